/**
 * The multifd captures of test/fixtures (multifd-*.json and their channel
 * files) and what the multifd tests derive from them: the decoded records of
 * every channel with the byte span of each, for the fixture tests
 * (multifd-fixtures.test.ts), the fuzz test and the exhaustive prefix and
 * split runs (test/fuzz/every-prefix.ts).
 */
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import {
  MULTIFD_INIT_BYTES,
  MULTIFD_PACKET_PAGES,
  MultifdDecoder,
  StreamDecoder,
  StreamError,
  encodeMultifdInit,
  multifdPacketHeaderLength,
  type KnownBlock,
  type MultifdDecoderOptions,
  type MultifdPacketRecord,
  type MultifdRecord,
  type StreamRecord,
} from '../../src/stream/index.js';

/** The committed captures; MULTIFD_FIXTURES=DIR runs the tests on a fresh `capture.ts --out DIR` instead. */
export const FIXTURES = process.env.MULTIFD_FIXTURES ?? join(import.meta.dirname, '..', 'fixtures');
export const MULTIFD_SCENARIOS = ['multifd-2', 'multifd-4', 'multifd-legacy-zero', 'multifd-tls'] as const;
const PAGE = 4096;
export const HEADER = multifdPacketHeaderLength(MULTIFD_PACKET_PAGES);

interface FileFacts {
  name: string;
  bytes: number;
  sha256: string;
}

export interface MultifdSidecar {
  fixture: string;
  files: { main: FileFacts; rp?: FileFacts; multifd: (FileFacts & { connectOrder: number; connection: number; channelId: number })[] };
  multifd: { channels: number; connectOrderOfIds: number[]; 'multifd-bytes': number };
  guest: { startMiB: number; endMiB: number; direction: 'up' | 'down' };
  memoryMiB: number;
  source: { queryMigrate: { ram: { normal: number; duplicate: number; 'multifd-bytes': number } }; ramBlocks: { name: string; usedLength: number }[] };
  relay: { connections: { tlsIn: string | null; tlsOut: string | null }[] };
  parameters: { sourceMultifd: { 'zero-page-detection': 'multifd' | 'legacy' | 'none'; 'multifd-compression': string } };
}

/** One record of a channel and the bytes it came from: [start, headerEnd) header, [headerEnd, end) pages. */
export interface Span {
  readonly start: number;
  readonly headerEnd: number;
  readonly end: number;
  readonly record: MultifdRecord;
}

export interface ChannelCapture {
  readonly file: string;
  readonly bytes: Buffer;
  readonly spans: readonly Span[];
  readonly packets: readonly MultifdPacketRecord[];
}

export interface MultifdCapture {
  readonly name: string;
  readonly sidecar: MultifdSidecar;
  readonly main: Buffer;
  readonly mainRecords: StreamRecord[];
  readonly blocks: readonly KnownBlock[];
  readonly channels: readonly ChannelCapture[];
}

export const sha256 = (b: Buffer) => createHash('sha256').update(b).digest('hex');

/** Where each record of a channel decoded whole lies in its bytes. */
export function spansOf(records: readonly MultifdRecord[]): Span[] {
  const spans: Span[] = [];
  let at = 0;
  for (const r of records) {
    if (r.type === 'multifd-init') {
      spans.push({ start: at, headerEnd: at + MULTIFD_INIT_BYTES, end: at + MULTIFD_INIT_BYTES, record: r });
      at += MULTIFD_INIT_BYTES;
    } else {
      const end = at + HEADER + r.normal.length * PAGE;
      spans.push({ start: at, headerEnd: at + HEADER, end, record: r });
      at = end;
    }
  }
  return spans;
}

/** Decodes a channel pushed whole; throws on any error. */
export function decodeChannel(bytes: Uint8Array, opts?: MultifdDecoderOptions): MultifdRecord[] {
  const d = new MultifdDecoder(opts);
  const out = d.push(bytes);
  d.end();
  return out;
}

const cache = new Map<string, MultifdCapture>();

export function loadCapture(name: string): MultifdCapture {
  const hit = cache.get(name);
  if (hit) return hit;
  const sidecar = JSON.parse(readFileSync(join(FIXTURES, `${name}.json`), 'utf8')) as MultifdSidecar;
  const main = readFileSync(join(FIXTURES, sidecar.files.main.name));
  const md = new StreamDecoder();
  const mainRecords = [...md.push(main), ...md.end()];
  const blocks = [...md.ramBlocks.values()];
  const channels = sidecar.files.multifd.map((f) => {
    const bytes = readFileSync(join(FIXTURES, f.name));
    const records = decodeChannel(bytes, { blocks });
    return {
      file: f.name,
      bytes,
      spans: spansOf(records),
      packets: records.filter((r): r is MultifdPacketRecord => r.type === 'multifd-packet'),
    };
  });
  const c = { name, sidecar, main, mainRecords, blocks, channels };
  cache.set(name, c);
  return c;
}

// ---- where to end and split a channel, and the checks ---------------------------

/**
 * A seeded sample of a channel's offsets (1 = chosen): every byte of the init
 * message and of the first three packet headers (a SYNC and page packets);
 * in every other header each byte of the fixed fields and the start of the
 * name, both sides of the first offset entries and of the header's end; both
 * sides of every page boundary of the first page packet; `anywhere` more
 * drawn from `seed`. The exhaustive run (every offset) is
 * `npm run fuzz:prefixes`.
 */
export function channelSample(ch: ChannelCapture, seed: number, anywhere = 1500): Uint8Array {
  const pick = new Uint8Array(ch.bytes.length + 1);
  const mark = (n: number) => {
    if (n >= 0 && n <= ch.bytes.length) pick[n] = 1;
  };
  let pagePackets = 0;
  ch.spans.forEach((s, i) => {
    if (i <= 3) for (let n = s.start; n <= s.headerEnd; n++) mark(n);
    else {
      for (let n = s.start; n <= s.start + 40; n++) mark(n);
      for (const n of [s.start + 63, s.start + 64, s.start + 65, s.start + 319, s.start + 320, s.start + 321, s.start + 328, s.headerEnd - 1, s.headerEnd, s.headerEnd + 1]) mark(n);
    }
    if (s.end > s.headerEnd && pagePackets++ === 0) {
      for (let n = s.headerEnd; n <= s.end; n += PAGE) {
        mark(n - 1);
        mark(n);
        mark(n + 1);
      }
    }
    mark(s.end - 1);
  });
  let x = seed >>> 0 || 1;
  for (let k = 0; k < anywhere; k++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    mark((x >>> 0) % (ch.bytes.length + 1));
  }
  return pick;
}

/** Same packet (fields, offsets, page bytes), wherever the bytes live. */
export function samePacket(a: MultifdRecord, b: MultifdRecord): boolean {
  if (a.type === 'multifd-init' || b.type === 'multifd-init') {
    return a.type === 'multifd-init' && b.type === 'multifd-init' && a.id === b.id && Buffer.from(a.uuid).equals(Buffer.from(b.uuid));
  }
  const keys = ['flags', 'sync', 'packetNum', 'pagesAlloc', 'nextPacketSize', 'block', 'handle', 'last'] as const;
  if (keys.some((k) => a[k] !== b[k])) return false;
  const { normal: na, zero: za } = a;
  const { normal: nb, zero: zb } = b;
  if (na.length !== nb.length || za.length !== zb.length) return false;
  if (!na.every((v, i) => v === nb[i]) || !za.every((v, i) => v === zb[i])) return false;
  const n = na.length * PAGE;
  if (a.data.buffer === b.data.buffer && a.data.byteOffset + a.start === b.data.byteOffset + b.start) return true; // the very same bytes
  return Buffer.from(a.data.buffer, a.data.byteOffset + a.start, n).equals(Buffer.from(b.data.buffer, b.data.byteOffset + b.start, n));
}

function fail(msg: string): never {
  throw new Error(msg);
}

/**
 * Runs `each(span, index, decoder)` with a decoder fed the channel up to the
 * start of the span (whole records, so its queue is empty and forking it is
 * O(1)); checks on the way that each record pushed whole is the reference.
 */
function forEachSpan(ch: ChannelCapture, opts: MultifdDecoderOptions, each: (s: Span, i: number, d: MultifdDecoder) => void): void {
  const d = new MultifdDecoder(opts);
  ch.spans.forEach((s, i) => {
    each(s, i, d);
    const got = d.push(ch.bytes.subarray(s.start, s.end));
    if (got.length !== 1 || !samePacket(got[0] as MultifdRecord, s.record)) fail(`${ch.file}: record ${i} pushed whole differs`);
  });
  d.end();
}

/**
 * Ends the channel at every chosen offset n (`at[n] === 1`): a decoder given
 * the bytes up to n completes no record it should not and ends cleanly only
 * after a whole record (not before the init message), else 'truncated'.
 * Returns how many offsets were ended and how many of them ended cleanly.
 */
export function checkChannelPrefixes(ch: ChannelCapture, blocks: readonly KnownBlock[], at: Uint8Array): { ended: number; clean: number } {
  const stack = Error.stackTraceLimit;
  Error.stackTraceLimit = 0;
  let ended = 0;
  let clean = 0;
  try {
    forEachSpan(ch, { blocks }, (s, i, d) => {
      for (let n = s.start; n < s.end; n++) {
        if (at[n] !== 1) continue;
        const f = d.fork();
        ended++;
        // this record's bytes so far, as one chunk: nothing completes before its end
        if (n > s.start && f.push(ch.bytes.subarray(s.start, n)).length !== 0) fail(`${ch.file}: prefix ${n} completed a record`);
        try {
          f.end();
          if (n !== s.start || i === 0) fail(`${ch.file}: prefix ${n} ended cleanly inside record ${i}`);
          clean++;
        } catch (e) {
          if (!(e instanceof StreamError)) throw e;
          if (e.code !== 'truncated' || (n === s.start && i > 0)) fail(`${ch.file}: prefix ${n}: ${e.code} ${e.message}`);
        }
      }
    });
  } finally {
    Error.stackTraceLimit = stack;
  }
  // the whole channel: forEachSpan ended it
  if (at[ch.bytes.length] === 1) {
    ended++;
    clean++;
  }
  return { ended, clean };
}

/**
 * Splits the channel in two at every chosen offset: the same records as
 * pushed whole, and the decoder is left ready for the next record. Returns
 * how many splits were made.
 */
export function checkChannelSplits(ch: ChannelCapture, blocks: readonly KnownBlock[], at: Uint8Array): number {
  let splits = 0;
  forEachSpan(ch, { blocks }, (s, i, d) => {
    const next = ch.spans[i + 1];
    for (let cut = s.start + 1; cut < s.end; cut++) {
      if (at[cut] !== 1) continue;
      const f = d.fork();
      const got = [...f.push(ch.bytes.subarray(s.start, cut)), ...f.push(ch.bytes.subarray(cut, s.end))];
      if (got.length !== 1 || !samePacket(got[0] as MultifdRecord, s.record)) fail(`${ch.file}: split at ${cut} in record ${i}`);
      if (next && !samePacket(f.push(ch.bytes.subarray(next.start, next.end))[0] as MultifdRecord, next.record)) fail(`${ch.file}: after a split at ${cut}`);
      splits++;
    }
  });
  return splits;
}

/**
 * splitPackets: splits every page packet in two at every chosen offset; the
 * pieces are views of the input at the right bytes (only a page straddling
 * the cut may be a copy), join to the packet's offsets, carry its zero list
 * on the first piece and its SYNC on the last. Returns how many splits.
 */
export function checkChannelPieces(ch: ChannelCapture, blocks: readonly KnownBlock[], at: Uint8Array): number {
  const buf = ch.bytes.buffer;
  const base = ch.bytes.byteOffset;
  let splits = 0;
  forEachSpan(ch, { blocks }, (s, i) => {
    const ref = s.record;
    if (ref.type === 'multifd-init' || ref.normal.length === 0) return;
    const d = new MultifdDecoder({ blocks, splitPackets: true });
    d.push(encodeMultifdInit(0));
    for (let cut = s.start + 1; cut < s.end; cut++) {
      if (at[cut] !== 1) continue;
      splits++;
      const f = d.fork();
      const pieces = [...f.push(ch.bytes.subarray(s.start, cut)), ...f.push(ch.bytes.subarray(cut, s.end))] as MultifdPacketRecord[];
      let done = 0;
      pieces.forEach((p, k) => {
        const last = k === pieces.length - 1;
        const n = p.normal.length;
        const ok =
          p.type === 'multifd-packet' &&
          p.last === last &&
          p.sync === (last && ref.sync) &&
          p.packetNum === ref.packetNum &&
          p.handle === ref.handle &&
          p.zero.length === (k === 0 ? ref.zero.length : 0) &&
          n > 0 &&
          p.normal.every((v, j) => v === ref.normal[done + j]);
        if (!ok) fail(`${ch.file}: record ${i} split at ${cut}: piece ${k} wrong`);
        const pos = s.headerEnd + done * PAGE;
        if (p.data.buffer === buf) {
          if (p.data.byteOffset + p.start !== base + pos) fail(`${ch.file}: split at ${cut}: piece ${k} views the wrong bytes`);
        } else if (n !== 1 || !Buffer.from(p.data.buffer, p.data.byteOffset + p.start, PAGE).equals(ch.bytes.subarray(pos, pos + PAGE))) {
          fail(`${ch.file}: split at ${cut}: piece ${k} is a copy of ${n} pages (only a straddling page may be copied)`);
        }
        done += n;
      });
      if (done !== ref.normal.length) fail(`${ch.file}: split at ${cut}: ${done} of ${ref.normal.length} pages`);
    }
  });
  return splits;
}
