import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import {
  PreemptDecoder,
  PreemptEncoder,
  StreamDecoder,
  StreamEncoder,
  TARGET_PAGE_SIZE,
  concatPieces,
  isZeroPage,
  type PreemptRecord,
  type RamBlockInfo,
  type StreamRecord,
} from '../../src/stream/index.js';
import { expandRuns } from './runs.js';
import { sameRecords } from './same-records.js';

/**
 * StreamEncoder/PreemptEncoder.writePages(block, offset, count, data, start):
 * the source's batch path. Its bytes must be exactly those of write() given
 * the per-page records (PAGE, or ZERO for an all-zero page) for any block
 * list, offsets, zero patterns, CONTINUE state across calls, blocks, section
 * boundaries and resets; misuse throws a typed error at the call and writes
 * nothing.
 */
const PAGE = TARGET_PAGE_SIZE;
const RAM = { sectionId: 2, idstr: 'ram', instanceId: 0, versionId: 4 } as const;

/** Page contents: zero, random-looking, zero at both ends but not inside, zero but the last byte. */
type PageKind = 0 | 1 | 2 | 3;
function fillPage(into: Uint8Array, at: number, kind: PageKind, seed: number): void {
  into.fill(0, at, at + PAGE);
  if (kind === 1) for (let i = 0; i < PAGE; i += 61) into[at + i] = (seed + i) | 1;
  if (kind === 2) into[at + 1 + (seed % (PAGE - 2))] = 0x5a;
  if (kind === 3) into[at + PAGE - 1] = 1;
}

const blockName = fc.constantFrom('pc.ram', 'pc.bios', '/rom@etc/acpi/tables', 'x', 'ram-node1');
const blockList = fc.uniqueArray(fc.record({ idstr: blockName, pages: fc.integer({ min: 1, max: 10 }) }), { minLength: 1, maxLength: 3, selector: (b) => b.idstr });

type Op =
  | { op: 'pages'; block: number; first: number; count: number; kinds: PageKind[]; pad: number; seed: number }
  | { op: 'record'; block: number; page: number; kind: PageKind }
  | { op: 'section' }
  | { op: 'reset' }
  | { op: 'take' };

const op: fc.Arbitrary<Op> = fc.oneof(
  { weight: 6, arbitrary: fc.record({ op: fc.constant('pages' as const), block: fc.nat(), first: fc.nat(), count: fc.integer({ min: 1, max: 10 }), kinds: fc.array(fc.constantFrom<PageKind>(0, 1, 2, 3), { minLength: 10, maxLength: 10 }), pad: fc.integer({ min: 0, max: 17 }), seed: fc.nat(255) }) },
  { weight: 1, arbitrary: fc.record({ op: fc.constant('record' as const), block: fc.nat(), page: fc.nat(), kind: fc.constantFrom<PageKind>(0, 1) }) },
  { weight: 1, arbitrary: fc.constant({ op: 'section' as const }) },
  { weight: 1, arbitrary: fc.constant({ op: 'reset' as const }) },
  { weight: 1, arbitrary: fc.constant({ op: 'take' as const }) },
);

interface Writer {
  write(r: StreamRecord & PreemptRecord): void;
  writePages(block: string, offset: number, count: number, data: Uint8Array, start?: number): { normal: number; zero: number };
  resetContinue(): void;
  take(): Uint8Array[];
}

/**
 * Runs `ops` on `batch` (with writePages) and `single` (the same pages as
 * write() records); `section` ops only where `sections` (the main channel).
 * Returns both outputs.
 */
function play(blocks: readonly RamBlockInfo[], ops: readonly Op[], batch: Writer, single: Writer, sections: boolean): { batch: Buffer; single: Buffer; normal: number; zero: number } {
  const outA: Uint8Array[] = [];
  const outB: Uint8Array[] = [];
  let normal = 0;
  let zero = 0;
  let expectNormal = 0;
  for (const o of ops) {
    switch (o.op) {
      case 'pages': {
        const b = blocks[o.block % blocks.length]!;
        const pages = b.length / PAGE;
        const first = o.first % pages;
        const count = Math.min(o.count, pages - first);
        const data = new Uint8Array(o.pad + count * PAGE + 5).fill(0xcc);
        for (let i = 0; i < count; i++) fillPage(data, o.pad + i * PAGE, o.kinds[i]!, o.seed + i);
        const got = batch.writePages(b.idstr, first * PAGE, count, data, o.pad);
        normal += got.normal;
        zero += got.zero;
        for (let i = 0; i < count; i++) {
          const page = data.subarray(o.pad + i * PAGE, o.pad + (i + 1) * PAGE);
          const offset = (first + i) * PAGE;
          if (isZeroPage(page)) single.write({ type: 'ram-zero', block: b.idstr, offset, continued: false });
          else {
            single.write({ type: 'ram-page', block: b.idstr, offset, continued: false, data: page });
            expectNormal++;
          }
        }
        break;
      }
      case 'record': {
        const b = blocks[o.block % blocks.length]!;
        const offset = (o.page % (b.length / PAGE)) * PAGE;
        const r: StreamRecord & PreemptRecord =
          o.kind === 0 ? { type: 'ram-zero', block: b.idstr, offset, continued: false } : { type: 'ram-page', block: b.idstr, offset, continued: false, data: new Uint8Array(PAGE).fill(9) };
        batch.write(r);
        single.write(r);
        break;
      }
      case 'section':
        if (!sections) break;
        for (const w of [batch, single]) {
          w.write({ type: 'ram-eos' } as never);
          w.write({ type: 'footer', sectionId: 2 } as never);
          w.write({ type: 'section', kind: 'part', ...RAM } as never);
        }
        break;
      case 'reset':
        batch.resetContinue();
        single.resetContinue();
        break;
      case 'take':
        outA.push(...batch.take());
        outB.push(...single.take());
        break;
    }
  }
  outA.push(...batch.take());
  outB.push(...single.take());
  expect(normal).toBe(expectNormal);
  return { batch: concatPieces(outA), single: concatPieces(outB), normal, zero };
}

const toInfo = (bl: { idstr: string; pages: number }[]): RamBlockInfo[] => bl.map((b) => ({ idstr: b.idstr, length: b.pages * PAGE }));

function mainPrelude(blocks: readonly RamBlockInfo[]): StreamRecord[] {
  return [
    { type: 'header', version: 3 },
    { type: 'configuration', machineType: 'pc-q35-10.0' },
    { type: 'section', kind: 'start', ...RAM },
    { type: 'ram-blocks', total: blocks.reduce((s, b) => s + b.length, 0), blocks },
    { type: 'ram-eos' },
    { type: 'footer', sectionId: 2 },
    { type: 'section', kind: 'part', ...RAM },
  ];
}

describe('writePages', () => {
  it.each(['auto', 'never'] as const)('main channel (continueMode %s): the bytes of write() with per-page records', (continueMode) => {
    fc.assert(
      fc.property(blockList, fc.array(op, { minLength: 1, maxLength: 25 }), (bl, ops) => {
        const blocks = toInfo(bl);
        const a = new StreamEncoder({ continueMode, slabSize: 256 });
        const b = new StreamEncoder({ continueMode, slabSize: 256 });
        a.writeAll(mainPrelude(blocks));
        b.writeAll(mainPrelude(blocks));
        const out = play(blocks, ops, a as unknown as Writer, b as unknown as Writer, true);
        expect(out.batch.equals(out.single)).toBe(true);
        // And the decoder reads back the pages written (through its run path too).
        const tail: StreamRecord[] = [{ type: 'ram-eos' }, { type: 'footer', sectionId: 2 }, { type: 'eof' }];
        a.writeAll(tail);
        const bytes = Buffer.concat([out.batch, concatPieces(a.take())]);
        const perPage = new StreamDecoder();
        const recs = [...perPage.push(bytes), ...perPage.end()];
        const runs = new StreamDecoder({ pageRuns: true });
        expect(sameRecords(expandRuns([...runs.push(bytes), ...runs.end()]), recs)).toBe(true);
        expect(recs.filter((r) => r.type === 'ram-page').length).toBeGreaterThanOrEqual(out.normal);
      }),
      { numRuns: 300 },
    );
  });

  it('preempt channel, blocks shared live with the main encoder: the bytes of write() with per-page records', () => {
    fc.assert(
      fc.property(blockList, fc.array(op, { minLength: 1, maxLength: 25 }), (bl, ops) => {
        const blocks = toInfo(bl);
        const main = new StreamEncoder();
        // Made before the main channel sent its block list, as a source does.
        const a = new PreemptEncoder({ blocks: main.blocks, slabSize: 128 });
        const b = new PreemptEncoder();
        main.writeAll(mainPrelude(blocks));
        const out = play(blocks, ops, a as unknown as Writer, b as unknown as Writer, false);
        expect(out.batch.equals(out.single)).toBe(true);
        const known = new StreamDecoder();
        known.push(concatPieces(main.take()));
        const d = new PreemptDecoder(known.ramBlocks);
        const got = d.push(out.batch);
        d.end();
        expect(got.filter((r) => r.type === 'ram-zero').length).toBeGreaterThanOrEqual(out.zero);
      }),
      { numRuns: 200 },
    );
  });

  it('long batches: zero stretches longer than one compare, broken by pages zero only at their ends', () => {
    fc.assert(
      fc.property(fc.array(fc.tuple(fc.constantFrom<PageKind>(0, 1, 2, 3), fc.integer({ min: 1, max: 40 })), { minLength: 1, maxLength: 8 }), fc.nat(255), (stretches, seed) => {
        const kinds = stretches.flatMap(([k, n]) => Array.from({ length: n }, () => k));
        const blocks = [{ idstr: 'pc.ram', length: kinds.length * PAGE }];
        const ops: Op[] = [{ op: 'pages', block: 0, first: 0, count: kinds.length, kinds, pad: 3, seed }];
        const a = new StreamEncoder();
        const b = new StreamEncoder();
        a.writeAll(mainPrelude(blocks));
        b.writeAll(mainPrelude(blocks));
        const out = play(blocks, ops, a as unknown as Writer, b as unknown as Writer, true);
        expect(out.batch.equals(out.single)).toBe(true);
        expect(out.zero).toBe(kinds.filter((k) => k === 0).length);
      }),
      { numRuns: 200 },
    );
  });

  it('counts PAGE and ZERO pages, and holds page payloads by reference', () => {
    const enc = new StreamEncoder();
    enc.writeAll(mainPrelude([{ idstr: 'pc.ram', length: 8 * PAGE }]));
    enc.take();
    const data = new Uint8Array(4 * PAGE);
    data[PAGE + 7] = 1;
    data[3 * PAGE] = 2;
    expect(enc.writePages('pc.ram', 2 * PAGE, 4, data)).toEqual({ normal: 2, zero: 2 });
    const pieces = enc.take();
    const views = pieces.filter((p) => p.buffer === data.buffer);
    expect(views.map((v) => [v.byteOffset, v.length])).toEqual([
      [PAGE, PAGE],
      [3 * PAGE, PAGE],
    ]);
  });

  it('takes the block list from `blocks` (a list) for a channel that does not send it', () => {
    const a = new StreamEncoder({ blocks: [{ idstr: 'pc.ram', length: 4 * PAGE }] });
    expect(a.blocks.get('pc.ram')).toEqual({ idstr: 'pc.ram', length: 4 * PAGE, index: 0 });
    expect(a.writePages('pc.ram', 0, 4, new Uint8Array(4 * PAGE))).toEqual({ normal: 0, zero: 4 });
    const p = new PreemptEncoder();
    p.setBlocks([
      { idstr: 'a', length: PAGE },
      { idstr: 'b', length: PAGE },
    ]);
    expect(p.blocks.get('b')?.index).toBe(1);
    expect(p.writePages('b', 0, 1, new Uint8Array(PAGE))).toEqual({ normal: 0, zero: 1 });
  });
});

describe('writePages misuse', () => {
  const fresh = () => {
    const enc = new StreamEncoder();
    enc.writeAll(mainPrelude([{ idstr: 'pc.ram', length: 8 * PAGE }, { idstr: 'rom', length: PAGE }]));
    enc.writePages('pc.ram', 0, 1, new Uint8Array(PAGE).fill(1)); // the channel's last block is pc.ram
    enc.take();
    return enc;
  };
  const page = new Uint8Array(2 * PAGE);
  const cases: [string, (e: StreamEncoder) => unknown, string, string, RegExp][] = [
    ['unknown block', (e) => e.writePages('pc.rom', 0, 1, page), 'unknown-ram-block', 'block', /"pc\.rom".*"pc\.ram", "rom"/],
    ['unaligned offset', (e) => e.writePages('pc.ram', 100, 1, page), 'unaligned-offset', 'offset', /0x64.*"pc\.ram"/],
    ['negative offset', (e) => e.writePages('pc.ram', -PAGE, 1, page), 'page-out-of-range', 'offset', /-4096.*"pc\.ram"/],
    ['fractional offset', (e) => e.writePages('pc.ram', 0.5, 1, page), 'page-out-of-range', 'offset', /0\.5/],
    ['offset at the end', (e) => e.writePages('pc.ram', 8 * PAGE, 1, page), 'page-out-of-range', 'offset', /0x8000.*"pc\.ram" of 0x8000/],
    ['count past the end', (e) => e.writePages('pc.ram', 7 * PAGE, 2, page), 'page-out-of-range', 'offset', /2 pages at 0x7000.*"pc\.ram"/],
    ['count 0', (e) => e.writePages('pc.ram', 0, 0, page), 'bad-option', 'count', /count 0 at 0x0 of block "pc\.ram"/],
    ['count negative', (e) => e.writePages('pc.ram', 0, -1, page), 'bad-option', 'count', /count -1/],
    ['count fractional', (e) => e.writePages('pc.ram', 0, 1.5, page), 'bad-option', 'count', /count 1\.5/],
    ['data too short', (e) => e.writePages('pc.ram', 0, 3, page), 'bad-option', 'data', /3 pages at 0x0.*"pc\.ram".*12288.*8192/],
    ['data too short from start', (e) => e.writePages('pc.ram', 0, 2, page, 1), 'bad-option', 'data', /from 1/],
    ['negative start', (e) => e.writePages('pc.ram', 0, 1, page, -1), 'bad-option', 'data', /from -1/],
  ];

  it.each(cases)('%s: a RangeError with a code, naming block and offset; nothing written, CONTINUE state kept', (_name, call, code, option, message) => {
    const enc = fresh();
    let err: unknown;
    try {
      call(enc);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(RangeError);
    expect(err).toMatchObject({ code, option });
    expect((err as Error).message).toMatch(message);
    expect(enc.pendingBytes).toBe(0);
    // The next page still continues pc.ram, as if the call had not been made.
    const ok = fresh();
    enc.writePages('pc.ram', PAGE, 1, page);
    ok.writePages('pc.ram', PAGE, 1, page);
    expect(concatPieces(enc.take()).equals(concatPieces(ok.take()))).toBe(true);
  });

  it('a preempt encoder without a block list says so', () => {
    const p = new PreemptEncoder();
    expect(() => p.writePages('pc.ram', 0, 1, page)).toThrow(expect.objectContaining({ code: 'unknown-ram-block', message: expect.stringMatching(/no block list/) }));
    expect(p.take()).toEqual([]);
  });
});
