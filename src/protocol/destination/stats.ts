import { performance } from 'node:perf_hooks';
import type { ChannelStats } from '../../transport/channel.js';
import type { PageTracker } from '../page-tracker.js';
import type { DestinationStats, ThreadStats } from './types.js';

/**
 * The destination's counters. Plain numbers bumped once per record or run
 * on the page path; the stats object is only built when asked for.
 */
export class DestinationCounters {
  readonly startedAt = performance.now();
  endedAt: number | undefined;
  /** Bytes received on every channel. */
  transferred = 0;
  /** PAGE records. */
  normal = 0;
  /** ZERO records. */
  duplicate = 0;
  xbzrle = 0;
  /** Pages that came on the preempt channel. */
  preempt = 0;
  /** RAM PART sections seen. */
  iterations = 0;
  /** Pages of the current RAM section. */
  iterationPages = 0;
  /** Sink calls that took a run of pages, and the pages in them. */
  runs = 0;
  runPages = 0;
  /** Chunks after which reading waited for the sink. */
  sinkWaits = 0;
  recoveries = 0;
  placedTwice = 0;

  stats(status: DestinationStats['status'], pages: PageTracker, channels: { main?: ChannelStats; preempt?: ChannelStats }, threads: ThreadStats): DestinationStats {
    return {
      status,
      recoveries: this.recoveries,
      'placed-twice': this.placedTwice,
      transferred: this.transferred,
      normal: this.normal,
      duplicate: this.duplicate,
      xbzrle: this.xbzrle,
      'preempt-pages': this.preempt,
      'postcopy-requests': pages.requestsSent,
      'precopy-iterations': this.iterations,
      'total-time': Math.round((this.endedAt ?? performance.now()) - this.startedAt),
      'postcopy-latency': pages.latency.summary(),
      runs: { count: this.runs, pages: this.runPages },
      'sink-waits': this.sinkWaits,
      channels,
      threads,
    };
  }
}
