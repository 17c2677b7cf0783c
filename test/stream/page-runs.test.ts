import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import {
  PreemptDecoder,
  PreemptEncoder,
  StreamDecoder,
  StreamEncoder,
  TARGET_PAGE_SIZE,
  concatPieces,
  type KnownBlock,
  type PreemptRecord,
  type RamRunRecord,
  type StreamRecord,
} from '../../src/stream/index.js';
import { KIND_COUNT, Rng, chunksAt, mapMainRecords, mapPreemptRecords, mutate, randomCuts, type Mutation } from '../fuzz/mutate.js';
import { MAIN_STREAMS, decodeWhole } from './prefixes.js';
import { sameRecords } from './same-records.js';
import { decodeMainChunks, decodePreemptChunks, expandRuns, runsOf, type Decoded } from './runs.js';

/**
 * `pageRuns: true` (the destination's hot path): consecutive PAGE or ZERO
 * records of one block come as one run record whose pages are views into the
 * input chunk. Expanded, the runs must be exactly the per-page records, for
 * every capture and every chunking; and a bad stream must fail with the same
 * code at the same offset in both modes, after the same records.
 */
const FIX = join(import.meta.dirname, '..', 'fixtures');
const load = (f: string) => readFileSync(join(FIX, f));
const PAGE = TARGET_PAGE_SIZE;

/** Fixed chunk sizes: a page record exactly, one byte more, TLS records, socket reads, odd sizes. */
const CHUNK_SIZES = [997, PAGE + 8, PAGE + 9, 16 * 1024, 16 * 1024 + 5, 64 * 1024, 256 * 1024];

function fixedChunks(b: Uint8Array, size: number): Uint8Array[] {
  const out: Uint8Array[] = [];
  for (let at = 0; at < b.length; at += size) out.push(b.subarray(at, Math.min(b.length, at + size)));
  return out;
}

/** The chunkings every capture is decoded with: whole, fixed sizes, seeded single cuts and seeded cut sets. */
function chunkings(b: Uint8Array, map: Parameters<typeof randomCuts>[2], seed: number): { name: string; chunks: Uint8Array[] }[] {
  const rng = new Rng(seed);
  const out = [{ name: 'whole', chunks: [b] }];
  for (const size of CHUNK_SIZES) out.push({ name: `chunks of ${size}`, chunks: fixedChunks(b, size) });
  for (let i = 0; i < 24; i++) {
    const cut = rng.int(b.length + 1);
    out.push({ name: `split at ${cut}`, chunks: chunksAt(b, [cut]) });
  }
  for (let i = 0; i < 12; i++) {
    const cuts = randomCuts(rng, b.length, map);
    out.push({ name: `cut set ${i} (${cuts.length} cuts)`, chunks: chunksAt(b, cuts) });
  }
  return out;
}

/** Shape of every run: whole pages inside `data`, stride as documented, views into a pushed chunk when longer than one page. */
function checkRunShapes(runs: readonly RamRunRecord[], chunks: readonly Uint8Array[], blocks?: ReadonlyMap<string, KnownBlock>): void {
  // No copy: a run of several pages lies in the memory of a pushed chunk.
  const inPushed = (d: Uint8Array) => chunks.some((c) => c.buffer === d.buffer && d.byteOffset >= c.byteOffset && d.byteOffset + d.length <= c.byteOffset + c.length);
  for (const r of runs) {
    expect(r.count).toBeGreaterThanOrEqual(1);
    expect(r.handle.idstr).toBe(r.block);
    expect(r.offset + r.count * PAGE).toBeLessThanOrEqual(r.handle.length);
    if (blocks) expect(r.handle).toBe(blocks.get(r.block));
    if (r.type === 'ram-pages') {
      expect(r.stride).toBe(r.count === 1 ? PAGE : PAGE + 8);
      expect(r.start + (r.count - 1) * r.stride + PAGE).toBeLessThanOrEqual(r.data.length);
      if (r.count > 1) expect(inPushed(r.data), `run of ${r.count} at 0x${r.offset.toString(16)} in a pushed chunk`).toBe(true);
    }
  }
}

function expectSame(runs: Decoded, pages: Decoded, what: string): void {
  expect(runs.error, `${what}: error with runs vs per page`).toEqual(pages.error);
  const expanded = expandRuns(runs.records);
  expect(expanded.length, `${what}: pages with runs vs per page`).toBe(pages.records.length);
  expect(sameRecords(expanded, pages.records), `${what}: expanded runs vs per-page records`).toBe(true);
}

describe.each(MAIN_STREAMS)('page runs over fixture $file', ({ file }) => {
  const bytes = load(file);
  const reference = decodeWhole(bytes);
  const map = mapMainRecords(reference);
  const pageRecords = reference.filter((r) => r.type === 'ram-page' || r.type === 'ram-zero').length;

  it('expanded, equal the per-page records for every chunking', () => {
    const seed = 7 + file.length;
    for (const { name, chunks } of chunkings(bytes, map, seed)) {
      const runs = decodeMainChunks(chunks, true);
      expect(runs.error, name).toBeUndefined();
      expect(sameRecords(expandRuns(runs.records), reference), `${file} ${name}: expanded runs vs per-page records`).toBe(true);
      expect(runs.records.some((r) => (r as { type: string }).type === 'ram-page' || (r as { type: string }).type === 'ram-zero'), name).toBe(false);
      checkRunShapes(runsOf(runs.records), chunks);
    }
  });

  it('pushed whole, batch the pages (fewer records, handles from the block list)', () => {
    const d = new StreamDecoder({ pageRuns: true });
    const recs = [...d.push(bytes), ...d.end()];
    const runs = runsOf(recs);
    checkRunShapes(runs, [bytes], d.ramBlocks);
    expect(runs.reduce((s, r) => s + r.count, 0)).toBe(pageRecords);
    // A QEMU stream sends long stretches of one block: far fewer runs than pages.
    expect(runs.length).toBeLessThan(pageRecords / 4);
    // The handle's index is the block's position in the block list.
    const list = reference.find((r) => r.type === 'ram-blocks');
    expect(list?.type).toBe('ram-blocks');
    if (list?.type === 'ram-blocks') {
      expect([...d.ramBlocks.values()].map((b) => [b.idstr, b.index])).toEqual(list.blocks.map((b, i) => [b.idstr, i]));
    }
  });
});

describe('page runs over the preempt channel', () => {
  const main = new StreamDecoder();
  main.push(load('preempt-main.bin'));
  main.end();
  const blocks = main.ramBlocks;
  const raw = load('preempt-channel.bin');
  const reference = new PreemptDecoder(new Map(blocks)).push(raw);
  const map = mapPreemptRecords(reference);

  it('expanded, equal the per-page records for every chunking, and byte by byte', () => {
    const all = [...chunkings(raw, map, 11), { name: 'byte by byte', chunks: fixedChunks(raw, 1) }];
    for (const { name, chunks } of all) {
      const runs = decodePreemptChunks(chunks, blocks, true);
      expect(runs.error, name).toBeUndefined();
      expect(sameRecords(expandRuns(runs.records), reference), `preempt ${name}`).toBe(true);
      checkRunShapes(runsOf(runs.records), chunks);
    }
  });

  it('the handles are the main channel block list', () => {
    const d = new PreemptDecoder(blocks, { pageRuns: true });
    const runs = runsOf(d.push(raw));
    expect(runs.length).toBeGreaterThan(0);
    for (const r of runs) expect(r.handle).toBe(blocks.get(r.block));
  });
});

// ---- errors: same code at the same offset, after the same pages ---------------------------------

const mutations = fc.array(fc.tuple(fc.integer({ min: 0, max: KIND_COUNT - 1 }), fc.nat(), fc.nat()), { minLength: 1, maxLength: 5 }) as fc.Arbitrary<Mutation[]>;
const cutList = fc.array(fc.nat(), { maxLength: 8 });

describe('page runs on mutated captures', () => {
  const bases = ['paused-guest.bin', 'postcopy-main.bin', 'xbzrle.bin', 'multiblock.bin'].map((f) => {
    const bytes = load(f);
    return { bytes, map: mapMainRecords(decodeWhole(bytes)) };
  });

  it('main channel: the same error and the same pages as per page', () => {
    fc.assert(
      fc.property(fc.integer({ min: 0, max: bases.length - 1 }), mutations, cutList, (which, muts, cs) => {
        const base = bases[which]!;
        const b = mutate(base.bytes, muts, base.map);
        const chunks = chunksAt(b, cs);
        const opts = { maxDeviceSectionBytes: 1 << 20 };
        expectSame(decodeMainChunks(chunks, true, opts), decodeMainChunks(chunks, false, opts), 'mutated main');
      }),
      { numRuns: 300 },
    );
  });

  it('preempt channel: the same error and the same pages as per page', () => {
    const main = new StreamDecoder();
    main.push(load('preempt-main.bin'));
    const blocks = main.ramBlocks;
    const raw = load('preempt-channel.bin');
    const map = mapPreemptRecords(new PreemptDecoder(new Map(blocks)).push(raw));
    fc.assert(
      fc.property(mutations, cutList, (muts, cs) => {
        const chunks = chunksAt(mutate(raw, muts, map), cs);
        expectSame(decodePreemptChunks(chunks, blocks, true), decodePreemptChunks(chunks, blocks, false), 'mutated preempt');
      }),
      { numRuns: 300 },
    );
  });
});

// ---- synthetic page streams: runs that end at every kind of break -------------------------------

const BLOCKS = [
  { idstr: 'pc.ram', length: 12 * PAGE },
  { idstr: 'rom', length: 3 * PAGE },
];
const RAM = { sectionId: 2, idstr: 'ram', instanceId: 0, versionId: 4 } as const;
const PRELUDE: StreamRecord[] = [
  { type: 'header', version: 3 },
  { type: 'configuration', machineType: 'pc-q35-10.0' },
  { type: 'section', kind: 'start', ...RAM },
  { type: 'ram-blocks', total: BLOCKS.reduce((s, b) => s + b.length, 0), blocks: BLOCKS },
  { type: 'ram-eos' },
  { type: 'footer', sectionId: 2 },
];

/** A page step: block, how the offset moves, kind, whether to name the block though it is the last one. */
const pageStep = fc.record({
  block: fc.integer({ min: 0, max: 3 }).map((i) => (i === 3 ? 1 : 0)),
  move: fc.integer({ min: 0, max: 9 }), // 0–6: the next page; 7: same page again; 8: jump; 9: past the block's end
  zero: fc.boolean(),
  named: fc.integer({ min: 0, max: 5 }).map((i) => i === 0),
  sectionBreak: fc.integer({ min: 0, max: 11 }).map((i) => i === 0),
  jump: fc.nat(),
});

type PageStep = typeof pageStep extends fc.Arbitrary<infer T> ? T : never;

/** Per-page records from steps: consecutive offsets mostly, now and then a repeat, a jump, a page past the end or a section break. */
function pageStream(steps: readonly PageStep[]): StreamRecord[] {
  const recs: StreamRecord[] = [...PRELUDE, { type: 'section', kind: 'part', ...RAM }];
  const next = [0, 0];
  let last: string | undefined;
  let fill = 1;
  for (const s of steps) {
    const b = BLOCKS[s.block]!;
    if (s.sectionBreak) {
      recs.push({ type: 'ram-eos' }, { type: 'footer', sectionId: 2 }, { type: 'section', kind: 'part', ...RAM });
    }
    let offset = next[s.block]!;
    if (s.move === 7) offset = Math.max(0, offset - PAGE);
    else if (s.move === 8) offset = (s.jump % (b.length / PAGE)) * PAGE;
    else if (s.move === 9) offset = b.length; // the decoder refuses it: page-out-of-range
    if (offset >= b.length && s.move !== 9) offset = 0;
    next[s.block] = offset + PAGE;
    const continued = last === b.idstr && !s.named;
    last = b.idstr;
    if (s.zero) recs.push({ type: 'ram-zero', block: b.idstr, offset, continued });
    else recs.push({ type: 'ram-page', block: b.idstr, offset, continued, data: new Uint8Array(PAGE).fill(fill++ & 0xff) });
    if (s.move === 9) break;
  }
  recs.push({ type: 'ram-eos' }, { type: 'footer', sectionId: 2 }, { type: 'eof' });
  return recs;
}

function encodeMain(records: readonly StreamRecord[]): Buffer {
  const e = new StreamEncoder({ continueMode: 'as-recorded' });
  e.writeAll(records);
  return concatPieces(e.take());
}

describe('page runs over synthetic page streams', () => {
  it('break at block changes, named blocks, repeats, jumps, section ends, the block end and corrupt records as per page', () => {
    fc.assert(
      fc.property(
        fc.array(pageStep, { minLength: 1, maxLength: 40 }),
        fc.option(fc.tuple(fc.nat(), fc.integer({ min: 0, max: 255 })), { nil: undefined }),
        cutList,
        (steps, corrupt, cs) => {
          const b = encodeMain(pageStream(steps));
          const prelude = encodeMain(PRELUDE).length;
          // One byte set somewhere after the block list: a bad flag, offset, fill byte or name.
          if (corrupt) b[prelude + (corrupt[0] % (b.length - prelude))] = corrupt[1];
          const chunks = chunksAt(b, cs);
          expectSame(decodeMainChunks(chunks, true), decodeMainChunks(chunks, false), 'synthetic');
          expectSame(decodeMainChunks(chunks, true), decodeMainChunks([b], false), 'synthetic, per page whole');
        },
      ),
      { numRuns: 500 },
    );
  });

  it('a run ends where a zero page has a bad fill byte: the pages before it are yielded, then the error', () => {
    const recs: PreemptRecord[] = [0, 1, 2, 3].map((i) => ({ type: 'ram-zero', block: 'pc.ram', offset: i * PAGE, continued: i > 0 }));
    const e = new PreemptEncoder();
    for (const r of recs) e.write(r);
    const b = concatPieces(e.take());
    const badAt = b.length - 9; // the last record
    b[b.length - 1] = 7;
    const blocks = new Map<string, KnownBlock>([['pc.ram', { idstr: 'pc.ram', length: 16 * PAGE, index: 0 }]]);
    const d = new PreemptDecoder(blocks, { pageRuns: true });
    const out = d.push(b);
    expect(out).toEqual([{ type: 'ram-zeros', block: 'pc.ram', handle: blocks.get('pc.ram'), offset: 0, count: 3, continued: false }]);
    expect(d.error).toMatchObject({ code: 'bad-zero-fill', offset: badAt });
    expect(() => d.push(new Uint8Array(1))).toThrow(d.error);
  });

  it('a run stops at the end of a PACKAGED blob: the page that overruns it fails as per page', () => {
    const pkg: StreamRecord[] = [
      { type: 'section', kind: 'part', ...RAM },
      ...[0, 1, 2, 3].map((i): StreamRecord => ({ type: 'ram-page', block: 'pc.ram', offset: i * PAGE, continued: i > 0, data: new Uint8Array(PAGE).fill(i + 1) })),
      { type: 'ram-eos' },
      { type: 'footer', sectionId: 2 },
      { type: 'command', command: { cmd: 'postcopy-run' } },
    ];
    const head: StreamRecord[] = [...PRELUDE, { type: 'command', command: { cmd: 'postcopy-advise', pageSizeSummary: 0x1000n, targetPageSize: 0x1000n } }];
    const b = encodeMain([...head, { type: 'command', command: { cmd: 'packaged', length: 0 } }, ...pkg, { type: 'package-end' }, { type: 'eof' }]);
    const lengthField = encodeMain(head).length + 5; // 08, be16 cmd, be16 len, then the be32 blob length
    const inner = b.readUInt32BE(lengthField);
    // End the blob inside the third page's payload.
    const sectionPart = 1 + 4;
    const firstPage = 8 + 1 + 'pc.ram'.length + PAGE;
    b.writeUInt32BE(sectionPart + firstPage + (8 + PAGE) + 100, lengthField);
    expect(inner).toBeGreaterThan(b.readUInt32BE(lengthField));
    const pkgStart = lengthField + 4;
    for (const chunks of [[b], fixedChunks(b, 5000), chunksAt(b, [pkgStart + 3])]) {
      const runs = decodeMainChunks(chunks, true);
      expectSame(runs, decodeMainChunks(chunks, false), 'package');
      expect(runs.error?.code).toBe('package-overrun');
      expect(runsOf(runs.records).reduce((s, r) => s + r.count, 0)).toBe(2);
    }
  });
});
