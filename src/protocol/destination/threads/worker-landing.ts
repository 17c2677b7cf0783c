import { TARGET_PAGE_SIZE } from '../../../stream/constants.js';
import type { KnownBlock } from '../../../stream/ram.js';
import type { PreemptRecordWithRuns, StreamRecordWithRuns } from '../../../stream/records.js';
import { PageBitmap } from '../../../stream/bitmap.js';
import { applyXbzrle } from '../../../stream/xbzrle.js';
import * as fs from 'node:fs';
import { StorageError } from '../../errors.js';
import { checkPageRun, checkPageViews, asBuffer } from '../../memory.js';
import { PageFileWriter, type WriterBlock } from '../../page-file-writer.js';
import { Count, type SharedBlock } from './wire.js';

const PAGE = TARGET_PAGE_SIZE;

/** One block's memory and bitmaps as a worker writes them. */
interface Target {
  readonly idstr: string;
  readonly length: number;
  /** Shared guest memory; empty for a sink of files (then `file`). */
  readonly memory: Buffer;
  /** A sink of files: where this worker's writer puts the block's pages. */
  readonly file: WriterBlock | undefined;
  readonly received: PageBitmap;
  readonly written: PageBitmap;
  readonly byPreempt: PageBitmap;
  readonly pages: number;
}

/**
 * Where a channel worker lands pages: straight into the shared guest memory,
 * the received set and the written set, by runs (one copy, one atomic range
 * per bitmap word, a few counter additions per run). The bitmaps are
 * PageBitmap's shared mode (every set/clear atomic): another channel's worker
 * sets bits of the same words concurrently.
 */
export class WorkerLanding {
  private readonly byIndex: Target[] = [];
  /** After POSTCOPY_LISTEN: a page already here is one placed twice. */
  listening = false;
  /** Pages since the current RAM section began (precopy 'pass' events). */
  iterationPages = 0;
  /** Bumped once per chunk that landed pages, so that the session looks at its waiting requests. */
  landedSinceWake = false;
  /** A sink of files: this worker's positioned writes (PageFileWriter: staging, bounded, in order per file). */
  writer: PageFileWriter | undefined;

  constructor(
    readonly counts: Float64Array,
    private readonly channel: 'main' | 'preempt',
  ) {}

  get ready(): boolean {
    return this.byIndex.length > 0;
  }

  setBlocks(blocks: readonly SharedBlock[]): void {
    for (const b of blocks) {
      const written = PageBitmap.attach(Math.ceil(b.length / PAGE), b.written);
      if (b.file) this.writer ??= new PageFileWriter((fd, buf, o, l, p, cb) => fs.write(fd, buf, o, l, p, cb));
      this.byIndex[b.index] = {
        idstr: b.idstr,
        length: b.length,
        memory: b.memory ? Buffer.from(b.memory, 0, b.length) : Buffer.alloc(0),
        file: b.file ? this.writer!.addBlock(b.file, written) : undefined,
        received: PageBitmap.attach(Math.ceil(b.length / PAGE), b.received),
        written,
        byPreempt: PageBitmap.attach(Math.ceil(b.length / PAGE), b.byPreempt),
        pages: Math.ceil(b.length / PAGE),
      };
    }
  }

  /** Lands `r` when it carries pages; false otherwise. */
  land(r: StreamRecordWithRuns | PreemptRecordWithRuns, handleOf: (block: string) => KnownBlock | undefined): boolean {
    switch (r.type) {
      case 'ram-pages':
      case 'ram-zeros': {
        const t = this.target(r.handle.index, r.block);
        const n = r.count;
        const first = r.offset / PAGE;
        checkPageRun(r.block, t.length, r.offset, n);
        const c = this.counts;
        if (r.type === 'ram-pages') {
          checkPageViews(r.block, r.data, r.start, n, r.stride);
          const src = asBuffer(r.data);
          if (t.file) this.writer!.writePages(t.file, r.offset, n, src, r.start, r.stride);
          else if (r.stride === PAGE) src.copy(t.memory, r.offset, r.start, r.start + n * PAGE);
          else for (let i = 0, s = r.start; i < n; i++, s += r.stride) src.copy(t.memory, r.offset + i * PAGE, s, s + PAGE);
          t.written.setRange(first, n);
          c[Count.normal]! += n;
        } else {
          if (t.file) this.writer!.zeroPages(t.file, r.offset, n);
          else zeroWritten(t, first, n);
          c[Count.duplicate]! += n;
        }
        if (this.listening) c[Count.placedTwice]! += countSet(t.received.words, first, n, t.pages);
        if (this.channel === 'preempt') broughtFirst(t, first, n);
        t.received.setRange(first, n);
        this.counted(n);
        return true;
      }
      case 'ram-xbzrle': {
        const index = handleOf(r.block)?.index;
        if (index === undefined) throw new RangeError(`unknown RAM block "${r.block}"`);
        const t = this.target(index, r.block);
        checkPageRun(r.block, t.length, r.offset, 1);
        const page = t.file ? this.heldPage(t, r.offset) : Buffer.from(t.memory.subarray(r.offset, r.offset + PAGE));
        applyXbzrle(page, r.encoded);
        if (t.file) this.writer!.writePages(t.file, r.offset, 1, page, 0, PAGE);
        else page.copy(t.memory, r.offset);
        const p = r.offset / PAGE;
        t.written.set(p);
        if (this.listening) this.counts[Count.placedTwice]! += countSet(t.received.words, p, 1, t.pages);
        if (this.channel === 'preempt') broughtFirst(t, p, 1);
        t.received.set(p);
        this.counts[Count.xbzrle]!++;
        this.counted(1);
        return true;
      }
      default:
        return false;
    }
  }

  /** POSTCOPY_RAM_DISCARD, in stream order: those pages will be sent again. */
  discard(index: number | undefined, start: number, length: number): void {
    const t = index === undefined ? undefined : this.byIndex[index];
    if (!t) return;
    t.received.clearRange(start / PAGE, Math.ceil(length / PAGE));
  }

  /** A sink of files: the page as its file will hold it (this worker's pending write of it, else the file; zeros if never written), for XBZRLE. */
  private heldPage(t: Target, offset: number): Buffer {
    const out = Buffer.alloc(PAGE);
    const f = t.file!;
    if (!t.written.has(offset / PAGE) || this.writer!.copyPending(f, offset, out)) return out;
    try {
      for (let got = 0; got < PAGE; ) {
        const n = fs.readSync(f.file.fd, out, got, PAGE - got, f.base + offset + got);
        if (n === 0) break;
        got += n;
      }
    } catch (e) {
      throw this.writer!.fail(new StorageError('read', f.file.path, f.base + offset, e));
    }
    return out;
  }

  private target(index: number, block: string): Target {
    const t = this.byIndex[index];
    if (!t) throw new RangeError(`RAM block "${block}" has no memory in this thread`);
    return t;
  }

  private counted(n: number): void {
    const c = this.counts;
    if (this.channel === 'preempt') c[Count.preempt]! += n;
    c[Count.runs]!++;
    c[Count.runPages]! += n;
    this.iterationPages += n;
    this.landedSinceWake = true;
  }
}

/** Calls `each(word, mask)` for the words of pages [from, from + count), bounded by `pages`. */
function forWords(from: number, count: number, pages: number, each: (word: number, mask: number) => void): void {
  const end = Math.min(from + count, pages);
  for (let i = from; i < end; ) {
    const bit = i & 31;
    const n = Math.min(32 - bit, end - i);
    each(i >>> 5, n === 32 ? 0xffffffff : ((1 << n) - 1) << bit);
    i += n;
  }
}

/** Pages set in [from, from + count). */
function countSet(w: Uint32Array, from: number, count: number, pages: number): number {
  let n = 0;
  forWords(from, count, pages, (i, mask) => {
    let x = (Atomics.load(w, i) & mask) >>> 0;
    x -= (x >>> 1) & 0x55555555;
    x = (x & 0x33333333) + ((x >>> 2) & 0x33333333);
    n += (((x + (x >>> 4)) & 0x0f0f0f0f) * 0x01010101) >>> 24;
  });
  return n;
}

/**
 * Marks in `byPreempt` the pages of [from, from + count) not received yet:
 * before they are set received (the session reads the two in that order), so
 * a request resolved by this run is attributed to preempt, exactly — a page
 * the main channel brought first stays main's.
 */
function broughtFirst(t: Pick<Target, 'received' | 'byPreempt' | 'pages'>, from: number, count: number): void {
  forWords(from, count, t.pages, (i, mask) => {
    const fresh = (mask & ~Atomics.load(t.received.words, i)) >>> 0;
    if (fresh !== 0) Atomics.or(t.byPreempt.words, i, fresh);
  });
}

/** A ZERO run: only pages ever written need clearing (fresh memory is zero). */
export function zeroWritten(t: Pick<Target, 'memory' | 'written' | 'pages'>, from: number, count: number): void {
  forWords(from, count, t.pages, (i, mask) => {
    const hit = (Atomics.load(t.written.words, i) & mask) >>> 0;
    if (hit === 0) return;
    for (let b = 0; b < 32; b++) if (hit & (1 << b)) t.memory.fill(0, (i * 32 + b) * PAGE, (i * 32 + b + 1) * PAGE);
  });
}
