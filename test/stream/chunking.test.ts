import { describe, expect, it } from 'vitest';
import {
  PreemptDecoder,
  PreemptEncoder,
  ReturnPathDecoder,
  StreamDecoder,
  StreamError,
  concatPieces,
  encodeReturnPathMessage,
  type PreemptRecord,
  type StreamDecoderOptions,
  type StreamRecord,
} from '../../src/stream/index.js';
import { encode, normalize } from './synthetic.js';

/**
 * Regression tests for decoders whose result depended on where the chunks
 * ended. Each small stream is decoded whole, then split at every point and
 * byte by byte: the records and the error (code and offset) must be the same.
 */

interface Pushable {
  push(c: Uint8Array): readonly unknown[];
  end(): unknown;
  readonly error: StreamError | undefined;
}

interface Outcome {
  records: unknown;
  error: { code: string; offset: number } | undefined;
}

function decode(make: () => Pushable, bytes: Uint8Array, cuts: readonly number[]): Outcome {
  const d = make();
  const got: unknown[] = [];
  let error: StreamError | undefined;
  try {
    let prev = 0;
    // Each piece is a copy, so records cannot alias bytes of a later piece.
    for (const c of [...cuts, bytes.length]) {
      got.push(...d.push(bytes.slice(prev, c)));
      prev = c;
    }
    const tail = d.end();
    if (Array.isArray(tail)) got.push(...(tail as unknown[]));
    error = d.error;
  } catch (e) {
    if (!(e instanceof StreamError)) throw e;
    error = e;
  }
  return { records: normalize(got), error: error && { code: error.code, offset: error.offset } };
}

/** Decodes whole, at every single split point and byte by byte; returns the (common) outcome. */
function sameForEveryChunking(make: () => Pushable, bytes: Uint8Array): Outcome {
  const whole = decode(make, bytes, []);
  for (let cut = 1; cut < bytes.length; cut++) {
    const split = decode(make, bytes, [cut]);
    expect(split, `split at ${cut}`).toEqual(whole);
  }
  const bytewise = decode(make, bytes, Array.from({ length: bytes.length - 1 }, (_, i) => i + 1));
  expect(bytewise, 'byte by byte').toEqual(whole);
  return whole;
}

const PRELUDE: StreamRecord[] = [
  { type: 'header', version: 3 },
  { type: 'configuration', machineType: 'pc-q35-10.0' },
];

/** A FULL device section with `payload`, its footer and EOF; returns the bytes and where the payload starts. */
function deviceStream(payload: Uint8Array): { bytes: Buffer; payloadAt: number } {
  const head: StreamRecord[] = [...PRELUDE, { type: 'section', kind: 'full', sectionId: 5, idstr: 'dev', instanceId: 0, versionId: 1 }];
  const bytes = encode([
    ...head,
    { type: 'device-state', sectionId: 5, idstr: 'dev', instanceId: 0, versionId: 1, kind: 'full', data: payload },
    { type: 'footer', sectionId: 5 },
    { type: 'eof' },
  ]);
  return { bytes, payloadAt: encode(head).length };
}

/** Payload bytes 1, 2, 3, … (never 0x7E, so no footer-like bytes unless put there). */
function payloadOf(n: number): Uint8Array {
  return Uint8Array.from({ length: n }, (_, i) => 1 + (i % 0x70));
}

describe('maxDeviceSectionBytes is enforced the same for every chunking', () => {
  const LIMIT = 48;
  const main = (opts: StreamDecoderOptions = {}) => () => new StreamDecoder({ maxDeviceSectionBytes: LIMIT, ...opts });

  it('accepts a payload of exactly the limit', () => {
    const { bytes } = deviceStream(payloadOf(LIMIT));
    const out = sameForEveryChunking(main(), bytes);
    expect(out.error).toBeUndefined();
    expect((out.records as { type: string }[]).map((r) => r.type)).toEqual(['header', 'configuration', 'section', 'device-state', 'footer', 'eof']);
  });

  it.each([LIMIT + 1, LIMIT + 4, LIMIT + 5, LIMIT + 300])('refuses a payload of %i bytes with device-boundary-not-found at the payload', (n) => {
    const { bytes, payloadAt } = deviceStream(payloadOf(n));
    const out = sameForEveryChunking(main(), bytes);
    expect(out.error).toEqual({ code: 'device-boundary-not-found', offset: payloadAt });
    expect((out.records as { type: string }[]).map((r) => r.type)).toEqual(['header', 'configuration', 'section']);
  });

  it('a payload cut short below the limit is truncated, not over the limit', () => {
    const { bytes, payloadAt } = deviceStream(payloadOf(LIMIT + 20));
    const out = sameForEveryChunking(main(), bytes.subarray(0, payloadAt + LIMIT - 1));
    expect(out.error).toEqual({ code: 'truncated', offset: payloadAt });
  });
});

describe('records parsed before an error in the same push are returned by every decoder', () => {
  it('ReturnPathDecoder', () => {
    const good = Buffer.concat([encodeReturnPathMessage({ type: 'pong', value: 1 }), encodeReturnPathMessage({ type: 'pong', value: 2 })]);
    // Message type 0 (MIG_RP_MSG_INVALID) after two PONGs.
    const bytes = Buffer.concat([good, Buffer.from([0, 0, 0, 4, 0, 0, 0, 0])]);
    const d = new ReturnPathDecoder();
    expect(d.push(bytes)).toEqual([
      { type: 'pong', value: 1 },
      { type: 'pong', value: 2 },
    ]);
    // The error is known at once and thrown by every later call.
    expect(d.error?.code).toBe('bad-return-path-message');
    expect(d.error?.offset).toBe(good.length);
    expect(() => d.push(Buffer.alloc(1))).toThrow(d.error);
    expect(() => d.end()).toThrow(d.error);
    const out = sameForEveryChunking(() => new ReturnPathDecoder(), bytes);
    expect(out.error).toEqual({ code: 'bad-return-path-message', offset: good.length });
    expect(out.records).toEqual([
      { type: 'pong', value: 1 },
      { type: 'pong', value: 2 },
    ]);
  });

  it('PreemptDecoder', () => {
    const blocks = new Map([['pc.ram', { idstr: 'pc.ram', length: 16 * 4096, index: 0 }]]);
    const recs: PreemptRecord[] = [
      { type: 'ram-page', block: 'pc.ram', offset: 0x3000, continued: false, data: new Uint8Array(4096).fill(0xab) },
      { type: 'ram-zero', block: 'pc.ram', offset: 0x5000, continued: true },
    ];
    const e = new PreemptEncoder({ continueMode: 'as-recorded' });
    for (const r of recs) e.write(r);
    const good = concatPieces(e.take());
    // A CONTINUE zero page whose fill byte is not zero.
    const bytes = Buffer.concat([good, Buffer.from([0, 0, 0, 0, 0, 0, 0x60, 0x22, 0x01])]);
    const d = new PreemptDecoder(new Map(blocks));
    expect(normalize(d.push(bytes))).toEqual(normalize(recs));
    expect(d.error?.code).toBe('bad-zero-fill');
    expect(d.error?.offset).toBe(good.length);
    expect(() => d.push(Buffer.alloc(1))).toThrow(d.error);
    expect(() => d.end()).toThrow(d.error);
    const out = sameForEveryChunking(() => new PreemptDecoder(new Map(blocks)), bytes);
    expect(out.error).toEqual({ code: 'bad-zero-fill', offset: good.length });
    expect(out.records).toEqual(normalize(recs));
  });

  it('StreamDecoder', () => {
    const good = encode(PRELUDE);
    const bytes = Buffer.concat([good, Buffer.from([0x42])]);
    const d = new StreamDecoder();
    expect(d.push(bytes).map((r) => r.type)).toEqual(['header', 'configuration']);
    expect(d.error?.code).toBe('unknown-record-type');
    expect(() => d.end()).toThrow(d.error);
    const out = sameForEveryChunking(() => new StreamDecoder(), bytes);
    expect(out.error).toEqual({ code: 'unknown-record-type', offset: good.length });
    expect((out.records as { type: string }[]).map((r) => r.type)).toEqual(['header', 'configuration']);
  });
});

describe('a device section overrunning its PACKAGED blob is package-overrun for every chunking', () => {
  /**
   * header, configuration, PACKAGED(length cut to end inside the device
   * payload) { POSTCOPY_LISTEN, FULL "dev", payload of 40 bytes with a lone
   * 0x7E at 30, footer, POSTCOPY_RUN }, EOF.
   */
  function overrunStream(endsInPayloadAt: number): { bytes: Buffer; payloadAt: number; packageEnd: number } {
    const payload = payloadOf(40);
    payload[30] = 0x7e; // footer-like byte (not followed by the section id) past the package end
    const pre = encode(PRELUDE);
    const section: StreamRecord = { type: 'section', kind: 'full', sectionId: 5, idstr: 'dev', instanceId: 0, versionId: 1 };
    const bytes = encode([
      ...PRELUDE,
      { type: 'command', command: { cmd: 'packaged', length: 0 } },
      { type: 'command', command: { cmd: 'postcopy-listen' } },
      section,
      { type: 'device-state', sectionId: 5, idstr: 'dev', instanceId: 0, versionId: 1, kind: 'full', data: payload },
      { type: 'footer', sectionId: 5 },
      { type: 'command', command: { cmd: 'postcopy-run' } },
      { type: 'package-end' },
      { type: 'eof' },
    ]);
    const packageStart = pre.length + 9; // after the PACKAGED command (08, be16 cmd, be16 len, be32 length)
    const payloadAt = packageStart + 5 + encode([section]).length;
    const packageEnd = payloadAt + endsInPayloadAt;
    bytes.writeUInt32BE(packageEnd - packageStart, pre.length + 5);
    return { bytes, payloadAt, packageEnd };
  }

  it('when the input goes on past the package end, without any footer after it', () => {
    const { bytes, payloadAt, packageEnd } = overrunStream(20);
    // Cut after the lone 0x7E, before the real footer: nothing else could end the section.
    const cut = bytes.subarray(0, payloadAt + 35);
    expect(cut.length).toBeGreaterThan(packageEnd);
    const out = sameForEveryChunking(() => new StreamDecoder(), cut);
    expect(out.error).toEqual({ code: 'package-overrun', offset: payloadAt });
  });

  it('when the input ends exactly at the package end', () => {
    const { bytes, payloadAt, packageEnd } = overrunStream(20);
    const out = sameForEveryChunking(() => new StreamDecoder(), bytes.subarray(0, packageEnd));
    expect(out.error).toEqual({ code: 'package-overrun', offset: payloadAt });
  });

  it('when the real footer lies past the package end', () => {
    const { bytes, payloadAt } = overrunStream(20);
    const out = sameForEveryChunking(() => new StreamDecoder(), bytes);
    expect(out.error).toEqual({ code: 'package-overrun', offset: payloadAt });
  });

  it('when the footer is the last thing in the package (POSTCOPY_RUN must follow)', () => {
    const { bytes, payloadAt } = overrunStream(45);
    const out = sameForEveryChunking(() => new StreamDecoder(), bytes);
    expect(out.error).toEqual({ code: 'package-overrun', offset: payloadAt });
  });

  it('as soon as the last place a footer could start inside the package is passed; before that, truncated', () => {
    const { bytes, payloadAt, packageEnd } = overrunStream(20);
    // The footer (5 bytes) must end before the package does: it could start at packageEnd - 5 at the latest.
    const last = packageEnd - 5;
    expect(sameForEveryChunking(() => new StreamDecoder(), bytes.subarray(0, last)).error).toEqual({ code: 'truncated', offset: payloadAt });
    expect(sameForEveryChunking(() => new StreamDecoder(), bytes.subarray(0, last + 1)).error).toEqual({ code: 'package-overrun', offset: payloadAt });
  });

  it('and with the exact size known, a section overrunning the package is refused before its bytes arrive', () => {
    const { bytes, payloadAt, packageEnd } = overrunStream(20);
    const make = () => new StreamDecoder({ deviceSizes: [{ name: 'dev', instanceId: 0, size: 40 }] });
    // The input stops well before the section's 40 bytes are complete.
    const cut = bytes.subarray(0, packageEnd + 3);
    expect(cut.length).toBeLessThan(payloadAt + 40);
    const out = sameForEveryChunking(make, cut);
    expect(out.error).toEqual({ code: 'package-overrun', offset: packageEnd });
  });
});
