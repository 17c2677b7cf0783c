import { EventEmitter } from 'node:events';
import type { Worker } from 'node:worker_threads';
import { channelName, type ChannelRole, type ChannelStats } from '../../../transport/channel.js';
import { TransportError, type ChannelName, type TransportErrorCode } from '../../../transport/errors.js';
import type { ReadCounts } from './page-batches.js';
import type { CountDelta, FromWorker, PassCommand, ToWorker, WireError } from './protocol.js';

/** How long a channel's thread has to end by itself after close/destroy before it is terminated. */
const END_GRACE_MS = 3000;

interface Pending {
  resolve(m: Extract<FromWorker, { t: 'done' }>): void;
  reject(e: TransportError): void;
  written?: (() => void) | undefined;
}

export function transportError(e: WireError, name: ChannelName): TransportError {
  return new TransportError(e.code as TransportErrorCode, e.message, { channel: (e.channel ?? name) as ChannelName });
}

/** What the worker reports that is not about one call (the connection routes it). */
export interface RemoteChannelHooks {
  onCounts(c: CountDelta): void;
  onMessage(m: FromWorker): void;
}

/**
 * A source channel that lives in a worker thread, as the caller's thread
 * sees it: the members of Channel the session uses on a threaded link
 * (send, flush, close, destroy, the stats, 'error' and 'close'), each a
 * message to the worker; the figures (stats, queued and unacknowledged
 * bytes) are the worker's latest report (every 100 ms, and with every pass's
 * end). Byte-level work (push, bulkRoom, read) happens in the worker.
 */
export class RemoteChannel extends EventEmitter<{ error: [TransportError]; close: []; end: [] }> {
  private s: ChannelStats;
  private unacked: number | undefined;
  private writable = 0;
  private closed = false;
  private failure: TransportError | undefined;
  /** When its worker saw the channel fail or close (lossClock), for the link to name the first of several losses. */
  lostAt: number | undefined;
  private nextId = 1;
  private readonly pending = new Map<number, Pending>();
  private exited = false;
  readonly exit: Promise<void>;
  cpuSeconds = 0;
  /** A file-backed source: the worker's reads, as last reported. */
  reads: ReadCounts | undefined;
  /** How the thread ended: by itself (nothing left in it), or stopped by terminate() after END_GRACE_MS. */
  ended: 'by-itself' | 'terminated' | undefined;
  private terminating = false;

  constructor(
    readonly worker: Worker,
    readonly role: ChannelRole,
    readonly threadId: number,
    stats: ChannelStats,
    private readonly hooks: RemoteChannelHooks,
    /** A multifd channel's id. */
    readonly channelId?: number,
  ) {
    super();
    this.name = channelName(role, channelId);
    this.s = stats;
    worker.on('message', (m: FromWorker) => this.onMessage(m));
    this.exit = new Promise((resolve) =>
      worker.once('exit', () => {
        this.exited = true;
        this.ended = this.terminating ? 'terminated' : 'by-itself';
        this.gone(new TransportError('closed', `the ${this.name} channel's thread ended`, { channel: this.name }));
        resolve();
      }),
    );
  }

  /** How errors name this channel (`main`, `preempt`, `multifd-N`). */
  readonly name: ChannelName;

  get stats(): ChannelStats {
    return { ...this.s, tuning: { ...this.s.tuning } };
  }

  get queuedBytes(): number {
    return this.s.queuedBytes;
  }

  get unackedBytes(): number | undefined {
    return this.unacked;
  }

  get isClosed(): boolean {
    return this.closed;
  }

  /** What Link's write watchdog reads of the socket: its buffered bytes, as last reported. */
  get socket(): { readonly writableLength: number } {
    return { writableLength: this.writable };
  }

  private onMessage(m: FromWorker): void {
    switch (m.t) {
      case 'done': {
        const p = this.pending.get(m.id);
        if (!p) return;
        this.pending.delete(m.id);
        if (m.error) p.reject(transportError(m.error, this.name));
        else p.resolve(m);
        return;
      }
      case 'written':
        this.pending.get(m.id)?.written?.();
        return;
      case 'stats':
        this.s = m.stats;
        this.unacked = m.unacked;
        this.writable = m.writable;
        this.cpuSeconds = m.cpuSeconds;
        if (m.reads) this.reads = m.reads;
        this.hooks.onCounts(m.counts);
        return;
      case 'error':
        this.lostAt ??= m.at;
        this.fail(transportError(m.error, this.name));
        return;
      case 'close':
        this.lostAt ??= m.at;
        // Calls still waiting get their answer from the worker (a flush resolves on a clean close,
        // as Channel.flush does), or fail when its thread exits right after.
        if (!this.closed) {
          this.closed = true;
          this.emit('close');
        }
        return;
      default:
        this.hooks.onMessage(m);
    }
  }

  private fail(e: TransportError): void {
    if (this.failure) return;
    this.failure = e;
    this.emit('error', e);
  }

  /** The channel (or its thread) is gone: every call still waiting fails, 'close' once. */
  private gone(e: TransportError): void {
    if (!this.closed) {
      this.closed = true;
      this.emit('close');
    }
    const waiting = [...this.pending.values()];
    this.pending.clear();
    for (const p of waiting) p.reject(this.failure ?? e);
  }

  /** One call to the worker, answered by its 'done'. */
  call(m: ToWorker, written?: () => void): Promise<Extract<FromWorker, { t: 'done' }>> {
    if (this.closed) return Promise.reject(this.failure ?? new TransportError('closed', 'channel closed', { channel: this.name }));
    return new Promise((resolve, reject) => {
      const id = (m as { id?: number }).id ?? 0;
      this.pending.set(id, { resolve, reject, written });
      this.worker.postMessage(m);
    });
  }

  id(): number {
    return this.nextId++;
  }

  /** As Channel.send: resolves once the worker's channel took the bytes under its bound; `written` once they reached the kernel. */
  async send(pieces: readonly Uint8Array[], priority: 'urgent' | 'bulk' = 'bulk', written?: () => void): Promise<void> {
    await this.call({ t: 'write', id: this.id(), pieces, urgent: priority === 'urgent' }, written);
  }

  async flush(): Promise<void> {
    await this.call({ t: 'flush', id: this.id() });
  }

  /** One bulk pass in the main worker; resolves with the pages it sent. */
  async pass(pass: PassCommand): Promise<{ sent: number; refused: boolean }> {
    const r = await this.call({ t: 'pass', id: this.id(), pass });
    return { sent: r.sent ?? 0, refused: r.refused === true };
  }

  /** Preempt worker: resolves once every request in its ring has been handed to its channel. */
  async drained(): Promise<void> {
    await this.call({ t: 'drain', id: this.id() });
  }

  post(m: ToWorker): void {
    if (!this.closed) this.worker.postMessage(m);
  }

  /** Sends what is queued, closes the socket, and waits for the thread to end. */
  async close(): Promise<void> {
    if (!this.exited && !this.closed) await this.call({ t: 'close', id: this.id() }).catch(() => undefined);
    await this.endThread();
  }

  /** Tears the channel down now; its thread ends (terminated if it does not within END_GRACE_MS). */
  destroy(): void {
    if (this.exited) return;
    this.worker.postMessage({ t: 'destroy' } satisfies ToWorker);
    void this.endThread();
  }

  private async endThread(): Promise<void> {
    if (this.exited) return;
    // A thread that does not end by itself (stuck in a handshake, say) is stopped: nothing outlives the session.
    // Longer than Channel.close's own 2 s wait for the peer's FIN (a QEMU destination may keep the preempt
    // channel open a while after the end): a thread still in that wait is not stuck.
    const timer = setTimeout(() => {
      this.terminating = true;
      void this.worker.terminate();
    }, END_GRACE_MS);
    await this.exit;
    clearTimeout(timer);
  }

  setNotSentLowat(): void {
    // The worker sets it (ThreadedSourceConnection.enterPostcopy).
  }

  setBulkYield(): void {
    // The worker sets it (ThreadedSourceConnection.enterPostcopy).
  }
}
