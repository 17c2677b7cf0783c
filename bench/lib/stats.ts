/**
 * Medians of repeated runs with their spread, and ratios between rows of the
 * same run, formatted for the report.
 */
import { fmt } from './report.js';

export interface RunStats {
  runs: number[];
  median: number;
  min: number;
  max: number;
}

/** The middle value (the mean of the two middle ones for an even count); undefined for none. */
export function median(xs: readonly number[]): number | undefined {
  const s = xs.filter((x) => Number.isFinite(x)).sort((a, b) => a - b);
  if (s.length === 0) return undefined;
  const m = s.length >> 1;
  return s.length % 2 === 1 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
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
