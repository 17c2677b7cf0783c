import { channelName, type ChannelRole, type ChannelStats } from '../../../transport/channel.js';
import type { TransportOptions } from '../../../transport/connection.js';
import { parseEndpoint, type Endpoint } from '../../../transport/endpoint.js';
import { TransportError } from '../../../transport/errors.js';
import { loadTlsDir, type TlsMaterial } from '../../../transport/pki.js';
import { DEFAULT_CONNECT_TIMEOUT_MS, dial, tuneChannel } from '../../../transport/sockets.js';
import { AtomicRing } from '../../../transport/worker/ring.js';
import { spawnWorker } from '../../../transport/worker/spawn.js';
import type { ReturnPathMessage } from '../../../stream/records.js';
import { StorageError } from '../../errors.js';
import type { ReadCounts } from './page-batches.js';
import { Control, NOTICE_WORDS, REQUEST_WORDS, type ChannelWorkerData, type CountDelta, type FromWorker, type PassCommand, type SharedBlock } from './protocol.js';
import { RemoteChannel, transportError } from './remote-channel.js';

const ENTRIES = {
  main: 'protocol/source/threads/main-worker',
  preempt: 'protocol/source/threads/preempt-worker',
  multifd: 'protocol/source/threads/multifd-worker',
} as const;

/** Room for this many page requests (main → preempt) and notices before a producer queues (RingWriter). */
const RING_ENTRIES = 4096;

/** One channel thread in SourceStats.threads: its role, id, CPU time and, once it is gone, how it ended. */
export interface ThreadStat {
  role: ChannelRole;
  /** A multifd channel's id. */
  id?: number;
  threadId: number;
  cpuSeconds: number;
  ended?: 'by-itself' | 'terminated';
  /** A file-backed source: the positioned reads this thread made of the block files for the pages it sent. */
  reads?: ReadCounts;
}

/** What the session's threads share, the same for every link of a migration (built once from the run). */
export interface ThreadShared {
  readonly blocks: readonly SharedBlock[];
  readonly sectionId: number;
  readonly sectionBytes: number;
  /** QEMU's global multifd packet number (MultifdPacketCounter's cell). */
  readonly packets: SharedArrayBuffer;
}

/** What a threaded connection tells its session (wired by attachLink). */
export interface ThreadedLinkHooks {
  onReturnPath(msgs: readonly ReturnPathMessage[]): void;
  onReturnPathError(reason: string): void;
  onBadRequest(reason: string): void;
  /** A notice entry from a ring: [kind, block index, page or count, reason, latency µs]. */
  onNotice(e: Float64Array): void;
  onCounts(c: CountDelta): void;
  /** A worker could not read the pages it was to send (a file-backed source). */
  onStorageError(e: StorageError): void;
}

/**
 * A source connection whose channels run in worker threads (one each):
 * every raw socket is dialed and tuned here, transferred to its worker
 * before it reads a byte, and the worker runs TLS on it. The connection
 * holds the rings between the threads and the session's control words, and
 * reads the notice rings for the session (events, counters) — off the urgent
 * path, which is main worker → request ring → preempt worker.
 */
export class ThreadedSourceConnection {
  readonly threaded = true;
  /** The multifd channels, by id, each in its own worker (empty without multifd). */
  multifd: readonly RemoteChannel[] = [];
  /** Per block, the multifd workers' chunk cursor of the pass under way (reset between passes). */
  private readonly cursors: Int32Array;
  preempt: RemoteChannel | undefined;
  private readonly control = new Int32Array(new SharedArrayBuffer(Control.WORDS * 4));
  private readonly requests = AtomicRing.create(RING_ENTRIES, REQUEST_WORDS);
  private readonly notices = { main: AtomicRing.create(RING_ENTRIES, NOTICE_WORDS), preempt: AtomicRing.create(RING_ENTRIES, NOTICE_WORDS) };
  private hooks: ThreadedLinkHooks | undefined;
  /** Notices and counts that came before the session wired its hooks (none in practice: nothing is asked before setup). */
  private ticket: Uint8Array | undefined;
  private ended = false;
  main!: RemoteChannel;

  private constructor(
    readonly endpoint: Endpoint,
    private readonly opts: TransportOptions,
    private readonly material: TlsMaterial | undefined,
    private readonly shared: ThreadShared,
  ) {
    this.cursors = new Int32Array(new SharedArrayBuffer(Math.max(1, shared.blocks.length) * 4));
  }

  /** Connects the main channel: dialed here, TLS and everything after in its worker. */
  static async connect(uri: string, opts: TransportOptions, shared: ThreadShared): Promise<ThreadedSourceConnection> {
    const ep = parseEndpoint(uri);
    const material = opts.tls ? await loadTlsDir(opts.tls.dir, 'client') : undefined;
    const c = new ThreadedSourceConnection(ep, opts, material, shared);
    c.main = await c.open('main');
    return c;
  }

  /** Wires the session: from here on notices are read and messages routed. */
  attach(hooks: ThreadedLinkHooks): void {
    this.hooks = hooks;
    void this.readNotices(this.notices.main);
    void this.readNotices(this.notices.preempt);
  }

  private async readNotices(ring: AtomicRing): Promise<void> {
    const e = new Float64Array(NOTICE_WORDS);
    for (;;) {
      while (ring.pop(e)) this.hooks?.onNotice(e);
      if (ring.closed) return;
      await ring.wait();
    }
  }

  private async open(role: ChannelRole, multifd?: { id: number; uuid?: Uint8Array }): Promise<RemoteChannel> {
    const o = this.opts;
    const timeoutMs = o.connectTimeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS;
    const name = channelName(role, multifd?.id);
    const raw = await dial(this.endpoint, { timeoutMs, role: name }).connected;
    if (this.ended) {
      raw.destroy();
      throw new TransportError('closed', 'the connection was closed while connecting', { channel: name });
    }
    // Tuned here (setsockopt on the descriptor), before any byte of the handshake, as openClientChannel does.
    const tuning = tuneChannel(raw, role, 'source', this.endpoint.kind, o);
    const data: ChannelWorkerData = {
      role,
      socket: raw,
      endpoint: this.endpoint,
      tuning,
      limits: (role === 'main' ? o.main : role === 'multifd' ? o.multifd : o.preempt) ?? {},
      ...(this.material && o.tls ? { tls: { material: this.material, settings: { ...o.tls, endpoint: 'client' as const }, ...(this.ticket ? { ticket: this.ticket } : {}) } } : {}),
      connectTimeoutMs: timeoutMs,
      blocks: this.shared.blocks,
      control: this.control.buffer as SharedArrayBuffer,
      requests: this.requests.sab,
      notices: this.notices[role === 'main' ? 'main' : 'preempt'].sab,
      sectionId: this.shared.sectionId,
      sectionBytes: this.shared.sectionBytes,
      ...(multifd ? { multifd: { ...multifd, packets: this.shared.packets, cursors: this.cursors.buffer as SharedArrayBuffer } } : {}),
    };
    let worker;
    try {
      worker = spawnWorker(ENTRIES[role], data, [raw as never]);
    } catch (e) {
      raw.destroy();
      throw new TransportError('connect-failed', `the ${name} channel's thread did not start: ${(e as Error).message}`, { channel: name, cause: e });
    }
    const first = await new Promise<FromWorker>((resolve) => {
      worker.once('message', resolve);
      worker.once('error', (e) => resolve({ t: 'connect-failed', error: { code: 'connect-failed', message: `the ${name} channel's thread failed: ${e.message}` } }));
      worker.once('exit', () => resolve({ t: 'connect-failed', error: { code: 'closed', message: `the ${name} channel's thread ended while connecting` } }));
    });
    if (first.t !== 'ready') {
      await worker.terminate();
      throw first.t === 'connect-failed' ? transportError(first.error, name) : new TransportError('connect-failed', `unexpected ${first.t} from the ${name} channel's thread`, { channel: name });
    }
    const ch = new RemoteChannel(
      worker,
      role,
      first.threadId,
      first.stats as ChannelStats,
      {
        onCounts: (c) => this.hooks?.onCounts(c),
        onMessage: (m) => this.route(m),
      },
      multifd?.id,
    );
    if (this.ended) {
      ch.destroy();
      throw new TransportError('closed', 'the connection was closed while connecting', { channel: name });
    }
    return ch;
  }

  private route(m: FromWorker): void {
    switch (m.t) {
      case 'rp':
        this.hooks?.onReturnPath(m.msgs);
        return;
      case 'rp-error':
        this.hooks?.onReturnPathError(m.reason);
        return;
      case 'bad-request':
        this.hooks?.onBadRequest(m.reason);
        return;
      case 'ticket':
        this.ticket = m.ticket;
        return;
      case 'storage-error': {
        const w = m.error;
        this.hooks?.onStorageError(new StorageError(w.operation, w.file, w.position, Object.assign(new Error(w.message), w.errno ? { code: w.errno } : {})));
        return;
      }
      default:
        return;
    }
  }

  /** Connects the preempt channel (its worker resumes the main channel's TLS session when it can). */
  async connectPreempt(): Promise<RemoteChannel> {
    if (this.preempt) return this.preempt;
    if (this.main.isClosed) throw new TransportError('channel-order', 'the preempt channel needs an established main channel', { channel: 'preempt' });
    this.preempt = await this.open('preempt');
    // From now on the main worker hands requests to the preempt worker.
    Atomics.store(this.control, Control.PREEMPT_UP, 1);
    return this.preempt;
  }

  /**
   * Connects `count` multifd channels (ids 0 … count−1) at once, each dialed
   * here and run in its own worker (TLS there, resuming main's session when
   * it can; the init message as soon as it is up). All or none, as
   * SourceConnection.connectMultifd: one that fails closes the others and
   * its error (naming `multifd-N`) is thrown.
   */
  async connectMultifd(count: number, uuid?: Uint8Array): Promise<readonly RemoteChannel[]> {
    if (this.multifd.length > 0) throw new TransportError('channel-order', 'the multifd channels are already connected', { channel: 'multifd-0' });
    if (this.main.isClosed) throw new TransportError('channel-order', 'multifd channels need an established main channel', { channel: 'multifd-0' });
    const dialed = await Promise.allSettled(Array.from({ length: count }, (_, id) => this.open('multifd', { id, ...(uuid ? { uuid } : {}) })));
    const failed = dialed.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    const channels = dialed.filter((r): r is PromiseFulfilledResult<RemoteChannel> => r.status === 'fulfilled').map((r) => r.value);
    if (failed || this.main.isClosed) {
      for (const ch of channels) ch.destroy();
      throw failed ? (failed.reason as unknown) : new TransportError('closed', 'the main channel closed while the multifd channels connected', { channel: 'main' });
    }
    this.multifd = channels;
    return channels;
  }

  /**
   * A multifd precopy pass: every multifd worker takes chunks of the shared
   * `toSend` until none is left; resolves with the pages sent and whether
   * postcopy's request cut it short (then no barrier: the switch writes its own).
   */
  async multifdPass(cmd: PassCommand): Promise<{ sent: number; interrupted: boolean }> {
    // Between passes every worker is idle: the cursors start over.
    this.cursors.fill(0);
    const n = this.multifd.length;
    const each = { ...cmd, bandwidthLimit: cmd.bandwidthLimit ? cmd.bandwidthLimit / n : undefined };
    const done = await Promise.allSettled(this.multifd.map((c) => c.call({ t: 'mpass', id: c.id(), pass: each })));
    const failed = done.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed) throw failed.reason;
    let sent = 0;
    let interrupted = false;
    for (const r of done as PromiseFulfilledResult<Extract<FromWorker, { t: 'done' }>>[]) {
      sent += r.value.sent ?? 0;
      if (r.value.interrupted) interrupted = true;
    }
    return { sent, interrupted };
  }

  /** A SYNC packet on every multifd channel; resolves once each is handed to its channel (main's MULTIFD_FLUSH may follow). */
  async multifdSync(): Promise<void> {
    await Promise.all(this.multifd.map((c) => c.call({ t: 'sync', id: c.id() })));
  }

  /** LISTEN is written: requests are answered from now on; the main worker tunes its socket for postcopy. */
  enterPostcopy(notSentLowat: number, bulkYield: number): void {
    Atomics.store(this.control, Control.LISTENED, 1);
    this.main.post({ t: 'postcopy', notSentLowat, bulkYield });
  }

  /** startPostcopy(): a precopy pass in the main worker ends at its next batch. */
  requestPostcopy(): void {
    Atomics.store(this.control, Control.POSTCOPY_REQUESTED, 1);
  }

  pass(cmd: PassCommand): Promise<{ sent: number; refused: boolean }> {
    return this.main.pass(cmd);
  }

  /** Every request handed to the preempt worker so far has gone to its channel. */
  async drained(): Promise<void> {
    await this.preempt?.drained();
  }

  stats(): { main: ChannelStats; preempt?: ChannelStats; multifd?: ChannelStats[] } {
    return {
      main: this.main.stats,
      ...(this.preempt ? { preempt: this.preempt.stats } : {}),
      ...(this.multifd.length > 0 ? { multifd: this.multifd.map((c) => c.stats) } : {}),
    };
  }

  /** The threads of this connection, for SourceStats.threads. */
  threadStats(): ThreadStat[] {
    return [this.main, this.preempt, ...this.multifd]
      .filter((c): c is RemoteChannel => c !== undefined)
      .map((c) => ({ role: c.role, ...(c.channelId !== undefined ? { id: c.channelId } : {}), threadId: c.threadId, cpuSeconds: c.cpuSeconds, ...(c.ended ? { ended: c.ended } : {}), ...(c.reads ? { reads: { ...c.reads } } : {}) }));
  }

  private endRings(): void {
    this.ended = true;
    this.requests.close();
    this.notices.main.close();
    this.notices.preempt.close();
  }

  /** Flushes and closes both channels; resolves once their threads have ended. */
  async close(): Promise<void> {
    await Promise.allSettled([this.main.close(), this.preempt?.close(), ...this.multifd.map((c) => c.close())]);
    this.endRings();
  }

  destroy(): void {
    this.endRings();
    this.main.destroy();
    this.preempt?.destroy();
    for (const c of this.multifd) c.destroy();
  }
}

export function isThreaded(conn: object): conn is ThreadedSourceConnection {
  return (conn as { threaded?: unknown }).threaded === true;
}
