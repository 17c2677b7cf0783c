/**
 * Leak checks by process.getActiveResourcesInfo(): sockets, servers and
 * timers of this process, compared by type with a snapshot taken before the
 * run (test/faults, test/load); worker threads by process's 'worker' event.
 */
import type { Worker } from 'node:worker_threads';

/**
 * Resources vitest's worker owns and that come and go on their own; also the
 * pipes and process handles of QEMU children and their QMP sockets, which
 * the QEMU harness stops by PID.
 */
const IGNORED = new Set(['MessagePort', 'TTYWrap', 'PipeWrap', 'FSReqCallback', 'FSReqPromise', 'ProcessWrap', 'SignalWrap', 'StatWatcher', 'FSEventWrap']);

export type ResourceSnapshot = ReadonlyMap<string, number>;

export function resourceSnapshot(): ResourceSnapshot {
  const m = new Map<string, number>();
  for (const r of process.getActiveResourcesInfo()) if (!IGNORED.has(r)) m.set(r, (m.get(r) ?? 0) + 1);
  return m;
}

/** Resource types with more instances now than in `before`, as `Type ×n`. */
export function leakedSince(before: ResourceSnapshot): string[] {
  const out: string[] = [];
  for (const [k, n] of resourceSnapshot()) if (n > (before.get(k) ?? 0)) out.push(`${k} ×${n - (before.get(k) ?? 0)}`);
  return out;
}

/**
 * What is still left after waiting up to `settleMs` for it to go (sessions
 * close their sockets a little after `done`).
 */
export async function leftAfter(before: ResourceSnapshot, settleMs: number): Promise<string[]> {
  const deadline = Date.now() + settleMs;
  let left = leakedSince(before);
  while (left.length > 0 && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 25));
    left = leakedSince(before);
  }
  return left;
}

/**
 * Worker threads started from now on that have not exited, seen through
 * process's 'worker' event (workers are not in getActiveResourcesInfo).
 */
export function watchWorkers(): { alive: Set<Worker>; started: () => number; stop: () => void } {
  const alive = new Set<Worker>();
  let n = 0;
  const on = (w: Worker): void => {
    n++;
    alive.add(w);
    w.once('exit', () => alive.delete(w));
  };
  process.on('worker', on);
  return { alive, started: () => n, stop: () => process.off('worker', on) };
}

/** How many of `alive` still run after waiting up to `ms` for them to exit. */
export async function noneAlive(alive: Set<Worker>, ms: number): Promise<number> {
  const deadline = Date.now() + ms;
  while (alive.size > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
  return alive.size;
}
