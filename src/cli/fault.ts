/**
 * A demand-fault generator for a postcopy destination that has no guest of its
 * own: it asks for pages the way a running guest would fault on them, at a
 * fixed rate, and measures how long each page takes to arrive.
 */
import { LatencyHistogram, type LatencySummary } from '../protocol/latency.js';
import type { PageRequestResult } from '../protocol/page-tracker.js';
import { TARGET_PAGE_SIZE } from '../stream/constants.js';

/** 'random': any missing page; 'sequential': missing pages in address order from a random start. */
export type FaultPattern = 'random' | 'sequential';

export const FAULT_PATTERNS: readonly FaultPattern[] = ['random', 'sequential'];

/** Highest rate accepted, requests per second. */
export const MAX_FAULT_RATE = 100_000;

/** What the generator needs from a destination (DestinationSession fits). */
export interface FaultTarget {
  requestPage(block: string, offset: number): Promise<PageRequestResult>;
  hasPage(block: string, offset: number): boolean;
}

export interface FaultGeneratorOptions {
  pattern: FaultPattern;
  /** Requests per second, 1 .. 100 000. */
  rate: number;
  /** RAM blocks to pick pages from (idstr and used length in bytes, as in the RAM block list). */
  blocks: readonly { idstr: string; length: number }[];
  /**
   * Most requests waiting for their page at once (default 256, at least 1).
   * Beyond it a due request is not made (counted as `throttled`): a slow source
   * must not grow an unbounded queue here.
   */
  maxOutstanding?: number;
  /** Pages examined to find one not received yet, per request (default 4096). */
  maxProbe?: number;
  /** Uniform random numbers in [0, 1) (default Math.random); for reproducible tests. */
  random?: () => number;
}

/** What the generator did, for reports. Latencies in microseconds. */
export interface FaultReport {
  pattern: FaultPattern;
  rate: number;
  /** Requests made (requestPage calls). */
  issued: number;
  /** Requests answered by a page that arrived after a REQ_PAGES went out. */
  answered: number;
  /** Requests whose page arrived without needing a REQ_PAGES (raced with the bulk stream). */
  satisfied: number;
  /** Answered requests by the channel that brought the page. */
  byChannel: { main: number; preempt: number };
  /** Due requests not made because every page looked at was already received (or already asked for). */
  skipped: number;
  /** Due requests not made because `maxOutstanding` requests were waiting. */
  throttled: number;
  /** Requests without an answer when the generator stopped, or refused because the migration ended. */
  unanswered: number;
  /** From start() to stop(). */
  durationMs: number;
  /** Request sent → page arrived, over `answered` (µs). */
  latency: LatencySummary;
}

interface BlockRange {
  idstr: string;
  /** Index of the block's first page in the concatenation of all blocks. */
  first: number;
  pages: number;
}

/**
 * Issues `rate` demand requests per second against a FaultTarget, picking
 * pages not received yet. `start()` once postcopy runs; `stop()` when the
 * migration ends (it clears the timer at once and ignores answers that come
 * later).
 */
export class FaultGenerator {
  private readonly ranges: BlockRange[] = [];
  private readonly totalPages: number;
  private readonly random: () => number;
  private readonly maxOutstanding: number;
  private readonly maxProbe: number;
  private readonly period: number;
  private readonly histogram = new LatencyHistogram();
  private readonly outstanding = new Set<string>();
  private timer: NodeJS.Timeout | undefined;
  private credit = 0;
  private lastTick = 0;
  private cursor = 0;
  private startedAt: number | undefined;
  private stoppedAt: number | undefined;
  private readonly counts = { issued: 0, answered: 0, satisfied: 0, main: 0, preempt: 0, skipped: 0, throttled: 0, failed: 0 };

  constructor(
    private readonly target: FaultTarget,
    private readonly opts: FaultGeneratorOptions,
  ) {
    if (!FAULT_PATTERNS.includes(opts.pattern)) throw new RangeError(`unknown fault pattern "${String(opts.pattern)}"`);
    if (!Number.isFinite(opts.rate) || opts.rate < 1 || opts.rate > MAX_FAULT_RATE) throw new RangeError(`fault rate ${opts.rate} is outside 1..${MAX_FAULT_RATE}`);
    let first = 0;
    for (const b of opts.blocks) {
      const pages = Math.floor(b.length / TARGET_PAGE_SIZE);
      if (pages === 0) continue;
      this.ranges.push({ idstr: b.idstr, first, pages });
      first += pages;
    }
    this.totalPages = first;
    this.random = opts.random ?? Math.random;
    this.maxOutstanding = Math.max(1, opts.maxOutstanding ?? 256);
    this.maxProbe = Math.max(1, opts.maxProbe ?? 4096);
    // One tick per request up to 200/s; above that, several per tick.
    this.period = Math.max(5, 1000 / opts.rate);
  }

  /** Starts issuing requests. Idempotent; a stopped generator does not restart. */
  start(): void {
    if (this.startedAt !== undefined) return;
    this.startedAt = performance.now();
    this.lastTick = this.startedAt;
    this.cursor = Math.floor(this.random() * this.totalPages);
    if (this.totalPages === 0) return;
    this.timer = setInterval(() => this.tick(), this.period);
    // The migration keeps the process alive, not the generator.
    this.timer.unref();
  }

  /** Whether it is issuing requests now. */
  get running(): boolean {
    return this.timer !== undefined;
  }

  /** Stops issuing (no timer is left) and returns the report. Idempotent. */
  stop(): FaultReport {
    clearInterval(this.timer);
    this.timer = undefined;
    if (this.stoppedAt === undefined && this.startedAt !== undefined) this.stoppedAt = performance.now();
    return this.report();
  }

  report(): FaultReport {
    const c = this.counts;
    const end = this.stoppedAt ?? performance.now();
    return {
      pattern: this.opts.pattern,
      rate: this.opts.rate,
      issued: c.issued,
      answered: c.answered,
      satisfied: c.satisfied,
      byChannel: { main: c.main, preempt: c.preempt },
      skipped: c.skipped,
      throttled: c.throttled,
      unanswered: c.failed + (this.stoppedAt === undefined ? 0 : this.outstanding.size),
      durationMs: this.startedAt === undefined ? 0 : Math.round(end - this.startedAt),
      latency: this.histogram.summary(),
    };
  }

  private tick(): void {
    const now = performance.now();
    // Catch up after a busy event loop, but by a tenth of a second at most.
    this.credit = Math.min(this.credit + ((now - this.lastTick) * this.opts.rate) / 1000, Math.max(1, this.opts.rate / 10));
    this.lastTick = now;
    while (this.credit >= 1 && this.timer) {
      this.credit -= 1;
      if (this.outstanding.size >= this.maxOutstanding) {
        this.counts.throttled++;
        continue;
      }
      const page = this.pick();
      if (!page) {
        this.counts.skipped++;
        continue;
      }
      this.issue(page.block, page.offset);
    }
  }

  private issue(block: string, offset: number): void {
    const key = `${block}\0${offset}`;
    this.outstanding.add(key);
    this.counts.issued++;
    this.target.requestPage(block, offset).then(
      (r) => {
        if (this.stoppedAt !== undefined || !this.outstanding.delete(key)) return;
        if (r.requested) {
          this.counts.answered++;
          this.histogram.record(r.latencyUs);
          if (r.channel === 'preempt') this.counts.preempt++;
          else if (r.channel === 'main') this.counts.main++;
        } else {
          this.counts.satisfied++;
        }
      },
      () => {
        if (this.stoppedAt !== undefined || !this.outstanding.delete(key)) return;
        this.counts.failed++;
      },
    );
  }

  /** The page with index `i` in the concatenation of all blocks. */
  private locate(i: number): { block: string; offset: number } {
    // Few blocks (usually under 20): a linear search is fine.
    for (const r of this.ranges) {
      if (i < r.first + r.pages) return { block: r.idstr, offset: (i - r.first) * TARGET_PAGE_SIZE };
    }
    const last = this.ranges[this.ranges.length - 1]!;
    return { block: last.idstr, offset: (last.pages - 1) * TARGET_PAGE_SIZE };
  }

  private wanted(p: { block: string; offset: number }): boolean {
    return !this.target.hasPage(p.block, p.offset) && !this.outstanding.has(`${p.block}\0${p.offset}`);
  }

  /** A page not received yet (and not asked for by us), or undefined when none was found within `maxProbe` pages. */
  private pick(): { block: string; offset: number } | undefined {
    const n = this.totalPages;
    let i: number;
    if (this.opts.pattern === 'random') {
      // A few random draws; then walk on from the last one.
      const draws = Math.min(16, this.maxProbe);
      i = 0;
      for (let k = 0; k < draws; k++) {
        i = Math.floor(this.random() * n);
        const p = this.locate(i);
        if (this.wanted(p)) return p;
      }
      for (let k = 1; k < this.maxProbe - draws; k++) {
        const p = this.locate((i + k) % n);
        if (this.wanted(p)) return p;
      }
      return undefined;
    }
    for (let k = 0; k < this.maxProbe; k++) {
      i = this.cursor;
      this.cursor = (this.cursor + 1) % n;
      const p = this.locate(i);
      if (this.wanted(p)) return p;
    }
    return undefined;
  }
}
