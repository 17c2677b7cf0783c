import { createRequire } from 'node:module';
import type * as Hdr from 'hdr-histogram-js';

let hdrModule: typeof Hdr | undefined;
/**
 * hdr-histogram-js (with its WebAssembly build and pako) takes ~40 ms to load:
 * it is loaded with the first histogram (a session's construction), not when
 * the package is imported.
 */
function hdr(): typeof Hdr {
  hdrModule ??= createRequire(import.meta.url)('hdr-histogram-js') as typeof Hdr;
  return hdrModule;
}

/** Percentiles of a latency histogram, in microseconds. */
export interface LatencySummary {
  count: number;
  p50: number;
  p90: number;
  p99: number;
  p999: number;
  max: number;
  mean: number;
}

/** An HDR histogram of latencies in microseconds (1 µs .. 1 h, 3 significant digits). */
export class LatencyHistogram {
  private readonly h = hdr().build({ lowestDiscernibleValue: 1, highestTrackableValue: 3_600_000_000, numberOfSignificantValueDigits: 3 });
  private sum = 0;
  /** Each percentile walks the whole histogram (milliseconds): computed once per change. */
  private cached: LatencySummary | undefined;

  record(micros: number): void {
    const v = Math.max(1, Math.round(micros));
    this.h.recordValue(v);
    this.sum += v;
    this.cached = undefined;
  }

  get count(): number {
    return this.h.totalCount;
  }

  summary(): LatencySummary {
    const h = this.h;
    if (h.totalCount === 0) return { count: 0, p50: 0, p90: 0, p99: 0, p999: 0, max: 0, mean: 0 };
    this.cached ??= {
      count: h.totalCount,
      p50: h.getValueAtPercentile(50),
      p90: h.getValueAtPercentile(90),
      p99: h.getValueAtPercentile(99),
      p999: h.getValueAtPercentile(99.9),
      max: h.maxValue,
      // A running sum: the library's mean walks every bucket.
      mean: Math.round(this.sum / h.totalCount),
    };
    return { ...this.cached };
  }
}
