import { PageBitmap } from '../stream/bitmap.js';
import { TARGET_PAGE_SIZE } from '../stream/constants.js';
import type { BlockFile } from './block-files.js';
import { StorageError } from './errors.js';

const PAGE = TARGET_PAGE_SIZE;
const MiB = 1 << 20;
/** The largest hole of never-written pages filled with zeros to keep a write whole (64 KiB). */
const MAX_GAP_PAGES = 16;

type Callback<T extends unknown[] = []> = (err: NodeJS.ErrnoException | null, ...rest: T) => void;

/** The one file operation a PageFileWriter makes: an asynchronous positioned write (node:fs's `write`). */
export type PositionedWrite = (fd: number, buffer: Uint8Array, offset: number, length: number, position: number, cb: Callback<[number]>) => void;

export interface PageFileWriterOptions {
  /**
   * Bytes of guest RAM the writer may hold that are not yet written to their
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
}

/** What a PageFileWriter has done and holds (numbers only). */
export interface PageFileWriterStats {
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
  readonly file: OpenFile;
  /** The block whose pages it starts with (a hole is filled only within one block). */
  readonly block: WriterBlock;
  /** Position in the file. */
  readonly pos: number;
  readonly slab: Slab;
  /** Position in the slab. */
  readonly at: number;
  len: number;
  /** Bytes of it already written (a short write goes on from here). */
  done: number;
}

/** A file the writer writes (several blocks may share one: a mapped-ram file). */
interface OpenFile {
  readonly path: string;
  readonly fd: number;
  /** Sealed runs not yet issued, in order. */
  readonly queue: Run[];
  /** Issued runs not yet done, in issue order. */
  readonly inflight: Run[];
}

/** A block as the writer places it: page at `offset` goes to `base + offset` of `file`. */
export interface WriterBlock {
  readonly idstr: string;
  readonly length: number;
  readonly base: number;
  readonly file: OpenFile;
  /** Pages ever written: a ZERO record on a page never written costs nothing (the file is sparse). */
  readonly written: PageBitmap;
}

/**
 * The positioned-write pipeline of guest pages into files, for one thread:
 * the caller's (DirectorySink) or a channel's worker. Where a page goes is
 * the block's BlockFile: byte `offset` of the block at `base + offset` of
 * its file (one file per block, or blocks side by side in one file). Pages
 * are copied into staging buffers (freeing the socket's chunk at once),
 * contiguous pages of a file coalesce into one positioned write of up to
 * `writeBytes`, and writes are issued asynchronously, in order per file: a
 * write never overlaps another of the same file still in flight, so a page
 * written twice ends with its later bytes. ZERO records on pages never
 * written cost nothing; on a page written before they write zeros through
 * the same pipeline. It opens, sizes, syncs and closes nothing: the files
 * are its owner's.
 *
 * A failed write makes the writer fail: every later call throws the
 * StorageError (file and position), and `backpressure()` and `drained()`
 * settle (reject / resolve) at once.
 */
export class PageFileWriter {
  private readonly files = new Map<number, OpenFile>();
  private readonly list: OpenFile[] = [];
  readonly maxInFlightBytes: number;
  readonly writeBytes: number;
  private readonly writesPerFile: number;

  /** The run pages are appended to, at the tail of `slab`. */
  private open: Run | undefined;
  private slab: Slab | undefined;
  private readonly pool: Slab[] = [];
  private failure: StorageError | undefined;
  /** Pages never written right after the open run that ZERO records skipped (see skipZeros). */
  private gap = 0;

  private readonly counters: PageFileWriterStats = { bufferedBytes: 0, inFlightBytes: 0, peakInFlightBytes: 0, peakBufferedBytes: 0, writes: 0, bytesWritten: 0, pauses: 0, stagingBuffers: 0 };
  /** Pending backpressure() promise (one per pause) and its settlers. */
  private pressure: { promise: Promise<void>; resolve: () => void; reject: (e: unknown) => void } | undefined;
  /** Called whenever nothing is buffered any more, or the writer failed (drained() waits on it). */
  private waitingDrain: (() => void)[] = [];

  constructor(
    private readonly write: PositionedWrite,
    opts: PageFileWriterOptions = {},
  ) {
    this.maxInFlightBytes = opts.maxInFlightBytes ?? 16 * MiB;
    this.writeBytes = opts.writeBytes ?? Math.min(MiB, this.maxInFlightBytes);
    this.writesPerFile = opts.writesPerFile ?? 4;
    if (!Number.isInteger(this.writeBytes) || this.writeBytes < PAGE || this.writeBytes % PAGE !== 0) {
      throw new RangeError(`writeBytes ${this.writeBytes} is not a positive multiple of ${PAGE}`);
    }
    if (!Number.isInteger(this.maxInFlightBytes) || this.maxInFlightBytes < this.writeBytes) {
      throw new RangeError(`maxInFlightBytes ${this.maxInFlightBytes} is below writeBytes ${this.writeBytes}`);
    }
    if (!Number.isInteger(this.writesPerFile) || this.writesPerFile < 1) throw new RangeError(`writesPerFile ${this.writesPerFile} is not a positive integer`);
  }

  /**
   * A block to write: where its pages go (`f`), and the set of its pages ever
   * written (`written`: the writer's own, or shared between the threads that
   * write the block — PageBitmap's shared mode).
   */
  addBlock(f: BlockFile, written: PageBitmap): WriterBlock {
    let file = this.files.get(f.fd);
    if (!file) {
      file = { path: f.path, fd: f.fd, queue: [], inflight: [] };
      this.files.set(f.fd, file);
      this.list.push(file);
    }
    return { idstr: f.idstr, length: f.length, base: f.base, file, written };
  }

  get failed(): StorageError | undefined {
    return this.failure;
  }

  stats(): PageFileWriterStats {
    return { ...this.counters };
  }

  /** Throws the writer's failure, if it failed. */
  check(): void {
    if (this.failure) throw this.failure;
  }

  /** `count` pages (checked by the caller) at `offset` of `b`: page i at src[start + i*stride]. */
  writePages(b: WriterBlock, offset: number, count: number, src: Buffer, start: number, stride: number): void {
    this.check();
    if (count === 0) return;
    this.append(b, offset, count, src, start, stride);
    b.written.setRange(offset / PAGE, count);
  }

  /** `count` ZERO pages (checked by the caller) at `offset` of `b`. */
  zeroPages(b: WriterBlock, offset: number, count: number): void {
    this.check();
    const end = offset / PAGE + count;
    for (let p = offset / PAGE; p < end; ) {
      if (b.written.has(p)) {
        const n = b.written.runLength(p, end - p);
        this.append(b, p * PAGE, n, undefined, 0, PAGE); // zeros over what was written, in the same pipeline
        p += n;
      } else {
        const next = b.written.next(p);
        const n = (next < 0 || next >= end ? end : next) - p;
        this.skipZeros(b, p * PAGE, n);
        p += n;
      }
    }
  }

  /** Copies the newest pending write (staged, queued or in flight) of the page at `offset` of `b` into `out`; false when none is pending. */
  copyPending(b: WriterBlock, offset: number, out: Buffer): boolean {
    const pos = b.base + offset;
    const f = b.file;
    const covers = (r: Run): boolean => r.file === f && r.pos <= pos && pos + PAGE <= r.pos + r.len;
    let run: Run | undefined;
    if (this.open && covers(this.open)) run = this.open;
    for (let i = f.queue.length - 1; !run && i >= 0; i--) if (covers(f.queue[i]!)) run = f.queue[i];
    for (let i = f.inflight.length - 1; !run && i >= 0; i--) if (covers(f.inflight[i]!)) run = f.inflight[i];
    if (!run) return false;
    const from = run.at + (pos - run.pos);
    run.slab.buf.copy(out, 0, from, from + PAGE);
    return true;
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

  /** Seals what is staged and settles once every write is done (or the writer failed: see `failed`). Never rejects. */
  drained(): Promise<void> {
    this.seal();
    const c = this.counters;
    if (c.inFlightBytes === 0 && (c.bufferedBytes === 0 || this.failure)) return Promise.resolve();
    return new Promise((res) => this.waitingDrain.push(res));
  }

  /** A failure of the owner's (an fsync) fails the writer as its own writes would. */
  fail(e: StorageError): StorageError {
    if (this.failure) return this.failure;
    this.failure = e;
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

  /** Drops the staging buffers (after drained(): the writer is not used afterwards). */
  dispose(): void {
    this.pool.length = 0;
    this.slab = undefined;
  }

  // ---- internals ----

  /**
   * ZERO records of pages never written: nothing to write (the file is
   * sparse) — but a small hole right after the staged run is remembered, so
   * that data after it fills the hole with zeros and the write stays whole
   * (a guest whose zero and data pages alternate would otherwise cost one
   * write per page). Larger holes stay holes.
   */
  private skipZeros(b: WriterBlock, offset: number, n: number): void {
    const run = this.open;
    if (run && run.block === b && b.base + offset === run.pos + run.len + this.gap * PAGE && this.gap + n <= MAX_GAP_PAGES) this.gap += n;
    else this.gap = 0;
  }

  /** Appends `count` pages at `offset` of `b` (from `src`, or zeros) to the open run, sealing runs as slabs fill. */
  private append(b: WriterBlock, offset: number, count: number, src: Buffer | undefined, start: number, stride: number): void {
    const pos = b.base + offset;
    if (this.gap > 0) {
      const g = this.gap;
      this.gap = 0;
      const run = this.open;
      if (run && run.block === b && pos === run.pos + run.len + g * PAGE) {
        const hole = run.pos + run.len - b.base;
        b.written.setRange(hole / PAGE, g);
        this.append(b, hole, g, undefined, 0, PAGE);
      }
    }
    const f = b.file;
    let i = 0;
    while (i < count) {
      let run = this.open;
      const at = pos + i * PAGE;
      if (!run || run.file !== f || run.pos + run.len !== at) {
        this.seal();
        let slab = this.slab;
        if (!slab || slab.used === slab.buf.length) slab = this.newSlab();
        run = { file: f, block: b, pos: at, slab, at: slab.used, len: 0, done: 0 };
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
    this.write(f.fd, run.slab.buf, run.at + run.done, run.len - run.done, run.pos + run.done, (err, n) => {
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
    if (c.inFlightBytes === 0 && this.open && this.waitingDrain.length > 0) this.seal();
    if (c.inFlightBytes === 0 && (c.bufferedBytes === 0 || this.failure)) {
      const waiting = this.waitingDrain.splice(0);
      for (const w of waiting) w();
    }
  }

  private rejected(e: unknown): Promise<never> {
    const p = Promise.reject(e);
    p.catch(() => undefined);
    return p;
  }

}

function overlapsAny(run: Run, others: readonly Run[]): boolean {
  for (const o of others) if (run.pos < o.pos + o.len && o.pos < run.pos + run.len) return true;
  return false;
}
