import { performance } from 'node:perf_hooks';
import type { BlockTimeSummary } from '../blocktime.js';
import type { PageTracker } from '../page-tracker.js';
import type { MultifdStats } from './multifd.js';
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
  /** MULTIFD_FLUSH records at which the main stream waited for a multifd channel. */
  multifdWaits = 0;

  /** `multifd`: the multifd channels' counters; their pages count in normal, duplicate and runs too. */
  stats(status: DestinationStats['status'], pages: PageTracker, blocktime: BlockTimeSummary, channels: DestinationStats['channels'], threads: ThreadStats, multifd?: MultifdStats): DestinationStats {
    return {
      status,
      recoveries: this.recoveries,
      'placed-twice': this.placedTwice,
      transferred: this.transferred,
      normal: this.normal + (multifd?.normal ?? 0),
      duplicate: this.duplicate + (multifd?.zero ?? 0),
      xbzrle: this.xbzrle,
      'preempt-pages': this.preempt,
      'postcopy-requests': pages.requestsSent,
      'precopy-iterations': this.iterations,
      'total-time': Math.round((this.endedAt ?? performance.now()) - this.startedAt),
      'postcopy-latency': pages.latency.summary(),
      'postcopy-blocktime': blocktime.total,
      'postcopy-vcpu-blocktime': blocktime.perVcpu,
      runs: { count: this.runs + (multifd?.runs.count ?? 0), pages: this.runPages + (multifd?.runs.pages ?? 0) },
      'sink-waits': this.sinkWaits,
      channels,
      threads,
      ...(multifd ? { multifd: { ...multifd, 'flush-waits': this.multifdWaits } } : {}),
    };
  }
}
