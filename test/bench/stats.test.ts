import { createHistogram } from 'node:perf_hooks';
import { describe, expect, it } from 'vitest';
import { CDF_STEPS, PERCENTILES, delaySummaryUs, fmtStats, mean, median, runStats, summarize } from '../../bench/lib/stats.js';

const range = (from: number, to: number): number[] => Array.from({ length: to - from + 1 }, (_, i) => from + i);

describe('bench statistics: summarize', () => {
  it('gives exact percentiles below 2048 µs (one value per bucket at 3 digits)', () => {
    const s = summarize(range(1, 1000))!;
    expect(s).toMatchObject({ count: 1000, minUs: 1, p50Us: 500, p90Us: 900, p99Us: 990, p999Us: 999, maxUs: 1000, meanUs: 500.5 });
    expect(s.percentiles).toMatchObject({ '0': 1, '1': 10, '25': 250, '99.99': 1000, '100': 1000 });
    expect(new Set(Object.keys(s.percentiles))).toEqual(new Set(PERCENTILES.map(String)));
    expect(s.cdf).toHaveLength(CDF_STEPS.length);
    expect(s.cdf[0]).toEqual({ us: 1, p: 0 });
    expect(s.cdf[50]).toEqual({ us: 500, p: 0.5 });
    expect(s.cdf.at(-1)).toEqual({ us: 1000, p: 1 });
  });

  it('reads the top of the bucket above 2048 µs, but min and max are the samples themselves', () => {
    const s = summarize(range(1, 10_000))!;
    // 4096–8191 µs: buckets 4 µs wide; 8192–16383 µs: 8 µs wide.
    expect(s).toMatchObject({ count: 10_000, minUs: 1, p50Us: 5003, p90Us: 9007, p99Us: 9903, p999Us: 9991, maxUs: 10_000 });
    expect(s.percentiles['100']).toBe(10_007);
    expect(s.cdf.at(-1)).toEqual({ us: 10_000, p: 1 });
    expect(s.meanUs).toBeCloseTo(5000.5, 0);
  });

  it('ranks by rounding the count up (HdrHistogram), not to the nearest', () => {
    // 11 % of 10 samples is 1.1: the 2nd sample (perf_hooks on its own would answer the 1st).
    expect(summarize(range(1, 10))!.cdf[11]).toEqual({ us: 2, p: 0.11 });
    expect(summarize(range(1, 10))!.percentiles['5']).toBe(1);
  });

  it('rounds samples to whole µs, at least 1, at most 60 s', () => {
    expect(summarize([0.2, 1.5, 2.4])).toMatchObject({ count: 3, minUs: 1, p50Us: 2, maxUs: 2 });
    const big = summarize([10, 90_000_000])!;
    expect(big.count).toBe(2);
    expect(big.maxUs).toBe(60_000_000);
  });

  it('has nothing to say about no samples', () => {
    expect(summarize([])).toBeUndefined();
  });
});

describe('bench statistics: the rest', () => {
  it('median, mean and runStats use the finite values only', () => {
    expect(median([3, 1, 2])).toBe(2);
    expect(median([4, 1, 3, 2])).toBe(2.5);
    expect(median([NaN, 5])).toBe(5);
    expect(median([])).toBeUndefined();
    expect(mean([1, 2, 6, Infinity])).toBe(3);
    expect(mean([])).toBeUndefined();
    expect(runStats([3, NaN, 1, 2])).toEqual({ runs: [3, 1, 2], median: 2, min: 1, max: 3 });
    expect(fmtStats(runStats([1000, 2000, 3000]))).toBe('2,000 (1,000–3,000)');
  });

  it('reads a perf_hooks histogram of nanoseconds in µs', () => {
    const h = createHistogram();
    for (const ns of range(1, 100)) h.record(ns * 1000);
    const d = delaySummaryUs(h);
    expect(d.p50Us).toBeCloseTo(50, 0);
    expect(d.p99Us).toBeCloseTo(99, 0);
    expect(d.maxUs).toBeCloseTo(100, 0);
    expect(delaySummaryUs(createHistogram())).toEqual({ p50Us: 0, p99Us: 0, maxUs: 0 });
  });
});
