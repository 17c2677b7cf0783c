/**
 * The per-channel work of QEMU's multifd on the source, with no session
 * inside (so that a worker thread can host it): a packet builder that sorts
 * pages into normal and zero ones (QEMU's zero-page-detection=multifd), the
 * packet counter shared by every channel, and `MultifdChannelSender`, which
 * writes one channel's init message, packets and SYNC packets.
 */
import { TARGET_PAGE_SIZE } from '../../stream/constants.js';
import { MULTIFD_PACKET_PAGES, MultifdFlag, encodeMultifdInit, encodeMultifdPacketHeader } from '../../stream/multifd.js';

/** Pages per packet: QEMU's MULTIFD_PACKET_SIZE (512 KiB) in 4 KiB pages; a QEMU destination refuses more. */
export const MULTIFD_PAGES_PER_PACKET = MULTIFD_PACKET_PAGES;

/** Where a sender writes: a Channel (pull-based bulk), or a worker's equivalent. */
export interface MultifdOutput {
  /** Hands the pieces over as one group, without a promise; returns the bytes queued. Throws once the channel failed. */
  push(pieces: readonly Uint8Array[], priority?: 'bulk' | 'urgent'): number;
  /** Bytes the producer may hand over now (see Channel.bulkRoom). */
  readonly bulkRoom: number;
  /** Resolves when `bulkRoom` is positive again; rejects once the channel failed or closed. */
  whenBulkRoom(): Promise<void>;
}

/**
 * QEMU's global packet number: one counter for every channel of a migration,
 * each packet (SYNC ones too) taking the next value. A BigInt64Array cell
 * with Atomics, so that channels in several threads can share one (pass a
 * cell over a SharedArrayBuffer).
 */
export class MultifdPacketCounter {
  readonly cell: BigInt64Array;
  constructor(cell?: BigInt64Array) {
    this.cell = cell ?? new BigInt64Array(1);
  }
  next(): bigint {
    return Atomics.add(this.cell, 0, 1n);
  }
}

/** What one channel has sent (its share of the migration's stats). */
export interface MultifdChannelCounters {
  packets: number;
  syncs: number;
  normalPages: number;
  zeroPages: number;
  bytes: number;
}

const ZERO_PAGE = Buffer.alloc(TARGET_PAGE_SIZE);

/** True when the 4 KiB page at `data[p]` is all zero: two byte probes, then one native compare. */
function zeroAt(data: Uint8Array, p: number): boolean {
  if (data[p] !== 0 || data[p + TARGET_PAGE_SIZE - 1] !== 0) return false;
  return ZERO_PAGE.compare(data, p, p + TARGET_PAGE_SIZE) === 0;
}

/**
 * One packet being filled: up to `pagesAlloc` pages of one RAM block, normal
 * pages' offsets and bytes (views, one per stretch of consecutive normal
 * pages: no copy) and zero pages' offsets. Reused packet after packet (the
 * offset lists are encoded into the header when the packet goes).
 */
export class MultifdPacketBuilder {
  readonly normal: Float64Array;
  readonly zero: Float64Array;
  normalCount = 0;
  zeroCount = 0;
  /** The block of the pages in the packet ('' while empty). */
  block = '';
  /** The normal pages' bytes, in the order of `normal`. */
  pieces: Uint8Array[] = [];

  constructor(readonly pagesAlloc = MULTIFD_PAGES_PER_PACKET) {
    this.normal = new Float64Array(pagesAlloc);
    this.zero = new Float64Array(pagesAlloc);
  }

  get size(): number {
    return this.normalCount + this.zeroCount;
  }

  /** Pages that still fit. */
  get room(): number {
    return this.pagesAlloc - this.normalCount - this.zeroCount;
  }

  /**
   * Adds `count` consecutive pages of `block` from byte `offset` on, their
   * bytes at `data[start + i*4096]`: each zero-checked in place. The caller
   * keeps to one block per packet and to `room`.
   */
  addRun(block: string, offset: number, count: number, data: Uint8Array, start: number): void {
    if (this.size === 0) this.block = block;
    else if (block !== this.block) throw new RangeError(`multifd packet of block "${this.block}" given pages of "${block}"`);
    if (count > this.room) throw new RangeError(`multifd packet has room for ${this.room} pages, given ${count}`);
    let runStart = -1; // data position of the current stretch of normal pages
    let p = start;
    for (let i = 0; i < count; i++, p += TARGET_PAGE_SIZE) {
      if (zeroAt(data, p)) {
        if (runStart >= 0) {
          this.pieces.push(data.subarray(runStart, p));
          runStart = -1;
        }
        this.zero[this.zeroCount++] = offset + i * TARGET_PAGE_SIZE;
      } else {
        if (runStart < 0) runStart = p;
        this.normal[this.normalCount++] = offset + i * TARGET_PAGE_SIZE;
      }
    }
    if (runStart >= 0) this.pieces.push(data.subarray(runStart, p));
  }

  /** Empties the packet (after it went). */
  reset(): void {
    this.normalCount = 0;
    this.zeroCount = 0;
    this.block = '';
    this.pieces = [];
  }
}

/**
 * One multifd channel of the source: the 64-byte init message first (its id
 * and the UUID, as QEMU's multifd_send_initial_packet), then packets — a
 * header with the block name and the offsets (normal pages first, then zero
 * pages), followed by the normal pages' bytes by reference — and SYNC
 * packets (no pages) when the session asks for the barrier. Knows nothing of
 * the session: the caller decides what goes where and when.
 */
export class MultifdChannelSender {
  readonly counters: MultifdChannelCounters = { packets: 0, syncs: 0, normalPages: 0, zeroPages: 0, bytes: 0 };

  constructor(
    readonly id: number,
    private readonly out: MultifdOutput,
    private readonly packetNumbers: MultifdPacketCounter,
    private readonly opts: { readonly uuid?: Uint8Array; readonly pagesAlloc?: number } = {},
  ) {}

  get pagesAlloc(): number {
    return this.opts.pagesAlloc ?? MULTIFD_PAGES_PER_PACKET;
  }

  /** Writes the init message. Returns the bytes handed over. */
  start(): number {
    return this.write([encodeMultifdInit(this.id, this.opts.uuid)]);
  }

  get bulkRoom(): number {
    return this.out.bulkRoom;
  }

  whenBulkRoom(): Promise<void> {
    return this.out.whenBulkRoom();
  }

  /** Sends the packet `b` holds (and empties it). Returns the bytes handed over. */
  sendPacket(b: MultifdPacketBuilder): number {
    const header = encodeMultifdPacketHeader({
      flags: 0, // MULTIFD_FLAG_NOCOMP
      pagesAlloc: this.pagesAlloc,
      packetNum: this.packetNumbers.next(),
      nextPacketSize: b.normalCount * TARGET_PAGE_SIZE,
      block: b.block,
      normal: b.normal,
      normalCount: b.normalCount,
      zero: b.zero,
      zeroCount: b.zeroCount,
    });
    const c = this.counters;
    c.packets++;
    c.normalPages += b.normalCount;
    c.zeroPages += b.zeroCount;
    const n = this.write(b.pieces.length === 0 ? [header] : [header, ...b.pieces]);
    b.reset();
    return n;
  }

  /**
   * A SYNC packet (no pages): the destination's channel stops after it until
   * the main stream's MULTIFD_FLUSH releases it, so every page sent before
   * it has landed before anything after the flush is read. Returns the bytes.
   */
  sync(): number {
    const header = encodeMultifdPacketHeader({
      flags: MultifdFlag.SYNC,
      pagesAlloc: this.pagesAlloc,
      packetNum: this.packetNumbers.next(),
      nextPacketSize: 0,
      block: '',
      normal: [],
      zero: [],
    });
    this.counters.syncs++;
    return this.write([header]);
  }

  private write(pieces: readonly Uint8Array[]): number {
    const n = this.out.push(pieces, 'bulk');
    this.counters.bytes += n;
    return n;
  }
}
