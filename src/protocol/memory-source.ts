import { TARGET_PAGE_SIZE } from '../stream/constants.js';
import { isZeroPage } from '../stream/ram.js';
import { PageBitmap } from '../stream/bitmap.js';
import type { BlockFile } from './block-files.js';
import { checkPageRun } from './memory.js';

/** A RAM block as a source offers it. */
export interface SourceBlock {
  readonly idstr: string;
  /** Bytes, a multiple of TARGET_PAGE_SIZE. */
  readonly length: number;
}

export { PageBitmap };

/**
 * What a SourceSession migrates: RAM blocks, page reads, and the pages the
 * guest dirtied since the last sync (the caller feeds them; QEMU's dirty
 * bitmap sync is `syncDirty`).
 */
export interface GuestMemorySource {
  blocks(): readonly SourceBlock[];
  /**
   * The page's bytes, sent by reference (no copy). The guest may change them
   * before they leave, as QEMU's guest may: such a page must then be dirty
   * (reported by `syncDirty`) and goes again. A source that cannot report
   * every write must return a copy.
   */
  readPage(block: string, offset: number): Uint8Array;
  /**
   * `count` consecutive pages as one contiguous view (no copy where the
   * memory allows), valid as readPage's are; a promise when the data must
   * be read first (SavedVmSource). Optional: without it the source calls
   * readPage per page.
   */
  readPages?(block: string, offset: number, count: number): Uint8Array | Promise<Uint8Array>;
  /**
   * Set by a source that recycles its read buffers: a page's bytes stay valid
   * only until this many bytes of later pages were read. A SourceSession
   * refuses a main channel that may hold more than that unsent.
   */
  readonly reuseAfterBytes?: number;
  /**
   * Optional fast path: whether the page is all zero, looked at in place (no
   * copy). A page the guest writes right after is dirty again and goes in the
   * next pass, as with QEMU.
   */
  pageIsZero?(block: string, offset: number): boolean;
  /** Moves the pages dirtied since the previous call into `into` (per block), clearing them here. */
  syncDirty(into: ReadonlyMap<string, PageBitmap>): void;
  /**
   * Optional: the blocks as open files that do not change while a session
   * runs (a saved VM), in `blocks()` order. A SourceSession with threads
   * then reads each channel's pages there from the channel's own worker
   * thread, by positioned reads of runs of pages, instead of asking this
   * object on the caller's thread.
   */
  blockFiles?(): readonly BlockFile[];
}

/** A block of an InMemorySource with `shared`: what another thread needs to read it and mark it dirty. */
export interface SharedSourceBlock {
  readonly idstr: string;
  readonly length: number;
  /** The block's bytes. */
  readonly memory: SharedArrayBuffer;
  /** Its dirty bitmap (PageBitmap.attach(length / 4096, dirty)). */
  readonly dirty: SharedArrayBuffer;
}

/**
 * Guest RAM in memory, for synthetic guests: `write()` changes memory and
 * marks the pages dirty. Pages are sent by reference: one written while
 * queued is dirty, and the next pass (or the final stage) sends it again.
 *
 * `{ shared: true }` puts every block and its dirty bitmap in a
 * SharedArrayBuffer (blocks given as Buffers are copied into one, unless a Buffer is a whole SharedArrayBuffer already): a
 * SourceSession with `threads` then reads the pages from its channels'
 * worker threads directly, and another thread may write the guest's memory
 * (marking pages dirty through `sharedBlocks()`' bitmaps, whose writes are
 * atomic).
 */
export class InMemorySource implements GuestMemorySource {
  readonly memory = new Map<string, Buffer>();
  private readonly dirty = new Map<string, PageBitmap>();
  private readonly list: SourceBlock[];
  readonly shared: boolean;

  constructor(blocks: readonly SourceBlock[] | ReadonlyMap<string, Buffer>, opts: { shared?: boolean } = {}) {
    this.shared = opts.shared === true;
    const alloc = (length: number): Buffer => (this.shared ? Buffer.from(new SharedArrayBuffer(length)) : Buffer.alloc(length));
    if (blocks instanceof Map) {
      this.list = [...blocks].map(([idstr, buf]) => ({ idstr, length: buf.length }));
      for (const [idstr, buf] of blocks) {
        if (!this.shared || wholeSharedBuffer(buf)) this.memory.set(idstr, buf);
        else {
          const copy = alloc(buf.length);
          copy.set(buf);
          this.memory.set(idstr, copy);
        }
      }
    } else {
      this.list = [...(blocks as readonly SourceBlock[])];
      for (const b of this.list) this.memory.set(b.idstr, alloc(b.length));
    }
    for (const b of this.list) {
      if (b.length % TARGET_PAGE_SIZE !== 0) throw new RangeError(`block "${b.idstr}" length is not a page multiple`);
      this.dirty.set(b.idstr, new PageBitmap(b.length / TARGET_PAGE_SIZE, { shared: this.shared }));
    }
  }

  /** With `shared`: every block's memory and dirty bitmap, to hand to another thread; undefined otherwise. */
  sharedBlocks(): readonly SharedSourceBlock[] | undefined {
    if (!this.shared) return undefined;
    return this.list.map((b) => {
      const mem = this.memory.get(b.idstr)!;
      return { idstr: b.idstr, length: b.length, memory: mem.buffer as SharedArrayBuffer, dirty: this.dirty.get(b.idstr)!.buffer };
    });
  }

  blocks(): readonly SourceBlock[] {
    return this.list;
  }

  /** Writes guest memory and marks the touched pages dirty. */
  write(block: string, offset: number, data: Uint8Array): void {
    const mem = this.memory.get(block);
    const d = this.dirty.get(block);
    if (!mem || !d) throw new Error(`unknown RAM block "${block}"`);
    mem.set(data, offset);
    const first = Math.floor(offset / TARGET_PAGE_SIZE);
    const last = Math.floor((offset + data.length - 1) / TARGET_PAGE_SIZE);
    for (let p = first; p <= last; p++) d.set(p);
  }

  pageIsZero(block: string, offset: number): boolean {
    return isZeroPage(this.memory.get(block)!.subarray(offset, offset + TARGET_PAGE_SIZE));
  }

  readPages(block: string, offset: number, count: number): Uint8Array {
    const mem = this.memory.get(block);
    if (!mem) throw new Error(`unknown RAM block "${block}"`);
    checkPageRun(block, mem.length, offset, count);
    // A view, as readPage's: a page written while queued is dirty and goes again.
    return mem.subarray(offset, offset + count * TARGET_PAGE_SIZE);
  }

  readPage(block: string, offset: number): Uint8Array {
    // No copy: every write goes through write(), which marks the page dirty, so
    // a page changed while it waits in a socket queue is sent again.
    return this.memory.get(block)!.subarray(offset, offset + TARGET_PAGE_SIZE);
  }

  syncDirty(into: ReadonlyMap<string, PageBitmap>): void {
    for (const [name, d] of this.dirty) {
      const target = into.get(name);
      if (target) d.drainInto(target);
    }
  }
}

/** Another thread sees a whole SharedArrayBuffer: a Buffer over part of one (or over a pooled one) is copied. */
function wholeSharedBuffer(buf: Buffer): boolean {
  return buf.buffer instanceof SharedArrayBuffer && buf.byteOffset === 0 && buf.byteLength === buf.buffer.byteLength;
}

export { SavedVmSource, type SavedVmSourceOptions, type SavedVmSourceStats } from './saved-vm-source.js';
