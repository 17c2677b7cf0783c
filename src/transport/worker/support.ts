import net from 'node:net';
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
