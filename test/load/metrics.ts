/**
 * Numbers of a load run: throughput per migration and in aggregate, Jain's
 * fairness index, and the worst urgent-latency p99. Reported (console and a
 * JSON file), never asserted: timing depends on the machine and its load.
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { dirname } from 'node:path';

/**
 * Jain's fairness index of `xs`: (Σx)² / (n·Σx²). 1 when all are equal, 1/n
 * when one gets everything. Undefined for an empty list or all zeros.
 */
export function jainIndex(xs: readonly number[]): number | undefined {
  if (xs.length === 0) return undefined;
  let sum = 0;
  let squares = 0;
  for (const x of xs) {
    sum += x;
    squares += x * x;
  }
  return squares === 0 ? undefined : (sum * sum) / (xs.length * squares);
}

/** Bytes over milliseconds, in MB/s (10^6 bytes per second). */
export function mbps(bytes: number, ms: number): number {
  return ms > 0 ? bytes / 1000 / ms : 0;
}

export function round(x: number, digits = 1): number {
  const f = 10 ** digits;
  return Math.round(x * f) / f;
}

/** min / median / max of `xs` (empty: zeros). */
export function spread(xs: readonly number[]): { min: number; median: number; max: number } {
  if (xs.length === 0) return { min: 0, median: 0, max: 0 };
  const s = [...xs].sort((a, b) => a - b);
  const mid = s.length >> 1;
  const median = s.length % 2 === 1 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2;
  return { min: s[0]!, median, max: s[s.length - 1]! };
}

/** Writes `value` as JSON to `path` (directories created), for the record of a run. */
export function writeJson(path: string, value: unknown): void {
  mkdirSync(dirname(path), { recursive: true });
  writeFileSync(path, `${JSON.stringify(value, null, 2)}\n`);
}
