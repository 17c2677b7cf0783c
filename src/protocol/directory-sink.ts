import * as nodeFs from 'node:fs';
import { join } from 'node:path';
import { PageBitmap } from '../stream/bitmap.js';
import { TARGET_PAGE_SIZE } from '../stream/constants.js';
import type { RamBlockInfo } from '../stream/records.js';
import type { BlockFile } from './block-files.js';
import { StorageError } from './errors.js';
import { asBuffer, checkPageRun, checkPageViews, type GuestMemorySink } from './memory.js';
import { PageFileWriter, type PageFileWriterOptions, type PageFileWriterStats, type WriterBlock } from './page-file-writer.js';

const PAGE = TARGET_PAGE_SIZE;

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

/** The staging and write bounds (PageFileWriterOptions: maxInFlightBytes 16 MiB, writeBytes 1 MiB, writesPerFile 4). */
export interface DirectorySinkOptions extends PageFileWriterOptions {
  /** File operations (tests). Default node:fs. */
  fs?: DirectorySinkFs;
}

/** What a DirectorySink has done and holds (numbers only): its writer's figures and its fsyncs. */
export interface DirectorySinkStats extends PageFileWriterStats {
  fsyncs: number;
}

/** A block's file as the sink keeps it. */
interface SinkFile {
  readonly idstr: string;
  readonly path: string;
  readonly fd: number;
  readonly length: number;
  readonly block: WriterBlock;
}

/**
 * Guest RAM as one sparse file per RAM block (`DIR/<block>.bin`); memory use
 * does not depend on guest size. The sink opens, sizes, syncs and closes the
 * files; its PageFileWriter stages the pages (freeing the socket's chunk at
 * once) and writes contiguous pages as one positioned asynchronous write of
 * up to `writeBytes`, in order per file, never a synchronous syscall on the
 * data path; see PageFileWriter.
 *
 * A failed write makes the sink fail: every later call throws the
 * StorageError (file and position), and `backpressure()` and `flush()`
 * reject with it.
 */
export class DirectorySink implements GuestMemorySink {
  private readonly files = new Map<string, SinkFile>();
  private readonly list: SinkFile[] = [];
  private readonly fs: DirectorySinkFs;
  private readonly writer: PageFileWriter;
  private closed = false;
  private fsyncs = 0;
  /** The last block looked up: a destination writes runs of one block after another. */
  private last: SinkFile | undefined;

  constructor(
    readonly dir: string,
    opts: DirectorySinkOptions = {},
  ) {
    const io = opts.fs ?? NODE_FS;
    this.fs = io;
    try {
      this.writer = new PageFileWriter((fd, b, o, l, p, cb) => io.write(fd, b, o, l, p, cb), opts);
    } catch (e) {
      throw new RangeError(`DirectorySink: ${(e as Error).message}`);
    }
    nodeFs.mkdirSync(dir, { recursive: true });
  }

  get maxInFlightBytes(): number {
    return this.writer.maxInFlightBytes;
  }

  get writeBytes(): number {
    return this.writer.writeBytes;
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
      const where: BlockFile = { idstr: b.idstr, length: b.length, path, fd, base: 0 };
      const file: SinkFile = { idstr: b.idstr, path, fd, length: b.length, block: this.writer.addBlock(where, PageBitmap.forBlockLength(b.length)) };
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
    return { ...this.writer.stats(), fsyncs: this.fsyncs };
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
    this.writer.writePages(f.block, offset, count, asBuffer(data), start, stride);
  }

  zeroPages(block: string, offset: number, count: number): void {
    const f = this.file(block);
    checkPageRun(block, f.length, offset, count);
    this.writer.zeroPages(f.block, offset, count);
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
    if (!f.block.written.has(offset / PAGE)) return out;
    if (this.writer.copyPending(f.block, offset, out)) return out;
    let got = 0;
    try {
      while (got < PAGE) {
        const n = this.fs.readSync(f.fd, out, got, PAGE - got, offset + got);
        if (n === 0) break; // past the end: a sparse file reads zeros
        got += n;
      }
    } catch (e) {
      throw this.writer.fail(new StorageError('read', f.path, offset + got, e));
    }
    return out;
  }

  backpressure(): Promise<void> | undefined {
    return this.writer.backpressure();
  }

  /**
   * Every write done, then every file fsync'ed. Rejects with the sink's
   * failure — after the fsyncs all the same, so that what did reach the
   * files is durable (a failed `qmt receive` keeps what arrived).
   */
  async flush(): Promise<void> {
    if (this.closed) throw new Error('DirectorySink: used after close()');
    await this.writer.drained();
    await Promise.all(this.list.map((f) => this.fsyncFile(f)));
    this.writer.check();
  }

  /**
   * Lets pending writes finish (no fsync: flush() first for durability), then
   * closes every file. Never rejects for an earlier write failure (flush()
   * reports it); the sink is not used afterwards.
   */
  async close(): Promise<void> {
    if (this.closed) return;
    await this.writer.drained();
    this.closed = true;
    const files = this.list.splice(0);
    this.files.clear();
    this.last = undefined;
    this.writer.dispose();
    const errors: StorageError[] = [];
    await Promise.all(files.map((f) => new Promise<void>((res) => this.fs.close(f.fd, (err) => (err && errors.push(new StorageError('close', f.path, 0, err)), res())))));
    if (errors.length > 0 && !this.writer.failed) throw errors[0];
  }

  // ---- internals ----

  private check(): void {
    this.writer.check();
    if (this.closed) throw new Error('DirectorySink: used after close()');
  }

  private file(block: string): SinkFile {
    const l = this.last;
    if (l !== undefined && l.idstr === block && !this.writer.failed) return l;
    this.check();
    const f = this.files.get(block);
    if (!f) throw new Error(`unknown RAM block "${block}"`);
    this.last = f;
    return f;
  }

  private fsyncFile(f: SinkFile): Promise<void> {
    return new Promise((res) => {
      this.fs.fsync(f.fd, (err) => {
        this.fsyncs++;
        if (err) this.writer.fail(new StorageError('fsync', f.path, 0, err));
        res();
      });
    });
  }
}
