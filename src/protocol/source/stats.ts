import { performance } from 'node:perf_hooks';
import type { ChannelStats } from '../../transport/channel.js';
import type { LatencySummary } from '../latency.js';
import type { ThreadStat } from './threads/connection.js';

/** Why a requested page went on the channel it went on (see SourceStats['requests-answered']). */
export type AnswerReason = 'preempt' | 'main-in-flight' | 'main-no-preempt';

export type RequestsAnswered = Record<AnswerReason, number>;

export interface SourceStats {
  status: 'setup' | 'active' | 'postcopy-active' | 'postcopy-paused' | 'postcopy-recover' | 'completed' | 'failed';
  /** Postcopy recoveries completed. */
  recoveries: number;
  transferred: number;
  /** Bytes of dirty pages still to send. */
  remaining: number;
  /** Source stop → destination running (package sent in postcopy, SHUT received in precopy), ms. */
  downtime: number | undefined;
  'setup-time': number;
  'total-time': number;
  'dirty-sync-count': number;
  'postcopy-requests': number;
  /**
   * Requested pages not sent again because they had already gone out since
   * POSTCOPY_LISTEN — nearly always by the background stream, sitting in the
   * main channel's queue and socket buffers ahead of the request: they arrive
   * on main, which is why the preempt channel may carry no page at all.
   */
  'requested-pages-already-sent': number;
  /**
   * Requested pages by how they were answered (each page once):
   * `preempt` sent on the preempt channel; `main-in-flight` already handed to
   * the main channel before the request arrived (with pull-based bulk at most
   * `transport.main.bulkWindowBytes` plus one batch, and the kernel's unsent
   * bytes, ahead of it), so not sent again; `main-no-preempt` there is no
   * preempt channel: sent (or already on its way) on main.
   */
  'requests-answered': RequestsAnswered;
  'pages-per-second': number;
  normal: number;
  duplicate: number;
  xbzrle: number;
  passes: number;
  /** Request arrival → last byte of the page handed to the kernel, µs. */
  'postcopy-latency': LatencySummary;
  /** Per channel; `multifd` by id, with multifd. */
  /** Whether the channels ran in worker threads and why; each thread's CPU time (SourceOptions.threads). */
  threads?: { used: boolean; why: string; channels: ThreadStat[] };
  channels: { main?: ChannelStats; preempt?: ChannelStats; multifd?: ChannelStats[] };
}


/** The session's counters, in one place (stats() reads them). */
export class SourceCounters {
  transferred = 0;
  normal = 0;
  duplicate = 0;
  xbzrle = 0;
  passes = 0;
  syncs = 0;
  requests = 0;
  recoveries = 0;
  alreadySent = 0;
  readonly answered: RequestsAnswered = { preempt: 0, 'main-in-flight': 0, 'main-no-preempt': 0 };
}

/** Times of the run (performance.now()). */
export class SourceTimes {
  readonly t0 = performance.now();
  setupMs = 0;
  stoppedAt: number | undefined;
  downtimeMs: number | undefined;
  endedAt: number | undefined;
}

export function buildStats(
  status: SourceStats['status'],
  c: SourceCounters,
  t: SourceTimes,
  remainingBytes: number,
  latency: LatencySummary,
  channels: SourceStats['channels'],
): SourceStats {
  const total = (t.endedAt ?? performance.now()) - t.t0;
  return {
    status,
    recoveries: c.recoveries,
    transferred: c.transferred,
    remaining: remainingBytes,
    downtime: t.downtimeMs,
    'setup-time': Math.round(t.setupMs),
    'total-time': Math.round(total),
    'dirty-sync-count': c.syncs,
    'postcopy-requests': c.requests,
    'requested-pages-already-sent': c.alreadySent,
    'requests-answered': { ...c.answered },
    'pages-per-second': Math.round(((c.normal + c.duplicate + c.xbzrle) * 1000) / Math.max(1, total)),
    normal: c.normal,
    duplicate: c.duplicate,
    xbzrle: c.xbzrle,
    passes: c.passes,
    'postcopy-latency': latency,
    channels,
  };
}
