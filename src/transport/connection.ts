import { EventEmitter } from 'node:events';
import type net from 'node:net';
import type tls from 'node:tls';
import { Admission, describeBytes, judgeMainOrPreempt, type FirstBytesJudgement } from './admission.js';
import { Channel, channelName, type ChannelLimits, type ChannelRole, type ChannelStats } from './channel.js';
import { formatEndpoint, parseEndpoint, type Endpoint } from './endpoint.js';
import { MultifdChannels } from './multifd-channels.js';
import { TransportError } from './errors.js';
import { loadTlsDir, type TlsMaterial } from './pki.js';
import {
  DEFAULT_MAX_PENDING_CONNECTIONS,
  DEFAULT_QUALIFY_TIMEOUT_MS,
  judgeMainOrMultifd,
  type ChannelStart,
  type QualifyOptions,
  type StrangerEvent,
} from './qualify.js';
import { connect, listen, tuneChannel, DEFAULT_CONNECT_TIMEOUT_MS, TlsSessionCache, type Listening } from './sockets.js';
import type { TlsSettings } from './tls.js';
import type { EffectiveTuning, TuningProfile } from './tuning.js';

export { connectSocket } from './sockets.js';

/** Options of one channel: its tuning (over the role's default profile) and buffering limits. */
export interface ChannelOptions extends ChannelLimits {
  /** Overrides of BULK_PROFILE (main) or URGENT_PROFILE (preempt). */
  readonly tuning?: Partial<TuningProfile>;
}

/**
 * Options shared by both ends; `maxPendingConnections` and `qualifyTimeoutMs`
 * (which connections may become a channel, see qualify.ts) are the destination's.
 */
export interface TransportOptions extends QualifyOptions {
  /**
   * TLS with QEMU's tls-creds-x509 directory layout. The source is always the
   * TLS client, the destination the server, on every channel (as in QEMU).
   */
  readonly tls?: Omit<TlsSettings, 'endpoint'>;
  readonly main?: ChannelOptions;
  readonly preempt?: ChannelOptions;
  /** Options of every multifd channel (defaults as main's). */
  readonly multifd?: ChannelOptions;
  /** TCP connect plus TLS handshake, per channel (default 10 s). */
  readonly connectTimeoutMs?: number;
}

/** `qualifyTimeoutMs`, else `connectTimeoutMs` (the handshake limit it replaces on the destination), else the default. */
function qualifyTimeout(opts: TransportOptions): number {
  return opts.qualifyTimeoutMs ?? opts.connectTimeoutMs ?? DEFAULT_QUALIFY_TIMEOUT_MS;
}

function limitsFor(role: ChannelRole, opts: TransportOptions): ChannelLimits {
  return (role === 'main' ? opts.main : role === 'multifd' ? opts.multifd : opts.preempt) ?? {};
}

/**
 * Opens one channel of the source: TCP/unix, tuned before the handshake (so
 * that even the handshake runs with the channel's options), then TLS when
 * configured, resuming from `sessions`.
 */
async function openClientChannel(ep: Endpoint, role: ChannelRole, opts: TransportOptions, material: TlsMaterial | undefined, sessions: TlsSessionCache, id?: number): Promise<Channel> {
  let tuning: EffectiveTuning | undefined;
  const { socket } = await connect(ep, {
    timeoutMs: opts.connectTimeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS,
    role: channelName(role, id),
    beforeHandshake: (raw) => (tuning = tuneChannel(raw, role, 'source', ep.kind, opts)),
    ...(material && opts.tls ? { tls: { material, settings: { ...opts.tls, endpoint: 'client' }, sessions } } : {}),
  });
  return new Channel(socket, role, tuning!, limitsFor(role, opts), id);
}

/**
 * The source's side of a migration connection: the main channel (bulk pages;
 * the return path comes back on it) and, once asked for, the preempt channel.
 * As in QEMU 10.0 there is no handshake byte: the destination tells the
 * channels apart by arrival, so the preempt channel must only be connected once
 * the main channel is established (QEMU waits for the first PONG; the session
 * layer does the same before calling `connectPreempt`).
 *
 * QEMU's multifd channels (`connectMultifd`) are dialed once the main
 * channel is established, before anything is written on it: a QEMU 10
 * destination with TLS tells channels apart by order only (the first
 * connection whose handshake completes is main), and starts reading main
 * only once every multifd channel has connected. The preempt channel, when
 * there is one, comes after them all (QEMU 10.1's order).
 */
export class SourceConnection {
  preempt: Channel | undefined;
  /** The multifd channels, by id (empty without multifd). */
  multifd: readonly Channel[] = [];

  private constructor(
    readonly endpoint: Endpoint,
    readonly main: Channel,
    private readonly opts: TransportOptions,
    private readonly material: TlsMaterial | undefined,
    /** TLS 1.3 tickets arrive after the handshake: the latest, for the preempt channel. */
    private readonly sessions: TlsSessionCache,
  ) {}

  /** Connects the main channel (TCP/unix, then TLS when configured). */
  static async connect(uri: string, opts: TransportOptions = {}): Promise<SourceConnection> {
    const ep = parseEndpoint(uri);
    const material = opts.tls ? await loadTlsDir(opts.tls.dir, 'client') : undefined;
    const sessions = new TlsSessionCache();
    const main = await openClientChannel(ep, 'main', opts, material, sessions);
    return new SourceConnection(ep, main, opts, material, sessions);
  }

  /**
   * Connects the preempt channel, resuming the main channel's TLS session when
   * the server allows it. Refused while the main channel is not established.
   */
  async connectPreempt(): Promise<Channel> {
    if (this.preempt) return this.preempt;
    if (this.main.isClosed) throw new TransportError('channel-order', 'the preempt channel needs an established main channel', { channel: 'preempt' });
    const ch = await openClientChannel(this.endpoint, 'preempt', this.opts, this.material, this.sessions);
    this.preempt = ch;
    return ch;
  }

  /**
   * Connects `count` multifd channels (ids 0 … count−1) at once, each TLS
   * when configured (resuming the main channel's session). All or none: when
   * one fails, the others are closed and its error (naming the channel,
   * `multifd-N`) is thrown. Refused while the main channel is not
   * established, or once multifd channels exist.
   *
   * `opened` is called with each channel as soon as it is established, before
   * the others are: its first bytes must go at once (QEMU's multifd_send_thread
   * sends the init message first thing). A QEMU 10 destination over TLS reads
   * a channel's init message as soon as its handshake completes, and its main
   * loop waits on that read, handshakes of the other channels included.
   */
  async connectMultifd(count: number, opened?: (ch: Channel) => void): Promise<readonly Channel[]> {
    if (this.multifd.length > 0) throw new TransportError('channel-order', 'the multifd channels are already connected', { channel: 'multifd-0' });
    if (this.main.isClosed) throw new TransportError('channel-order', 'multifd channels need an established main channel', { channel: 'multifd-0' });
    const dialed = await Promise.allSettled(
      Array.from({ length: count }, async (_, id) => {
        const ch = await openClientChannel(this.endpoint, 'multifd', this.opts, this.material, this.sessions, id);
        opened?.(ch);
        return ch;
      }),
    );
    const failed = dialed.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    const channels = dialed.filter((r): r is PromiseFulfilledResult<Channel> => r.status === 'fulfilled').map((r) => r.value);
    if (failed || this.main.isClosed) {
      for (const ch of channels) ch.destroy();
      throw failed ? (failed.reason as unknown) : new TransportError('closed', 'the main channel closed while the multifd channels connected', { channel: 'main' });
    }
    this.multifd = channels;
    return channels;
  }

  stats(): { main: ChannelStats; preempt?: ChannelStats; multifd?: ChannelStats[] } {
    return {
      main: this.main.stats,
      ...(this.preempt ? { preempt: this.preempt.stats } : {}),
      ...(this.multifd.length > 0 ? { multifd: this.multifd.map((c) => c.stats) } : {}),
    };
  }

  /** Flushes and closes every channel. */
  async close(): Promise<void> {
    await Promise.allSettled([this.main.close(), this.preempt?.close(), ...this.multifd.map((c) => c.close())]);
  }

  destroy(reason?: unknown): void {
    this.main.destroy(reason);
    this.preempt?.destroy(reason);
    for (const c of this.multifd) c.destroy(reason);
  }
}

/** The destination's side of one migration: the channels in the order they qualified. */
export class DestinationConnection {
  private preemptChannel: Channel | undefined;
  private preemptWaiters: { resolve: (c: Channel) => void; reject: (e: TransportError) => void }[] = [];
  constructor(
    readonly main: Channel,
    /** @internal how many connections may still turn out to be the (silent) preempt channel. */
    private readonly candidates: () => number = () => 0,
    /** The multifd channels (a listener for `multifd`): all of them come before processing starts. */
    readonly multifd?: MultifdChannels,
  ) {}

  /** @internal plain-TCP connections that may still turn out to be the (silent) preempt channel. */
  get preemptCandidates(): number {
    return this.candidates();
  }

  /** The preempt channel, if it has arrived. */
  get preempt(): Channel | undefined {
    return this.preemptChannel;
  }

  /**
   * True when a preempt channel is here or may be: a plain-TCP preempt
   * channel is only known by its first bytes (see qualify.ts), so pages may
   * still come on a connection that has not spoken yet.
   */
  get preemptExpected(): boolean {
    return this.preemptChannel !== undefined || this.preemptCandidates > 0;
  }

  /** Resolves when the preempt channel has qualified (the next connection after main, as in QEMU). */
  waitPreempt(): Promise<Channel> {
    if (this.preemptChannel) return Promise.resolve(this.preemptChannel);
    return new Promise((resolve, reject) => this.preemptWaiters.push({ resolve, reject }));
  }

  /** @internal the listener hands over the second channel. */
  attachPreempt(ch: Channel): void {
    this.preemptChannel = ch;
    for (const w of this.preemptWaiters.splice(0)) w.resolve(ch);
  }

  /** @internal the listener closed before a preempt channel arrived. */
  abandonPreempt(e: TransportError): void {
    for (const w of this.preemptWaiters.splice(0)) w.reject(e);
  }

  stats(): { main: ChannelStats; preempt?: ChannelStats; multifd?: ChannelStats[] } {
    return {
      main: this.main.stats,
      ...(this.preemptChannel ? { preempt: this.preemptChannel.stats } : {}),
      ...(this.multifd ? { multifd: this.multifd.list().map((c) => c.stats) } : {}),
    };
  }

  async close(): Promise<void> {
    await Promise.allSettled([this.main.close(), this.preemptChannel?.close(), ...(this.multifd?.list().map((c) => c.close()) ?? [])]);
  }

  destroy(reason?: unknown): void {
    this.main.destroy(reason);
    this.preemptChannel?.destroy(reason);
    this.multifd?.destroy(reason);
  }
}

/** Options of {@link MigrationListener.listen} that are not about the channels themselves. */
export interface ListenOptions {
  /**
   * What a connection must start with to become the main channel: a new
   * migration's stream magic (default), on a postcopy-recovery listener the
   * recovery's first command, or 'any' (roles by order, no byte checked).
   */
  readonly start?: ChannelStart;
  /**
   * QEMU's multifd (`multifd` capability, `multifd-channels` N): besides the
   * main channel, N multifd channels, told apart from it by their first bytes
   * (see qualify.ts), each by the id of its init message; a preempt channel
   * (QEMU 10.1's order) only after all of them. With `start: 'stream'` only.
   */
  readonly multifd?: { readonly channels: number; /** 16 bytes; default zeros (QEMU without -uuid). */ readonly uuid?: Uint8Array };
}

interface ListenerEvents {
  /** A connection was dropped before it became a channel; the listener keeps waiting. */
  stranger: [StrangerEvent];
  main: [Channel];
  preempt: [Channel];
  multifd: [Channel];
}

/**
 * Listens for one migration. Channel roles go only to connections that
 * qualify (see qualify.ts, admission.ts): the main channel is the first whose
 * first bytes are the stream magic (with TLS: after a handshake with a valid
 * client certificate), then the preempt channel by order (TLS) or by its first
 * RAM page record (plain TCP). Anything else on the port — a probe that
 * connects and closes, an HTTP request, a TLS client of another CA, a client
 * that says nothing — is dropped and reported as a 'stranger' event; the
 * listener keeps waiting. `accept()` rejects only when the listener is closed.
 */
export class MigrationListener extends EventEmitter<ListenerEvents> {
  private conn: DestinationConnection | undefined;
  private acceptWaiters: { resolve: (c: DestinationConnection) => void; reject: (e: TransportError) => void }[] = [];
  private closing = false;
  private readonly admission: Admission;
  /** The multifd channels, which may qualify before the main channel. */
  private readonly multifd: MultifdChannels | undefined;

  private constructor(
    private readonly listening: Listening,
    private readonly opts: TransportOptions,
    private readonly listenOpts: ListenOptions,
  ) {
    super();
    const m = listenOpts.multifd;
    this.multifd = m ? new MultifdChannels(m.channels, m.uuid ?? new Uint8Array(16)) : undefined;
    this.admission = new Admission(
      {
        // Until main and every multifd channel are in, a connection may be any of them (its bytes tell).
        offer: () => (this.conn?.preempt ? undefined : this.conn && this.allBulkIn ? 'preempt' : 'main'),
        judge: (role, secure) => this.judge(role, secure),
        take: (role, s, _raw, id) => this.take(role, s, id),
      },
      {
        // A QEMU source opens every multifd channel at once: they must not push each other out.
        maxPending: opts.maxPendingConnections ?? DEFAULT_MAX_PENDING_CONNECTIONS + (m?.channels ?? 0),
        qualifyMs: qualifyTimeout(opts),
        ...(opts.tls?.allowedPeers ? { allowedPeers: opts.tls.allowedPeers } : {}),
        stranger: (ev) => {
          if (!this.closing) this.emit('stranger', ev);
        },
      },
    );
    this.admission.wire(listening.server, listening.secure);
  }

  static async listen(uri: string, opts: TransportOptions = {}, listenOpts: ListenOptions = {}): Promise<MigrationListener> {
    const ep = parseEndpoint(uri);
    const m = listenOpts.multifd;
    if (m !== undefined) {
      if (!Number.isInteger(m.channels) || m.channels < 1 || m.channels > 255) throw new RangeError(`multifd.channels must be an integer from 1 to 255, got ${String(m.channels)}`);
      if (m.uuid !== undefined && m.uuid.length !== 16) throw new RangeError(`multifd.uuid must have 16 bytes, got ${m.uuid.length}`);
      if ((listenOpts.start ?? 'stream') !== 'stream') throw new RangeError('multifd needs a listener for a new stream (start: "stream")');
    }
    for (const [name, v, min] of [
      ['maxPendingConnections', opts.maxPendingConnections, 1],
      ['qualifyTimeoutMs', opts.qualifyTimeoutMs, 1],
    ] as const) {
      if (v !== undefined && !(Number.isInteger(v) && v >= min && v <= 2_147_483_647)) throw new RangeError(`${name} must be an integer from ${min} to 2147483647, got ${String(v)}`);
    }
    const material = opts.tls ? await loadTlsDir(opts.tls.dir, 'server') : undefined;
    // A handshake that never completes must not hold a socket forever.
    const tlsSpec = material && opts.tls ? { material, settings: { ...opts.tls, endpoint: 'server' as const } satisfies TlsSettings, handshakeTimeoutMs: qualifyTimeout(opts) } : undefined;
    const listening = await listen(ep, tlsSpec ? { tls: tlsSpec } : {});
    return new MigrationListener(listening, opts, listenOpts);
  }

  /** Where it listens, with the port actually bound (port 0). */
  get endpoint(): Endpoint {
    return this.listening.endpoint;
  }

  /** `tcp:HOST:PORT` with the port actually bound (useful with port 0), or `unix:PATH`. */
  get uri(): string {
    return formatEndpoint(this.endpoint);
  }

  /** Connections waiting to qualify right now. */
  get pendingConnections(): number {
    return this.admission.size;
  }

  /** Main and every multifd channel have qualified (no multifd: main alone). */
  private get allBulkIn(): boolean {
    return this.conn !== undefined && (this.multifd?.complete ?? true);
  }

  /** What qualifies a candidate for `role` (see qualify.ts). */
  private judge(role: ChannelRole, secure: boolean): ((seen: Buffer) => FirstBytesJudgement) | undefined {
    const start = this.listenOpts.start ?? 'stream';
    if (start === 'any') return undefined;
    // With TLS the preempt channel is taken by order: only a peer holding a certificate of our CA gets there.
    if (role === 'preempt' && secure) return undefined;
    const multifd = this.multifd;
    if (role === 'main' && multifd) {
      return (seen) => {
        const j = judgeMainOrMultifd(seen, { channels: multifd.expected, uuid: multifd.uuid, taken: (id) => multifd.has(id) });
        switch (j.verdict) {
          case 'more':
            return j;
          case 'main':
            return { verdict: 'yes', role: 'main' };
          case 'multifd':
            return { verdict: 'yes', role: 'multifd', channelId: j.id };
          case 'bad-init': {
            const ch = { channel: j.id !== undefined ? channelName('multifd', j.id) : ('multifd' as const) };
            return j.taken
              ? { verdict: 'no', reason: 'extra', error: new TransportError('channel-order', j.why, ch) }
              : { verdict: 'no', reason: 'not-migration', error: new TransportError('bad-multifd-init', j.why, ch) };
          }
          case 'no':
            return { verdict: 'no', reason: 'not-migration', error: new TransportError('not-a-migration-channel', `first bytes ${describeBytes(seen)} are neither the migration stream magic QEVM nor a multifd channel's 0x11223344`) };
        }
      };
    }
    return judgeMainOrPreempt(role === 'main' ? 'main' : 'preempt', start);
  }

  /** A connection qualified for `role`: it becomes that channel, unless the role was taken meanwhile. */
  private take(role: ChannelRole, s: net.Socket | tls.TLSSocket, channelId?: number): boolean {
    if (role === 'multifd') {
      const m = this.multifd;
      if (!m || channelId === undefined || m.has(channelId)) return false;
      const ch = new Channel(s, 'multifd', tuneChannel(s, 'multifd', 'destination', this.endpoint.kind, this.opts), limitsFor('multifd', this.opts), channelId);
      m.add(channelId, ch);
      this.bulkArrived();
      this.emit('multifd', ch);
      return true;
    }
    if (role === 'main' ? this.conn !== undefined : !this.allBulkIn || this.conn!.preempt !== undefined) return false;
    const tuning = tuneChannel(s, role, 'destination', this.endpoint.kind, this.opts);
    const ch = new Channel(s, role, tuning, limitsFor(role, this.opts));
    if (role === 'main') {
      this.conn = new DestinationConnection(ch, () => this.admission.count('preempt'), this.multifd);
      this.bulkArrived();
      for (const w of this.acceptWaiters.splice(0)) w.resolve(this.conn);
      this.emit('main', ch);
    } else {
      this.admission.dropAll('another connection became the preempt channel');
      this.conn!.attachPreempt(ch);
      this.emit('preempt', ch);
    }
    return true;
  }

  /** Resolves with the connection once its main channel has qualified; rejects when the listener is closed first. */
  accept(): Promise<DestinationConnection> {
    if (this.conn) return Promise.resolve(this.conn);
    if (this.closing) return Promise.reject(new TransportError('closed', 'listener closed'));
    return new Promise((resolve, reject) => this.acceptWaiters.push({ resolve, reject }));
  }

  /**
   * Main, or a multifd channel, qualified: once they all are in, candidates
   * still waiting are dropped — connections that came before the last of them
   * spoke are not the preempt channel: QEMU's source opens that one only after
   * its main channel has been answered (PONG 1).
   */
  private bulkArrived(): void {
    if (!this.allBulkIn) return;
    this.admission.dropAll(this.multifd ? 'the main channel and every multifd channel are connected' : 'another connection became the main channel');
  }

  /** The multifd channels (a listener for `multifd`), including those in before the main channel. */
  get multifdChannels(): MultifdChannels | undefined {
    return this.multifd;
  }

  /**
   * Stops listening and drops every connection still waiting to qualify.
   * Channels that qualified stay open (close them through the connection);
   * multifd channels in while no main channel came are closed here.
   */
  close(): void {
    if (this.closing) return;
    this.closing = true;
    const e = new TransportError('closed', 'listener closed');
    this.admission.close();
    for (const w of this.acceptWaiters.splice(0)) w.reject(e);
    this.conn?.abandonPreempt(e);
    this.multifd?.abandon(e);
    if (!this.conn) this.multifd?.destroy();
    // net.Server.close() calls back only once every accepted socket has ended: do not wait for it.
    this.listening.server.close();
  }
}
