import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { StreamDecoder, StreamError, type StreamRecord } from '../../src/stream/index.js';
import { Rng } from '../fuzz/mutate.js';
import { recordEnds } from './prefixes.js';
import { decodeSplit, encode, normalize, syntheticRecords } from './synthetic.js';

/**
 * The split points and prefix lengths tried: every record boundary and the 3
 * bytes on either side of it, plus 1,500 offsets drawn from a fixed seed. All
 * of them (tens of thousands, each a whole decode) took tens of seconds on a
 * busy machine; `npm run fuzz` chunks and truncates at random for longer.
 */
function sampledOffsets(records: readonly StreamRecord[], length: number): number[] {
  const picked = new Set<number>();
  for (const end of [0, ...recordEnds(records)]) for (let d = -3; d <= 3; d++) picked.add(end + d);
  const rng = new Rng(11);
  for (let i = 0; i < 1500; i++) picked.add(rng.u32() % (length + 1));
  return [...picked].filter((n) => n >= 0 && n <= length).sort((a, b) => a - b);
}

function expectStreamError(fn: () => unknown, code?: string): StreamError {
  try {
    fn();
  } catch (e) {
    expect(e).toBeInstanceOf(StreamError);
    if (code) expect((e as StreamError).code).toBe(code);
    return e as StreamError;
  }
  throw new Error('expected a StreamError');
}

describe.each([
  ['precopy', false],
  ['postcopy', true],
])('synthetic %s stream', (_name, postcopy) => {
  const records = syntheticRecords(7, { postcopy, pagesPerPass: 3 });
  const bytes = encode(records);
  const offsets = sampledOffsets(records, bytes.length);

  it('decodes to the records it was encoded from', () => {
    expect(normalize(decodeSplit(bytes))).toEqual(normalize(records));
  });

  it('re-encodes byte for byte', () => {
    expect(encode(decodeSplit(bytes)).equals(bytes)).toBe(true);
  });

  it('gives the same records for every record boundary ±3 and 1,500 seeded split points', () => {
    // Compared through the encoder (byte-exact) to keep this O(n) per split point.
    for (const cut of offsets.filter((n) => n > 0 && n < bytes.length)) {
      const again = encode(decodeSplit(bytes, [cut]));
      if (!again.equals(bytes)) expect.fail(`split at ${cut} decodes differently`);
    }
  });

  it('gives the same records fed byte by byte', () => {
    const cuts = Array.from({ length: bytes.length - 1 }, (_, i) => i + 1);
    expect(normalize(decodeSplit(bytes, cuts))).toEqual(normalize(records));
  });

  it('refuses the proper prefixes ending at every record boundary ±3 and 1,500 seeded ones as truncated, never yielding a wrong record', () => {
    const wholeCount = decodeSplit(bytes).length;
    for (const n of offsets.filter((o) => o < bytes.length)) {
      const d = new StreamDecoder();
      const got: StreamRecord[] = [];
      let error: StreamError | undefined;
      try {
        got.push(...d.push(bytes.subarray(0, n)));
        got.push(...d.end());
      } catch (e) {
        if (!(e instanceof StreamError)) throw e;
        error = e;
      }
      // Whatever came out is a prefix of the real record sequence.
      // (checked through the encoder: byte-exact and cheap)
      const again = encode(got);
      if (!bytes.subarray(0, again.length).equals(again)) expect.fail(`prefix ${n}: records differ from the stream`);
      const completeWithoutVmdesc = !postcopy && got.length === wholeCount - 1 && d.complete;
      if (!completeWithoutVmdesc) {
        expect(error?.code, `prefix ${n}`).toBe('truncated');
      }
    }
  });
});

describe('decode(encode(x)) = x for generated streams', () => {
  it('holds for random seeds and random chunking', () => {
    fc.assert(
      fc.property(fc.integer({ min: 1, max: 1_000_000 }), fc.boolean(), fc.array(fc.integer({ min: 1, max: 20_000 }), { maxLength: 8 }), (seed, postcopy, rawCuts) => {
        const records = syntheticRecords(seed, { postcopy });
        const bytes = encode(records);
        const cuts = [...new Set(rawCuts.map((c) => c % bytes.length))].filter((c) => c > 0).sort((a, b) => a - b);
        expect(normalize(decodeSplit(bytes, cuts))).toEqual(normalize(records));
      }),
      { numRuns: 60 },
    );
  });
});

describe('CONTINUE', () => {
  it("'auto' and 'never' encodings decode to the same pages", () => {
    const records = syntheticRecords(3);
    const strip = (rs: StreamRecord[]) => normalize(rs.map((r) => ('continued' in r ? { ...r, continued: false } : r)));
    expect(strip(decodeSplit(encode(records, 'never')))).toEqual(strip(records));
    expect(strip(decodeSplit(encode(records, 'auto')))).toEqual(strip(records));
    expect(encode(records, 'never').length).toBeGreaterThan(encode(records, 'auto').length);
  });

  it('survives section boundaries and is per channel', () => {
    const records = syntheticRecords(5);
    const decoded = decodeSplit(encode(records, 'auto'));
    const pages = decoded.filter((r) => r.type === 'ram-page' || r.type === 'ram-zero' || r.type === 'ram-xbzrle');
    // The first page of the second PART continues the block of the last page of the first PART.
    expect(pages.some((p, i) => i > 0 && 'continued' in p && p.continued)).toBe(true);
  });

  it('refuses CONTINUE on the first page of a channel', () => {
    const records = syntheticRecords(1);
    const bytes = encode(records);
    // Find the first page record (after the START footer) and set CONTINUE on it.
    const startFooter = bytes.indexOf(Buffer.from([0x7e, 0, 0, 0, 2]));
    const firstPart = startFooter + 5 + 5; // PART header
    const hdr = bytes.readUInt32BE(firstPart + 4);
    const mutated = Buffer.from(bytes);
    mutated.writeUInt32BE(hdr | 0x20, firstPart + 4);
    const e = expectStreamError(() => decodeSplit(mutated), 'continue-without-block');
    expect(e.offset).toBe(firstPart);
    expect(e.section?.idstr).toBe('ram');
  });
});

describe('bad input', () => {
  const good = encode(syntheticRecords(11));

  it('wrong magic', () => {
    const b = Buffer.from(good);
    b[0] = 0x51 ^ 0xff;
    const e = expectStreamError(() => decodeSplit(b), 'bad-magic');
    expect(e.offset).toBe(0);
    expect(e.describe()).toMatch(/^bad-magic at offset 0: /);
  });

  it('v2 stream', () => {
    const b = Buffer.from(good);
    b.writeUInt32BE(2, 4);
    expect(expectStreamError(() => decodeSplit(b), 'unsupported-version').offset).toBe(4);
  });

  it('unknown section id in PART', () => {
    const b = Buffer.from(good);
    const at = b.indexOf(Buffer.from([0x02, 0, 0, 0, 2]));
    b.writeUInt32BE(99, at + 1);
    const e = expectStreamError(() => decodeSplit(b), 'unknown-section');
    expect(e.offset).toBe(at);
  });

  it('unknown command and bad command length', () => {
    const cmdAt = good.indexOf(Buffer.from([0x08, 0, 1, 0, 0]));
    const b = Buffer.from(good);
    b.writeUInt16BE(12, cmdAt + 1);
    expect(expectStreamError(() => decodeSplit(b), 'unknown-command').offset).toBe(cmdAt);
    const c = Buffer.from(good);
    c.writeUInt16BE(3, cmdAt + 3);
    expect(expectStreamError(() => decodeSplit(c), 'bad-command-length').offset).toBe(cmdAt);
  });

  it('oversized lengths are refused before their bytes are awaited', () => {
    // A PACKAGED blob claiming 4 GiB: refused at once, nothing buffered.
    const head = encode([{ type: 'header', version: 3 }, { type: 'configuration', machineType: 'pc-q35-10.0' }]);
    const pkg = Buffer.concat([head, Buffer.from([0x08, 0, 7, 0, 4, 0xff, 0xff, 0xff, 0xff])]);
    const d = new StreamDecoder();
    // The records before it are returned; the error is known at once and thrown by the next call.
    expect(d.push(pkg).map((r) => r.type)).toEqual(['header', 'configuration']);
    expect(d.error?.code).toBe('length-too-large');
    expect(expectStreamError(() => d.end(), 'length-too-large').offset).toBe(head.length);
    // A VM description claiming 4 GiB.
    const v = Buffer.concat([head, Buffer.from([0x00, 0x06, 0xff, 0xff, 0xff, 0xf0])]);
    const dv = new StreamDecoder();
    dv.push(v);
    expect(expectStreamError(() => dv.push(Buffer.alloc(1)), 'length-too-large').offset).toBe(head.length + 1);
  });

  it('a device section without footer fails within its bound instead of growing', () => {
    const head = encode([
      { type: 'header', version: 3 },
      { type: 'configuration', machineType: 'pc-q35-10.0' },
      { type: 'section', kind: 'full', sectionId: 4, idstr: 'dev', instanceId: 0, versionId: 1 },
    ]);
    const d = new StreamDecoder({ maxDeviceSectionBytes: 64 * 1024 });
    d.push(head);
    const junk = Buffer.alloc(16 * 1024, 0x55);
    let err: unknown;
    for (let i = 0; i < 100 && !err; i++) {
      try {
        d.push(junk);
      } catch (e) {
        err = e;
      }
    }
    expect(err).toBeInstanceOf(StreamError);
    expect((err as StreamError).code).toBe('device-boundary-not-found');
    expect((err as StreamError).offset).toBe(head.length);
  });

  it('zero page with a non-zero fill byte', () => {
    const recs = syntheticRecords(2);
    const b = encode(recs);
    // A ZERO|CONTINUE record: be64 with low byte 0x22, then the fill byte.
    let at = -1;
    for (let i = 0; i + 9 <= b.length; i++) {
      if ((b[i + 7]! & 0xff) === 0x22 && b[i + 6]! % 16 === 0 && b[i + 8] === 0 && b.readUInt32BE(i) === 0) {
        at = i;
        break;
      }
    }
    expect(at).toBeGreaterThan(0);
    const m = Buffer.from(b);
    m[at + 8] = 1;
    expectStreamError(() => decodeSplit(m), 'bad-zero-fill');
  });

  it('device sizes are checked against the VM description', () => {
    const recs = syntheticRecords(4);
    const vm = recs.findIndex((r) => r.type === 'vmdesc');
    const json = JSON.parse(new TextDecoder().decode((recs[vm] as { json: Uint8Array }).json));
    json.devices[1].fields[0].size = 299;
    const bad = [...recs.slice(0, vm), { type: 'vmdesc', json: new TextEncoder().encode(JSON.stringify(json)) } as StreamRecord];
    expectStreamError(() => decodeSplit(encode(bad)), 'device-size-mismatch');
  });

  it('exact device sizes delimit payloads that the footer rule would split', () => {
    // A payload that contains its own footer followed by a plausible FULL header.
    const fake = Buffer.concat([Buffer.from([1, 2, 3, 0x7e, 0, 0, 0, 9, 0x04, 0, 0, 0, 10, 3]), Buffer.from('abc'), Buffer.alloc(8), Buffer.from([7, 7])]);
    const recs: StreamRecord[] = [
      { type: 'header', version: 3 },
      { type: 'configuration', machineType: 'pc-q35-10.0' },
      { type: 'section', kind: 'full', sectionId: 9, idstr: 'tricky', instanceId: 0, versionId: 1 },
      { type: 'device-state', sectionId: 9, idstr: 'tricky', instanceId: 0, versionId: 1, kind: 'full', data: fake },
      { type: 'footer', sectionId: 9 },
      { type: 'eof' },
    ];
    const bytes = encode(recs);
    // Heuristic alone is fooled (documented): it fails rather than yielding junk silently.
    expect(() => decodeSplit(bytes)).toThrow(StreamError);
    // With the size from a VM description it is exact.
    expect(normalize(decodeSplit(bytes, [], { deviceSizes: [{ name: 'tricky', instanceId: 0, size: fake.length }] }))).toEqual(normalize(recs));
  });
});

describe('fuzz: mutated streams only ever raise StreamError', () => {
  const bases = [encode(syntheticRecords(21)), encode(syntheticRecords(22, { postcopy: true }))];
  it('bit flips, truncations, splices and extreme lengths', () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 0, max: 1 }),
        fc.array(fc.tuple(fc.nat(), fc.integer({ min: 0, max: 4 }), fc.nat()), { minLength: 1, maxLength: 6 }),
        fc.array(fc.integer({ min: 1, max: 5000 }), { maxLength: 4 }),
        (which, mutations, cuts) => {
          let b = Buffer.from(bases[which]!);
          for (const [pos, kind, val] of mutations) {
            const p = pos % b.length;
            if (kind === 0) b[p]! ^= 1 << (val % 8);
            else if (kind === 1) b = b.subarray(0, p);
            else if (kind === 2) b.fill(0xff, p, Math.min(b.length, p + 4));
            else if (kind === 3) b = Buffer.concat([b.subarray(0, p), b.subarray((p + val) % b.length)]);
            else b[p] = val & 0xff;
            if (b.length === 0) break;
          }
          const sorted = [...new Set(cuts.map((c) => c % Math.max(1, b.length)))].filter((c) => c > 0).sort((x, y) => x - y);
          try {
            decodeSplit(b, sorted);
          } catch (e) {
            if (!(e instanceof StreamError)) throw e;
          }
        },
      ),
      { numRuns: 3000 },
    );
  });
});
