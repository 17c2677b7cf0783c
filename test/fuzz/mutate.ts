/**
 * Mutation helpers shared by the fuzz script (test/fuzz/fuzz-decoder.ts) and
 * the fast-check fuzz tests (test/stream/fuzz.test.ts, multifd-fuzz.test.ts).
 *
 * A mutation is a plain tuple `[kind, pos, value]` (easy to generate with
 * fast-check, to print, and to replay). Positions and values are reduced
 * modulo whatever they index, so any naturals are valid. Field-aware kinds
 * use a {@link RecordMap} of the base: where each record starts and where its
 * length/id/flags fields are, found by decoding the base once and
 * re-encoding record by record (the encoder is byte-exact on QEMU captures).
 */
import {
  PreemptEncoder,
  StreamDecoder,
  StreamEncoder,
  StreamError,
  encodeReturnPathMessage,
  MULTIFD_INIT_BYTES,
  multifdPacketHeaderLength,
  type MultifdRecord,
  type PreemptRecord,
  type ReturnPathMessage,
  type StreamRecord,
} from '../../src/stream/index.js';

export type Mutation = readonly [kind: number, pos: number, value: number];

export type Width = 1 | 2 | 4 | 8;

/** A fixed-width big-endian field of the base; `flags` marks a RAM record's be64 (address | RAM_SAVE_FLAG_*). */
export interface Field {
  readonly at: number;
  readonly width: Width;
  readonly flags?: boolean;
}

/** One record of the base: bytes [start, end). */
export interface RecordSpan {
  readonly start: number;
  readonly end: number;
  readonly type: string;
}

export interface RecordMap {
  readonly spans: readonly RecordSpan[];
  readonly fields: readonly Field[];
}

export const EMPTY_MAP: RecordMap = { spans: [], fields: [] };

/**
 * Mutation kinds. 0–4 are the historical ones of test/stream/fuzz.test.ts
 * (kept with the same meaning so old counterexamples still replay).
 */
export const Kind = {
  BIT_FLIP: 0,
  TRUNCATE: 1,
  BE32_EXTREME: 2, // at any position
  SPLICE_OUT: 3, // remove up to 9000 bytes
  COPY_IN: 4, // insert a 64-byte copy of another part
  FIELD_EXTREME: 5, // a known field of the record map to an extreme
  DUPLICATE_RECORD: 6,
  DROP_RECORD: 7,
  SWAP_RECORDS: 8, // two adjacent records
  SET_BYTE: 9,
  BE16_EXTREME: 10,
  BE64_EXTREME: 11,
  DONOR_SPLICE: 12, // insert a range of another base
  DUPLICATE_RANGE: 13, // any range, inserted right after itself
  MOVE_RECORD: 14, // a record moved to another record boundary
  JSON_NUMBER: 15, // a decimal number (the VM description) replaced by an extreme
} as const;
export const KIND_COUNT = 16;

/** Mutations that keep the length and every offset: applied first, in base coordinates. */
const IN_PLACE = new Set<number>([Kind.BIT_FLIP, Kind.BE32_EXTREME, Kind.FIELD_EXTREME, Kind.SET_BYTE, Kind.BE16_EXTREME, Kind.BE64_EXTREME]);

const MAX_BY_WIDTH = { 1: 0xffn, 2: 0xffffn, 4: 0xffff_ffffn, 8: 0xffff_ffff_ffff_ffffn } as const;

/** Values a length/id field is pushed to: 0, 1, the type's extremes, page and limit boundaries, the neighbours of the original. */
function extremes(width: Width, original: bigint): bigint[] {
  const max = MAX_BY_WIDTH[width];
  const top = 1n << BigInt(width * 8 - 1);
  const common = [0n, 1n, max, max - 1n, top, top - 1n, original + 1n, original - 1n, original * 2n, original + 4096n, original ^ top];
  switch (width) {
    case 1:
      return [...common, 0x7en, 0x20n];
    case 2:
      return [...common, 512n, 513n, 4096n, 4097n, 0x100n];
    case 4:
      return [...common, 0x100_0000n, 0x100_0001n, 0x1000_0000n, 0x1000_0001n, 0x1_0000n, 0xffffn, 4096n];
    case 8:
      return [...common, 1n << 53n, (1n << 53n) + 1n, 1n << 32n, (1n << 32n) - 1n, 1n << 40n, original | (1n << 45n)];
  }
}

/** RAM_SAVE_FLAG_* combinations for a RAM record's low 12 bits. */
const RAM_FLAGS = [0x000, 0x001, 0x002, 0x004, 0x008, 0x010, 0x020, 0x022, 0x028, 0x040, 0x060, 0x080, 0x100, 0x200, 0x210, 0x00c, 0x018, 0x030, 0xfff, 0x800];

function readBe(b: Buffer, at: number, width: Width): bigint {
  switch (width) {
    case 1:
      return BigInt(b[at] as number);
    case 2:
      return BigInt(b.readUInt16BE(at));
    case 4:
      return BigInt(b.readUInt32BE(at));
    case 8:
      return b.readBigUInt64BE(at);
  }
}

function writeBe(b: Buffer, at: number, width: Width, v: bigint): void {
  const x = BigInt.asUintN(width * 8, v);
  switch (width) {
    case 1:
      b[at] = Number(x);
      return;
    case 2:
      b.writeUInt16BE(Number(x), at);
      return;
    case 4:
      b.writeUInt32BE(Number(x), at);
      return;
    case 8:
      b.writeBigUInt64BE(x, at);
  }
}

function pushField(b: Buffer, f: Field, value: number): void {
  if (f.at + f.width > b.length) return;
  const orig = readBe(b, f.at, f.width);
  if (f.flags && value % 3 === 0) {
    // keep the address, change the flags
    const flags = BigInt(RAM_FLAGS[Math.floor(value / 3) % RAM_FLAGS.length]!);
    writeBe(b, f.at, 8, (orig & ~0xfffn) | flags);
    return;
  }
  const xs = extremes(f.width, orig);
  writeBe(b, f.at, f.width, xs[value % xs.length]!);
}

const JSON_NUMBERS = ['0', '-1', '1.5', '1e308', '9007199254740993', '4294967296', '18446744073709551616', '""', 'null', '[]', '{}', '99999999999'];

function replaceJsonNumber(b: Buffer, pos: number, value: number): Buffer {
  // The first number after `pos` that follows a colon (a JSON value), wrapping around once.
  let from = pos % b.length;
  let start = -1;
  for (let tries = 0; tries < 64 && start < 0; tries++) {
    let i = b.indexOf(0x3a, from);
    if (i < 0) {
      if (from === 0) break;
      from = 0;
      continue;
    }
    from = i + 1;
    while (b[i + 1] === 0x20) i++;
    const c = b[i + 1];
    if (c !== undefined && c >= 0x30 && c <= 0x39) start = i + 1;
  }
  if (start < 0) return b;
  let end = start;
  while (end < b.length && (b[end] as number) >= 0x30 && (b[end] as number) <= 0x39) end++;
  const repl = Buffer.from(JSON_NUMBERS[value % JSON_NUMBERS.length]!, 'latin1');
  return Buffer.concat([b.subarray(0, start), repl, b.subarray(end)]);
}

/**
 * Applies `muts` to a copy of `base`. In-place kinds are applied first, in
 * base coordinates (so `map` fields still point at their fields); the kinds
 * that move bytes follow, in order. `donors` feed DONOR_SPLICE.
 */
export function mutate(base: Uint8Array, muts: readonly Mutation[], map: RecordMap = EMPTY_MAP, donors: readonly Uint8Array[] = []): Buffer {
  let b: Buffer = Buffer.from(base);
  const ordered = [...muts.filter((m) => IN_PLACE.has(m[0] % KIND_COUNT)), ...muts.filter((m) => !IN_PLACE.has(m[0] % KIND_COUNT))];
  for (const [rawKind, pos, value] of ordered) {
    if (b.length === 0) break;
    const kind = rawKind % KIND_COUNT;
    const p = pos % b.length;
    const spans = map.spans;
    switch (kind) {
      case Kind.BIT_FLIP:
        b[p]! ^= 1 << (value % 8);
        break;
      case Kind.TRUNCATE:
        b = b.subarray(0, p);
        break;
      case Kind.BE32_EXTREME:
        if (p + 4 <= b.length) b.writeUInt32BE([0, 1, 0xff, 0xffff, 0x7fffffff, 0xffffffff][value % 6]!, p);
        break;
      case Kind.SPLICE_OUT:
        b = Buffer.concat([b.subarray(0, p), b.subarray(Math.min(b.length, p + (value % 9000)))]);
        break;
      case Kind.COPY_IN:
        b = Buffer.concat([b.subarray(0, p), b.subarray(value % b.length, (value % b.length) + 64), b.subarray(p)]);
        break;
      case Kind.FIELD_EXTREME: {
        if (map.fields.length === 0) break;
        pushField(b, map.fields[pos % map.fields.length]!, value);
        break;
      }
      case Kind.SET_BYTE:
        b[p] = value & 0xff;
        break;
      case Kind.BE16_EXTREME:
        if (p + 2 <= b.length) pushField(b, { at: p, width: 2 }, value);
        break;
      case Kind.BE64_EXTREME:
        if (p + 8 <= b.length) pushField(b, { at: p, width: 8, flags: true }, value);
        break;
      case Kind.DUPLICATE_RECORD:
      case Kind.DROP_RECORD:
      case Kind.SWAP_RECORDS:
      case Kind.MOVE_RECORD: {
        if (spans.length === 0) break;
        const i = pos % spans.length;
        const s = spans[i]!;
        if (s.end > b.length) break; // moved out of reach by an earlier mutation
        const rec = b.subarray(s.start, s.end);
        if (kind === Kind.DUPLICATE_RECORD) {
          b = Buffer.concat([b.subarray(0, s.end), rec, b.subarray(s.end)]);
        } else if (kind === Kind.DROP_RECORD) {
          b = Buffer.concat([b.subarray(0, s.start), b.subarray(s.end)]);
        } else if (kind === Kind.SWAP_RECORDS) {
          const n = spans[i + 1];
          if (!n || n.start !== s.end || n.end > b.length) break;
          b = Buffer.concat([b.subarray(0, s.start), b.subarray(n.start, n.end), rec, b.subarray(n.end)]);
        } else {
          const to = spans[value % spans.length]!.start;
          if (to > b.length) break;
          const copy = Buffer.from(rec);
          const without = Buffer.concat([b.subarray(0, s.start), b.subarray(s.end)]);
          const at = to > s.start ? Math.max(s.start, to - copy.length) : to;
          b = Buffer.concat([without.subarray(0, at), copy, without.subarray(at)]);
        }
        break;
      }
      case Kind.DONOR_SPLICE: {
        const d = donors.length > 0 ? donors[value % donors.length]! : b;
        if (d.length === 0) break;
        const from = (value >>> 3) % d.length;
        const len = 1 + ((value >>> 7) % 4200);
        b = Buffer.concat([b.subarray(0, p), d.subarray(from, from + len), b.subarray(p)]);
        break;
      }
      case Kind.DUPLICATE_RANGE: {
        const len = 1 + (value % 4200);
        const end = Math.min(b.length, p + len);
        b = Buffer.concat([b.subarray(0, end), b.subarray(p, end), b.subarray(end)]);
        break;
      }
      case Kind.JSON_NUMBER:
        b = replaceJsonNumber(b, p, value);
        break;
      default:
        break;
    }
  }
  return b;
}

/** Cuts `b` at `cuts` (reduced modulo length + 1, sorted): the chunks one decoder pushes. */
export function chunksAt(b: Uint8Array, cuts: readonly number[]): Uint8Array[] {
  const out: Uint8Array[] = [];
  let prev = 0;
  for (const c of [...cuts.map((x) => x % (b.length + 1)).sort((x, y) => x - y), b.length]) {
    out.push(b.subarray(prev, Math.max(prev, c)));
    prev = Math.max(prev, c);
  }
  return out;
}

// ---- record maps ----------------------------------------------------------------

function be64Field(at: number): Field {
  return { at, width: 8, flags: true };
}

/** Decodes a main-channel stream as far as it goes (never throws). */
export function decodeMain(buf: Uint8Array, decoder = new StreamDecoder()): { records: StreamRecord[]; error: StreamError | undefined } {
  const records: StreamRecord[] = [];
  try {
    records.push(...decoder.push(buf));
    records.push(...decoder.end());
  } catch (e) {
    if (!(e instanceof StreamError)) throw e;
    return { records, error: e };
  }
  return { records, error: decoder.error };
}

/**
 * Where every record of a main-channel stream starts and where its fixed
 * fields are, from its decoded records (`startOffset`: stream offset of the
 * first record, for a resumed channel). Records inside a PACKAGED blob are
 * mapped too; the PACKAGED command is 9 bytes and `package-end` takes none.
 */
export function mapMainRecords(records: readonly StreamRecord[], startOffset = 0): RecordMap {
  const enc = new StreamEncoder({ continueMode: 'as-recorded' });
  const spans: RecordSpan[] = [];
  const fields: Field[] = [];
  let off = startOffset;
  for (const r of records) {
    const s = off;
    let len: number;
    if (r.type === 'command' && r.command.cmd === 'packaged') {
      len = 9;
    } else if (r.type === 'package-end') {
      continue;
    } else {
      try {
        enc.write(r);
      } catch {
        break; // not re-encodable (cannot happen for decoder output): stop mapping here
      }
      len = 0;
      for (const p of enc.take()) len += p.length;
    }
    off += len;
    spans.push({ start: s, end: off, type: r.type === 'command' ? `command/${r.command.cmd}` : r.type === 'section' ? `section/${r.kind}` : r.type });
    switch (r.type) {
      case 'header':
        fields.push({ at: s, width: 4 }, { at: s + 4, width: 4 });
        break;
      case 'configuration':
        fields.push({ at: s, width: 1 }, { at: s + 1, width: 4 });
        break;
      case 'section': {
        fields.push({ at: s, width: 1 }, { at: s + 1, width: 4 });
        if (r.kind === 'start' || r.kind === 'full') {
          const n = Buffer.byteLength(r.idstr, 'latin1');
          fields.push({ at: s + 5, width: 1 }, { at: s + 6 + n, width: 4 }, { at: s + 10 + n, width: 4 });
        }
        break;
      }
      case 'footer':
        fields.push({ at: s, width: 1 }, { at: s + 1, width: 4 });
        break;
      case 'command': {
        fields.push({ at: s + 1, width: 2 }, { at: s + 3, width: 2 });
        const c = r.command;
        if (c.cmd === 'ping' || c.cmd === 'packaged') fields.push({ at: s + 5, width: 4 });
        if (c.cmd === 'postcopy-advise') fields.push({ at: s + 5, width: 8 }, { at: s + 13, width: 8 });
        if (c.cmd === 'postcopy-ram-discard') {
          const n = Buffer.byteLength(c.block, 'latin1');
          fields.push({ at: s + 5, width: 1 }, { at: s + 6, width: 1 }, { at: s + 7 + n, width: 1 });
          for (let i = 0; i < c.ranges.length; i++) fields.push({ at: s + 8 + n + 16 * i, width: 8 }, { at: s + 16 + n + 16 * i, width: 8 });
        }
        if (c.cmd === 'recv-bitmap') fields.push({ at: s + 5, width: 1 });
        break;
      }
      case 'ram-page':
      case 'ram-zero':
      case 'ram-xbzrle': {
        fields.push(be64Field(s));
        const head = r.continued ? 8 : 9 + Buffer.byteLength(r.block, 'latin1');
        if (!r.continued) fields.push({ at: s + 8, width: 1 });
        if (r.type === 'ram-zero') fields.push({ at: s + head, width: 1 });
        if (r.type === 'ram-xbzrle') fields.push({ at: s + head, width: 1 }, { at: s + head + 1, width: 2 });
        break;
      }
      case 'ram-eos':
      case 'ram-multifd-flush':
        fields.push(be64Field(s));
        break;
      case 'ram-blocks': {
        fields.push(be64Field(s));
        let p = s + 8;
        for (const blk of r.blocks) {
          const n = Buffer.byteLength(blk.idstr, 'latin1');
          fields.push({ at: p, width: 1 }, { at: p + 1 + n, width: 8 });
          p += 1 + n + 8;
          if (blk.pageSize !== undefined) {
            fields.push({ at: p, width: 8 });
            p += 8;
          }
          if (blk.gpa !== undefined) p += 8;
        }
        break;
      }
      case 'vmdesc':
        fields.push({ at: s, width: 1 }, { at: s + 1, width: 4 });
        break;
      case 'eof':
        fields.push({ at: s, width: 1 });
        break;
      default:
        break;
    }
  }
  return { spans, fields };
}

/** The same for the preempt channel (bare RAM records). */
export function mapPreemptRecords(records: readonly PreemptRecord[]): RecordMap {
  const enc = new PreemptEncoder({ continueMode: 'as-recorded' });
  const spans: RecordSpan[] = [];
  const fields: Field[] = [];
  let off = 0;
  for (const r of records) {
    const s = off;
    try {
      enc.write(r);
    } catch {
      break;
    }
    for (const p of enc.take()) off += p.length;
    spans.push({ start: s, end: off, type: r.type });
    fields.push(be64Field(s));
    if ('continued' in r && !r.continued) fields.push({ at: s + 8, width: 1 });
  }
  return { spans, fields };
}

/** The same for the return path. */
export function mapReturnPath(messages: readonly ReturnPathMessage[]): RecordMap {
  const spans: RecordSpan[] = [];
  const fields: Field[] = [];
  let off = 0;
  for (const m of messages) {
    const s = off;
    off += encodeReturnPathMessage(m).length;
    spans.push({ start: s, end: off, type: m.type });
    fields.push({ at: s, width: 2 }, { at: s + 2, width: 2 });
    switch (m.type) {
      case 'shut':
      case 'pong':
      case 'resume-ack':
        fields.push({ at: s + 4, width: 4 });
        break;
      case 'req-pages':
        fields.push({ at: s + 4, width: 8 }, { at: s + 12, width: 4 });
        break;
      case 'req-pages-id':
        fields.push({ at: s + 4, width: 8 }, { at: s + 12, width: 4 }, { at: s + 16, width: 1 });
        break;
      case 'recv-bitmap': {
        const n = Buffer.byteLength(m.block, 'latin1');
        fields.push({ at: s + 4, width: 1 }, { at: s + 5 + n, width: 8 }, { at: off - 8, width: 8 });
        break;
      }
      default:
        break;
    }
  }
  return { spans, fields };
}

/**
 * The same for a multifd channel decoded whole: the init message (magic,
 * version, channel id) and every packet (magic, version, flags, pages_alloc,
 * normal_pages, next_packet_size, packet_num, zero_pages, the name's first
 * and last bytes, the first and last used offset entries). `pagesAlloc` is the
 * decoder's packet capacity (the header length follows from it).
 */
export function mapMultifdRecords(records: readonly MultifdRecord[], pagesAlloc = 128): RecordMap {
  const header = multifdPacketHeaderLength(pagesAlloc);
  const spans: RecordSpan[] = [];
  const fields: Field[] = [];
  let off = 0;
  for (const r of records) {
    const s = off;
    if (r.type === 'multifd-init') {
      off += MULTIFD_INIT_BYTES;
      fields.push({ at: s, width: 4 }, { at: s + 4, width: 4 }, { at: s + 24, width: 1 });
    } else {
      off += header + r.normal.length * 4096;
      for (const at of [0, 4, 8, 12, 16, 20]) fields.push({ at: s + at, width: 4 });
      fields.push({ at: s + 24, width: 8 }, { at: s + 32, width: 4 }, { at: s + 64, width: 1 }, { at: s + 64 + r.block.length, width: 1 });
      const used = r.normal.length + r.zero.length;
      if (used > 0) fields.push({ at: s + 320, width: 8 }, { at: s + 320 + 8 * (used - 1), width: 8 });
      if (r.normal.length > 0 && r.zero.length > 0) fields.push({ at: s + 320 + 8 * r.normal.length, width: 8 });
    }
    spans.push({ start: s, end: off, type: r.type });
  }
  return { spans, fields };
}

// ---- a small seeded PRNG (sfc32), so that input i of seed s is the same everywhere -----

export class Rng {
  private a: number;
  private b: number;
  private c: number;
  private d: number;

  /** A generator for input `index` of run `seed`: independent of which worker makes it. */
  constructor(seed: number, index = 0) {
    this.a = 0x9e3779b9 ^ seed;
    this.b = 0x243f6a88 ^ index;
    this.c = 0xb7e15162 ^ Math.floor(index / 0x1_0000_0000);
    this.d = 1;
    for (let i = 0; i < 15; i++) this.u32();
  }

  u32(): number {
    this.a >>>= 0;
    this.b >>>= 0;
    this.c >>>= 0;
    this.d >>>= 0;
    const t = (((this.a + this.b) | 0) + this.d) | 0;
    this.d = (this.d + 1) | 0;
    this.a = this.b ^ (this.b >>> 9);
    this.b = (this.c + (this.c << 3)) | 0;
    this.c = (this.c << 21) | (this.c >>> 11);
    this.c = (this.c + t) | 0;
    return t >>> 0;
  }

  /** An integer in [0, n). */
  int(n: number): number {
    return n <= 0 ? 0 : this.u32() % n;
  }

  /** An integer in [lo, hi]. */
  range(lo: number, hi: number): number {
    return lo + this.int(hi - lo + 1);
  }

  chance(p: number): boolean {
    return this.u32() / 0x1_0000_0000 < p;
  }

  pick<T>(xs: readonly T[]): T {
    return xs[this.int(xs.length)]!;
  }
}

/**
 * Random mutations for a base with `map`: 1–`max` of them, field-aware kinds
 * favoured when the map has fields.
 */
export function randomMutations(rng: Rng, map: RecordMap, max = 4): Mutation[] {
  const n = rng.range(1, max);
  const out: Mutation[] = [];
  for (let i = 0; i < n; i++) {
    let kind: number;
    const r = rng.int(100);
    if (map.fields.length > 0 && r < 30) kind = Kind.FIELD_EXTREME;
    else if (map.spans.length > 0 && r < 45) kind = rng.pick([Kind.DUPLICATE_RECORD, Kind.DROP_RECORD, Kind.SWAP_RECORDS, Kind.MOVE_RECORD]);
    else kind = rng.int(KIND_COUNT);
    out.push([kind, rng.u32(), rng.u32()]);
  }
  return out;
}

/**
 * Chunk boundaries for an input of `len` bytes: one push, a few random cuts,
 * many cuts, cuts next to record boundaries, or small fixed-size chunks
 * (byte by byte for small inputs). Returns the cut offsets, sorted.
 */
export function randomCuts(rng: Rng, len: number, map: RecordMap): number[] {
  const mode = rng.int(100);
  const cuts: number[] = [];
  if (mode < 30 || len === 0) return cuts;
  if (mode < 60) {
    for (let i = rng.range(1, 8); i > 0; i--) cuts.push(rng.int(len + 1));
  } else if (mode < 75) {
    for (let i = rng.range(9, 64); i > 0; i--) cuts.push(rng.int(len + 1));
  } else if (mode < 90 && map.spans.length > 0) {
    for (let i = rng.range(1, 24); i > 0; i--) {
      const s = rng.pick(map.spans);
      const at = (rng.chance(0.5) ? s.start : s.end) + rng.range(-3, 3);
      if (at >= 0 && at <= len) cuts.push(at);
    }
  } else {
    // small chunks: byte by byte when short, else a few hundred pushes at most
    const size = len <= 2048 ? rng.range(1, 3) : Math.max(rng.range(1, 512), Math.ceil(len / 400));
    for (let at = size; at < len; at += size) cuts.push(at);
  }
  return cuts.sort((x, y) => x - y);
}
