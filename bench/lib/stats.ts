/**
 * The benchmarks' one statistics module: medians of repeated runs with their
 * spread, means, ratios between rows of the same run, latency summaries (an
 * HDR histogram: Node's own perf_hooks.createHistogram) and the readings of a
 * perf_hooks histogram such as monitorEventLoopDelay — and the number
 * formatting of the reports. It loads nothing heavy (peer processes import it).
 */
import { createHistogram, type Histogram } from 'node:perf_hooks';

export interface RunStats {
  runs: number[];
  median: number;
  min: number;
  max: number;
}

/** Right-aligned number formatting for tables. */
export function fmt(n: number | undefined, digits = 0): string {
  if (n === undefined || !Number.isFinite(n)) return '–';
  return n.toLocaleString('en-US', { minimumFractionDigits: digits, maximumFractionDigits: digits });
}

/** The middle value (the mean of the two middle ones for an even count) of the finite values; undefined for none. */
export function median(xs: readonly number[]): number | undefined {
  const s = xs.filter((x) => Number.isFinite(x)).sort((a, b) => a - b);
  if (s.length === 0) return undefined;
  const m = s.length >> 1;
  return s.length % 2 === 1 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

/** The arithmetic mean of the finite values; undefined for none. */
export function mean(xs: readonly number[]): number | undefined {
  const f = xs.filter((x) => Number.isFinite(x));
  return f.length === 0 ? undefined : f.reduce((a, b) => a + b, 0) / f.length;
}

export function runStats(xs: readonly number[]): RunStats | undefined {
  const runs = xs.filter((x) => Number.isFinite(x));
  const m = median(runs);
  if (m === undefined) return undefined;
  return { runs, median: m, min: Math.min(...runs), max: Math.max(...runs) };
}

/** `median (min–max)`, or `–`. */
export function fmtStats(s: RunStats | undefined, digits = 0, scale = 1): string {
  if (!s) return '–';
  if (s.runs.length === 1) return fmt(s.median * scale, digits);
  return `${fmt(s.median * scale, digits)} (${fmt(s.min * scale, digits)}–${fmt(s.max * scale, digits)})`;
}

/** `a / b` as `1.23×`, or `–`. */
export function fmtRatio(a: number | undefined, b: number | undefined, digits = 2): string {
  if (a === undefined || b === undefined || !Number.isFinite(a) || !Number.isFinite(b) || b === 0) return '–';
  return `${fmt(a / b, digits)}×`;
}

export function ratio(a: number | undefined, b: number | undefined): number | undefined {
  if (a === undefined || b === undefined || !Number.isFinite(a) || !Number.isFinite(b) || b === 0) return undefined;
  return a / b;
}

// ---------------------------------------------------------------------------
// Latency summaries
// ---------------------------------------------------------------------------

export interface CdfPoint {
  /** Round trip, µs. */
  us: number;
  /** Fraction of samples at or below `us`. */
  p: number;
}

export interface LatencySummary {
  count: number;
  minUs: number;
  p50Us: number;
  p90Us: number;
  p99Us: number;
  p999Us: number;
  maxUs: number;
  meanUs: number;
  /** Value at each percentile of PERCENTILES, from the histogram. */
  percentiles: Record<string, number>;
  cdf: CdfPoint[];
}

export const PERCENTILES = [0, 1, 5, 10, 20, 25, 30, 40, 50, 60, 70, 75, 80, 85, 90, 95, 97, 98, 99, 99.5, 99.8, 99.9, 99.95, 99.99, 100] as const;
export const CDF_STEPS = [...Array.from({ length: 100 }, (_, i) => i), 99.5, 99.75, 99.9, 99.95, 99.99, 100] as const;

/** The histogram's range: 1 µs … 60 s, 3 significant digits. */
const LOWEST_US = 1;
const HIGHEST_US = 60_000_000;

/**
 * The rank (1-based) of the sample at percentile `p` of `n`: the smallest
 * count that includes p % of the samples, at least the first (rounded up, less
 * one ulp of floating-point error — HdrHistogram's rule, which earlier reports
 * were computed with).
 */
function rankAt(p: number, n: number): number {
  const fp = (Math.min(p, 100) / 100) * n;
  const ulp = fp === 0 ? 0 : 2 ** (Math.floor(Math.log2(fp)) - 52);
  return Math.max(1, Math.ceil(fp - ulp));
}

/**
 * Records samples (µs, float; rounded to whole µs, at least 1, at most 60 s —
 * the histogram would drop a larger value) in an HDR histogram of 3
 * significant digits (perf_hooks.createHistogram). Each percentile is the
 * highest value equivalent to the sample at that rank; percentile 0 the lowest
 * equivalent of the smallest sample; minUs and maxUs, and the CDF's ends, are
 * the smallest and largest samples themselves.
 */
export function summarize(samplesUs: readonly number[]): LatencySummary | undefined {
  if (samplesUs.length === 0) return undefined;
  const h = createHistogram({ lowest: LOWEST_US, highest: HIGHEST_US, figures: 3 });
  let min = Infinity;
  let max = -Infinity;
  for (const s of samplesUs) {
    const v = Math.min(HIGHEST_US, Math.max(LOWEST_US, Math.round(s)));
    h.record(v);
    if (v < min) min = v;
    if (v > max) max = v;
  }
  const n = h.count;
  // perf_hooks takes percentiles in (0, 100] and ranks them by rounding to the nearest count: ask for the exact
  // fraction of the rank wanted. Its `min` is the lowest equivalent of the smallest sample.
  const at = (p: number): number => (p === 0 ? h.min : h.percentile((100 * rankAt(p, n)) / n));
  const percentiles: Record<string, number> = {};
  for (const p of PERCENTILES) percentiles[String(p)] = at(p);
  const cdf: CdfPoint[] = CDF_STEPS.map((p) => ({ us: p === 0 ? min : p === 100 ? max : at(p), p: p / 100 }));
  return {
    count: n,
    minUs: min,
    p50Us: at(50),
    p90Us: at(90),
    p99Us: at(99),
    p999Us: at(99.9),
    maxUs: max,
    meanUs: Math.round(h.mean * 10) / 10,
    percentiles,
    cdf,
  };
}

/** p50, p99 and max of a perf_hooks histogram of nanoseconds (e.g. monitorEventLoopDelay), in µs. */
export function delaySummaryUs(h: Histogram): { p50Us: number; p99Us: number; maxUs: number } {
  if (h.count === 0) return { p50Us: 0, p99Us: 0, maxUs: 0 };
  return { p50Us: h.percentile(50) / 1000, p99Us: h.percentile(99) / 1000, maxUs: h.max / 1000 };
}
