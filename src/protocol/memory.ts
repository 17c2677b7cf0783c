import { PageBitmap } from '../stream/bitmap.js';
import { TARGET_PAGE_SIZE } from '../stream/constants.js';
import type { RamBlockInfo } from '../stream/records.js';
import type { BlockFile } from './block-files.js';
import { MigrationError } from './errors.js';

const PAGE = TARGET_PAGE_SIZE;

/** `data` as a Buffer (same memory), for Buffer.copy: one view per call, not one per page. */
export function asBuffer(data: Uint8Array): Buffer {
  return Buffer.isBuffer(data) ? data : Buffer.from(data.buffer, data.byteOffset, data.byteLength);
}

/**
 * Checks a run of pages against a block of `length` bytes once per call: a
 * RangeError naming block and offset, never a write past the block.
 */
export function checkPageRun(block: string, length: number, offset: number, count: number): void {
  if (!Number.isInteger(offset) || offset < 0 || offset % PAGE !== 0 || !Number.isInteger(count) || count < 0 || offset + count * PAGE > length) {
    throw new RangeError(`RAM block "${block}": ${count} page(s) at offset 0x${offset.toString(16)} do not lie within its 0x${length.toString(16)} bytes on page boundaries`);
  }
}

/** Checks once per call that the `count` page views of a writePages call lie within `data`. */
export function checkPageViews(block: string, data: Uint8Array, start: number, count: number, stride: number): void {
  if (count > 0 && (!Number.isInteger(start) || start < 0 || !Number.isInteger(stride) || stride < PAGE || start + (count - 1) * stride + PAGE > data.length)) {
    throw new RangeError(`RAM block "${block}": ${count} page(s) at ${start} + i×${stride} do not lie within the ${data.length} bytes given`);
  }
}

/**
 * Calls `each(first, n)` for every run of pages set in `bits` within
 * [from, from + count): the pages a ZERO record must clear (the others are
 * still zero).
 */
export function forEachSetRun(bits: PageBitmap, from: number, count: number, each: (first: number, n: number) => void): void {
  const end = from + count;
  let p = from;
  while (p < end) {
    p = bits.next(p, end);
    if (p < 0 || p >= end) return;
    const n = bits.runLength(p, end - p);
    each(p, n);
    p += n;
  }
}

/**
 * Where a destination puts guest RAM. Calls are synchronous on the hot path
 * (one per run of pages with `writePages`, else one per page): a sink that
 * must do I/O queues it and pushes back through `backpressure()`, and
 * `flush()` makes everything durable. A sink's failure (disk full) is thrown
 * by its next call, or rejects `backpressure()` / `flush()`.
 */
export interface GuestMemorySink {
  /** The block list arrived (RAM START section): size the storage. */
  setBlocks(blocks: readonly RamBlockInfo[]): void;
  /** A whole page (TARGET_PAGE_SIZE bytes) at `offset` of `block`. */
  writePage(block: string, offset: number, data: Uint8Array): void;
  /** A ZERO record. */
  zeroPage(block: string, offset: number): void;
  /**
   * `count` consecutive pages from `offset` of `block`: page i is
   * `data[start + i*stride, start + i*stride + TARGET_PAGE_SIZE)`. The views
   * are valid only during the call (they are the socket's chunk): a sink
   * that keeps the bytes copies them. Optional: without it the destination
   * calls writePage per page.
   */
  writePages?(block: string, offset: number, count: number, data: Uint8Array, start: number, stride: number): void;
  /** `count` consecutive ZERO records from `offset`. Optional (zeroPage per page). */
  zeroPages?(block: string, offset: number, count: number): void;
  /**
   * undefined, or a promise that settles when the sink is back under its
   * bound of bytes in flight (the destination returns it from its channel
   * consumer, which pauses reading). Rejects with the storage error.
   */
  backpressure?(): Promise<void> | undefined;
  /** The page as currently held (for XBZRLE deltas), copied or viewed. */
  readPage(block: string, offset: number): Uint8Array;
  /** Makes everything written so far durable. */
  flush(): Promise<void>;
  /**
   * Optional: the blocks as open files (after setBlocks), for a destination
   * with threads: each channel's worker then writes the pages it decodes
   * there itself (positioned writes at their fixed places), and `flush()` is
   * called once every worker's writes are done.
   */
  blockFiles?(): readonly BlockFile[];
  /** Releases resources; the sink is not used afterwards. */
  close(): Promise<void>;
}

/** Guest RAM in memory: one Buffer per block. For tests, demos and small guests. */
export class InMemorySink implements GuestMemorySink {
  readonly blocks = new Map<string, Buffer>();
  /** Pages ever written: a ZERO record on a page still zero-filled costs nothing. */
  private readonly written = new Map<string, PageBitmap>();

  /** `shared`: back each block with a SharedArrayBuffer, so that another thread can read the RAM. */
  constructor(private readonly opts: { shared?: boolean } = {}) {}

  /** Its blocks are SharedArrayBuffers (a destination with threads writes them from its channels' workers). */
  get shared(): boolean {
    return this.opts.shared === true;
  }

  /** preallocate() was called: the blocks are the destination VM's, and the stream must match them. */
  private preallocated = false;

  /**
   * Sizes the storage for the stream's block list. With preallocated blocks
   * (the destination VM's RAM) the list must name those blocks with those
   * sizes, as QEMU requires ("Length mismatch", "Unknown ramblock"): a
   * mismatch is refused, never silently replaced.
   */
  setBlocks(blocks: readonly RamBlockInfo[]): void {
    if (this.preallocated) {
      for (const b of blocks) {
        const have = this.blocks.get(b.idstr);
        if (!have) {
          throw new MigrationError('unknown-ram-block', 'setup', `RAM block "${b.idstr}" of the stream is not one of the preallocated blocks (${[...this.blocks.keys()].map((k) => `"${k}"`).join(', ')}): cannot accept the migration`);
        }
        if (have.length !== b.length) {
          throw new MigrationError('length-mismatch', 'setup', `RAM block "${b.idstr}": the stream has 0x${b.length.toString(16)} bytes, the preallocated block 0x${have.length.toString(16)} (Length mismatch)`);
        }
      }
      return;
    }
    for (const b of blocks) {
      const have = this.blocks.get(b.idstr);
      if (!have || have.length !== b.length) this.allocate(b.idstr, b.length, false);
    }
  }

  /**
   * Allocates blocks before the migration, as a destination VM's RAM exists
   * before its incoming migration starts; the stream's block list must then
   * name exactly these blocks with these sizes (see setBlocks). `prefault` touches
   * every page now: the kernel's first-touch faults (4 KiB each, several µs
   * apiece on some machines) then cost nothing while the stream arrives —
   * QEMU gets much the same from transparent huge pages on its guest RAM.
   */
  preallocate(blocks: readonly { idstr: string; length: number }[], opts: { prefault?: boolean } = {}): void {
    for (const b of blocks) this.allocate(b.idstr, b.length, opts.prefault ?? false);
    this.preallocated = true;
  }

  private allocate(idstr: string, length: number, prefault: boolean): void {
    const buf = this.opts.shared ? Buffer.from(new SharedArrayBuffer(length)) : Buffer.alloc(length);
    if (prefault) for (let o = 0; o < length; o += TARGET_PAGE_SIZE) buf[o] = 0;
    this.blocks.set(idstr, buf);
    this.written.set(idstr, PageBitmap.forBlockLength(length));
  }

  private block(name: string): Buffer {
    const b = this.blocks.get(name);
    if (!b) throw new Error(`unknown RAM block "${name}"`);
    return b;
  }

  writePage(block: string, offset: number, data: Uint8Array): void {
    this.block(block).set(data, offset);
    this.written.get(block)!.set(offset / TARGET_PAGE_SIZE);
  }

  zeroPage(block: string, offset: number): void {
    const buf = this.block(block);
    if (this.written.get(block)!.has(offset / TARGET_PAGE_SIZE)) buf.fill(0, offset, offset + TARGET_PAGE_SIZE);
  }

  writePages(block: string, offset: number, count: number, data: Uint8Array, start: number, stride: number): void {
    const buf = this.block(block);
    checkPageRun(block, buf.length, offset, count);
    checkPageViews(block, data, start, count, stride);
    const src = asBuffer(data);
    if (stride === PAGE) src.copy(buf, offset, start, start + count * PAGE);
    else for (let i = 0, s = start; i < count; i++, s += stride) src.copy(buf, offset + i * PAGE, s, s + PAGE);
    this.written.get(block)!.setRange(offset / PAGE, count);
  }

  zeroPages(block: string, offset: number, count: number): void {
    const buf = this.block(block);
    checkPageRun(block, buf.length, offset, count);
    forEachSetRun(this.written.get(block)!, offset / PAGE, count, (p, n) => buf.fill(0, p * PAGE, (p + n) * PAGE));
  }

  /** Memory takes every write at once: never any backpressure. */
  backpressure(): undefined {
    return undefined;
  }

  readPage(block: string, offset: number): Uint8Array {
    return this.block(block).subarray(offset, offset + TARGET_PAGE_SIZE);
  }

  async flush(): Promise<void> {}
  async close(): Promise<void> {}
}
