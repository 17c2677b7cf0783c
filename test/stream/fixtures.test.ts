import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import {
  PreemptDecoder,
  ReturnPathDecoder,
  StreamDecoder,
  StreamEncoder,
  StreamSummary,
  concatPieces,
  type StreamRecord,
} from '../../src/stream/index.js';
import { MAIN_STREAMS, checkPrefixes, decodeWhole, prefixSample } from './prefixes.js';
import { sameRecords } from './same-records.js';

/**
 * Golden captures from QEMU 10.0.2 (test/fixtures/README.md says how they were
 * made). Each is decoded whole, byte by byte, at chosen split points, ended at
 * sampled prefixes (at every prefix: `npm run fuzz:prefixes`), re-encoded, and
 * checked against QEMU's own counters.
 */
const DIR = join(import.meta.dirname, '..', 'fixtures');

interface Sidecar {
  files: Record<string, { name: string; bytes: number }>;
  source: {
    queryMigrate: { ram: { normal: number; duplicate: number; 'postcopy-requests': number }; 'xbzrle-cache'?: { pages: number; bytes: number } };
    ramBlocks: { name: string; usedLength: number }[];
  };
}


const load = (name: string) => readFileSync(join(DIR, name));
const sidecar = (name: string) => JSON.parse(readFileSync(join(DIR, name), 'utf8')) as Sidecar;

/**
 * Prefixes ended per capture: every non-RAM record boundary (±1) plus a seeded
 * sample; `npm run fuzz:prefixes` ends at every prefix. PREFIX_SEED=N draws
 * another sample.
 */
const PREFIX_SEED = Number(process.env.PREFIX_SEED ?? 1);
const PREFIX_SAMPLE = { ramBoundaries: 400, anywhere: 1500 };

describe.each(MAIN_STREAMS)('fixture $file', ({ file, sidecar: sc, postcopy }) => {
  const bytes = load(file);
  const facts = sidecar(sc);
  const reference = decodeWhole(bytes);

  it('re-encodes byte for byte (CONTINUE set as QEMU sets it)', () => {
    const enc = new StreamEncoder();
    enc.writeAll(reference);
    expect(concatPieces(enc.take()).equals(bytes)).toBe(true);
  });

  it("matches QEMU's own counters and RAM blocks", () => {
    const s = new StreamSummary();
    s.add(reference, bytes.length);
    const r = s.report;
    const ram = facts.source.queryMigrate.ram;
    if (file === 'preempt-main.bin') {
      // The rest of the normal pages travelled on the preempt channel (checked below).
      expect(r.pages.normal).toBeLessThan(ram.normal);
    } else {
      expect(r.pages.normal).toBe(ram.normal);
    }
    expect(r.pages.zero).toBe(ram.duplicate);
    expect(r.ramBlocks.map((b) => [b.idstr, b.length])).toEqual(facts.source.ramBlocks.map((b) => [b.name, b.usedLength]));
    const xb = facts.source.queryMigrate['xbzrle-cache'];
    if (xb) {
      // QEMU counts unchanged pages it skipped as XBZRLE pages too; the bytes are exact.
      let encodedBytes = 0;
      for (const rec of reference) if (rec.type === 'ram-xbzrle') encodedBytes += (rec.continued ? 0 : 1 + rec.block.length) + 3 + rec.encoded.length;
      expect(encodedBytes).toBe(xb.bytes);
      expect(r.pages.xbzrle).toBeGreaterThan(0);
      expect(r.pages.xbzrle).toBeLessThanOrEqual(xb.pages);
    }
    expect(r.eof).toBe(true);
    if (postcopy) {
      expect(r.vmdescBytes).toBeUndefined();
      expect(r.devices.every((d) => d.packaged)).toBe(true);
    } else {
      expect(r.vmdescBytes).toBeGreaterThan(0);
    }
  });

  it(`gives the same records fed byte by byte, and ending at sampled prefixes is truncated (seed ${PREFIX_SEED})`, () => {
    const endAt = prefixSample(reference, bytes.length, PREFIX_SEED, PREFIX_SAMPLE);
    const { ended, completions } = checkPrefixes(bytes, reference, endAt);
    expect(ended).toBeGreaterThan(PREFIX_SAMPLE.anywhere);
    // Only the complete stream, or a precopy stream cut right after EOF (before the VM description), ends cleanly.
    expect(completions).toBe(postcopy ? 1 : 2);
  });

  it('gives the same records for random chunkings', () => {
    fc.assert(
      fc.property(fc.array(fc.integer({ min: 1, max: bytes.length - 1 }), { minLength: 1, maxLength: 40 }), (raw) => {
        const cuts = [...new Set(raw)].sort((a, b) => a - b);
        const d = new StreamDecoder();
        const out: StreamRecord[] = [];
        let prev = 0;
        for (const c of [...cuts, bytes.length]) {
          out.push(...d.push(bytes.subarray(prev, c)));
          prev = c;
        }
        out.push(...d.end());
        expect(sameRecords(out, reference)).toBe(true);
      }),
      { numRuns: 25 },
    );
  });
});

describe('preempt channel and return path fixtures', () => {
  it('preempt channel: bare page records that complete the main channel, CONTINUE of its own', () => {
    const main = new StreamDecoder();
    main.push(load('preempt-main.bin'));
    main.end();
    const raw = load('preempt-channel.bin');
    const pre = new PreemptDecoder(main.ramBlocks);
    const recs = pre.push(raw);
    pre.end();
    const facts = sidecar('preempt.json');
    const mainPages = decodeWhole(load('preempt-main.bin')).filter((r) => r.type === 'ram-page').length;
    expect(recs.every((r) => r.type === 'ram-page' || r.type === 'ram-zero')).toBe(true);
    expect(mainPages + recs.filter((r) => r.type === 'ram-page').length).toBe(facts.source.queryMigrate.ram.normal);
    expect(recs[0]).toMatchObject({ type: 'ram-page', continued: false });
    // byte by byte gives the same
    const bb = new PreemptDecoder(main.ramBlocks);
    const again: typeof recs = [];
    for (let i = 0; i < raw.length; i++) again.push(...bb.push(raw.subarray(i, i + 1)));
    bb.end();
    expect(sameRecords(again as StreamRecord[], recs as StreamRecord[])).toBe(true);
    // every page request on the return path was answered on the preempt channel or the main channel
    const rp = new ReturnPathDecoder().push(load('preempt-rp.bin'));
    const requests = rp.filter((m) => m.type === 'req-pages' || m.type === 'req-pages-id');
    expect(requests.length).toBe(facts.source.queryMigrate.ram['postcopy-requests']);
    // a truncated preempt channel is refused as truncated
    const t = new PreemptDecoder(main.ramBlocks);
    t.push(raw.subarray(0, 100));
    expect(() => t.end()).toThrow(expect.objectContaining({ code: 'truncated' }));
  });

  it.each([
    ['returnpath-rp.bin', 'returnpath.json'],
    ['postcopy-rp.bin', 'postcopy.json'],
    ['preempt-rp.bin', 'preempt.json'],
  ])('return path %s: PONGs, requests and SHUT 0', (file, sc) => {
    const raw = load(file);
    const whole = new ReturnPathDecoder().push(raw);
    const bb = new ReturnPathDecoder();
    const again = [];
    for (let i = 0; i < raw.length; i++) {
      again.push(...bb.push(raw.subarray(i, i + 1)));
      if (i < raw.length - 1) expect(() => bb.end.call(Object.create(bb))).not.toThrow(TypeError);
    }
    expect(again).toEqual(whole);
    expect(whole[0]).toEqual({ type: 'pong', value: 1 });
    expect(whole[whole.length - 1]).toEqual({ type: 'shut', value: 0 });
    const facts = sidecar(sc);
    expect(whole.filter((m) => m.type === 'req-pages' || m.type === 'req-pages-id').length).toBe(facts.source.queryMigrate.ram['postcopy-requests']);
    // Every proper prefix that ends inside a message is truncated.
    let boundary = 0;
    for (let n = 1; n < raw.length; n++) {
      const d = new ReturnPathDecoder();
      const got = d.push(raw.subarray(0, n));
      let err: unknown;
      try {
        d.end();
      } catch (e) {
        err = e;
      }
      if (err === undefined) boundary++;
      else expect(err).toMatchObject({ code: 'truncated' });
      expect(got).toEqual(whole.slice(0, got.length));
    }
    expect(boundary).toBe(whole.length - 1);
  });
});
