import net from 'node:net';
import { availableParallelism } from 'node:os';
import { MessageChannel, type TransferListItem } from 'node:worker_threads';

/**
 * Whether a session runs its channels in worker threads: `on` (or a typed
 * error naming why it cannot), `off` (one event loop, the path every Node
 * version has), `auto` (threads when they are possible, else `off`; the
 * session's stats say which and why).
 */
export type ThreadMode = 'auto' | 'on' | 'off';

let transferable: boolean | undefined;

/**
 * Whether a `net.Socket` can go to a worker thread in `postMessage`'s
 * transfer list (Node 26.6 and later). Probed once, without a connection:
 * a Node that knows how to transfer sockets refuses a socket that is not
 * connected with ERR_WORKER_HANDLE_NOT_TRANSFERABLE (its state is wrong);
 * one that does not (Node 22) refuses the type itself (a DataCloneError,
 * "Found invalid value in transferList").
 */
export function socketTransferSupported(): boolean {
  if (transferable !== undefined) return transferable;
  const probe = new net.Socket();
  const { port1, port2 } = new MessageChannel();
  try {
    port1.postMessage(probe, [probe as unknown as TransferListItem]);
    transferable = true;
  } catch (e) {
    transferable = (e as { code?: unknown }).code === 'ERR_WORKER_HANDLE_NOT_TRANSFERABLE';
  } finally {
    port1.close();
    port2.close();
    probe.destroy();
  }
  return transferable;
}

/** Why threads cannot be used where socket transfer is missing (for errors and stats). */
export function socketTransferWhy(): string {
  return `this Node (${process.version}) cannot transfer a socket to a worker thread (needs Node 26.6 or later)`;
}

/**
 * Cores below which `auto` keeps a session on one thread. On the 2-core
 * machines this project is measured on, every row was worse with a thread
 * per channel than on one event loop (bench/REPORT.md, issue 13: urgent
 * p50 1.9-2.4x, library multifd TLS 0.68x, the eight-migration load test):
 * each cross-thread hand-off waits for the scheduler when the peer's vCPUs
 * and the bulk thread hold both cores. Four gives the main and preempt
 * threads and the caller's thread a core each; 'on' forces threads anywhere.
 */
export const AUTO_THREADS_MIN_CORES = 4;

let coresForTest: number | undefined;

/** The cores this process may use (`os.availableParallelism()`, or the test seam's figure). */
export function availableCores(): number {
  return coresForTest ?? availableParallelism();
}

/** @internal Test seam: pretend this many cores (undefined: the real count). */
export function setAvailableCoresForTest(n: number | undefined): void {
  coresForTest = n;
}

/** Why `auto` stays on one thread on this machine's cores, or undefined when there are enough. */
export function tooFewCoresWhy(): string | undefined {
  const n = availableCores();
  if (n >= AUTO_THREADS_MIN_CORES) return undefined;
  return `${n} core${n === 1 ? '' : 's'} available: a thread per channel needs ${AUTO_THREADS_MIN_CORES} or more to pay off (measured slower on 2; threads: 'on' forces them)`;
}
