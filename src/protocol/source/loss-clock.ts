import { performance } from 'node:perf_hooks';

/**
 * A clock for ordering channel losses seen on different threads: each
 * thread's performance.now() counts from its own timeOrigin, their sum is
 * one millisecond clock (sub-millisecond resolution) for all of them.
 */
export function lossClock(): number {
  return performance.timeOrigin + performance.now();
}
