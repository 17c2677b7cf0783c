import { TARGET_PAGE_SIZE } from '../../stream/constants.js';
import type { PreemptEncoder, StreamEncoder } from '../../stream/encoder.js';
import { isZeroPage } from '../../stream/ram.js';
import type { DiscardRange } from '../../stream/records.js';
import { PageBitmap, type GuestMemorySource, type SourceBlock } from '../memory-source.js';
import type { XbzrleCache } from '../xbzrle-cache.js';
import type { SourceCounters } from './stats.js';

/** One RAM block's page sets. */
export interface BlockState {
  readonly info: SourceBlock;
  /** Position in the block list (the order on the wire). */
  readonly index: number;
  readonly pages: number;
  /** Pages to send in the current pass / after LISTEN. */
  readonly toSend: PageBitmap;
  /** Pages sent at least once. */
  readonly sentOnce: PageBitmap;
  /** After LISTEN: pages sent (exactly once), on either channel. */
  readonly sentAfterListen: PageBitmap;
  /** After LISTEN: pages sent on the preempt channel (a repeated request is not an answer). */
  readonly sentOnPreempt: PageBitmap;
}

const EMPTY = new Uint8Array(0);

/** The guest's RAM as the source tracks it: blocks in wire order, their bitmaps, and how a page is encoded. */
export class RamPages {
  readonly blocks: readonly BlockState[];
  private readonly byName: ReadonlyMap<string, BlockState>;
  /** The `toSend` bitmaps by name, as `syncDirty` takes them (built once). */
  readonly dirtyInto: ReadonlyMap<string, PageBitmap>;
  readonly totalPages: number;

  constructor(
    private readonly memory: GuestMemorySource,
    private readonly c: SourceCounters,
    private readonly xbzrle: XbzrleCache | undefined,
    /** The page sets in SharedArrayBuffers (atomic writes): channel worker threads claim and mark pages in them. */
    shared = false,
  ) {
    const blocks: BlockState[] = [];
    const o = { shared };
    for (const b of memory.blocks()) {
      const pages = b.length / TARGET_PAGE_SIZE;
      const st: BlockState = {
        info: b,
        index: blocks.length,
        pages,
        toSend: new PageBitmap(pages, o),
        sentOnce: new PageBitmap(pages, o),
        sentAfterListen: new PageBitmap(pages, o),
        sentOnPreempt: new PageBitmap(pages, o),
      };
      st.toSend.setAll(); // the first pass sends every page
      blocks.push(st);
    }
    this.blocks = blocks;
    this.byName = new Map(blocks.map((b) => [b.info.idstr, b]));
    this.dirtyInto = new Map(blocks.map((b) => [b.info.idstr, b.toSend]));
    this.totalPages = blocks.reduce((s, b) => s + b.pages, 0);
  }

  get(block: string): BlockState | undefined {
    return this.byName.get(block);
  }

  /** Moves the pages the guest dirtied since the last sync into the `toSend` sets. */
  syncDirty(): void {
    this.memory.syncDirty(this.dirtyInto);
  }

  dirtyPages(): number {
    let n = 0;
    for (const b of this.blocks) n += b.toSend.count();
    return n;
  }

  /**
   * Writes `count` consecutive pages of `st` from `page` on into `enc` (the
   * caller has made sure all are to go): zero pages as ZERO, the rest as
   * PAGE by reference, or — in later precopy passes with a cache — XBZRLE
   * deltas, page by page (XBZRLE compares each page with its cached copy).
   * Marks them sent. Returns the pages written (an unchanged page under
   * XBZRLE is not); `runBytes` holds the bytes of page data (the section budget).
   */
  writeRun(enc: StreamEncoder, st: BlockState, page: number, count: number, xbzrleAllowed: boolean, listened: boolean): number {
    const block = st.info.idstr;
    const mem = this.memory;
    let bytes = 0;
    let written = count;
    const xb = xbzrleAllowed ? this.xbzrle : undefined;
    for (let p = page, end = page + count; p < end; p++) {
      const offset = p * TARGET_PAGE_SIZE;
      const zero = mem.pageIsZero ? mem.pageIsZero(block, offset) : undefined;
      const data = zero ? EMPTY : mem.readPage(block, offset);
      if (zero ?? isZeroPage(data)) {
        this.c.duplicate++;
        this.xbzrle?.forget(block, p);
        enc.write({ type: 'ram-zero', block, offset, continued: false });
        bytes += 16;
        continue;
      }
      if (xb) {
        const delta = xb.encode(block, p, data);
        if (delta && delta.length === 0) {
          written--; // unchanged: nothing to send (as QEMU)
          continue;
        }
        if (delta) {
          this.c.xbzrle++;
          enc.write({ type: 'ram-xbzrle', block, offset, continued: false, encoded: delta });
          bytes += delta.length + 16;
          continue;
        }
      }
      this.c.normal++;
      enc.write({ type: 'ram-page', block, offset, continued: false, data });
      bytes += TARGET_PAGE_SIZE;
    }
    st.toSend.clearRange(page, count);
    st.sentOnce.setRange(page, count);
    if (listened) st.sentAfterListen.setRange(page, count);
    this.runBytes = bytes;
    return written;
  }

  /** Marks `count` pages of `st` from `page` on as sent in precopy (multifd: the packet builder took them). */
  markSent(st: BlockState, page: number, count: number): void {
    st.toSend.clearRange(page, count);
    st.sentOnce.setRange(page, count);
  }

  /** Page-data bytes of the last `writeRun`. */
  runBytes = 0;

  /**
   * The batch path: `count` pages of `st` from `page` on as one view, when
   * the memory has `readPages` and the pages need no per-page look (no
   * XBZRLE). A promise when the memory must read first; undefined: use
   * `writeRun`.
   */
  readRun(st: BlockState, page: number, count: number, xbzrleAllowed: boolean): Uint8Array | Promise<Uint8Array> | undefined {
    if (!this.memory.readPages || (xbzrleAllowed && this.xbzrle)) return undefined;
    return this.memory.readPages(st.info.idstr, page * TARGET_PAGE_SIZE, count);
  }

  /**
   * Writes the pages of [page, page + count) still marked in `toSend` from
   * `data` (page i of the run at `i * 4096`) with `writePages`: one call per
   * contiguous stretch, zero pages found in place, no record per page. (A
   * request may have taken pages out of the set while an asynchronous read
   * ran: those are skipped.) Marks them sent; returns the pages written and
   * sets `runBytes`.
   */
  writeRunData(enc: StreamEncoder, st: BlockState, page: number, count: number, data: Uint8Array, listened: boolean): number {
    const block = st.info.idstr;
    const end = page + count;
    let written = 0;
    let bytes = 0;
    let p = st.toSend.has(page) ? page : st.toSend.next(page);
    while (p >= 0 && p < end) {
      const n = st.toSend.runLength(p, end - p);
      const r = enc.writePages(block, p * TARGET_PAGE_SIZE, n, data, (p - page) * TARGET_PAGE_SIZE);
      this.c.normal += r.normal;
      this.c.duplicate += r.zero;
      bytes += r.normal * TARGET_PAGE_SIZE + r.zero * 16;
      written += n;
      st.toSend.clearRange(p, n);
      st.sentOnce.setRange(p, n);
      if (listened) st.sentAfterListen.setRange(p, n);
      p = st.toSend.next(p + n);
    }
    this.runBytes = bytes;
    return written;
  }

  /**
   * A requested page's bytes read through `readPages` where the memory has it:
   * a promise when they must be read first (SavedVmSource reads a page away
   * from its scan alone, asynchronously — no synchronous read on the urgent
   * path); undefined otherwise (writePreemptPage reads it).
   */
  readRequested(st: BlockState, page: number): Uint8Array | Promise<Uint8Array> | undefined {
    return this.memory.readPages?.(st.info.idstr, page * TARGET_PAGE_SIZE, 1);
  }

  /** One requested page on the preempt channel (never XBZRLE: the destination has no cache there); `read`: its bytes, from readRequested. */
  writePreemptPage(enc: PreemptEncoder, st: BlockState, page: number, read?: Uint8Array): void {
    const block = st.info.idstr;
    const offset = page * TARGET_PAGE_SIZE;
    const mem = this.memory;
    const zero = read ? undefined : mem.pageIsZero ? mem.pageIsZero(block, offset) : undefined;
    const data = read ?? (zero ? EMPTY : mem.readPage(block, offset));
    if (zero ?? isZeroPage(data)) {
      this.c.duplicate++;
      this.xbzrle?.forget(block, page);
      enc.write({ type: 'ram-zero', block, offset, continued: false });
    } else {
      this.c.normal++;
      enc.write({ type: 'ram-page', block, offset, continued: false, data });
    }
    st.toSend.clear(page);
    st.sentOnce.set(page);
    st.sentAfterListen.set(page);
    st.sentOnPreempt.set(page);
  }

  /** Bytes of the pages still to send. */
  remainingBytes(): number {
    return this.dirtyPages() * TARGET_PAGE_SIZE;
  }
}

/** Runs of set bits as byte ranges. */
export function bitmapRanges(bm: PageBitmap): DiscardRange[] {
  const out: DiscardRange[] = [];
  let i = bm.next(0);
  while (i >= 0) {
    const n = bm.runLength(i);
    out.push({ start: i * TARGET_PAGE_SIZE, length: n * TARGET_PAGE_SIZE });
    i = bm.next(i + n);
  }
  return out;
}
