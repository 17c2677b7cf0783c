import * as nodeFs from 'node:fs';
import { join } from 'node:path';
import { TARGET_PAGE_SIZE } from '../stream/constants.js';
import { PageBitmap } from '../stream/bitmap.js';
import { presentSpan, zeroAbsentPages, type BlockFile } from './block-files.js';
import { StorageError } from './errors.js';
import { checkPageRun } from './memory.js';
import type { MappedRamFile } from './mapped-ram-file.js';
import type { GuestMemorySource, SourceBlock } from './memory-source.js';
import { readSavedVmManifest, type SavedVmManifest } from './saved-vm.js';

const PAGE = TARGET_PAGE_SIZE;
const MiB = 1 << 20;

type Callback<T extends unknown[] = []> = (err: NodeJS.ErrnoException | null, ...rest: T) => void;

/** The file operations a SavedVmSource uses, node:fs by default (tests inject failures through it). */
export interface SavedVmSourceFs {
  openSync(path: string, flags: string): number;
  /** The readPage fallback only (a caller without readPages): one read per run, not per page. */
  readSync(fd: number, buffer: Uint8Array, offset: number, length: number, position: number): number;
  read(fd: number, buffer: Uint8Array, offset: number, length: number, position: number, cb: Callback<[number]>): void;
  close(fd: number, cb: Callback): void;
}

const NODE_FS: SavedVmSourceFs = {
  openSync: (path, flags) => nodeFs.openSync(path, flags),
  readSync: (fd, buffer, offset, length, position) => nodeFs.readSync(fd, buffer, offset, length, position),
  read: (fd, buffer, offset, length, position, cb) => nodeFs.read(fd, buffer, offset, length, position, cb),
  close: (fd, cb) => nodeFs.close(fd, cb),
};

export interface SavedVmSourceOptions {
  /** Bytes of one read-ahead run (one read, one buffer). Default 1 MiB (a multiple of the page size). */
  runBytes?: number;
  /** Runs read ahead of the one being scanned. Default 8. */
  readAheadRuns?: number;
  /** Reads in flight at once. Default 4 (libuv's thread pool). */
  maxReads?: number;
  /**
   * How long a page handed out stays valid, in bytes of later pages read
   * (`reuseAfterBytes`): a buffer is reused only after that. Default 32 MiB;
   * the buffers take about this plus the read-ahead.
   */
  reuseAfterBytes?: number;
  fs?: SavedVmSourceFs;
}

/** Counters of a SavedVmSource. */
export interface SavedVmSourceStats {
  /** Read-ahead runs read (async). */
  runsRead: number;
  /** Pages read alone (out of order: postcopy requests). */
  pagesReadAlone: number;
  /** readPages calls answered at once from a run already read. */
  hits: number;
  /** readPages calls that had to wait for a read. */
  waits: number;
  /** Synchronous reads (readPage without readPages, or a run not yet read). */
  syncReads: number;
  /** Runs that found no reusable buffer and got one of their own. */
  ownBuffers: number;
  readsInFlight: number;
  bytesRead: number;
  /** Files open. */
  openFiles: number;
}

/** One block as the constructor takes it: where its pages are. */
interface SavedFileBlock {
  readonly idstr: string;
  readonly length: number;
  readonly path: string;
  readonly base: number;
  readonly present?: PageBitmap;
}

interface Block {
  readonly idstr: string;
  readonly index: number;
  readonly length: number;
  readonly path: string;
  readonly fd: number;
  /** File position of the block's page 0. */
  readonly base: number;
  /** Pages the file holds (a mapped-ram file's bitmap, shared with the channels' threads); undefined: all. */
  readonly present: PageBitmap | undefined;
  /** Live runs by run number (offset / runBytes): at most the slots' worth. */
  readonly runs: Map<number, RunEntry>;
}

/** A read-ahead buffer; reused once its pages were handed out long enough ago (reuseAfterBytes). */
interface Slot {
  readonly buf: Buffer;
  entry: RunEntry | undefined;
  /** `consumed` after the last page of it was handed out; -Infinity when none was. */
  handedAt: number;
}

/** One run of a block: [pos, pos + len) read into `buf`. */
interface RunEntry {
  readonly block: Block;
  readonly k: number;
  readonly pos: number;
  readonly len: number;
  readonly buf: Buffer;
  /** The ring slot it lives in, or none (a buffer of its own). */
  readonly slot: Slot | undefined;
  state: 'reading' | 'ready' | 'failed';
  error: StorageError | undefined;
  waiters: (() => void)[];
}

/**
 * A saved VM as a source — the directory `qmt receive` writes (a file per
 * block) or QEMU's own mapped-ram file (every block at its offset in one
 * file, zero pages absent from its bitmap and never read): RAM is read
 * from the files in runs of `runBytes` (1 MiB), asynchronously and
 * ahead of the scan (`readAheadRuns`, at most `maxReads` in flight), into a
 * fixed ring of buffers, so memory use does not depend on the guest size and
 * a sequential scan (readPages) almost never waits. A page asked for out of
 * order (a postcopy request) is read alone. Nothing is ever dirtied (the VM
 * is not running).
 *
 * Pages are handed out by reference into the ring; a ring buffer is reused
 * only once `reuseAfterBytes` bytes of later pages were handed out after its
 * last one — checked, not assumed: a run that finds no such buffer gets one
 * of its own.
 */
export class SavedVmSource implements GuestMemorySource {
  private readonly byName = new Map<string, Block>();
  /** Open descriptors by path. */
  private readonly fds = new Map<string, number>();
  private readonly list: Block[] = [];
  private readonly sourceBlocks: SourceBlock[];
  private readonly fs: SavedVmSourceFs;
  readonly runBytes: number;
  private readonly readAhead: number;
  private readonly maxReads: number;
  readonly reuseAfterBytes: number;
  private readonly slots: Slot[] = [];
  private readonly slotCount: number;
  private nextSlot = 0;
  /** Bytes of pages handed out so far (the clock of reuseAfterBytes). */
  private consumed = 0;
  /** The run the scan is at. */
  private cursor: { block: Block; k: number } | undefined;
  /** readPage's own batch (a caller without readPages): the rest of a run read synchronously. */
  private syncBatch: { block: Block; pos: number; buf: Buffer } | undefined;
  /** The run readPage served last. */
  private lastRun: RunEntry | undefined;
  private last: Block | undefined;
  private closed = false;
  private whenClosedResolve: (() => void) | undefined;
  private readonly closedPromise: Promise<void>;
  private readonly c: SavedVmSourceStats = { runsRead: 0, pagesReadAlone: 0, hits: 0, waits: 0, syncReads: 0, ownBuffers: 0, readsInFlight: 0, bytesRead: 0, openFiles: 0 };

  private constructor(
    /** The saved VM: its directory, or the mapped-ram file. */
    readonly path: string,
    files: readonly SavedFileBlock[],
    opts: SavedVmSourceOptions,
  ) {
    this.fs = opts.fs ?? NODE_FS;
    this.runBytes = opts.runBytes ?? MiB;
    this.readAhead = opts.readAheadRuns ?? 8;
    this.maxReads = opts.maxReads ?? 4;
    this.reuseAfterBytes = opts.reuseAfterBytes ?? 32 * MiB;
    if (!Number.isInteger(this.runBytes) || this.runBytes < PAGE || this.runBytes % PAGE !== 0) throw new RangeError(`SavedVmSource: runBytes ${this.runBytes} is not a positive multiple of ${PAGE}`);
    if (!Number.isInteger(this.readAhead) || this.readAhead < 0) throw new RangeError(`SavedVmSource: readAheadRuns ${this.readAhead} is not a non-negative integer`);
    if (!Number.isInteger(this.maxReads) || this.maxReads < 1) throw new RangeError(`SavedVmSource: maxReads ${this.maxReads} is not a positive integer`);
    if (!Number.isInteger(this.reuseAfterBytes) || this.reuseAfterBytes < 0) throw new RangeError(`SavedVmSource: reuseAfterBytes ${this.reuseAfterBytes} is not a non-negative integer`);
    // Enough slots that a steady scan always finds one: those within reuseAfterBytes
    // behind the cursor, the one at it, those read ahead, and one to spare.
    this.slotCount = Math.ceil(this.reuseAfterBytes / this.runBytes) + this.readAhead + 2;
    this.closedPromise = new Promise((res) => (this.whenClosedResolve = res));
    this.sourceBlocks = files.map((b) => ({ idstr: b.idstr, length: b.length }));
    try {
      for (const b of files) {
        // One descriptor per file: a mapped-ram file's blocks share one.
        let fd = this.fds.get(b.path);
        if (fd === undefined) {
          try {
            fd = this.fs.openSync(b.path, 'r');
          } catch (e) {
            throw new StorageError('open', b.path, 0, e);
          }
          this.fds.set(b.path, fd);
          this.c.openFiles++;
        }
        const block: Block = { idstr: b.idstr, index: this.list.length, length: b.length, path: b.path, fd, base: b.base, present: b.present, runs: new Map() };
        this.list.push(block);
        this.byName.set(b.idstr, block);
      }
    } catch (e) {
      this.close();
      throw e;
    }
  }

  /** The saved VM in `dir` (the directory `qmt receive` writes); refused unless its capture completed. */
  static async open(dir: string, opts: SavedVmSourceOptions = {}): Promise<SavedVmSource> {
    const m = await readSavedVmManifest(dir);
    if (!m.complete) throw new Error(`${dir}: the saved VM is incomplete (${m.error?.code ?? 'unknown'}: ${m.error?.message ?? ''})`);
    return SavedVmSource.fromManifest(dir, m, opts);
  }

  /** The block files a manifest lists (read and checked by the caller). */
  static fromManifest(dir: string, m: SavedVmManifest, opts: SavedVmSourceOptions = {}): SavedVmSource {
    return new SavedVmSource(
      dir,
      m.blocks.map((b) => ({ idstr: b.idstr, length: b.length, path: join(dir, b.file), base: 0 })),
      opts,
    );
  }

  /**
   * QEMU's saved-VM file (mapped-ram) at `path`, whose stream parts `file`
   * has read and checked (MappedRamFile.open; it may be closed already):
   * every block's pages are read at their fixed positions in the file, and
   * a page whose bit is clear in the block's bitmap is zero without a read.
   */
  static fromMappedRam(path: string, file: MappedRamFile, opts: SavedVmSourceOptions = {}): SavedVmSource {
    return new SavedVmSource(
      path,
      file.blocks.map((b) => {
        // Shared, so that the channels' threads read the same bits (blockFiles()).
        const present = new PageBitmap(b.present.pages, { shared: true });
        present.assignBytes(b.present.bytes);
        return { idstr: b.idstr, length: b.length, path, base: b.header.pagesOffset, present };
      }),
      opts,
    );
  }

  blocks(): readonly SourceBlock[] {
    return this.sourceBlocks;
  }

  stats(): SavedVmSourceStats {
    return { ...this.c };
  }

  /**
   * The block files, open, for a SourceSession with threads: each channel's
   * worker reads the pages it sends there itself (positioned reads of runs,
   * into a few buffers of its own), none of the read-ahead ring here is
   * used. The descriptors stay open until close().
   */
  blockFiles(): readonly BlockFile[] {
    if (this.closed) throw new Error('SavedVmSource: used after close()');
    return this.list.map((b) => ({ idstr: b.idstr, length: b.length, path: b.path, fd: b.fd, base: b.base, ...(b.present ? { present: b.present.buffer } : {}) }));
  }

  syncDirty(): void {}

  /**
   * `count` pages from `offset` as one view into a read buffer: at once when
   * the run is read, else a promise for it. A run not yet asked for, of one
   * page, away from the scan (a postcopy request) is read alone; anything
   * else starts or continues the scan and reads ahead. Pages that cross a
   * run boundary are copied into one buffer (a caller batching within
   * runBytes-aligned runs never pays that).
   */
  readPages(block: string, offset: number, count: number): Uint8Array | Promise<Uint8Array> {
    const b = this.block(block);
    checkPageRun(block, b.length, offset, count);
    const bytes = count * PAGE;
    if (count === 0) return Buffer.alloc(0);
    const k = Math.floor(offset / this.runBytes);
    const kLast = Math.floor((offset + bytes - 1) / this.runBytes);
    if (k !== kLast) return this.readAcross(b, offset, count, k, kLast);
    let e = b.runs.get(k);
    if (!e && count === 1 && !this.nearCursor(b, k)) return this.readAlone(b, offset);
    e ??= this.startRun(b, k);
    this.cursor = { block: b, k };
    // Handed out (or waited on) before the read-ahead looks for buffers, so that it cannot take this one.
    if (e.state === 'ready') {
      this.c.hits++;
      const v = this.handOut(e, offset, bytes);
      this.prefetch();
      return v;
    }
    if (e.state === 'failed') throw this.dropFailed(e);
    this.c.waits++;
    const entry = e;
    const p = new Promise<Uint8Array>((res, rej) => {
      entry.waiters.push(() => {
        if (entry.state === 'failed') rej(this.dropFailed(entry));
        else res(this.handOut(entry, offset, bytes));
      });
    });
    this.prefetch();
    return p;
  }

  /**
   * One page, synchronously (a caller without readPages). From a run already
   * read if there is one; else the rest of its run is read synchronously in
   * one call (not one per page) and the scan reads ahead from there.
   */
  readPage(block: string, offset: number): Uint8Array {
    const b = this.block(block);
    checkPageRun(block, b.length, offset, 1);
    const sb = this.syncBatch;
    if (sb && sb.block === b && offset >= sb.pos && offset + PAGE <= sb.pos + sb.buf.length) return this.counted(sb.buf.subarray(offset - sb.pos, offset - sb.pos + PAGE));
    // The run of the previous page, still in its buffer: no lookup, no read-ahead step per page.
    const le = this.lastRun;
    if (le && le.block === b && le.state === 'ready' && offset >= le.pos && offset + PAGE <= le.pos + le.len && (!le.slot || le.slot.entry === le)) return this.handOut(le, offset, PAGE);
    const k = Math.floor(offset / this.runBytes);
    const e = b.runs.get(k);
    if (e && e.state === 'ready') {
      this.cursor = { block: b, k };
      this.lastRun = e;
      const v = this.handOut(e, offset, PAGE);
      this.prefetch();
      return v;
    }
    const sequential = e !== undefined || this.nearCursor(b, k);
    // The rest of the run for a scan, the page alone otherwise.
    const end = sequential ? Math.min((k + 1) * this.runBytes, b.length) : offset + PAGE;
    const buf = Buffer.allocUnsafe(end - offset);
    this.readSyncInto(b, buf, offset);
    this.c.syncReads++;
    if (sequential) {
      this.syncBatch = { block: b, pos: offset, buf };
      this.cursor = { block: b, k };
      this.prefetch();
    } else this.c.pagesReadAlone++;
    return this.counted(buf.subarray(0, PAGE));
  }

  /** Stops reading; every file is closed once the reads in flight are done (whenClosed()). */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.maybeCloseFiles();
  }

  /** Settles when close() has closed every file. */
  whenClosed(): Promise<void> {
    return this.closedPromise;
  }

  // ---- internals ----

  private block(name: string): Block {
    if (this.closed) throw new Error('SavedVmSource: used after close()');
    const l = this.last;
    if (l !== undefined && l.idstr === name) return l;
    const b = this.byName.get(name);
    if (!b) throw new Error(`unknown RAM block "${name}"`);
    this.last = b;
    return b;
  }

  /** Run k of b is where the scan is or just after it (the next block's first run counts). */
  private nearCursor(b: Block, k: number): boolean {
    const c = this.cursor;
    if (!c) return k === 0;
    if (c.block === b) return k === c.k || k === c.k + 1;
    return k === 0 && b.index === c.block.index + 1;
  }

  private counted(view: Uint8Array): Uint8Array {
    this.consumed += view.length;
    return view;
  }

  private handOut(e: RunEntry, offset: number, bytes: number): Uint8Array {
    const from = offset - e.pos;
    this.consumed += bytes;
    if (e.slot) e.slot.handedAt = this.consumed;
    return e.buf.subarray(from, from + bytes);
  }

  /** The run after (b, k) in scan order: the next run of b, or the first of the next block. */
  private after(b: Block, k: number): { block: Block; k: number } | undefined {
    if ((k + 1) * this.runBytes < b.length) return { block: b, k: k + 1 };
    const next = this.list[b.index + 1];
    return next ? { block: next, k: 0 } : undefined;
  }

  /** Whether run e is at the cursor or within the read-ahead after it. */
  private ahead(e: RunEntry): boolean {
    let at = this.cursor;
    for (let i = 0; at && i <= this.readAhead; i++, at = this.after(at.block, at.k)) if (at.block === e.block && at.k === e.k) return true;
    return false;
  }

  /** Starts reads of the runs after the cursor, up to readAheadRuns ahead and maxReads in flight. */
  private prefetch(): void {
    if (this.closed || !this.cursor) return;
    let at: { block: Block; k: number } | undefined = this.cursor;
    for (let i = 0; i < this.readAhead && this.c.readsInFlight < this.maxReads; i++) {
      at = this.after(at.block, at.k);
      if (!at) return;
      if (at.block.runs.has(at.k)) continue;
      const slot = this.freeSlot();
      if (!slot) return; // every buffer still holds pages handed out too recently: later
      this.startRun(at.block, at.k, slot);
    }
  }

  /** A ring slot that may be reused now, or a new one while the ring is not full. */
  private freeSlot(): Slot | undefined {
    if (this.slots.length < this.slotCount) {
      const s: Slot = { buf: Buffer.allocUnsafeSlow(this.runBytes), entry: undefined, handedAt: -Infinity };
      this.slots.push(s);
      return s;
    }
    for (let i = 0; i < this.slots.length; i++) {
      const j = (this.nextSlot + i) % this.slots.length;
      const s = this.slots[j]!;
      const e = s.entry;
      if (e && (e.state === 'reading' || e.waiters.length > 0)) continue;
      if (this.consumed - s.handedAt < this.reuseAfterBytes) continue;
      // Read ahead and not yet handed out: the scan still needs it, unless it moved on (a jump).
      if (e && s.handedAt === -Infinity && this.ahead(e)) continue;
      this.nextSlot = (j + 1) % this.slots.length;
      if (e) e.block.runs.delete(e.k);
      s.entry = undefined;
      s.handedAt = -Infinity;
      return s;
    }
    return undefined;
  }

  /** Reads run k of b asynchronously into `slot` (or a free slot, or a buffer of its own). */
  private startRun(b: Block, k: number, slot = this.freeSlot()): RunEntry {
    const pos = k * this.runBytes;
    const len = Math.min(this.runBytes, b.length - pos);
    if (!slot) this.c.ownBuffers++;
    const buf = slot ? slot.buf.subarray(0, len) : Buffer.allocUnsafe(len);
    const e: RunEntry = { block: b, k, pos, len, buf, slot, state: 'reading', error: undefined, waiters: [] };
    if (slot) slot.entry = e;
    b.runs.set(k, e);
    this.readAsync(b, buf, pos, (err) => {
      if (err) {
        e.state = 'failed';
        e.error = err;
      } else {
        e.state = 'ready';
        this.c.runsRead++;
      }
      const w = e.waiters.splice(0);
      for (const f of w) f();
      this.prefetch();
    });
    return e;
  }

  /** A failed run is forgotten (a later request reads it again); its error goes to the caller. */
  private dropFailed(e: RunEntry): StorageError {
    if (e.block.runs.get(e.k) === e) e.block.runs.delete(e.k);
    if (e.slot && e.slot.entry === e) e.slot.entry = undefined;
    return e.error!;
  }

  /** One page read on its own, into a buffer of its own (a postcopy request away from the scan). */
  private readAlone(b: Block, offset: number): Promise<Uint8Array> {
    this.c.pagesReadAlone++;
    const buf = Buffer.allocUnsafe(PAGE);
    return new Promise((res, rej) => this.readAsync(b, buf, offset, (err) => (err ? rej(err) : res(this.counted(buf)))));
  }

  /** Pages across run boundaries, copied into one buffer from their runs (read ahead as a scan). */
  private readAcross(b: Block, offset: number, count: number, k: number, kLast: number): Uint8Array | Promise<Uint8Array> {
    const out = Buffer.allocUnsafe(count * PAGE);
    const waits: Promise<void>[] = [];
    const end = offset + count * PAGE;
    for (let j = k; j <= kLast; j++) {
      const from = Math.max(offset, j * this.runBytes);
      const to = Math.min(end, (j + 1) * this.runBytes);
      const at = from - offset;
      const v = this.readPages(b.idstr, from, (to - from) / PAGE);
      // Copied at once, so that no view has to outlive the call.
      if (v instanceof Promise) waits.push(v.then((x) => void out.set(x, at)));
      else out.set(v, at);
    }
    return waits.length === 0 ? out : Promise.all(waits).then(() => out);
  }

  /**
   * Reads bytes [pos, pos + buf.length) of block b: only the span from the
   * first present page to the last (a mapped-ram file's bitmap; all of it
   * otherwise), the absent pages zero.
   */
  private readAsync(b: Block, buf: Buffer, pos: number, done: (err: StorageError | undefined) => void): void {
    const first = pos / PAGE;
    const count = buf.length / PAGE;
    const span = presentSpan(b.present, first, count);
    if (!span) {
      buf.fill(0);
      queueMicrotask(() => done(undefined)); // as a read would: after the caller registered its waiters
      return;
    }
    buf.fill(0, 0, span.from * PAGE);
    buf.fill(0, span.to * PAGE);
    const to = span.to * PAGE;
    this.c.readsInFlight++;
    let got = span.from * PAGE;
    const step = (): void => {
      this.fs.read(b.fd, buf, got, to - got, b.base + pos + got, (err, n) => {
        if (err) return finish(new StorageError('read', b.path, b.base + pos + got, err));
        if (n === 0) {
          buf.fill(0, got, to); // past the end of a short file: zeros, as a sparse file reads
          return finish(undefined);
        }
        got += n;
        this.c.bytesRead += n;
        if (got < to) step();
        else finish(undefined);
      });
    };
    const finish = (err: StorageError | undefined): void => {
      if (!err) zeroAbsentPages(b.present, first, count, buf, 0);
      this.c.readsInFlight--;
      done(err);
      this.maybeCloseFiles();
    };
    step();
  }

  private readSyncInto(b: Block, buf: Buffer, pos: number): void {
    const first = pos / PAGE;
    const count = buf.length / PAGE;
    const span = presentSpan(b.present, first, count);
    buf.fill(0, 0, (span?.from ?? count) * PAGE);
    if (!span) return;
    buf.fill(0, span.to * PAGE);
    const to = span.to * PAGE;
    let got = span.from * PAGE;
    try {
      while (got < to) {
        const n = this.fs.readSync(b.fd, buf, got, to - got, b.base + pos + got);
        if (n === 0) {
          buf.fill(0, got, to);
          break;
        }
        got += n;
        this.c.bytesRead += n;
      }
    } catch (e) {
      throw new StorageError('read', b.path, b.base + pos + got, e);
    }
    zeroAbsentPages(b.present, first, count, buf, 0);
  }

  private maybeCloseFiles(): void {
    if (!this.closed || this.c.readsInFlight > 0 || this.list.length === 0) {
      if (this.closed && this.c.readsInFlight === 0) this.whenClosedResolve?.();
      return;
    }
    this.list.length = 0;
    this.byName.clear();
    this.last = undefined;
    this.slots.length = 0;
    this.syncBatch = undefined;
    this.lastRun = undefined;
    const fds = [...this.fds.values()];
    this.fds.clear();
    let left = fds.length;
    for (const fd of fds) {
      this.fs.close(fd, () => {
        this.c.openFiles--;
        if (--left === 0) this.whenClosedResolve?.();
      });
    }
  }
}
