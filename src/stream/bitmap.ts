import { TARGET_PAGE_SIZE } from './constants.js';

/**
 * The one bitmap of pages: one bit per TARGET_PAGE_SIZE page, bit i of the
 * bitmap is bit (i & 31) of 32-bit word i >> 5. Every page set in the library
 * is one of these: the source's dirty and sent sets, the destination's
 * received pages, the recovery bitmaps, the tap's and the sinks' written sets.
 *
 * The words live in a buffer sized in whole 64-bit words, so that on a
 * little-endian host (every host Node runs on for this library: x86-64,
 * aarch64) `bytes` is byte for byte QEMU's RECV_BITMAP payload (a bitmap of
 * unsigned longs, converted to little-endian, ramblock_recv_bitmap_send):
 * no conversion when a bitmap is sent or received. `shared` backs it with a
 * SharedArrayBuffer, so that another thread can read and write it.
 */
export class PageBitmap {
  readonly words: Uint32Array;
  /** The same bits as bytes (bit i of byte i >> 3), QEMU's wire layout; length `byteSize(pages)`. */
  readonly bytes: Uint8Array;

  constructor(
    readonly pages: number,
    opts: { shared?: boolean; bytes?: Uint8Array } = {},
  ) {
    if (!Number.isInteger(pages) || pages < 0) throw new RangeError(`bitmap of ${pages} pages`);
    const size = PageBitmap.byteSize(pages);
    if (opts.bytes && opts.bytes.length !== size) throw new RangeError(`bitmap of ${opts.bytes.length} bytes for ${pages} pages (expected ${size})`);
    const buffer = opts.shared ? new SharedArrayBuffer(size) : new ArrayBuffer(size);
    this.words = new Uint32Array(buffer);
    this.bytes = new Uint8Array(buffer);
    if (opts.bytes) this.assignBytes(opts.bytes);
  }

  /** Takes the bits of a wire bitmap (`byteSize(pages)` bytes, QEMU's layout); bits past `pages` are dropped. */
  assignBytes(bytes: Uint8Array): void {
    if (bytes.length !== this.bytes.length) throw new RangeError(`bitmap of ${bytes.length} bytes for ${this.pages} pages (expected ${this.bytes.length})`);
    this.bytes.set(bytes);
    this.clearTail();
  }

  /** Becomes the complement of `other` (same page count): every page `other` lacks. */
  assignComplement(other: PageBitmap): void {
    if (other.pages !== this.pages) throw new RangeError(`complement of a bitmap of ${other.pages} pages into one of ${this.pages}`);
    const a = this.words;
    const b = other.words;
    for (let i = 0; i < a.length; i++) a[i] = ~(b[i] as number);
    this.clearTail();
  }

  /** Bytes of a bitmap of `pages` pages on the wire: whole 64-bit words. */
  static byteSize(pages: number): number {
    return Math.ceil(pages / 64) * 8;
  }

  /** A bitmap for a RAM block of `length` bytes. */
  static forBlockLength(length: number, opts: { shared?: boolean } = {}): PageBitmap {
    return new PageBitmap(Math.ceil(length / TARGET_PAGE_SIZE), opts);
  }

  set(i: number): void {
    this.words[i >>> 5]! |= 1 << (i & 31);
  }

  clear(i: number): void {
    this.words[i >>> 5]! &= ~(1 << (i & 31));
  }

  has(i: number): boolean {
    return ((this.words[i >>> 5] as number) & (1 << (i & 31))) !== 0;
  }

  /** Sets pages [from, from + count). */
  setRange(from: number, count: number): void {
    this.range(from, count, true);
  }

  /** Clears pages [from, from + count). */
  clearRange(from: number, count: number): void {
    this.range(from, count, false);
  }

  private range(from: number, count: number, on: boolean): void {
    let i = from;
    const end = Math.min(from + count, this.pages);
    const w = this.words;
    while (i < end) {
      const bit = i & 31;
      const n = Math.min(32 - bit, end - i);
      const mask = n === 32 ? 0xffffffff : ((1 << n) - 1) << bit;
      if (on) w[i >>> 5]! |= mask;
      else w[i >>> 5]! &= ~mask;
      i += n;
    }
  }

  setAll(): void {
    this.words.fill(0xffffffff);
    this.clearTail();
  }

  clearAll(): void {
    this.words.fill(0);
  }

  /** Bits past `pages` stay zero (a received bitmap may carry garbage there). */
  private clearTail(): void {
    const full = this.pages >>> 5;
    const rest = this.pages & 31;
    if (rest > 0) this.words[full]! &= (1 << rest) - 1;
    this.words.fill(0, rest > 0 ? full + 1 : full);
  }

  /** Pages set. */
  count(): number {
    let n = 0;
    for (let w of this.words) {
      w -= (w >>> 1) & 0x55555555;
      w = (w & 0x33333333) + ((w >>> 2) & 0x33333333);
      n += (((w + (w >>> 4)) & 0x0f0f0f0f) * 0x01010101) >>> 24;
    }
    return n;
  }

  /** The next set bit at or after `from` and below `end` (default: the end), or -1. */
  next(from: number, end = this.pages): number {
    return this.scan(from, 0, end);
  }

  /** The next clear bit at or after `from` and below `end` (default: the end), or -1. */
  nextClear(from: number, end = this.pages): number {
    return this.scan(from, 0xffffffff, end);
  }

  /** Bounded by `end`: a caller looking at a short range must not pay for the rest of a large bitmap. */
  private scan(from: number, invert: number, end: number): number {
    const w = this.words;
    const stop = Math.min(end, this.pages);
    for (let i = from; i < stop; ) {
      const word = ((w[i >>> 5] as number) ^ invert) & (~0 << (i & 31));
      if (word === 0) {
        i = ((i >>> 5) + 1) << 5;
        continue;
      }
      const idx = ((i >>> 5) << 5) + (31 - Math.clz32(word & -word));
      return idx < stop ? idx : -1;
    }
    return -1;
  }

  /** Pages set from `from` on, before the first clear one or `limit` (a run's length). */
  runLength(from: number, limit = this.pages - from): number {
    const bound = Math.min(this.pages, from + limit);
    const end = this.nextClear(from, bound);
    return (end < 0 ? bound : end) - from;
  }

  /** Moves every bit of `this` into `into` (OR) and clears this. */
  drainInto(into: PageBitmap): void {
    const a = this.words;
    const b = into.words;
    for (let i = 0; i < a.length; i++) {
      b[i]! |= a[i] as number;
      a[i] = 0;
    }
  }
}

