import { describe, expect, it } from 'vitest';
import {
  MULTIFD_INIT_BYTES,
  MULTIFD_PACKET_PAGES,
  MultifdDecoder,
  MultifdFlag,
  StreamError,
  encodeMultifdInit,
  encodeMultifdPacketHeader,
  forEachOffsetRun,
  multifdPacketHeaderLength,
  type KnownBlock,
  type MultifdDecoderOptions,
  type MultifdPacketHeaderFields,
  type MultifdRecord,
} from '../../src/stream/index.js';

/**
 * The multifd codec on synthetic channels built with its own encoder; the
 * layout is pinned by hand-written offsets (not by the encoder) so that a
 * wrong field cannot pass both ways. Captures from QEMU are in
 * multifd-fixtures.test.ts.
 */

const PAGE = 4096;
const HEADER = multifdPacketHeaderLength(MULTIFD_PACKET_PAGES);
const BLOCKS: KnownBlock[] = [
  { idstr: 'pc.ram', length: 32 * 1024 * 1024, index: 0 },
  { idstr: '/rom@etc/acpi/tables', length: 128 * 1024, index: 1 },
];

function be32(b: Uint8Array, at: number): number {
  return new DataView(b.buffer, b.byteOffset, b.byteLength).getUint32(at);
}
function setBe32(b: Uint8Array, at: number, v: number): void {
  new DataView(b.buffer, b.byteOffset, b.byteLength).setUint32(at, v);
}
function concat(parts: readonly Uint8Array[]): Uint8Array {
  return new Uint8Array(Buffer.concat(parts));
}

/** Page data whose every byte says which page it is (page i of a packet: byte i+1). */
function pageBytes(n: number, seed: number): Uint8Array {
  const b = new Uint8Array(n * PAGE);
  for (let i = 0; i < n; i++) b.fill((seed * 31 + i + 1) & 0xff, i * PAGE, (i + 1) * PAGE);
  return b;
}

interface Pkt extends Omit<MultifdPacketHeaderFields, 'pagesAlloc'> {
  pagesAlloc?: number;
}
function packet(p: Pkt, seed = 0): Uint8Array {
  const h = encodeMultifdPacketHeader({ pagesAlloc: MULTIFD_PACKET_PAGES, ...p });
  const n = p.normalCount ?? p.normal.length;
  return n === 0 ? h : concat([h, pageBytes(n, seed)]);
}
const sync = (num: bigint) => packet({ flags: MultifdFlag.SYNC, packetNum: num, block: '', normal: [], zero: [] });

/** A channel as QEMU sends it: init, the setup SYNC, page packets, a SYNC. */
function channel(id = 1): Uint8Array {
  return concat([
    encodeMultifdInit(id),
    sync(0n),
    packet({ flags: 0, packetNum: 3n, block: 'pc.ram', normal: [0x1000, 0x2000, 0x3000, 0x9000], zero: [0x5000, 0x4000] }, 1),
    packet({ flags: 0, packetNum: 7n, block: '/rom@etc/acpi/tables', normal: [0x0], zero: [] }, 2),
    packet({ flags: 0, packetNum: 8n, block: 'pc.ram', normal: [], zero: [0x10000, 0x11000] }),
    sync(12n),
  ]);
}

interface Outcome {
  records: unknown[];
  error: { code: string; offset: number } | undefined;
}

/** Records with page bytes copied out (so chunk aliasing cannot hide differences). */
function plain(r: MultifdRecord): unknown {
  if (r.type === 'multifd-init') return { ...r, uuid: [...r.uuid] };
  const { data, start, handle, ...rest } = r;
  return {
    ...rest,
    handle: handle?.idstr,
    normal: [...r.normal],
    zero: [...r.zero],
    pages: Buffer.from(data.subarray(start, start + r.normal.length * PAGE)).toString('base64'),
  };
}

function decode(bytes: Uint8Array, cuts: readonly number[], opts?: MultifdDecoderOptions): Outcome {
  const d = new MultifdDecoder(opts);
  const records: unknown[] = [];
  let prev = 0;
  try {
    for (const c of [...cuts, bytes.length]) {
      for (const r of d.push(bytes.slice(prev, c))) records.push(plain(r));
      prev = c;
    }
    d.end();
    return { records, error: undefined };
  } catch (e) {
    if (!(e instanceof StreamError)) throw e;
    return { records, error: { code: e.code, offset: e.offset } };
  }
}

function errorOf(bytes: Uint8Array, opts?: MultifdDecoderOptions): StreamError {
  const d = new MultifdDecoder(opts);
  try {
    d.push(bytes);
    d.end();
  } catch (e) {
    if (e instanceof StreamError) return e;
    throw e;
  }
  throw new Error('decoded without an error');
}

describe('multifd init message', () => {
  it('is 64 bytes: magic, version, UUID, id, reserved zeros', () => {
    const uuid = Uint8Array.from({ length: 16 }, (_, i) => 0xa0 + i);
    const b = encodeMultifdInit(3, uuid);
    expect(b.length).toBe(MULTIFD_INIT_BYTES);
    expect(Buffer.from(b.subarray(0, 8)).toString('hex')).toBe('1122334400000001');
    expect([...b.subarray(8, 24)]).toEqual([...uuid]);
    expect(b[24]).toBe(3);
    expect(b.subarray(25).every((x) => x === 0)).toBe(true);
    const d = new MultifdDecoder({ uuid, channels: 4 });
    const [rec] = d.push(b);
    expect(rec).toEqual({ type: 'multifd-init', id: 3, uuid });
    expect(d.init?.id).toBe(3);
    expect(d.offset).toBe(64);
    // the UUID is a copy: reusing the pushed memory does not change it
    b.fill(0);
    expect([...(rec as { uuid: Uint8Array }).uuid]).toEqual([...uuid]);
    const fromBuffer = new MultifdDecoder().push(Buffer.from(encodeMultifdInit(1, uuid)))[0] as { uuid: Uint8Array };
    expect(Buffer.isBuffer(fromBuffer.uuid)).toBe(false);
  });

  it('refuses a wrong magic as soon as 4 bytes are in, a wrong version, UUID or id', () => {
    const d = new MultifdDecoder();
    expect(() => d.push(Buffer.from('QEVM'))).toThrow(expect.objectContaining({ code: 'bad-magic', offset: 0 }));
    const v = encodeMultifdInit(0);
    setBe32(v, 4, 2);
    expect(errorOf(v)).toMatchObject({ code: 'unsupported-version', offset: 4 });
    const other = encodeMultifdInit(0, new Uint8Array(16).fill(7));
    expect(errorOf(other, { uuid: new Uint8Array(16) })).toMatchObject({ code: 'bad-multifd-init', offset: 8 });
    expect(errorOf(encodeMultifdInit(4), { channels: 4 })).toMatchObject({ code: 'bad-multifd-init', offset: 24 });
    expect(new MultifdDecoder({ channels: 4 }).push(encodeMultifdInit(3))).toHaveLength(1);
  });
});

describe('multifd packet header', () => {
  it('is 320 bytes of fields and name plus 8 per page of capacity (1344 for QEMU)', () => {
    expect(HEADER).toBe(1344);
    expect(multifdPacketHeaderLength(1)).toBe(328);
  });

  it('puts every field where QEMU 10.0 does', () => {
    const h = encodeMultifdPacketHeader({
      flags: 0,
      pagesAlloc: 128,
      packetNum: 0x1_0000_0002n,
      block: 'pc.ram',
      normal: [0x1000, 0x1_0000_2000],
      zero: [0x7000],
    });
    expect(h.length).toBe(1344);
    expect(be32(h, 0)).toBe(0x11223344);
    expect(be32(h, 4)).toBe(1);
    expect(be32(h, 8)).toBe(0);
    expect(be32(h, 12)).toBe(128); // pages_alloc
    expect(be32(h, 16)).toBe(2); // normal_pages
    expect(be32(h, 20)).toBe(2 * PAGE); // next_packet_size
    expect(be32(h, 24)).toBe(1); // packet_num high
    expect(be32(h, 28)).toBe(2);
    expect(be32(h, 32)).toBe(1); // zero_pages
    expect(h.subarray(36, 64).every((x) => x === 0)).toBe(true); // reserved
    expect(Buffer.from(h.subarray(64, 70)).toString('latin1')).toBe('pc.ram');
    expect(h.subarray(70, 320).every((x) => x === 0)).toBe(true);
    expect([be32(h, 320), be32(h, 324)]).toEqual([0, 0x1000]);
    expect([be32(h, 328), be32(h, 332)]).toEqual([1, 0x2000]);
    expect([be32(h, 336), be32(h, 340)]).toEqual([0, 0x7000]);
    expect(h.subarray(344).every((x) => x === 0)).toBe(true);
  });

  it('a SYNC packet has pages_alloc 0, no pages and no name, and the full header length', () => {
    const h = sync(5n);
    expect(h.length).toBe(1344);
    expect(be32(h, 8)).toBe(1);
    expect(be32(h, 12)).toBe(0);
    expect(h.subarray(12, 24).every((x) => x === 0)).toBe(true);
    expect(be32(h, 28)).toBe(5);
    expect(h.subarray(32).every((x) => x === 0)).toBe(true);
  });

  it('encoder refuses what would not decode', () => {
    const base = { flags: 0, pagesAlloc: 4, packetNum: 0n, block: 'b', normal: [0], zero: [] };
    expect(() => encodeMultifdPacketHeader({ ...base, normal: [1, 2, 3], zero: [4, 5].map((x) => x * PAGE) })).toThrow(RangeError);
    expect(() => encodeMultifdPacketHeader({ ...base, normal: [100] })).toThrow(expect.objectContaining({ code: 'unaligned-offset' }));
    expect(() => encodeMultifdPacketHeader({ ...base, block: '' })).toThrow(expect.objectContaining({ code: 'bad-option', option: 'block' }));
    expect(() => encodeMultifdPacketHeader({ ...base, block: 'x'.repeat(256) })).toThrow(RangeError);
    expect(() => encodeMultifdPacketHeader({ ...base, packetNum: -1n })).toThrow(RangeError);
    expect(() => encodeMultifdInit(256)).toThrow(RangeError);
    // normalCount/zeroCount take a prefix of reusable arrays
    const h = encodeMultifdPacketHeader({ ...base, normal: new Float64Array([PAGE, 2 * PAGE, 9 * PAGE]), normalCount: 2, zero: new Float64Array(4), zeroCount: 1 });
    expect([be32(h, 16), be32(h, 20), be32(h, 32), be32(h, 324), be32(h, 332), be32(h, 340)]).toEqual([2, 2 * PAGE, 1, PAGE, 2 * PAGE, 0]);
  });
});

describe('MultifdDecoder', () => {
  it('decodes a channel: init, SYNC, pages with their offsets, zero lists, blocks', () => {
    const bytes = channel();
    const d = new MultifdDecoder({ blocks: BLOCKS });
    const recs = d.push(bytes);
    d.end();
    expect(recs.map((r) => r.type)).toEqual(['multifd-init', 'multifd-packet', 'multifd-packet', 'multifd-packet', 'multifd-packet', 'multifd-packet']);
    const [, s0, p1, p2, p3, s1] = recs as Extract<MultifdRecord, { type: 'multifd-packet' }>[];
    expect(s0).toMatchObject({ sync: true, flags: 1, pagesAlloc: 0, block: '', packetNum: 0n, nextPacketSize: 0 });
    expect(s0!.normal.length + s0!.zero.length).toBe(0);
    expect(s0!.handle).toBeUndefined();
    expect(p1).toMatchObject({ sync: false, pagesAlloc: 128, block: 'pc.ram', packetNum: 3n, nextPacketSize: 4 * PAGE });
    expect(p1!.handle).toBe(BLOCKS[0]);
    expect([...p1!.normal]).toEqual([0x1000, 0x2000, 0x3000, 0x9000]);
    expect([...p1!.zero]).toEqual([0x5000, 0x4000]);
    // pushed whole: the pages are a view of the pushed chunk, at the byte after the header
    expect(p1!.data.buffer).toBe(bytes.buffer);
    expect(p1!.start).toBe(64 + HEADER + HEADER);
    for (let i = 0; i < 4; i++) expect(p1!.data[p1!.start + i * PAGE + 17]).toBe((31 + i + 1) & 0xff);
    expect(p2).toMatchObject({ block: '/rom@etc/acpi/tables', handle: BLOCKS[1] });
    expect(p3!.normal.length).toBe(0);
    expect([...p3!.zero]).toEqual([0x10000, 0x11000]);
    expect(s1).toMatchObject({ sync: true, packetNum: 12n });
    expect(d.offset).toBe(bytes.length);
  });

  it('gives the same records and errors for any chunking (every split point, byte by byte)', () => {
    const bytes = channel();
    const whole = decode(bytes, [], { blocks: BLOCKS });
    expect(whole.error).toBeUndefined();
    expect(whole.records).toHaveLength(6);
    for (let cut = 1; cut < bytes.length; cut += cut < 3000 ? 1 : 97) {
      expect(decode(bytes, [cut], { blocks: BLOCKS }), `cut at ${cut}`).toEqual(whole);
    }
    const small = channel().subarray(0, 64 + 2 * HEADER + PAGE + 10);
    const everyByte = Array.from({ length: small.length - 1 }, (_, i) => i + 1);
    expect(decode(small, everyByte)).toEqual(decode(small, []));
    // a corrupt packet: the same error wherever the chunks end
    const bad = channel();
    setBe32(bad, 64 + HEADER + HEADER + 4 * PAGE + 16, 200);
    const badWhole = decode(bad, [], { blocks: BLOCKS });
    expect(badWhole.error).toEqual({ code: 'length-too-large', offset: 64 + 2 * HEADER + 4 * PAGE + 16 });
    for (let cut = 1; cut < bad.length; cut += 37) expect(decode(bad, [cut], { blocks: BLOCKS }), `cut at ${cut}`).toEqual(badWhole);
  });

  it('copies pages only when the packet was split', () => {
    const bytes = channel();
    const d = new MultifdDecoder();
    const split = 64 + 2 * HEADER + 2 * PAGE + 5; // inside the first packet's pages
    const a = d.push(bytes.subarray(0, split));
    const b = d.push(bytes.subarray(split));
    expect(a.length).toBe(2);
    const p1 = b[0] as Extract<MultifdRecord, { type: 'multifd-packet' }>;
    expect(p1.data.buffer).not.toBe(bytes.buffer);
    expect(Buffer.compare(p1.data.subarray(p1.start, p1.start + 4 * PAGE), bytes.subarray(64 + 2 * HEADER, 64 + 2 * HEADER + 4 * PAGE))).toBe(0);
    const p2 = b[1] as Extract<MultifdRecord, { type: 'multifd-packet' }>;
    expect(p2.data.buffer).toBe(bytes.buffer);
  });

  it('ends cleanly after any whole packet, else truncated; every prefix', () => {
    const bytes = channel();
    const ends = new Set<number>();
    let at = 64;
    ends.add(at);
    for (const n of [0, 4, 1, 0, 0]) {
      at += HEADER + n * PAGE;
      ends.add(at);
    }
    expect(at).toBe(bytes.length);
    const master = new MultifdDecoder({ blocks: BLOCKS });
    for (let n = 0; n <= bytes.length; n++) {
      const f = master.fork();
      let outcome = 'complete';
      try {
        f.end();
      } catch (e) {
        if (!(e instanceof StreamError)) throw e;
        outcome = e.code;
        expect(e.offset).toBeLessThanOrEqual(n);
      }
      if (outcome !== (ends.has(n) ? 'complete' : 'truncated')) throw new Error(`prefix ${n}: ${outcome}`);
      if (n < bytes.length) master.push(bytes.subarray(n, n + 1));
    }
    master.end();
    expect(() => new MultifdDecoder().end()).toThrow(expect.objectContaining({ code: 'truncated', offset: 0 }));
  });

  it('re-encodes every header byte for byte', () => {
    const bytes = channel();
    const d = new MultifdDecoder();
    let at = 64;
    for (const r of d.push(bytes)) {
      if (r.type !== 'multifd-packet') continue;
      const h = encodeMultifdPacketHeader({ ...r, pagesAlloc: MULTIFD_PACKET_PAGES });
      expect(Buffer.compare(h, bytes.subarray(at, at + HEADER))).toBe(0);
      at += HEADER + r.normal.length * PAGE;
    }
    expect(at).toBe(bytes.length);
  });

  describe('refuses, naming the field', () => {
    const P1 = 64 + HEADER; // the first page packet
    const cases: { name: string; edit: (b: Uint8Array) => void; code: string; at: number; msg?: RegExp; opts?: MultifdDecoderOptions }[] = [
      { name: 'packet magic', edit: (b) => setBe32(b, P1, 0x5145564d), code: 'bad-magic', at: P1 },
      { name: 'packet version', edit: (b) => setBe32(b, P1 + 4, 3), code: 'unsupported-version', at: P1 + 4 },
      { name: 'device-state flag', edit: (b) => setBe32(b, P1 + 8, MultifdFlag.DEVICE_STATE), code: 'unsupported', at: P1 + 8, msg: /DEVICE_STATE/ },
      { name: 'zlib', edit: (b) => setBe32(b, P1 + 8, 0x02), code: 'unsupported', at: P1 + 8, msg: /zlib/ },
      { name: 'zstd', edit: (b) => setBe32(b, P1 + 8, 0x04), code: 'unsupported', at: P1 + 8, msg: /zstd/ },
      { name: 'qatzip', edit: (b) => setBe32(b, P1 + 8, 0x20), code: 'unsupported', at: P1 + 8, msg: /qatzip/ },
      { name: 'unknown flag', edit: (b) => setBe32(b, P1 + 8, 0x80), code: 'bad-multifd-packet', at: P1 + 8 },
      { name: 'pages_alloc > 128', edit: (b) => setBe32(b, P1 + 12, 129), code: 'length-too-large', at: P1 + 12 },
      { name: 'pages_alloc 2^32-1', edit: (b) => setBe32(b, P1 + 12, 0xffffffff), code: 'length-too-large', at: P1 + 12 },
      { name: 'normal_pages > pages_alloc', edit: (b) => setBe32(b, P1 + 16, 129), code: 'length-too-large', at: P1 + 16 },
      { name: 'zero_pages > pages_alloc - normal', edit: (b) => setBe32(b, P1 + 32, 125), code: 'length-too-large', at: P1 + 32 },
      { name: 'next_packet_size', edit: (b) => setBe32(b, P1 + 20, 3 * PAGE), code: 'bad-multifd-packet', at: P1 + 20 },
      { name: 'unknown block', edit: (b) => (b[P1 + 64] = 0x71), code: 'unknown-ram-block', at: P1 + 64, opts: { blocks: BLOCKS } },
      { name: 'no block name', edit: (b) => (b[P1 + 64] = 0), code: 'unknown-ram-block', at: P1 + 64 },
      { name: 'unterminated name', edit: (b) => b.fill(0x41, P1 + 64, P1 + 320), code: 'bad-multifd-packet', at: P1 + 64 },
      { name: 'unaligned normal offset', edit: (b) => setBe32(b, P1 + 320 + 8 + 4, 0x2001), code: 'unaligned-page', at: P1 + 328 },
      { name: 'unaligned zero offset', edit: (b) => setBe32(b, P1 + 320 + 40 + 4, 0x10), code: 'unaligned-page', at: P1 + 360 },
      { name: 'normal offset past the block', edit: (b) => setBe32(b, P1 + 324, 32 * 1024 * 1024), code: 'page-out-of-range', at: P1 + 320, opts: { blocks: BLOCKS } },
      { name: 'zero offset past the block', edit: (b) => setBe32(b, P1 + 320 + 32, 1), code: 'page-out-of-range', at: P1 + 352, opts: { blocks: BLOCKS } },
      { name: 'offset ≥ 2^53 without a block list', edit: (b) => setBe32(b, P1 + 320, 0x20_0000), code: 'page-out-of-range', at: P1 + 320 },
    ];
    for (const c of cases) {
      it(c.name, () => {
        const b = channel();
        c.edit(b);
        const e = errorOf(b, c.opts);
        expect({ code: e.code, offset: e.offset }).toEqual({ code: c.code, offset: c.at });
        if (c.msg) expect(e.message).toMatch(c.msg);
        // untouched, the same channel decodes
        expect(decode(channel(), [], c.opts).error).toBeUndefined();
      });
    }

    it('holds no page data for a packet it refuses (fails on the first 36 header bytes)', () => {
      const b = channel();
      setBe32(b, P1 + 16, 0xffff_ffff);
      const d = new MultifdDecoder();
      d.push(b.subarray(0, P1 + 35));
      expect(() => d.push(b.subarray(P1 + 35, P1 + 36))).toThrow(expect.objectContaining({ code: 'length-too-large', offset: P1 + 16 }));
      expect(() => d.push(new Uint8Array(1))).toThrow(expect.objectContaining({ code: 'length-too-large' }));
    });

    it('a block list given later applies to the packets after it', () => {
      const b = channel();
      const d = new MultifdDecoder();
      const first = d.push(b.subarray(0, P1));
      expect(first).toHaveLength(2);
      d.setBlocks([{ idstr: 'other', length: PAGE, index: 0 }]);
      expect(() => d.push(b.subarray(P1))).toThrow(expect.objectContaining({ code: 'unknown-ram-block', offset: P1 + 64 }));
    });
  });

  it('a smaller packet capacity changes the header length and the pages_alloc bound', () => {
    const b = concat([
      encodeMultifdInit(0),
      packet({ flags: 0, pagesAlloc: 2, packetNum: 1n, block: 'pc.ram', normal: [0], zero: [PAGE] }),
      packet({ flags: 1, pagesAlloc: 2, packetNum: 2n, block: '', normal: [], zero: [] }),
    ]);
    expect(b.length).toBe(64 + 2 * multifdPacketHeaderLength(2) + PAGE);
    const d = new MultifdDecoder({ maxPagesAlloc: 2 });
    expect(d.push(b).map((r) => (r.type === 'multifd-packet' ? r.packetNum : r.id))).toEqual([0, 1n, 2n]);
    expect(errorOf(b, { maxPagesAlloc: 1 })).toMatchObject({ code: 'length-too-large', offset: 64 + 12 });
    expect(() => new MultifdDecoder({ maxPagesAlloc: 0 })).toThrow(RangeError);
  });
});

describe('MultifdDecoder with splitPackets', () => {
  type Packet = Extract<MultifdRecord, { type: 'multifd-packet' }>;
  /** Pieces joined back into whole packets, checking the piece rules on the way. */
  function join(recs: readonly MultifdRecord[], chunks: readonly Uint8Array[]): unknown[] {
    const out: unknown[] = [];
    let acc: { first: Packet; normal: number[]; pages: Buffer[] } | undefined;
    for (const r of recs) {
      if (r.type !== 'multifd-packet') {
        out.push(plain(r));
        continue;
      }
      const n = r.normal.length;
      // a piece of several pages is a view of a pushed chunk (only a page straddling two is copied)
      if (n > 1) expect(chunks.some((c) => c.buffer === r.data.buffer)).toBe(true);
      if (!acc) acc = { first: r, normal: [], pages: [] };
      else {
        expect(r.zero.length).toBe(0);
        expect(r.packetNum).toBe(acc.first.packetNum);
      }
      if (!r.last) expect(r.sync).toBe(false);
      acc.normal.push(...r.normal);
      acc.pages.push(Buffer.from(r.data.subarray(r.start, r.start + n * PAGE)));
      if (r.last) {
        const whole = { ...acc.first, sync: r.sync, normal: new Float64Array(acc.normal), data: Buffer.concat(acc.pages), start: 0, last: true };
        out.push(plain(whole));
        acc = undefined;
      }
    }
    expect(acc).toBeUndefined();
    return out;
  }

  it('yields each packet in pieces whole in one chunk; joined, the same as whole packets', () => {
    const bytes = concat([channel(), packet({ flags: MultifdFlag.SYNC, packetNum: 20n, block: 'pc.ram', normal: [0x40000, 0x41000, 0x42000], zero: [0] }, 3)]);
    const whole = decode(bytes, [], { blocks: BLOCKS });
    expect(whole.error).toBeUndefined();
    let pieces = 0;
    for (const step of [1000, 4096, 5000, 8191, 65536]) {
      const chunks: Uint8Array[] = [];
      for (let i = 0; i < bytes.length; i += step) chunks.push(bytes.slice(i, i + step));
      const d = new MultifdDecoder({ blocks: BLOCKS, splitPackets: true });
      const recs = chunks.flatMap((c) => d.push(c));
      d.end();
      pieces = Math.max(pieces, recs.length);
      expect(join(recs, chunks), `chunks of ${step}`).toEqual(whole.records);
    }
    expect(pieces).toBeGreaterThan(whole.records.length);
    // pushed whole, one record per packet
    const d = new MultifdDecoder({ splitPackets: true });
    expect(d.push(bytes).every((r) => r.type === 'multifd-init' || r.last)).toBe(true);
  });

  it('the SYNC of a split packet is on its last piece', () => {
    const bytes = concat([encodeMultifdInit(0), packet({ flags: MultifdFlag.SYNC, packetNum: 1n, block: 'pc.ram', normal: [0, PAGE, 2 * PAGE], zero: [] })]);
    const d = new MultifdDecoder({ splitPackets: true });
    const recs = [...d.push(bytes.slice(0, 64 + HEADER + PAGE + 100)), ...d.push(bytes.slice(64 + HEADER + PAGE + 100))] as Packet[];
    expect(recs.slice(1).map((r) => [r.normal.length, r.sync, r.last])).toEqual([
      [1, false, false],
      [1, false, false],
      [1, true, true],
    ]);
    d.end();
    const cut = new MultifdDecoder({ splitPackets: true });
    cut.push(bytes.subarray(0, bytes.length - 1));
    expect(() => cut.end()).toThrow(expect.objectContaining({ code: 'truncated' }));
  });
});

describe('forEachOffsetRun', () => {
  const runs = (o: number[], count = o.length) => {
    const out: number[][] = [];
    forEachOffsetRun(o, count, (first, offset, n) => out.push([first, offset, n]));
    return out;
  };
  it('splits unsorted lists at every break', () => {
    expect(runs([])).toEqual([]);
    expect(runs([0x5000])).toEqual([[0, 0x5000, 1]]);
    expect(runs([0x1000, 0x2000, 0x3000, 0x9000, 0xa000, 0x4000, 0x3000])).toEqual([
      [0, 0x1000, 3],
      [3, 0x9000, 2],
      [5, 0x4000, 1],
      [6, 0x3000, 1],
    ]);
    expect(runs([0, 0x1000, 0x2000, 0x3000], 2)).toEqual([[0, 0, 2]]);
  });
});
