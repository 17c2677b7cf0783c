/**
 * Where a RAM block's pages live in a file, as every thread of a session can
 * use it: page at byte `offset` of the block is at byte `base + offset` of
 * the file. One description for the files a saved VM keeps (one file per
 * block, base 0) and for a mapped-ram file (every block in one file, each at
 * its own base), so that a worker thread reads or writes a channel's pages
 * at their fixed positions itself.
 */
import { PageBitmap } from '../stream/bitmap.js';
import { TARGET_PAGE_SIZE } from '../stream/constants.js';

const PAGE = TARGET_PAGE_SIZE;

export interface BlockFile {
  readonly idstr: string;
  /** The block's bytes (a multiple of the page size). */
  readonly length: number;
  /** For errors: the file's path. */
  readonly path: string;
  /**
   * The open file's descriptor, valid in every thread of the process until
   * the session that uses it has ended (its owner closes it after that).
   */
  readonly fd: number;
  /** Byte of the file where the block's page 0 is. */
  readonly base: number;
  /**
   * Read side, a mapped-ram file: the block's bitmap of the pages the file
   * holds (a shared PageBitmap's buffer, so that every thread reads the same
   * bits without a copy). A page whose bit is clear is zero whatever bytes
   * its slot holds: QEMU clears the bit of a page it wrote in one pass and
   * found zero in a later one, and leaves the old bytes. Absent: every page
   * is in the file (a saved VM's block files).
   */
  readonly present?: SharedArrayBuffer;
}

/** The file position of byte `offset` of `block`. */
export function filePosition(block: BlockFile, offset: number): number {
  return block.base + offset;
}

/** A block file's bitmap of present pages, or undefined when every page is in the file. */
export function presentPages(block: BlockFile): PageBitmap | undefined {
  return block.present ? PageBitmap.attach(block.length / PAGE, block.present) : undefined;
}

/**
 * Of the `count` pages from page `first`, the span a read must cover: from
 * the first page present to the end of the last one, in pages relative to
 * `first` ([from, to)); `undefined` when none is present (all zero, nothing
 * to read). Without a bitmap, all of them.
 */
export function presentSpan(present: PageBitmap | undefined, first: number, count: number): { from: number; to: number } | undefined {
  if (!present) return { from: 0, to: count };
  const end = first + count;
  const lo = present.next(first, end);
  if (lo < 0) return undefined;
  // The end of the last run of set bits: runs, not pages (a block's bitmap is mostly long runs).
  let hi = lo;
  for (let p = lo; p >= 0 && p < end; p = present.next(hi, end)) {
    const clear = present.nextClear(p, end);
    hi = clear < 0 ? end : clear;
  }
  return { from: lo - first, to: hi - first };
}

/**
 * Zeroes the pages of [first, first + count) whose bit is clear, in `buf`
 * where page `first` is at byte `at`: what a read of their slots brought in
 * (old bytes, or nothing) is not the page.
 */
export function zeroAbsentPages(present: PageBitmap | undefined, first: number, count: number, buf: Uint8Array, at: number): void {
  if (!present) return;
  const end = first + count;
  for (let p = present.nextClear(first, end); p >= 0; p = present.nextClear(p, end)) {
    const set = present.next(p, end);
    const stop = set < 0 ? end : set;
    buf.fill(0, at + (p - first) * PAGE, at + (stop - first) * PAGE);
    if (set < 0) break;
    p = stop;
  }
}
