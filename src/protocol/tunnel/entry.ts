/**
 * The entry of `qmt tunnel`, on the source host: QEMU's `migrate` goes to its
 * local listener (unix or tcp, plain); every connection QEMU opens there
 * (main, preempt, each multifd channel) crosses the network to the exit on a
 * hop connection of its own, over mutual TLS with our PKI, tuned for its role.
 *
 * Order: the exit connects its QEMU-side connections in the order of the
 * HELLOs it welcomes, and a QEMU destination tells channels apart by accept
 * order; so the first hop connection of QEMU connection N is opened only
 * once that of N-1 has been welcomed (the exit then has connected N-1).
 *
 * Resumable: a lost hop connection (reset, closed, silent) is replaced with
 * backoff, and both ends go on from the last byte the other has; the QEMU
 * socket stays open meanwhile. An exit that no longer knows the connection
 * (it gave up, or restarted) refuses the resume: the QEMU socket is closed
 * then, as after an outage longer than the limit, and QEMU's own recovery
 * (postcopy-paused → `migrate … resume=true`, through the tunnel again) or
 * failure takes over.
 */
import { randomBytes } from 'node:crypto';
import { EventEmitter } from 'node:events';
import type net from 'node:net';
import { parseEndpoint, formatEndpoint, type Endpoint } from '../../transport/endpoint.js';
import { TransportError, type ChannelName } from '../../transport/errors.js';
import { loadTlsDir } from '../../transport/pki.js';
import { ResumableConnection } from '../../transport/resumable.js';
import { hello } from '../../transport/resumable-hop.js';
import { connect, listen, type Listening, type TlsClientSpec } from '../../transport/sockets.js';
import { usageError } from '../../errors.js';
import type { ChannelRole } from '../../transport/channel.js';
import { TunnelAnalysis } from './analysis.js';
import { forwardEvents, profileOf, pruneFinished, settleRole, roleOf, statsOf, tuneFor, type Carried, type TunnelEvents, type TunnelLimits, type TunnelStats } from './common.js';

export interface TunnelEntryOptions {
  /** Where QEMU's `migrate` connects: `unix:PATH` or `tcp:HOST:PORT` (binds only there). */
  readonly listen: string;
  /** The exit: `tcp:HOST:PORT`. */
  readonly to: string;
  /** Our PKI directory (client certificate and key, CA), `tls-hostname` of the exit's certificate, an allow-list. */
  readonly tls: { readonly dir: string; readonly hostname?: string; readonly allowedPeers?: readonly string[] };
  readonly limits?: TunnelLimits;
  /** Backoff of hop reconnects: the first delay, doubled up to the last (default 50 ms → 1 s). */
  readonly reconnect?: { readonly initialDelayMs?: number; readonly maxDelayMs?: number };
  /**
   * With QEMU's own TLS end to end (its bytes hidden from the tunnel), how many
   * connections after each main one are multifd channels (bulk tuning); the
   * rest are taken as the preempt channel (urgent tuning). Default 0.
   */
  readonly multifdChannels?: number;
}

interface Entry extends Carried {
  readonly name: ChannelName;
  /** Its place after its migration's first connection (0: that one), fixed when QEMU opened it. */
  readonly position: number;
  reconnecting: boolean;
  hop: net.Socket | undefined;
}

export class TunnelEntry extends EventEmitter<TunnelEvents> {
  private readonly tunnel = randomBytes(16);
  private readonly carried: Entry[] = [];
  private readonly analysis = new TunnelAnalysis();
  private next = 0;
  /** Index of the current migration's first connection. */
  private leader = 0;
  /** The first hop connections, one after another (QEMU's order). */
  private setup: Promise<void> = Promise.resolve();
  private closing = false;
  private readonly timeoutMs: number;
  private readonly backoff: { first: number; max: number };

  private constructor(
    private readonly listening: Listening,
    private readonly exit: Endpoint,
    private readonly clientTls: TlsClientSpec,
    private readonly opts: TunnelEntryOptions,
  ) {
    super();
    this.timeoutMs = opts.limits?.connectTimeoutMs ?? 5000;
    this.backoff = { first: opts.reconnect?.initialDelayMs ?? 50, max: opts.reconnect?.maxDelayMs ?? 1000 };
    listening.server.on('connection', (s: net.Socket) => this.onQemu(s));
  }

  /** Listens for QEMU; the exit is reached only when QEMU connects. */
  static async start(opts: TunnelEntryOptions): Promise<TunnelEntry> {
    const exit = parseEndpoint(opts.to);
    if (exit.kind !== 'tcp') throw usageError('type', 'bad-option', 'to', `the exit is reached over TCP (tcp:HOST:PORT), got ${opts.to}`);
    const local = parseEndpoint(opts.listen);
    const material = await loadTlsDir(opts.tls.dir, 'client');
    const settings = { dir: opts.tls.dir, endpoint: 'client' as const, ...(opts.tls.hostname ? { hostname: opts.tls.hostname } : {}), ...(opts.tls.allowedPeers ? { allowedPeers: opts.tls.allowedPeers } : {}) };
    const listening = await listen(local, { allowHalfOpen: true });
    return new TunnelEntry(listening, exit, { material, settings }, opts);
  }

  /** Where QEMU migrates to (the bound port when 0 was asked). */
  get uri(): string {
    return formatEndpoint(this.listening.endpoint);
  }

  stats(): TunnelStats {
    return statsOf(
      this.carried,
      (c) => c.conn.stats().sent,
      (c) => c.conn.stats().received,
      this.analysis,
    );
  }

  /** Stops listening and closes every carried connection at both ends. */
  async close(): Promise<void> {
    if (this.closing) return;
    this.closing = true;
    await this.listening.close();
    for (const c of this.carried) c.conn.fail(new TransportError('closed', 'the tunnel entry was closed', { channel: c.name }));
  }

  private onQemu(local: net.Socket): void {
    if (this.closing) {
      local.destroy();
      return;
    }
    const index = this.next++;
    // The first connection while none is carried opens a migration (or a recovery): the others follow it.
    if (!this.carried.some((o) => o.conn.state !== 'done' && o.conn.state !== 'failed')) this.leader = index;
    const position = index - this.leader;
    const name: ChannelName = position === 0 ? 'main' : 'preempt';
    const conn = new ResumableConnection(local, name, this.opts.limits);
    const c: Entry = { index, conn, role: 'pending', name, position, reconnecting: false, hop: undefined };
    this.carried.push(c);
    forwardEvents(c, this);
    const prune = (): void => pruneFinished(this.carried);
    conn.once('done', prune);
    conn.once('failed', prune);
    const feedOf = this.analysis.opened(position === 0);
    conn.on('first-bytes', (b) => {
      c.role = roleOf(b);
      const feed = feedOf(c.role);
      if (feed) conn.observer = { read: feed.toward, delivered: feed.back };
      const profile = this.profile(c);
      tuneFor(local, profile, 'destination', this.listening.endpoint.kind);
      if (c.hop) tuneFor(c.hop, profile, 'source', 'tcp');
      settleRole(c, profile);
    });
    conn.on('lost', () => void this.reconnect(c));
    const first = this.setup.then(() => this.firstHop(c));
    this.setup = first.catch(() => undefined);
  }

  /** Its socket profile: by its bytes, or (QEMU's TLS) by its place after its migration's first connection. */
  private profile(c: Entry): ChannelRole {
    return profileOf(c.role, c.position, c.position >= 1 && c.position <= (this.opts.multifdChannels ?? 0));
  }

  /** The first hop connection: retried until welcomed, refused, or the outage limit passes. */
  private async firstHop(c: Entry): Promise<void> {
    const limit = this.opts.limits?.outageMs ?? 30_000;
    const t0 = Date.now();
    let delay = this.backoff.first;
    for (;;) {
      if (this.closing || c.conn.state !== 'waiting') return;
      const r = await this.attempt(c, false);
      if (r === 'attached' || r === 'refused') {
        if (r === 'attached') this.emit('connection', { index: c.index, role: c.role });
        return;
      }
      if (limit > 0 && Date.now() - t0 > limit) {
        c.conn.fail(new TransportError('outage-timeout', `the exit ${formatEndpoint(this.exit)} could not be reached within ${limit} ms: ${r.message}`, { channel: c.name }));
        return;
      }
      await new Promise((res) => setTimeout(res, delay).unref());
      delay = Math.min(delay * 2, this.backoff.max);
    }
  }

  private async reconnect(c: Entry): Promise<void> {
    if (c.reconnecting) return;
    c.reconnecting = true;
    let delay = this.backoff.first;
    try {
      while (!this.closing && c.conn.state === 'outage') {
        const r = await this.attempt(c, true);
        if (r === 'attached' || r === 'refused') return;
        await new Promise((res) => setTimeout(res, delay).unref());
        delay = Math.min(delay * 2, this.backoff.max);
      }
    } finally {
      c.reconnecting = false;
    }
  }

  /** One hop connection: connect, TLS, HELLO, WELCOME; attaches it, or says why not. */
  private async attempt(c: Entry, resume: boolean): Promise<'attached' | 'refused' | TransportError> {
    let socket: net.Socket | undefined;
    try {
      const role = this.profile(c);
      const connected = await connect(this.exit, { tls: this.clientTls, timeoutMs: this.timeoutMs, role: c.name, beforeHandshake: (raw) => tuneFor(raw, role, 'source', 'tcp') });
      socket = connected.socket;
      const hopRole = c.role === 'main' || (c.role !== 'multifd' && c.role !== 'preempt' && c.position === 0) ? 'main' : 'secondary';
      const w = await hello(socket, { resume, tunnel: this.tunnel, connection: c.index, role: hopRole, received: c.conn.received }, this.timeoutMs, c.name);
      if (this.closing || c.conn.state === 'done' || c.conn.state === 'failed') {
        socket.destroy();
        return 'refused';
      }
      if (w.frame.status === 'unknown' || w.frame.status === 'refused') {
        socket.destroy();
        const why = w.frame.status === 'unknown' ? `the exit no longer knows connection ${c.index} (it gave it up, or restarted)` : `the exit could not open connection ${c.index} to its QEMU`;
        c.conn.fail(new TransportError('hop-refused', why, { channel: c.name }));
        return 'refused';
      }
      c.hop = socket;
      c.conn.attach(socket, w.decoder, w.frame.received, w.after);
      return 'attached';
    } catch (e) {
      socket?.destroy();
      return TransportError.is(e) ? e : new TransportError('closed', (e as Error).message, { channel: c.name, cause: e });
    }
  }
}
