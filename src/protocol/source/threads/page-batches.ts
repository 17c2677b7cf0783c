/**
 * Where a source channel's worker finds the bytes of the pages it claimed:
 * in the session's shared memory (an InMemorySource with `shared`), or in
 * the block files (a saved VM), read by this worker itself with positioned
 * asynchronous reads — one read per run of consecutive pages, into a few
 * buffers of its own that come back once the channel has written their
 * pages. Memory then stays at `batches × batchPages` pages per worker,
 * whatever the guest size.
 */
import * as fs from 'node:fs';
import { TARGET_PAGE_SIZE } from '../../../stream/constants.js';
import { filePosition, presentPages, presentSpan, zeroAbsentPages, type BlockFile } from '../../block-files.js';
import type { PageBitmap } from '../../../stream/bitmap.js';
import { StorageError } from '../../errors.js';
import type { BlockState } from '../pages.js';

const PAGE = TARGET_PAGE_SIZE;
const EMPTY = Buffer.alloc(0);

/**
 * Pages a worker took from one block, as runs: run i is the pages
 * [first[i], first[i] + count[i]), its bytes at data[at[i] …]. Reused: a
 * worker has a fixed set of them.
 */
export class PageBatch {
  st!: BlockState;
  runs = 0;
  pages = 0;
  readonly first: Int32Array;
  readonly count: Int32Array;
  readonly at: Float64Array;
  data: Uint8Array = EMPTY;
  /** While the pages are being read (files): settles once they are in `data`, or `error` is set. */
  loading: Promise<void> | undefined;
  error: StorageError | undefined;
  /** What to do once the channel has written this batch's bytes (answers to time, with on-main requests). */
  readonly after: (() => void)[] = [];

  constructor(
    readonly maxPages: number,
    /** The batch's own buffer (files); none over shared memory. */
    readonly slab: Buffer | undefined,
  ) {
    this.first = new Int32Array(maxPages);
    this.count = new Int32Array(maxPages);
    this.at = new Float64Array(maxPages);
  }

  get room(): number {
    return this.maxPages - this.pages;
  }

  begin(st: BlockState): void {
    this.st = st;
    this.runs = 0;
    this.pages = 0;
    this.data = EMPTY;
    this.loading = undefined;
    this.error = undefined;
    this.after.length = 0;
  }

  /** Adds `n` pages from `page` on (n ≤ room); one run with the previous when adjacent. */
  add(page: number, n: number): void {
    const r = this.runs;
    if (r > 0 && this.first[r - 1]! + this.count[r - 1]! === page) this.count[r - 1]! += n;
    else {
      this.first[r] = page;
      this.count[r] = n;
      this.runs = r + 1;
    }
    this.pages += n;
  }
}

/** Reads a worker made (files only). */
export interface ReadCounts {
  reads: number;
  bytes: number;
  /** Times the channel waited for a read. */
  waits: number;
}

/** The pages of a worker's claimed batches: see MemoryPages and FilePages. */
export interface WorkerPages {
  /** Batches are read from files (`loading`, buffers that must come back after the write); false: shared memory, at once. */
  readonly files: boolean;
  /** A free batch for `st`, or undefined while every one is in use (whenFree). */
  take(st: BlockState): PageBatch | undefined;
  whenFree(): Promise<void>;
  /** Makes the batch's bytes available: at once (memory) or by reads (files: await `loading`, then check `error`). */
  load(b: PageBatch): void;
  release(b: PageBatch): void;
  readonly counts: ReadCounts | undefined;
}

/** A pool of at most `max` batches. */
abstract class BatchPool {
  private readonly free: PageBatch[] = [];
  private made = 0;
  private waiters: (() => void)[] = [];

  constructor(
    readonly batchPages: number,
    readonly maxBatches: number,
  ) {}

  protected abstract make(): PageBatch;

  take(st: BlockState): PageBatch | undefined {
    let b = this.free.pop();
    if (!b && this.made < this.maxBatches) {
      this.made++;
      b = this.make();
    }
    b?.begin(st);
    return b;
  }

  whenFree(): Promise<void> {
    if (this.free.length > 0 || this.made < this.maxBatches) return Promise.resolve();
    return new Promise((resolve) => this.waiters.push(resolve));
  }

  release(b: PageBatch): void {
    b.data = EMPTY;
    this.free.push(b);
    const w = this.waiters;
    if (w.length === 0) return;
    this.waiters = [];
    for (const f of w) f();
  }
}

/** Pages in the session's shared memory: a batch's runs are views of the block, ready at once. */
export class MemoryPages extends BatchPool implements WorkerPages {
  readonly files = false;
  readonly counts = undefined;

  constructor(
    private readonly memory: readonly Buffer[],
    batchPages: number,
    maxBatches: number,
  ) {
    super(batchPages, maxBatches);
  }

  protected make(): PageBatch {
    return new PageBatch(this.batchPages, undefined);
  }

  load(b: PageBatch): void {
    b.data = this.memory[b.st.index]!;
    for (let i = 0; i < b.runs; i++) b.at[i] = b.first[i]! * PAGE;
  }
}

/**
 * Pages in the block files, read by this worker: a batch's runs are read
 * into its own buffer one after the other, one positioned read per run
 * (more only for a short read), all of them at once. A file shorter than
 * its block reads as zeros past its end, as a sparse file does. With a
 * bitmap of present pages (a mapped-ram file) a run reads only the span
 * from its first present page to its last, and its absent pages are zero.
 */
export class FilePages extends BatchPool implements WorkerPages {
  readonly files = true;
  readonly counts: ReadCounts = { reads: 0, bytes: 0, waits: 0 };
  private readonly present: (PageBitmap | undefined)[];

  constructor(
    private readonly blockFiles: readonly BlockFile[],
    batchPages: number,
    maxBatches: number,
  ) {
    super(batchPages, maxBatches);
    this.present = blockFiles.map(presentPages);
  }

  protected make(): PageBatch {
    return new PageBatch(this.batchPages, Buffer.allocUnsafeSlow(this.batchPages * PAGE));
  }

  load(b: PageBatch): void {
    const f = this.blockFiles[b.st.index]!;
    const present = this.present[b.st.index];
    const slab = b.slab!;
    b.data = slab;
    let left = b.runs;
    if (left === 0) return;
    let off = 0;
    let resolve!: () => void;
    b.loading = new Promise<void>((r) => (resolve = r));
    const done = (err: StorageError | undefined): void => {
      if (err && !b.error) b.error = err;
      if (--left > 0) return;
      b.loading = undefined;
      resolve();
    };
    for (let i = 0; i < b.runs; i++) {
      b.at[i] = off;
      const first = b.first[i]!;
      const count = b.count[i]!;
      const at = off;
      off += count * PAGE;
      const span = presentSpan(present, first, count);
      if (!span) {
        slab.fill(0, at, at + count * PAGE);
        done(undefined);
        continue;
      }
      slab.fill(0, at, at + span.from * PAGE);
      slab.fill(0, at + span.to * PAGE, at + count * PAGE);
      const from = at + span.from * PAGE;
      this.readFully(f, slab, from, (span.to - span.from) * PAGE, filePosition(f, (first + span.from) * PAGE), (err) => {
        if (!err) zeroAbsentPages(present, first, count, slab, at);
        done(err);
      });
    }
  }

  private readFully(f: BlockFile, buf: Buffer, at: number, len: number, pos: number, done: (err: StorageError | undefined) => void): void {
    const c = this.counts;
    let got = 0;
    const step = (): void => {
      c.reads++;
      fs.read(f.fd, buf, at + got, len - got, pos + got, (err, n) => {
        if (err) return done(new StorageError('read', f.path, pos + got, err));
        if (n === 0) {
          buf.fill(0, at + got, at + len);
          return done(undefined);
        }
        got += n;
        c.bytes += n;
        if (got < len) step();
        else done(undefined);
      });
    };
    step();
  }
}
