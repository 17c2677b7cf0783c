import * as nodeFs from 'node:fs';
import { join } from 'node:path';
import { PageBitmap } from '../stream/bitmap.js';
import { TARGET_PAGE_SIZE } from '../stream/constants.js';
import type { RamBlockInfo } from '../stream/records.js';
import { StorageError } from './errors.js';
import { asBuffer, checkPageRun, checkPageViews, type GuestMemorySink } from './memory.js';

const PAGE = TARGET_PAGE_SIZE;
const MiB = 1 << 20;
/** The largest hole of never-written pages filled with zeros to keep a write whole (64 KiB). */
const MAX_GAP_PAGES = 16;

/** A block's idstr as a file name ("/rom@etc/acpi/tables" → "%2From%40etc%2Facpi%2Ftables"). */
export function blockFileName(idstr: string): string {
  return `${encodeURIComponent(idstr)}.bin`;
}

type Callback<T extends unknown[] = []> = (err: NodeJS.ErrnoException | null, ...rest: T) => void;

/**
 * The file operations a DirectorySink uses, node:fs by default. Setup
 * (open, truncate) is synchronous: it happens once per block at RAM START.
 * The data path is asynchronous only. Tests inject failures and count bytes
 * through it.
 */
export interface DirectorySinkFs {
  openSync(path: string, flags: string): number;
  ftruncateSync(fd: number, length: number): void;
  /** XBZRLE only: the page a delta applies to, when no write of it is pending. */
  readSync(fd: number, buffer: Uint8Array, offset: number, length: number, position: number): number;
  write(fd: number, buffer: Uint8Array, offset: number, length: number, position: number, cb: Callback<[number]>): void;
  fsync(fd: number, cb: Callback): void;
  close(fd: number, cb: Callback): void;
}

const NODE_FS: DirectorySinkFs = {
  openSync: (path, flags) => nodeFs.openSync(path, flags),
  ftruncateSync: (fd, length) => nodeFs.ftruncateSync(fd, length),
  readSync: (fd, buffer, offset, length, position) => nodeFs.readSync(fd, buffer, offset, length, position),
  write: (fd, buffer, offset, length, position, cb) => nodeFs.write(fd, buffer, offset, length, position, cb),
  fsync: (fd, cb) => nodeFs.fsync(fd, cb),
  close: (fd, cb) => nodeFs.close(fd, cb),
};

export interface DirectorySinkOptions {
  /**
   * Bytes of guest RAM the sink may hold that are not yet written to their
   * file (staged, queued and in flight); above it `backpressure()` returns a
   * promise, and never more than this is handed to the kernel at once.
   * Default 16 MiB.
   */
  maxInFlightBytes?: number;
  /** Size of a staging buffer, the largest single write. Default 1 MiB (a multiple of the page size, ≤ maxInFlightBytes). */
  writeBytes?: number;
  /**
   * Writes in flight per file at once (never overlapping). Default 4 (libuv's
   * thread pool): on a quiet machine 512 MiB to durable took 0.39–0.45 s with
   * 4, 0.43–0.44 s with 2 and 0.48–0.53 s with 1, at the same CPU (one
   * write at a time leaves the file idle while its completion crosses the
   * event loop).
   */
  writesPerFile?: number;
  /** File operations (tests). Default node:fs. */
  fs?: DirectorySinkFs;
}

/** What a DirectorySink has done and holds (numbers only). */
export interface DirectorySinkStats {
  /** Bytes taken but not yet written to their file: staged, queued, in flight. */
  bufferedBytes: number;
  /** Bytes handed to the kernel (write issued) and not yet done. */
  inFlightBytes: number;
  /** The largest inFlightBytes ever (never above maxInFlightBytes). */
  peakInFlightBytes: number;
  /** The largest bufferedBytes ever: above maxInFlightBytes only by what callers added while backpressure() was pending. */
  peakBufferedBytes: number;
  writes: number;
  bytesWritten: number;
  fsyncs: number;
  /** Times backpressure() returned a promise. */
  pauses: number;
  /** Staging buffers allocated (each writeBytes). */
  stagingBuffers: number;
}

/** A staging buffer: runs of pages are appended at `used`; it is reused when every run in it is written. */
interface Slab {
  readonly buf: Buffer;
  used: number;
  /** Runs in it not yet written (the open run included). */
  refs: number;
}

/** Contiguous pages of one file staged in a slab: one positioned write. */
interface Run {
  readonly file: BlockFile;
  /** Position in the file. */
  readonly pos: number;
  readonly slab: Slab;
  /** Position in the slab. */
  readonly at: number;
  len: number;
  /** Bytes of it already written (a short write goes on from here). */
  done: number;
}

interface BlockFile {
  readonly idstr: string;
  readonly path: string;
  readonly fd: number;
  readonly length: number;
  /** Pages ever written: a ZERO record on a page never written costs nothing (the file is sparse). */
  readonly written: PageBitmap;
  /** Sealed runs not yet issued, in order. */
  readonly queue: Run[];
  /** Issued runs not yet done, in issue order. */
  readonly inflight: Run[];
}

/**
 * Guest RAM as one sparse file per RAM block (`DIR/<block>.bin`); memory use
 * does not depend on guest size. Pages are copied into staging buffers
 * (freeing the socket's chunk at once), contiguous pages of a file coalesce
 * into one positioned write of up to `writeBytes`, and writes are issued
 * asynchronously (never a synchronous syscall on the data path), in order per
 * file: a write never overlaps another of the same file still in flight, so
 * a page written twice ends with its later bytes. ZERO records on pages never
 * written cost nothing; on a page written before they write zeros through
 * the same pipeline.
 *
 * A failed write makes the sink fail: every later call throws the
 * StorageError (file and position), and `backpressure()` and `flush()`
 * reject with it.
 */
export class DirectorySink implements GuestMemorySink {
  private readonly files = new Map<string, BlockFile>();
  private readonly list: BlockFile[] = [];
  private readonly fs: DirectorySinkFs;
  readonly maxInFlightBytes: number;
  readonly writeBytes: number;
  private readonly writesPerFile: number;

  /** The run pages are appended to, at the tail of `slab`. */
  private open: Run | undefined;
  private slab: Slab | undefined;
  private readonly pool: Slab[] = [];
  private failure: StorageError | undefined;
  private closed = false;
  /** Pages never written right after the open run that ZERO records skipped (see skipZeros). */
  private gap = 0;
  /** The last block looked up: a destination writes runs of one block after another. */
  private last: BlockFile | undefined;

  private readonly counters: DirectorySinkStats = { bufferedBytes: 0, inFlightBytes: 0, peakInFlightBytes: 0, peakBufferedBytes: 0, writes: 0, bytesWritten: 0, fsyncs: 0, pauses: 0, stagingBuffers: 0 };
  /** Pending backpressure() promise (one per pause) and its settlers. */
  private pressure: { promise: Promise<void>; resolve: () => void; reject: (e: unknown) => void } | undefined;
  /** Called whenever nothing is buffered any more, or the sink failed (flush and close wait on it). */
  private drained: (() => void)[] = [];

  constructor(
    readonly dir: string,
    opts: DirectorySinkOptions = {},
  ) {
    this.fs = opts.fs ?? NODE_FS;
    this.maxInFlightBytes = opts.maxInFlightBytes ?? 16 * MiB;
    this.writeBytes = opts.writeBytes ?? Math.min(MiB, this.maxInFlightBytes);
    this.writesPerFile = opts.writesPerFile ?? 4;
    if (!Number.isInteger(this.writeBytes) || this.writeBytes < PAGE || this.writeBytes % PAGE !== 0) {
      throw new RangeError(`DirectorySink: writeBytes ${this.writeBytes} is not a positive multiple of ${PAGE}`);
    }
    if (!Number.isInteger(this.maxInFlightBytes) || this.maxInFlightBytes < this.writeBytes) {
      throw new RangeError(`DirectorySink: maxInFlightBytes ${this.maxInFlightBytes} is below writeBytes ${this.writeBytes}`);
    }
    if (!Number.isInteger(this.writesPerFile) || this.writesPerFile < 1) throw new RangeError(`DirectorySink: writesPerFile ${this.writesPerFile} is not a positive integer`);
    nodeFs.mkdirSync(dir, { recursive: true });
  }

  setBlocks(blocks: readonly RamBlockInfo[]): void {
    this.check();
    for (const b of blocks) {
      if (this.files.has(b.idstr)) continue;
      const path = join(this.dir, blockFileName(b.idstr));
      let fd: number;
      try {
        fd = this.fs.openSync(path, 'w+');
      } catch (e) {
        throw new StorageError('open', path, 0, e);
      }
      const file: BlockFile = { idstr: b.idstr, path, fd, length: b.length, written: PageBitmap.forBlockLength(b.length), queue: [], inflight: [] };
      // Registered before the truncate so that close() closes it even if that fails.
      this.files.set(b.idstr, file);
      this.list.push(file);
      try {
        this.fs.ftruncateSync(fd, b.length);
      } catch (e) {
        throw new StorageError('truncate', path, b.length, e);
      }
    }
  }

  stats(): DirectorySinkStats {
    return { ...this.counters };
  }

  writePage(block: string, offset: number, data: Uint8Array): void {
    this.writePages(block, offset, 1, data, 0, PAGE);
  }

  zeroPage(block: string, offset: number): void {
    this.zeroPages(block, offset, 1);
  }

  writePages(block: string, offset: number, count: number, data: Uint8Array, start: number, stride: number): void {
    const f = this.file(block);
    checkPageRun(block, f.length, offset, count);
    checkPageViews(block, data, start, count, stride);
    if (count === 0) return;
    this.append(f, offset, count, asBuffer(data), start, stride);
    f.written.setRange(offset / PAGE, count);
  }

  zeroPages(block: string, offset: number, count: number): void {
    const f = this.file(block);
    checkPageRun(block, f.length, offset, count);
    const end = offset / PAGE + count;
    for (let p = offset / PAGE; p < end; ) {
      if (f.written.has(p)) {
        const n = f.written.runLength(p, end - p);
        this.append(f, p * PAGE, n, undefined, 0, PAGE); // zeros over what was written, in the same pipeline
        p += n;
      } else {
        const next = f.written.next(p);
        const n = (next < 0 || next >= end ? end : next) - p;
        this.skipZeros(f, p * PAGE, n);
        p += n;
      }
    }
  }

  /**
   * The page as the file will hold it once every pending write is done (for
   * XBZRLE), copied: from the newest staged or in-flight write of it, else
   * read from the file (the one synchronous read left, XBZRLE only), zeros
   * for a page never written.
   */
  readPage(block: string, offset: number): Uint8Array {
    const f = this.file(block);
    checkPageRun(block, f.length, offset, 1);
    const out = Buffer.alloc(PAGE);
    if (!f.written.has(offset / PAGE)) return out;
    const run = this.pendingRunOf(f, offset);
    if (run) {
      const from = run.at + (offset - run.pos);
      run.slab.buf.copy(out, 0, from, from + PAGE);
      return out;
    }
    let got = 0;
    try {
      while (got < PAGE) {
        const n = this.fs.readSync(f.fd, out, got, PAGE - got, offset + got);
        if (n === 0) break; // past the end: a sparse file reads zeros
        got += n;
      }
    } catch (e) {
      throw this.fail(new StorageError('read', f.path, offset + got, e));
    }
    return out;
  }

  backpressure(): Promise<void> | undefined {
    if (this.failure) return this.rejected(this.failure);
    if (this.counters.bufferedBytes <= this.maxInFlightBytes) return undefined;
    // The staged run stays open to grow into a whole write: above the bound, sealed writes
    // are queued or in flight, and their end wakes the promise (settle()).
    if (!this.pressure) {
      let resolve!: () => void;
      let reject!: (e: unknown) => void;
      const promise = new Promise<void>((res, rej) => {
        resolve = res;
        reject = rej;
      });
      // Whoever holds it sees the rejection; nobody holding it is not an unhandled rejection.
      promise.catch(() => undefined);
      this.pressure = { promise, resolve, reject };
      this.counters.pauses++;
    }
    return this.pressure.promise;
  }

  /**
   * Every write done, then every file fsync'ed. Rejects with the sink's
   * failure — after the fsyncs all the same, so that what did reach the
   * files is durable (a failed `qmt receive` keeps what arrived).
   */
  async flush(): Promise<void> {
    if (this.closed) throw new Error('DirectorySink: used after close()');
    this.seal();
    await this.whenDrained();
    await Promise.all(this.list.map((f) => this.fsyncFile(f)));
    this.check();
  }

  /**
   * Lets pending writes finish (no fsync: flush() first for durability), then
   * closes every file. Never rejects for an earlier write failure (flush()
   * reports it); the sink is not used afterwards.
   */
  async close(): Promise<void> {
    if (this.closed) return;
    this.seal();
    await this.whenDrained();
    this.closed = true;
    const files = this.list.splice(0);
    this.files.clear();
    this.last = undefined;
    this.pool.length = 0;
    this.slab = undefined;
    const errors: StorageError[] = [];
    await Promise.all(files.map((f) => new Promise<void>((res) => this.fs.close(f.fd, (err) => (err && errors.push(new StorageError('close', f.path, 0, err)), res())))));
    if (errors.length > 0 && !this.failure) throw errors[0];
  }

  // ---- internals ----

  private check(): void {
    if (this.failure) throw this.failure;
    if (this.closed) throw new Error('DirectorySink: used after close()');
  }

  private file(block: string): BlockFile {
    const l = this.last;
    if (l !== undefined && l.idstr === block && !this.failure) return l;
    this.check();
    const f = this.files.get(block);
    if (!f) throw new Error(`unknown RAM block "${block}"`);
    this.last = f;
    return f;
  }

  /** Appends `count` pages at file position `pos` (from `src`, or zeros) to the open run, sealing runs as slabs fill. */
  /**
   * ZERO records of pages never written: nothing to write (the file is
   * sparse) — but a small hole right after the staged run is remembered, so
   * that data after it fills the hole with zeros and the write stays whole
   * (a guest whose zero and data pages alternate would otherwise cost one
   * write per page). Larger holes stay holes.
   */
  private skipZeros(f: BlockFile, pos: number, n: number): void {
    const run = this.open;
    if (run && run.file === f && pos === run.pos + run.len + this.gap * PAGE && this.gap + n <= MAX_GAP_PAGES) this.gap += n;
    else this.gap = 0;
  }

  private append(f: BlockFile, pos: number, count: number, src: Buffer | undefined, start: number, stride: number): void {
    if (this.gap > 0) {
      const g = this.gap;
      this.gap = 0;
      const run = this.open;
      if (run && run.file === f && pos === run.pos + run.len + g * PAGE) {
        const hole = run.pos + run.len;
        f.written.setRange(hole / PAGE, g);
        this.append(f, hole, g, undefined, 0, PAGE);
      }
    }
    let i = 0;
    while (i < count) {
      let run = this.open;
      const at = pos + i * PAGE;
      if (!run || run.file !== f || run.pos + run.len !== at) {
        this.seal();
        let slab = this.slab;
        if (!slab || slab.used === slab.buf.length) slab = this.newSlab();
        run = { file: f, pos: at, slab, at: slab.used, len: 0, done: 0 };
        slab.refs++;
        this.open = run;
      }
      const slab = run.slab;
      const n = Math.min((slab.buf.length - slab.used) / PAGE, count - i);
      const dst = slab.buf;
      const d = slab.used;
      if (src === undefined) dst.fill(0, d, d + n * PAGE);
      else if (stride === PAGE) src.copy(dst, d, start + i * PAGE, start + (i + n) * PAGE);
      else for (let k = 0, s = start + i * stride; k < n; k++, s += stride) src.copy(dst, d + k * PAGE, s, s + PAGE);
      run.len += n * PAGE;
      slab.used += n * PAGE;
      const c = this.counters;
      c.bufferedBytes += n * PAGE;
      if (c.bufferedBytes > c.peakBufferedBytes) c.peakBufferedBytes = c.bufferedBytes;
      i += n;
      if (slab.used === dst.length) this.seal();
    }
  }

  private newSlab(): Slab {
    const old = this.slab;
    if (old && old.refs === 0) {
      old.used = 0; // every run in it is written: reuse it in place
      return old;
    }
    let slab = this.pool.pop();
    if (slab) slab.used = 0;
    else {
      slab = { buf: Buffer.allocUnsafeSlow(this.writeBytes), used: 0, refs: 0 };
      this.counters.stagingBuffers++;
    }
    this.slab = slab;
    return slab;
  }

  /** A slab none of whose runs is pending goes back to the pool (at most a bound's worth are kept). */
  private release(slab: Slab): void {
    if (slab === this.slab) {
      slab.used = 0; // the current one: reuse it in place
      return;
    }
    if (this.pool.length < this.maxInFlightBytes / this.writeBytes) this.pool.push(slab);
  }

  /** The open run goes to its file's queue. */
  private seal(): void {
    const run = this.open;
    if (!run) return;
    this.open = undefined;
    this.gap = 0;
    run.file.queue.push(run);
    this.pump();
  }

  /** Issues queued writes while the bound, the per-file limit and the no-overlap rule allow. */
  private pump(): void {
    if (this.failure) return;
    for (const f of this.list) {
      while (f.queue.length > 0 && f.inflight.length < this.writesPerFile) {
        const run = f.queue[0]!;
        if (this.counters.inFlightBytes > 0 && this.counters.inFlightBytes + run.len > this.maxInFlightBytes) return;
        if (overlapsAny(run, f.inflight)) break;
        f.queue.shift();
        f.inflight.push(run);
        const c = this.counters;
        c.inFlightBytes += run.len;
        if (c.inFlightBytes > c.peakInFlightBytes) c.peakInFlightBytes = c.inFlightBytes;
        this.issue(run);
      }
    }
  }

  private issue(run: Run): void {
    this.counters.writes++;
    const f = run.file;
    this.fs.write(f.fd, run.slab.buf, run.at + run.done, run.len - run.done, run.pos + run.done, (err, n) => {
      if (err || n <= 0) {
        this.fail(new StorageError('write', f.path, run.pos + run.done, err ?? new Error(`short write (${n} of ${run.len - run.done} bytes)`)));
        this.retire(run);
        this.settle();
        return;
      }
      run.done += n;
      this.counters.bytesWritten += n;
      if (run.done < run.len) {
        this.issue(run); // a short write goes on where it stopped
        return;
      }
      this.retire(run);
      // The next write first: settle() must not take a moment between two writes for idleness.
      this.pump();
      this.settle();
    });
  }

  /** A run is done (written or failed): its bytes and its slab are free. */
  private retire(run: Run): void {
    const f = run.file;
    const i = f.inflight.indexOf(run);
    if (i >= 0) f.inflight.splice(i, 1);
    const c = this.counters;
    c.inFlightBytes -= run.len;
    c.bufferedBytes -= run.len;
    if (--run.slab.refs === 0) this.release(run.slab);
  }

  /**
   * Wakes backpressure() once the bytes sealed for writing (queued and in
   * flight; the staged run does not count, it is still growing into a whole
   * write) are down to half the bound — one promise per pause, not per write —
   * and flush()/close() once nothing is left.
   */
  private settle(): void {
    const c = this.counters;
    if (this.pressure && c.bufferedBytes - (this.open?.len ?? 0) <= this.maxInFlightBytes / 2) {
      const p = this.pressure;
      this.pressure = undefined;
      p.resolve();
    }
    // Nothing in flight (so nothing queued) and flush() or close() waits: the staged run must go too.
    if (c.inFlightBytes === 0 && this.open && this.drained.length > 0) this.seal();
    if (c.inFlightBytes === 0 && (c.bufferedBytes === 0 || this.failure)) {
      const waiting = this.drained.splice(0);
      for (const w of waiting) w();
    }
  }

  /** The first failure sticks: queued writes are dropped, waiters rejected. */
  private fail(e: StorageError): StorageError {
    if (this.failure) return this.failure;
    this.failure = e;
    this.last = undefined;
    const open = this.open;
    this.open = undefined;
    this.gap = 0;
    const dropped: Run[] = open ? [open] : [];
    for (const f of this.list) dropped.push(...f.queue.splice(0));
    for (const r of dropped) {
      this.counters.bufferedBytes -= r.len;
      if (--r.slab.refs === 0) this.release(r.slab);
    }
    const p = this.pressure;
    this.pressure = undefined;
    p?.reject(e);
    this.settle();
    return e;
  }

  private rejected(e: unknown): Promise<never> {
    const p = Promise.reject(e);
    p.catch(() => undefined);
    return p;
  }

  private whenDrained(): Promise<void> {
    const c = this.counters;
    if (c.inFlightBytes === 0 && (c.bufferedBytes === 0 || this.failure)) return Promise.resolve();
    return new Promise((res) => this.drained.push(res));
  }

  private fsyncFile(f: BlockFile): Promise<void> {
    return new Promise((res) => {
      this.fs.fsync(f.fd, (err) => {
        this.counters.fsyncs++;
        if (err) this.fail(new StorageError('fsync', f.path, 0, err));
        res();
      });
    });
  }

  /** The newest pending write of the page at `offset` of `f` (staged, queued or in flight), if any. */
  private pendingRunOf(f: BlockFile, offset: number): Run | undefined {
    const covers = (r: Run): boolean => r.file === f && r.pos <= offset && offset + PAGE <= r.pos + r.len;
    if (this.open && covers(this.open)) return this.open;
    for (let i = f.queue.length - 1; i >= 0; i--) if (covers(f.queue[i]!)) return f.queue[i];
    for (let i = f.inflight.length - 1; i >= 0; i--) if (covers(f.inflight[i]!)) return f.inflight[i];
    return undefined;
  }
}

function overlapsAny(run: Run, others: readonly Run[]): boolean {
  for (const o of others) if (run.pos < o.pos + o.len && o.pos < run.pos + run.len) return true;
  return false;
}
