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
 *
 * Shared, every set/clear (single, range, drain, claim) is an `Atomics`
 * read-modify-write on its word: a plain `|=` racing another thread's `&=`
 * on the same word loses one of the two (a lost dirty page, or a page sent
 * twice). Reads (`has`, `next`, `count`) stay plain: they see some recent
 * value, which is all a scan needs. `setAll`, `clearAll`, `assign*` are
 * plain too: they run while no other thread uses the bitmap.
 */
export class PageBitmap {
  readonly words: Uint32Array;
  /** The same bits as bytes (bit i of byte i >> 3), QEMU's wire layout; length `byteSize(pages)`. */
  readonly bytes: Uint8Array;
  /** Backed by a SharedArrayBuffer: every write is atomic. */
  readonly shared: boolean;

  constructor(
    readonly pages: number,
    opts: { shared?: boolean; bytes?: Uint8Array; buffer?: SharedArrayBuffer } = {},
  ) {
    if (!Number.isInteger(pages) || pages < 0) throw new RangeError(`bitmap of ${pages} pages`);
    const size = PageBitmap.byteSize(pages);
    if (opts.bytes && opts.bytes.length !== size) throw new RangeError(`bitmap of ${opts.bytes.length} bytes for ${pages} pages (expected ${size})`);
    if (opts.buffer && opts.buffer.byteLength !== size) throw new RangeError(`shared bitmap of ${opts.buffer.byteLength} bytes for ${pages} pages (expected ${size})`);
    const buffer = opts.buffer ?? (opts.shared ? new SharedArrayBuffer(size) : new ArrayBuffer(size));
    this.shared = buffer instanceof SharedArrayBuffer;
    this.words = new Uint32Array(buffer);
    this.bytes = new Uint8Array(buffer);
    if (opts.bytes) this.assignBytes(opts.bytes);
  }

  /** The same bits seen from another thread: a bitmap over `sab` (from `buffer` of a shared one). */
  static attach(pages: number, sab: SharedArrayBuffer): PageBitmap {
    return new PageBitmap(pages, { buffer: sab });
  }

  /** The SharedArrayBuffer of a shared bitmap (to post to another thread). */
  get buffer(): SharedArrayBuffer {
    if (!(this.words.buffer instanceof SharedArrayBuffer)) throw new TypeError('not a shared bitmap');
    return this.words.buffer;
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
    if (this.shared) Atomics.or(this.words, i >>> 5, 1 << (i & 31));
    else this.words[i >>> 5]! |= 1 << (i & 31);
  }

  clear(i: number): void {
    if (this.shared) Atomics.and(this.words, i >>> 5, ~(1 << (i & 31)));
    else this.words[i >>> 5]! &= ~(1 << (i & 31));
  }

  /**
   * Clears page `i` and says whether it was set: of two threads claiming the
   * same page (a bulk producer, a preempt server), exactly one gets true.
   */
  claim(i: number): boolean {
    return this.claimWord(i >>> 5, 1 << (i & 31)) !== 0;
  }

  /**
   * Clears the bits of `mask` in word `word` (pages word*32 … word*32+31)
   * and returns those of them that were set: up to 32 pages taken in one
   * atomic step (what was taken is the caller's alone).
   */
  claimWord(word: number, mask = 0xffffffff): number {
    const w = this.words;
    if (this.shared) return (Atomics.and(w, word, ~mask) & mask) >>> 0;
    const old = w[word] as number;
    w[word] = old & ~mask;
    return (old & mask) >>> 0;
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
      if (this.shared) {
        if (on) Atomics.or(w, i >>> 5, mask);
        else Atomics.and(w, i >>> 5, ~mask);
      } else if (on) w[i >>> 5]! |= mask;
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

  /** Moves every bit of `this` into `into` (OR) and clears this; atomic per word where either is shared (no bit set meanwhile is lost). */
  drainInto(into: PageBitmap): void {
    const a = this.words;
    const b = into.words;
    if (this.shared || into.shared) {
      for (let i = 0; i < a.length; i++) {
        if (a[i] === 0) continue; // most words of a dirty set are clean: no atomic step for them
        const bits = this.shared ? Atomics.exchange(a, i, 0) : (a[i] as number);
        if (!this.shared) a[i] = 0;
        if (into.shared) Atomics.or(b, i, bits);
        else b[i]! |= bits;
      }
      return;
    }
    for (let i = 0; i < a.length; i++) {
      b[i]! |= a[i] as number;
      a[i] = 0;
    }
  }
}

