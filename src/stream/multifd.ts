/**
 * QEMU 10.0's multifd channels (migration/multifd.c, multifd-nocomp.c): each
 * is its own connection, opened by the source after the main one, carrying
 * a 64-byte init message and then packets. Encoder, decoder and lengths side
 * by side. Pure: no I/O.
 *
 * What 10.0.2 puts on a channel (all big-endian):
 *
 *   init (MultiFDInit_t, 64 bytes): magic 0x11223344, version 1, the 16-byte
 *   UUID (`-uuid`, zeros when unset; the destination compares it with its
 *   own), the channel id (u8), 7 + 32 reserved zero bytes.
 *
 *   packet (MultiFDPacket_t): magic, version, flags @8, pages_alloc @12,
 *   normal_pages @16, next_packet_size @20, packet_num (u64) @24,
 *   zero_pages @32, 4 + 24 reserved bytes, the RAM block's name NUL-padded to
 *   256 bytes @64, then an array of u64 page offsets @320: normal pages
 *   first, then zero pages. Then the normal pages' bytes, 4 KiB each (no
 *   compression).
 *
 * Facts that are easy to get wrong:
 *
 * - The packet's length does not come from the packet: both sides size the
 *   offset array by the packet capacity (MULTIFD_PACKET_SIZE 512 KiB / 4 KiB
 *   = 128 pages), so every packet header is 320 + 128 × 8 = 1344 bytes, even
 *   a SYNC packet whose pages_alloc field is 0 and a packet of 3 pages.
 *   Unused array entries are zero.
 * - pages_alloc is 128 in a packet with pages and 0 in a SYNC packet (QEMU
 *   fills the page fields only for packets that carry pages); the receiver
 *   refuses pages_alloc > 128, normal_pages > pages_alloc and zero_pages >
 *   pages_alloc − normal_pages.
 * - next_packet_size is normal_pages × 4096 (the bytes after the header),
 *   0 in a SYNC packet.
 * - packet_num is one counter shared by all the channels of the source
 *   (fetch-and-increment per packet, from 0): increasing on a channel, with
 *   gaps; across channels every number appears once. The receiver only keeps
 *   the largest; nothing is checked against it.
 * - SYNC packets (flags 0x1, no pages) come on every channel at setup (the
 *   first packet of each channel) and at the end of every pass over RAM;
 *   after sending them the source writes one MULTIFD_FLUSH on main, and a
 *   destination channel that read a SYNC waits until main's MULTIFD_FLUSH
 *   (multifd_recv_sync_main) before reading on.
 * - Zero pages (zero-page-detection=multifd, the default) are listed after
 *   the normal ones and carry no bytes. Neither list is sorted: QEMU's
 *   zero-page detection swaps zero pages to the end of the array.
 * - flags bits 1–5 name the compression (0 none, 0x02 zlib, 0x04 zstd, 0x08
 *   qpl, 0x10 uadk, 0x20 qatzip); bit 6 (0x40) marks a device-state packet
 *   (VFIO, MultiFDPacketDeviceState_t, another layout). Neither is
 *   implemented here: they are refused by name.
 */
import { TARGET_PAGE_MASK, TARGET_PAGE_SIZE } from './constants.js';
import { StreamError } from './errors.js';
import { ByteQueue, be32At, decodeName } from './byte-queue.js';
import { PushDecoder } from './push-decoder.js';
import type { KnownBlock } from './ram.js';
import { usageError } from '../errors.js';

/** MULTIFD_MAGIC: the first be32 of the init message and of every packet. */
export const MULTIFD_MAGIC = 0x11223344;
/** MULTIFD_VERSION. */
export const MULTIFD_VERSION = 1;
/** sizeof(MultiFDInit_t). */
export const MULTIFD_INIT_BYTES = 64;
/** sizeof(MultiFDPacket_t) without its offset array: the fields and the 256-byte block name. */
export const MULTIFD_PACKET_FIXED_BYTES = 320;
/** Pages per packet in QEMU: MULTIFD_PACKET_SIZE (512 KiB) / TARGET_PAGE_SIZE; sizes every packet header. */
export const MULTIFD_PACKET_PAGES = 128;
/** Length of the block-name field; a name has at most 255 bytes (the last is always NUL). */
export const MULTIFD_BLOCK_NAME_BYTES = 256;

/** Flag bits of a packet (MULTIFD_FLAG_*). */
export const MultifdFlag = {
  SYNC: 0x1, // MULTIFD_FLAG_SYNC
  COMPRESSION_MASK: 0x3e, // MULTIFD_FLAG_COMPRESSION_MASK (0x1f << 1)
  DEVICE_STATE: 0x40, // MULTIFD_FLAG_DEVICE_STATE (32 << 1)
} as const;

/** Compression values of the flags' compression field (MULTIFD_FLAG_ZLIB …), by name. */
export const MultifdCompression = {
  none: 0x00, // MULTIFD_FLAG_NOCOMP
  zlib: 0x02, // MULTIFD_FLAG_ZLIB
  zstd: 0x04, // MULTIFD_FLAG_ZSTD
  qpl: 0x08, // MULTIFD_FLAG_QPL
  uadk: 0x10, // MULTIFD_FLAG_UADK
  qatzip: 0x20, // MULTIFD_FLAG_QATZIP
} as const;

/** Every flag bit 10.0 defines; any other is refused. */
const KNOWN_FLAGS = MultifdFlag.SYNC | MultifdFlag.COMPRESSION_MASK | MultifdFlag.DEVICE_STATE;

const PAGE = TARGET_PAGE_SIZE;
const PAGE_MASK = TARGET_PAGE_MASK;
const FIXED = MULTIFD_PACKET_FIXED_BYTES;
const EMPTY_OFFSETS = new Float64Array(0);
const EMPTY_BYTES = new Uint8Array(0);
const ZERO_UUID = new Uint8Array(16);

// ---- records ---------------------------------------------------------------------

/** The 64-byte message that opens a multifd channel. */
export interface MultifdInitRecord {
  readonly type: 'multifd-init';
  /** Channel id, 0 … multifd-channels − 1. */
  readonly id: number;
  /** The source's UUID (16 bytes; zeros when QEMU runs without -uuid). */
  readonly uuid: Uint8Array;
}

/** One packet of a multifd channel, with its pages. */
export interface MultifdPacketRecord {
  readonly type: 'multifd-packet';
  /** The flags field as on the wire. */
  readonly flags: number;
  /** flags & SYNC: after this packet's pages the channel meets the main stream's MULTIFD_FLUSH. */
  readonly sync: boolean;
  readonly packetNum: bigint;
  /** The pages_alloc field as on the wire (128 with pages, 0 in a SYNC packet). */
  readonly pagesAlloc: number;
  /** The next_packet_size field: bytes of page data after the header (normal × 4096). */
  readonly nextPacketSize: number;
  /** The RAM block's name; '' when the packet has no pages (a SYNC packet). */
  readonly block: string;
  /** The block, when the decoder was given the block list and the packet has pages. */
  readonly handle?: KnownBlock;
  /** Byte offsets within the block of the normal pages, in wire order (not sorted). */
  readonly normal: Float64Array;
  /** Byte offsets of the zero pages (no bytes on the wire), in wire order. */
  readonly zero: Float64Array;
  /**
   * Normal page i is `data[start + i*4096, start + (i+1)*4096)`: a view of the
   * pushed chunk when the packet's pages arrived whole in it, else a copy.
   */
  readonly data: Uint8Array;
  readonly start: number;
  /**
   * True on a whole packet. With `splitPackets` a packet whose pages arrive
   * in several chunks comes as several records ("pieces"), each with the
   * pages whole in one chunk: `normal` is that piece's offsets, `zero` is in
   * the first piece only, `sync` is on the last piece only, and `last` is
   * false on all but the last.
   */
  readonly last: boolean;
}

/** What a MultifdDecoder yields. */
export type MultifdRecord = MultifdInitRecord | MultifdPacketRecord;

// ---- lengths and encoders ---------------------------------------------------------

/** Header bytes of a packet whose offset array holds `pagesAlloc` entries (1344 for QEMU's 128). */
export function multifdPacketHeaderLength(pagesAlloc: number): number {
  return FIXED + 8 * pagesAlloc;
}

/** The init message of channel `id` (0–255); `uuid` defaults to zeros (QEMU without -uuid). */
export function encodeMultifdInit(id: number, uuid: Uint8Array = ZERO_UUID): Uint8Array {
  if (!Number.isInteger(id) || id < 0 || id > 255) throw usageError('range', 'bad-option', 'id', `multifd channel id ${String(id)} is not an integer 0–255`);
  if (uuid.length !== 16) throw usageError('range', 'bad-option', 'uuid', `a UUID has 16 bytes, not ${uuid.length}`);
  const b = new Uint8Array(MULTIFD_INIT_BYTES);
  putBe32(b, 0, MULTIFD_MAGIC);
  putBe32(b, 4, MULTIFD_VERSION);
  b.set(uuid, 8);
  b[24] = id;
  return b;
}

/** The fields of a packet to encode; see encodeMultifdPacketHeader. */
export interface MultifdPacketHeaderFields {
  /** Flags; a packet with pages must not have compression or device-state bits. */
  readonly flags: number;
  /**
   * The packet capacity: the offset array's length, hence the header length
   * (multifdPacketHeaderLength). QEMU always uses MULTIFD_PACKET_PAGES (128)
   * and reads exactly that many, so against QEMU it must be 128.
   */
  readonly pagesAlloc: number;
  readonly packetNum: bigint;
  /** Default normalCount × 4096, as QEMU. */
  readonly nextPacketSize?: number;
  /** Block name ('' for a packet without pages). */
  readonly block: string;
  /** Page-aligned byte offsets of the normal pages (their bytes follow the header). */
  readonly normal: ArrayLike<number>;
  /** How many of `normal` to send (default all). */
  readonly normalCount?: number;
  /** Page-aligned byte offsets of the zero pages. */
  readonly zero: ArrayLike<number>;
  readonly zeroCount?: number;
}

/**
 * The header bytes of one packet (multifdPacketHeaderLength(pagesAlloc) of
 * them); the caller writes the normal pages' bytes after it, by reference.
 * The pages_alloc field is `pagesAlloc` when the packet has pages and 0 when
 * it has none (a SYNC packet), as QEMU writes them; unused offset entries are
 * zero. Bad fields are a RangeError (code 'bad-option').
 */
export function encodeMultifdPacketHeader(p: MultifdPacketHeaderFields): Uint8Array {
  const normalCount = p.normalCount ?? p.normal.length;
  const zeroCount = p.zeroCount ?? p.zero.length;
  const cap = p.pagesAlloc;
  if (!Number.isInteger(cap) || cap < 0 || cap > 0x10000) throw usageError('range', 'bad-option', 'pagesAlloc', `pagesAlloc ${String(cap)} is not an integer 0–65536`);
  if (!Number.isInteger(normalCount) || normalCount < 0 || normalCount > p.normal.length) throw usageError('range', 'bad-option', 'normalCount', `normalCount ${String(normalCount)} is not 0–${p.normal.length}`);
  if (!Number.isInteger(zeroCount) || zeroCount < 0 || zeroCount > p.zero.length) throw usageError('range', 'bad-option', 'zeroCount', `zeroCount ${String(zeroCount)} is not 0–${p.zero.length}`);
  const pages = normalCount + zeroCount;
  if (pages > cap) throw usageError('range', 'bad-option', 'pagesAlloc', `${pages} pages do not fit a packet of ${cap}`);
  if (!Number.isInteger(p.flags) || p.flags < 0 || p.flags > 0xffffffff) throw usageError('range', 'bad-option', 'flags', `flags ${String(p.flags)} is not a be32`);
  if (p.packetNum < 0n || p.packetNum > 0xffff_ffff_ffff_ffffn) throw usageError('range', 'bad-option', 'packetNum', `packetNum ${p.packetNum} is not a u64`);
  const next = p.nextPacketSize ?? normalCount * PAGE;
  if (!Number.isInteger(next) || next < 0 || next > 0xffffffff) throw usageError('range', 'bad-option', 'nextPacketSize', `nextPacketSize ${String(next)} is not a be32`);
  const name = Buffer.from(p.block, 'latin1');
  if (name.length >= MULTIFD_BLOCK_NAME_BYTES) throw usageError('range', 'bad-option', 'block', `block name of ${name.length} bytes (at most 255)`);
  if (pages > 0 && name.length === 0) throw usageError('range', 'bad-option', 'block', 'a packet with pages needs its block name');
  const b = new Uint8Array(multifdPacketHeaderLength(cap));
  putBe32(b, 0, MULTIFD_MAGIC);
  putBe32(b, 4, MULTIFD_VERSION);
  putBe32(b, 8, p.flags);
  putBe32(b, 12, pages > 0 ? cap : 0);
  putBe32(b, 16, normalCount);
  putBe32(b, 20, next);
  putBe32(b, 24, Number(p.packetNum >> 32n));
  putBe32(b, 28, Number(p.packetNum & 0xffff_ffffn));
  putBe32(b, 32, zeroCount);
  b.set(name, 64);
  let at = FIXED;
  for (let i = 0; i < normalCount; i++, at += 8) putOffset(b, at, p.normal[i] as number, 'normal', i);
  for (let i = 0; i < zeroCount; i++, at += 8) putOffset(b, at, p.zero[i] as number, 'zero', i);
  return b;
}

function putOffset(b: Uint8Array, at: number, v: number, list: string, i: number): void {
  if (!Number.isSafeInteger(v) || v < 0 || (v & PAGE_MASK) !== 0) {
    throw usageError('range', 'unaligned-offset', `${list}[${i}]`, `page offset ${String(v)} is not a page-aligned non-negative integer`);
  }
  putBe32(b, at, Math.floor(v / 0x1_0000_0000));
  putBe32(b, at + 4, v >>> 0);
}

function putBe32(b: Uint8Array, at: number, v: number): void {
  b[at] = v >>> 24;
  b[at + 1] = (v >>> 16) & 0xff;
  b[at + 2] = (v >>> 8) & 0xff;
  b[at + 3] = v & 0xff;
}

/**
 * Calls `each(first, offset, n)` for every run of consecutive pages in
 * `offsets[0..count)`: entries first … first+n−1 are offset, offset+4096, …
 * Lets a consumer land a packet's pages by runs (one writePages per run, not
 * per page). The lists are not sorted, so a run ends at any break.
 */
export function forEachOffsetRun(offsets: ArrayLike<number>, count: number, each: (first: number, offset: number, n: number) => void): void {
  let i = 0;
  while (i < count) {
    const first = i;
    const offset = offsets[i] as number;
    let expect = offset + PAGE;
    i++;
    while (i < count && (offsets[i] as number) === expect) {
      expect += PAGE;
      i++;
    }
    each(first, offset, i - first);
  }
}

// ---- decoder -------------------------------------------------------------------

/** Options of MultifdDecoder. */
export interface MultifdDecoderOptions {
  /**
   * The migration's RAM blocks (from the main channel's block list). With
   * them a packet naming another block is an 'unknown-ram-block' error, page
   * offsets must lie inside the block ('page-out-of-range') and packets carry
   * `handle`. Without them only alignment is checked. Also settable later
   * with setBlocks (the block list arrives on main after the channels connect).
   */
  readonly blocks?: readonly KnownBlock[];
  /**
   * The packet capacity in pages, which sizes every packet header
   * (multifdPacketHeaderLength) and bounds pages_alloc: a larger pages_alloc
   * is a 'length-too-large' error. Default MULTIFD_PACKET_PAGES (128), what
   * QEMU sends and accepts; 1–65536. Page data held per packet is at most
   * this × 4 KiB.
   */
  readonly maxPagesAlloc?: number;
  /**
   * Yield a packet's pages as they arrive, in pieces that lie whole in one
   * pushed chunk (see MultifdPacketRecord.last), instead of copying a packet
   * split across chunks into one buffer. Over TCP nearly every 512 KiB packet
   * spans chunks; with this only a page that straddles two chunks is copied.
   * Default false (one record per packet, the same for any chunking).
   */
  readonly splitPackets?: boolean;
  /** Number of channels of the migration: an init message with id ≥ this is a 'bad-multifd-init' error. */
  readonly channels?: number;
  /** The UUID the source must announce (QEMU compares it with its own): another is a 'bad-multifd-init' error. */
  readonly uuid?: Uint8Array;
}

type State = 'init' | 'header' | 'pages';

/**
 * Push decoder of one multifd channel: the init message, then packets. Same
 * contract as the other push decoders (PushDecoder): `push(chunk)` returns the
 * records the bytes so far complete, the same for any chunking; a malformed
 * packet fails the decoder with one StreamError (code, byte offset of the
 * bad field) and it stays failed. Memory is bounded by one packet.
 */
export class MultifdDecoder extends PushDecoder<MultifdRecord> {
  private q = new ByteQueue();
  private state: State = 'init';
  private readonly capacity: number;
  private readonly headerBytes: number;
  private readonly channels: number;
  private readonly uuid: Uint8Array | undefined;
  private blockMap: Map<string, KnownBlock> | undefined;
  /** The packet whose page data is awaited (state 'pages'). */
  private pending: Omit<MultifdPacketRecord, 'data' | 'start' | 'last'> | undefined;
  /** Normal pages of `pending` already yielded (splitPackets). */
  private pendingDone = 0;
  private readonly split: boolean;
  private ended = false;
  private initSeen: MultifdInitRecord | undefined;

  constructor(opts: MultifdDecoderOptions = {}) {
    super();
    const cap = opts.maxPagesAlloc ?? MULTIFD_PACKET_PAGES;
    if (!Number.isInteger(cap) || cap < 1 || cap > 0x10000) throw usageError('range', 'bad-option', 'maxPagesAlloc', `maxPagesAlloc ${String(cap)} is not an integer 1–65536`);
    const ch = opts.channels ?? 256;
    if (!Number.isInteger(ch) || ch < 1 || ch > 256) throw usageError('range', 'bad-option', 'channels', `channels ${String(ch)} is not an integer 1–256`);
    if (opts.uuid !== undefined && opts.uuid.length !== 16) throw usageError('range', 'bad-option', 'uuid', `a UUID has 16 bytes, not ${opts.uuid.length}`);
    this.capacity = cap;
    this.headerBytes = multifdPacketHeaderLength(cap);
    this.channels = ch;
    this.uuid = opts.uuid;
    this.split = opts.splitPackets === true;
    if (opts.blocks) this.setBlocks(opts.blocks);
  }

  /** Absolute offset of the next byte to be parsed. */
  get offset(): number {
    return this.q.offset;
  }

  /** The init message, once read. */
  get init(): MultifdInitRecord | undefined {
    return this.initSeen;
  }

  /** Gives (or replaces) the block list that names and bounds the packets' pages. */
  setBlocks(blocks: readonly KnownBlock[]): void {
    this.blockMap = new Map(blocks.map((b) => [b.idstr, b]));
  }

  /** An independent decoder in this decoder's state (pushed bytes shared): "what if the input ended here?". */
  fork(): MultifdDecoder {
    const f = Object.create(MultifdDecoder.prototype) as MultifdDecoder;
    Object.assign(f, this);
    f.q = this.q.clone();
    return f;
  }

  push(chunk: Uint8Array): MultifdRecord[] {
    this.throwIfFailed();
    if (this.ended) throw new TypeError('push() after end()');
    this.q.push(chunk);
    return this.parseAvailable();
  }

  /**
   * Declares the end of the channel. A channel may end after any whole
   * packet; ending inside one, or before the init message, is 'truncated'.
   */
  end(): void {
    this.throwIfFailed();
    this.ended = true;
    if (this.state === 'init') {
      this.fail(new StreamError('truncated', this.q.offset, `multifd channel ended before its init message (${this.q.available} of ${MULTIFD_INIT_BYTES} bytes)`));
    }
    if (this.state === 'pages') {
      const p = this.pending as MultifdPacketRecord;
      const left = (p.normal.length - this.pendingDone) * PAGE;
      this.fail(new StreamError('truncated', this.q.offset, `multifd channel ended inside the page data of packet ${p.packetNum} (${this.q.available} of the last ${left} bytes)`));
    }
    if (this.q.available > 0) {
      this.fail(new StreamError('truncated', this.q.offset, `multifd channel ended inside a packet header (${this.q.available} of ${this.headerBytes} bytes)`));
    }
  }

  protected step(out: MultifdRecord[]): boolean {
    switch (this.state) {
      case 'init':
        return this.readInit(out);
      case 'header':
        return this.readHeader(out);
      case 'pages':
        return this.readPages(out);
    }
  }

  private readInit(out: MultifdRecord[]): boolean {
    const q = this.q;
    if (!q.ensure(MULTIFD_INIT_BYTES)) {
      // Refuse a wrong magic as soon as its 4 bytes are in: a channel that is not multifd at all.
      if (q.available >= 4 && q.ensure(4)) this.checkMagic(q.be32(0), 'init message');
      return false;
    }
    const at = q.offset;
    this.checkMagic(q.be32(0), 'init message');
    const version = q.be32(4);
    if (version !== MULTIFD_VERSION) throw new StreamError('unsupported-version', at + 4, `multifd init message version ${version} (expected ${MULTIFD_VERSION})`);
    const uuid = new Uint8Array(q.bytes(8, 16)); // a copy: the pushed chunk may be reused
    const id = q.u8(24);
    if (this.uuid && !sameBytes(uuid, this.uuid)) {
      throw new StreamError('bad-multifd-init', at + 8, `multifd channel ${id} announces UUID ${hex(uuid)}, expected ${hex(this.uuid)}`);
    }
    if (id >= this.channels) throw new StreamError('bad-multifd-init', at + 24, `multifd channel id ${id} is not below the number of channels (${this.channels})`);
    q.advance(MULTIFD_INIT_BYTES);
    const rec: MultifdInitRecord = { type: 'multifd-init', id, uuid };
    this.initSeen = rec;
    out.push(rec);
    this.state = 'header';
    return true;
  }

  private checkMagic(magic: number, what: string): void {
    if (magic !== MULTIFD_MAGIC) {
      throw new StreamError('bad-magic', this.q.offset, `multifd ${what} magic 0x${magic.toString(16).padStart(8, '0')} (expected 0x${MULTIFD_MAGIC.toString(16)})`);
    }
  }

  private readHeader(out: MultifdRecord[]): boolean {
    const q = this.q;
    // Fail on the fixed fields as soon as they are in, not after a whole header.
    if (!q.ensure(this.headerBytes)) {
      if (q.available >= 36 && q.ensure(36)) this.checkFixed();
      return false;
    }
    const at = q.offset;
    const { flags, pagesAlloc, normalCount, zeroCount, nextPacketSize } = this.checkFixed();
    const pages = normalCount + zeroCount;
    let block = '';
    let handle: KnownBlock | undefined;
    let normal: Float64Array = EMPTY_OFFSETS;
    let zero: Float64Array = EMPTY_OFFSETS;
    if (pages > 0) {
      const nameBytes = q.bytes(64, MULTIFD_BLOCK_NAME_BYTES);
      const len = nameBytes.indexOf(0);
      if (len < 0) throw new StreamError('bad-multifd-packet', at + 64, 'multifd packet block name is not NUL-terminated');
      if (len === 0) throw new StreamError('unknown-ram-block', at + 64, `multifd packet with ${pages} pages and no block name`);
      block = decodeName(nameBytes.subarray(0, len));
      let limit = Infinity;
      if (this.blockMap) {
        handle = this.blockMap.get(block);
        if (!handle) throw new StreamError('unknown-ram-block', at + 64, `multifd packet names unknown RAM block "${block}" (known: ${[...this.blockMap.keys()].join(', ') || 'none'})`);
        limit = handle.length;
      }
      if (normalCount > 0) normal = this.readOffsets(0, normalCount, at, block, limit);
      if (zeroCount > 0) zero = this.readOffsets(normalCount, zeroCount, at, block, limit);
    }
    const rec = {
      type: 'multifd-packet' as const,
      flags,
      sync: (flags & MultifdFlag.SYNC) !== 0,
      packetNum: q.be64big(24),
      pagesAlloc,
      nextPacketSize,
      block,
      ...(handle ? { handle } : {}),
      normal,
      zero,
    };
    q.advance(this.headerBytes);
    if (normalCount === 0) {
      out.push({ ...rec, data: EMPTY_BYTES, start: 0, last: true });
      return true;
    }
    this.pending = rec;
    this.pendingDone = 0;
    this.state = 'pages';
    return true;
  }

  /** Checks the fields before the block name; the header's first 36 bytes are contiguous. */
  private checkFixed(): { flags: number; pagesAlloc: number; normalCount: number; zeroCount: number; nextPacketSize: number } {
    const q = this.q;
    const at = q.offset;
    this.checkMagic(q.be32(0), 'packet');
    const version = q.be32(4);
    if (version !== MULTIFD_VERSION) throw new StreamError('unsupported-version', at + 4, `multifd packet version ${version} (expected ${MULTIFD_VERSION})`);
    const flags = q.be32(8);
    if ((flags & MultifdFlag.DEVICE_STATE) !== 0) {
      throw new StreamError('unsupported', at + 8, `multifd device-state packet (flag DEVICE_STATE 0x40, flags 0x${flags.toString(16)}): device state over multifd is not implemented`);
    }
    const compression = flags & MultifdFlag.COMPRESSION_MASK;
    if (compression !== 0) {
      throw new StreamError('unsupported', at + 8, `multifd packet compressed with ${compressionName(compression)} (flags 0x${flags.toString(16)}): only multifd-compression=none is implemented`);
    }
    if ((flags & ~KNOWN_FLAGS) !== 0) throw new StreamError('bad-multifd-packet', at + 8, `multifd packet with unknown flag bits 0x${(flags & ~KNOWN_FLAGS).toString(16)}`);
    const pagesAlloc = q.be32(12);
    if (pagesAlloc > this.capacity) throw new StreamError('length-too-large', at + 12, `multifd packet of ${pagesAlloc} pages (at most ${this.capacity})`);
    const normalCount = q.be32(16);
    if (normalCount > pagesAlloc) throw new StreamError('length-too-large', at + 16, `multifd packet with ${normalCount} normal pages in a packet of ${pagesAlloc}`);
    const zeroCount = q.be32(32);
    if (zeroCount > pagesAlloc - normalCount) throw new StreamError('length-too-large', at + 32, `multifd packet with ${zeroCount} zero pages besides ${normalCount} normal ones in a packet of ${pagesAlloc}`);
    const nextPacketSize = q.be32(20);
    if (nextPacketSize !== normalCount * PAGE) {
      throw new StreamError('bad-multifd-packet', at + 20, `multifd packet next_packet_size ${nextPacketSize} for ${normalCount} uncompressed pages (expected ${normalCount * PAGE})`);
    }
    return { flags, pagesAlloc, normalCount, zeroCount, nextPacketSize };
  }

  private readOffsets(from: number, n: number, at: number, block: string, limit: number): Float64Array {
    const b = this.q.buf;
    const base = this.q.pos + FIXED + 8 * from;
    const out = new Float64Array(n);
    for (let i = 0; i < n; i++) {
      const p = base + 8 * i;
      const hi = be32At(b, p);
      const lo = be32At(b, p + 4);
      // ≥ 2^53 is past any block (and not exact as a number).
      const v = hi >= 0x20_0000 ? Infinity : hi * 0x1_0000_0000 + lo;
      if ((lo & PAGE_MASK) !== 0) {
        throw new StreamError('unaligned-page', at + FIXED + 8 * (from + i), `multifd page offset 0x${hi.toString(16)}${lo.toString(16).padStart(8, '0')} of block "${block}" is not page aligned`);
      }
      if (v + PAGE > limit || v === Infinity) {
        throw new StreamError('page-out-of-range', at + FIXED + 8 * (from + i), `multifd page at 0x${hi.toString(16)}${lo.toString(16).padStart(8, '0')} is outside block "${block}"${limit === Infinity ? '' : ` of 0x${limit.toString(16)} bytes`}`);
      }
      out[i] = v;
    }
    return out;
  }

  private readPages(out: MultifdRecord[]): boolean {
    const p = this.pending as Omit<MultifdPacketRecord, 'data' | 'start' | 'last'>;
    const q = this.q;
    const total = p.normal.length;
    if (!this.split) {
      if (!q.ensure(total * PAGE)) return false;
      out.push({ ...p, data: q.buf, start: q.pos, last: true });
      q.advance(total * PAGE);
      this.pending = undefined;
      this.state = 'header';
      return true;
    }
    const done = this.pendingDone;
    // Whole pages in the head chunk; a page straddling two chunks is made contiguous (a 4 KiB copy).
    let n = Math.min(total - done, Math.floor((q.buf.length - q.pos) / PAGE));
    if (n === 0) {
      if (!q.ensure(PAGE)) return false;
      n = 1;
    }
    const last = done + n === total;
    out.push({
      ...p,
      sync: p.sync && last,
      normal: done === 0 && last ? p.normal : p.normal.subarray(done, done + n),
      zero: done === 0 ? p.zero : EMPTY_OFFSETS,
      data: q.buf,
      start: q.pos,
      last,
    });
    q.advance(n * PAGE);
    this.pendingDone = done + n;
    if (last) {
      this.pending = undefined;
      this.state = 'header';
    }
    return true;
  }
}

function compressionName(value: number): string {
  for (const [name, v] of Object.entries(MultifdCompression)) if (v === value) return `${name} (0x${v.toString(16).padStart(2, '0')})`;
  return `unknown compression 0x${value.toString(16).padStart(2, '0')}`;
}

function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

function hex(b: Uint8Array): string {
  return Buffer.from(b).toString('hex');
}
