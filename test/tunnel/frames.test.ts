/**
 * The hop frames of `qmt tunnel` (src/transport/resumable-frames.ts): every
 * frame decodes to what was encoded at every split point and byte by byte (a
 * DATA frame split between reads comes as pieces with consecutive `seq`,
 * which join to it); every truncation is need-more-data, never an error; malformed bytes
 * are a 'hop-protocol' TransportError naming the offset, and nothing else is
 * ever thrown (fast-check).
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { TransportError } from '../../src/transport/errors.js';
import {
  ACK_LENGTH,
  DATA_HEADER_LENGTH,
  HELLO_LENGTH,
  HopFrameDecoder,
  MAX_DATA_PAYLOAD,
  WELCOME_LENGTH,
  encodeFrame,
  frameLength,
  type HopFrame,
} from '../../src/transport/resumable-frames.js';

const TUNNEL = Buffer.from('00112233445566778899aabbccddeeff', 'hex');

const SAMPLES: HopFrame[] = [
  { type: 'hello', resume: false, tunnel: TUNNEL, connection: 0, role: 'main', received: 0 },
  { type: 'hello', resume: true, tunnel: TUNNEL, connection: 0xffff_fffe, role: 'secondary', received: 2 ** 53 - 1 },
  { type: 'welcome', status: 'new', received: 0 },
  { type: 'welcome', status: 'resumed', received: 123_456_789_012 },
  { type: 'welcome', status: 'unknown', received: 1 },
  { type: 'welcome', status: 'refused', received: 0 },
  { type: 'data', seq: 0, payload: Buffer.from('QEVM') },
  { type: 'data', seq: 2 ** 40 + 7, payload: Buffer.alloc(70_000, 0xab) },
  { type: 'ack', received: 4_294_967_296 },
  { type: 'fin', seq: 17 },
  { type: 'reset' },
];

/** DATA pieces with consecutive numbers joined back into the frame they came from. */
function joined(frames: HopFrame[]): HopFrame[] {
  const out: HopFrame[] = [];
  for (const f of frames) {
    const last = out[out.length - 1];
    if (f.type === 'data' && last?.type === 'data' && last.seq + last.payload.length === f.seq) out[out.length - 1] = { ...last, payload: Buffer.concat([last.payload, f.payload]) };
    else out.push(f);
  }
  return out;
}

/** Plain objects to compare (payload views as arrays of bytes; DATA pieces joined). */
function plain(frames: HopFrame[]): unknown[] {
  return joined(frames).map((f) => (f.type === 'data' ? { ...f, payload: [...f.payload] } : f.type === 'hello' ? { ...f, tunnel: f.tunnel.toString('hex') } : f));
}

function decodeInChunks(bytes: Buffer, cuts: number[]): HopFrame[] {
  const d = new HopFrameDecoder();
  const out: HopFrame[] = [];
  let at = 0;
  for (const c of [...cuts, bytes.length]) {
    out.push(...d.push(bytes.subarray(at, c)));
    at = c;
  }
  expect(d.midFrame).toBe(false);
  return out;
}

describe('hop frames', () => {
  it('have the documented lengths', () => {
    expect(encodeFrame(SAMPLES[0]!).length).toBe(HELLO_LENGTH);
    expect(encodeFrame(SAMPLES[2]!).length).toBe(WELCOME_LENGTH);
    expect(encodeFrame(SAMPLES[6]!).length).toBe(DATA_HEADER_LENGTH + 4);
    expect(encodeFrame(SAMPLES[8]!).length).toBe(ACK_LENGTH);
    for (const f of SAMPLES) expect(encodeFrame(f).length).toBe(frameLength(f));
    // The magic opens the HELLO: what the exit's admission peeks at.
    expect(encodeFrame(SAMPLES[0]!).subarray(0, 4).toString('latin1')).toBe('QMTH');
  });

  it('decode to what was encoded, whole and at every split point', () => {
    const small = SAMPLES.filter((f) => frameLength(f) < 100);
    const bytes = Buffer.concat(small.map(encodeFrame));
    const want = plain(small);
    expect(plain(decodeInChunks(bytes, []))).toEqual(want);
    for (let i = 1; i < bytes.length; i++) expect(plain(decodeInChunks(bytes, [i]))).toEqual(want);
    for (let i = 1; i < bytes.length; i += 3) for (let j = i + 1; j < bytes.length; j += 5) expect(plain(decodeInChunks(bytes, [i, j]))).toEqual(want);
    // Byte by byte.
    expect(plain(decodeInChunks(bytes, Array.from({ length: bytes.length - 1 }, (_, k) => k + 1)))).toEqual(want);
  });

  it('hand out a payload as a view into the chunk when it does not span chunks', () => {
    const bytes = encodeFrame({ type: 'data', seq: 5, payload: Buffer.from('hello') });
    const [f] = new HopFrameDecoder().push(bytes);
    expect(f?.type).toBe('data');
    if (f?.type === 'data') expect(f.payload.buffer).toBe(bytes.buffer);
  });

  it('need more data at every truncation, and never fail on it; a DATA payload is handed out as it comes, uncopied', () => {
    for (const f of SAMPLES) {
      const bytes = encodeFrame(f);
      const step = bytes.length > 1000 ? 997 : 1;
      for (let n = 1; n < bytes.length; n += step) {
        const d = new HopFrameDecoder();
        const first = d.push(bytes.subarray(0, n));
        expect(d.midFrame).toBe(true);
        if (f.type === 'data' && n >= DATA_HEADER_LENGTH) {
          // The payload bytes that came (none yet with the header alone), at their numbers, as a view into the chunk.
          const want: HopFrame[] = n > DATA_HEADER_LENGTH ? [{ type: 'data', seq: f.seq, payload: f.payload.subarray(0, n - DATA_HEADER_LENGTH) }] : [];
          expect(plain(first)).toEqual(plain(want));
          if (first[0]?.type === 'data') expect(first[0].payload.buffer).toBe(bytes.buffer);
          expect(d.pending).toBe(0);
        } else {
          expect(first).toEqual([]);
          expect(d.pending).toBe(n);
        }
        // The rest completes it.
        expect(plain([...first, ...d.push(bytes.subarray(n))])).toEqual(plain([f]));
        expect(d.midFrame).toBe(false);
      }
    }
  });

  it('refuse malformed bytes with hop-protocol naming the offset', () => {
    const cases: Array<[string, Buffer, RegExp]> = [
      ['unknown type', Buffer.from([0x00]), /byte 0: unknown frame type 0x00/],
      ['an HTTP request', Buffer.from('GET / HTTP/1.1\r\n'), /unknown frame type 0x47/],
      ['a bad magic', Buffer.from('QEVM\x00\x00\x00\x03', 'latin1'), /bad magic 5145/],
      ['a bad version', Buffer.concat([Buffer.from('QMTH'), Buffer.from([9])]), /version 9/],
      ['an empty DATA', Buffer.from([0x44, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]), /DATA frame of 0 bytes/],
      ['an oversized DATA', Buffer.from([0x44, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 1]), /DATA frame of 1048577 bytes/],
      ['a counter beyond 2^53', Buffer.from([0x41, 0, 0x20, 0, 0, 0, 0, 0, 0]), /ACK received beyond 2\^53/],
      ['a bad WELCOME status', Buffer.concat([Buffer.from('QMTW'), Buffer.from([1, 7]), Buffer.alloc(8)]), /WELCOME status 7/],
    ];
    for (const [what, bytes, msg] of cases) {
      const d = new HopFrameDecoder();
      let err: unknown;
      try {
        d.push(bytes);
      } catch (e) {
        err = e;
      }
      expect(err, what).toBeInstanceOf(TransportError);
      expect((err as TransportError).code, what).toBe('hop-protocol');
      expect((err as TransportError).message, what).toMatch(msg);
      // Refuses anything after.
      expect(() => d.push(Buffer.from([0x52]))).toThrow(TransportError);
    }
    // The offset counts the frames before the bad one.
    const d = new HopFrameDecoder();
    expect(() => d.push(Buffer.concat([encodeFrame({ type: 'ack', received: 1 }), Buffer.from([0x99])]))).toThrow(/byte 9:/);
  });

  it('refuse what the encoders cannot represent', () => {
    expect(() => encodeFrame({ type: 'data', seq: 0, payload: Buffer.alloc(0) })).toThrow(RangeError);
    expect(() => encodeFrame({ type: 'data', seq: 0, payload: Buffer.alloc(MAX_DATA_PAYLOAD + 1) })).toThrow(RangeError);
    expect(() => encodeFrame({ type: 'ack', received: 2 ** 53 })).toThrow(RangeError);
    expect(() => encodeFrame({ type: 'hello', resume: false, tunnel: Buffer.alloc(3), connection: 0, role: 'main', received: 0 })).toThrow(RangeError);
  });

  const counter = fc.oneof(fc.nat(), fc.integer({ min: 0, max: Number.MAX_SAFE_INTEGER }));
  const frameArb: fc.Arbitrary<HopFrame> = fc.oneof(
    fc.record({ type: fc.constant('hello' as const), resume: fc.boolean(), tunnel: fc.uint8Array({ minLength: 16, maxLength: 16 }).map((a) => Buffer.from(a)), connection: fc.nat({ max: 0xffff_ffff }), role: fc.constantFrom('main' as const, 'secondary' as const), received: counter }),
    fc.record({ type: fc.constant('welcome' as const), status: fc.constantFrom('new' as const, 'resumed' as const, 'unknown' as const, 'refused' as const), received: counter }),
    fc.record({ type: fc.constant('data' as const), seq: counter, payload: fc.uint8Array({ minLength: 1, maxLength: 600 }).map((a) => Buffer.from(a)) }),
    fc.record({ type: fc.constant('ack' as const), received: counter }),
    fc.record({ type: fc.constant('fin' as const), seq: counter }),
    fc.constant({ type: 'reset' as const }),
  );

  it('decode(encode(frames)) = frames in any chunking (fast-check)', () => {
    fc.assert(
      fc.property(fc.array(frameArb, { maxLength: 12 }), fc.array(fc.nat(), { maxLength: 8 }), (frames, rawCuts) => {
        const bytes = Buffer.concat(frames.map(encodeFrame));
        const cuts = [...new Set(rawCuts.map((c) => (bytes.length === 0 ? 0 : c % bytes.length)))].sort((a, b) => a - b);
        expect(plain(decodeInChunks(bytes, cuts))).toEqual(plain(frames));
      }),
      { numRuns: 300 },
    );
  });

  it('throw nothing but hop-protocol on arbitrary bytes (fast-check)', () => {
    fc.assert(
      fc.property(fc.array(fc.oneof(fc.uint8Array({ maxLength: 40 }), frameArb.map((f) => new Uint8Array(encodeFrame(f)))), { maxLength: 6 }), fc.array(fc.nat(), { maxLength: 5 }), (parts, rawCuts) => {
        const bytes = Buffer.concat(parts.map((p) => Buffer.from(p)));
        const cuts = [...new Set(rawCuts.map((c) => (bytes.length === 0 ? 0 : c % bytes.length)))].sort((a, b) => a - b);
        const d = new HopFrameDecoder();
        let at = 0;
        try {
          for (const c of [...cuts, bytes.length]) {
            d.push(bytes.subarray(at, c));
            at = c;
          }
        } catch (e) {
          expect(e).toBeInstanceOf(TransportError);
          expect((e as TransportError).code).toBe('hop-protocol');
          const m = /at byte (\d+):/.exec((e as Error).message);
          expect(Number(m?.[1])).toBeLessThanOrEqual(bytes.length);
        }
      }),
      { numRuns: 500 },
    );
  });
});
