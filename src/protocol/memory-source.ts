import { closeSync, openSync, readSync } from 'node:fs';
import { join } from 'node:path';
import { TARGET_PAGE_SIZE } from '../stream/constants.js';
import { isZeroPage } from '../stream/ram.js';
import { PageBitmap } from '../stream/bitmap.js';
import { readSavedVmManifest, type SavedVmManifest } from './saved-vm.js';

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
}

/**
 * Guest RAM in memory, for synthetic guests: `write()` changes memory and
 * marks the pages dirty. Pages are sent by reference: one written while
 * queued is dirty, and the next pass (or the final stage) sends it again.
 */
export class InMemorySource implements GuestMemorySource {
  readonly memory = new Map<string, Buffer>();
  private readonly dirty = new Map<string, PageBitmap>();
  private readonly list: SourceBlock[];

  constructor(blocks: readonly SourceBlock[] | ReadonlyMap<string, Buffer>) {
    if (blocks instanceof Map) {
      this.list = [...blocks].map(([idstr, buf]) => ({ idstr, length: buf.length }));
      for (const [idstr, buf] of blocks) this.memory.set(idstr, buf);
    } else {
      this.list = [...(blocks as readonly SourceBlock[])];
      for (const b of this.list) this.memory.set(b.idstr, Buffer.alloc(b.length));
    }
    for (const b of this.list) {
      if (b.length % TARGET_PAGE_SIZE !== 0) throw new RangeError(`block "${b.idstr}" length is not a page multiple`);
      this.dirty.set(b.idstr, new PageBitmap(b.length / TARGET_PAGE_SIZE));
    }
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

/**
 * A saved VM (the directory `qmt receive` writes) as a source: RAM is read
 * from the per-block files in place, in batches, so memory use does not
 * depend on the guest size; nothing is ever dirtied (the VM is not running).
 */
export class SavedVmSource implements GuestMemorySource {
  private readonly fds = new Map<string, number>();
  private readonly list: SourceBlock[];
  private batch: { block: string; start: number; buf: Buffer } | undefined;
  private static readonly BATCH = 64 * TARGET_PAGE_SIZE;
  private static readonly RING_SLOTS = 128;
  readonly reuseAfterBytes = SavedVmSource.RING_SLOTS * SavedVmSource.BATCH;
  private readonly ring: Buffer[] = [];
  private ringNext = 0;

  private constructor(
    readonly dir: string,
    readonly manifest: SavedVmManifest,
  ) {
    this.list = manifest.blocks.map((b) => ({ idstr: b.idstr, length: b.length }));
    for (const b of manifest.blocks) this.fds.set(b.idstr, openSync(join(dir, b.file), 'r'));
  }

  static async open(dir: string): Promise<SavedVmSource> {
    const m = await readSavedVmManifest(dir);
    if (!m.complete) throw new Error(`${dir}: the saved VM is incomplete (${m.error?.code ?? 'unknown'}: ${m.error?.message ?? ''})`);
    return new SavedVmSource(dir, m);
  }

  blocks(): readonly SourceBlock[] {
    return this.list;
  }

  readPage(block: string, offset: number): Uint8Array {
    const b = this.batch;
    if (b && b.block === block && offset >= b.start && offset + TARGET_PAGE_SIZE <= b.start + b.buf.length) {
      return b.buf.subarray(offset - b.start, offset - b.start + TARGET_PAGE_SIZE);
    }
    const fd = this.fds.get(block);
    if (fd === undefined) throw new Error(`unknown RAM block "${block}"`);
    const len = this.list.find((x) => x.idstr === block)!.length;
    // A scan (the next page after the batch) reads 64 pages ahead into the ring;
    // a page asked for out of order (a postcopy request) is read alone.
    const sequential = b !== undefined && b.block === block && offset === b.start + b.buf.length;
    const size = sequential ? Math.min(SavedVmSource.BATCH, len - offset) : TARGET_PAGE_SIZE;
    const buf = sequential ? this.ringSlot().subarray(0, size) : Buffer.allocUnsafe(size);
    let got = 0;
    while (got < size) {
      const n = readSync(fd, buf, got, size - got, offset + got);
      if (n === 0) {
        buf.fill(0, got);
        break;
      }
      got += n;
    }
    this.batch = { block, start: offset, buf };
    return buf.subarray(0, TARGET_PAGE_SIZE);
  }

  /**
   * Batch buffers are reused round-robin: a fresh 256 KiB buffer per batch
   * kept a GiB-sized scan at ~450 MiB of RSS until the GC caught up. A slot
   * comes back after RING_SLOTS × 256 KiB (32 MiB) of later reads, well past
   * what a session holds unsent (the main channel's 8 MiB bound, 1 MiB in the
   * socket, one encoder batch): its pages have long been handed to the kernel.
   */
  private ringSlot(): Buffer {
    const i = this.ringNext;
    this.ringNext = (i + 1) % SavedVmSource.RING_SLOTS;
    return (this.ring[i] ??= Buffer.allocUnsafeSlow(SavedVmSource.BATCH));
  }

  syncDirty(): void {}

  close(): void {
    for (const fd of this.fds.values()) closeSync(fd);
    this.fds.clear();
  }
}
