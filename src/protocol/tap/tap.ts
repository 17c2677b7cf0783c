/**
 * `qmt tap`: a protocol-aware relay between a QEMU source and a QEMU
 * destination.
 *
 * Connections are taken in the order QEMU opens them: the first of a
 * migration is the main channel, the second (while the main one is open) the
 * preempt channel. For each, the tap opens the matching connection to the
 * destination, in the same order: the preempt one only once the main one is
 * established (TCP, and TLS when configured), so the destination, which tells
 * channels apart by arrival alone, sees the right order. Bytes are forwarded
 * unchanged in every direction — main, return path, preempt — with no
 * buffering beyond what backpressure needs, and are then parsed by
 * {@link MigrationAnalysis} into a {@link TapReport}.
 *
 * One report per main connection ("session"): a postcopy recovery opens a new
 * main connection and gets its own report (kind 'resume').
 */
import { EventEmitter } from 'node:events';
import { lstat, unlink } from 'node:fs/promises';
import net from 'node:net';
import { monitorEventLoopDelay, performance } from 'node:perf_hooks';
import type tls from 'node:tls';
import type { LatencySummary } from '../latency.js';
import type { StreamError } from '../../stream/errors.js';
import { classifySocketError } from '../../transport/channel.js';
import { connectSocket } from '../../transport/connection.js';
import { formatEndpoint, parseEndpoint, type Endpoint } from '../../transport/endpoint.js';
import { TransportError } from '../../transport/errors.js';
import { loadTlsDir } from '../../transport/pki.js';
import { classifyTlsError, clientTlsOptions, secureAccept, secureConnect, serverTlsOptions } from '../../transport/tls.js';
import {
  MigrationAnalysis,
  type AnalysisReport,
  type Milestone,
  type PageAnsweredEvent,
  type PageRequestEvent,
  type TapDirection,
} from './analysis.js';
import { forward, type AnySocket } from './forward.js';

export type TapRole = 'main' | 'preempt';

/** Options of {@link startTap}. */
export interface TapOptions {
  /** Where the source connects: `tcp:HOST:PORT` (port 0: any free port, see `uri`) or `unix:PATH`. */
  listen: string;
  /** The destination QEMU's `migrate-incoming` URI: `tcp:HOST:PORT` or `unix:PATH`. */
  to: string;
  /**
   * A tls-creds-x509 directory with server credentials (ca-cert.pem,
   * server-cert.pem, server-key.pem): terminate the source's TLS (QEMU source
   * with `endpoint=client`). The source's client certificate is required and
   * must chain to ca-cert.pem.
   *
   * Node's TLS 1.3 server sends session tickets that a QEMU source reads only
   * on a channel with a return path; a source that closes with them unread
   * resets the connection and may lose the end of its stream (precopy without
   * return-path). Start the process with OPENSSL_CONF pointing at
   * openssl/no-tls13-tickets.cnf to avoid it (`qmt tap` does).
   */
  tlsIn?: string;
  /**
   * A tls-creds-x509 directory with client credentials (ca-cert.pem,
   * client-cert.pem, client-key.pem): originate TLS to the destination (QEMU
   * destination with `endpoint=server`). Its certificate is checked against
   * `tlsHostname`, else the host of `to`.
   */
  tlsOut?: string;
  /** The name the destination's certificate must carry (QEMU's `tls-hostname`); needed with a unix `to` and `tlsOut`. */
  tlsHostname?: string;
  /** Limit of one connection to the destination, TCP plus TLS, and of the source's TLS handshake (default 10 000 ms). */
  connectTimeoutMs?: number;
}

/** One relayed connection. Times are ms after the session started. */
export interface TapConnectionReport {
  role: TapRole;
  acceptedMs: number;
  /** Both sides ready and forwarding started (null: never). */
  establishedMs: number | null;
  closedMs: number | null;
  /** Negotiated TLS towards the source / the destination (null: plain). */
  tlsIn: { protocol: string | null; cipher: string } | null;
  tlsOut: { protocol: string | null; cipher: string } | null;
}

export interface TapTransportErrorReport {
  /** The side whose socket failed. */
  side: 'source' | 'destination';
  channel: TapRole;
  code: string;
  message: string;
  atMs: number;
  /** The migration had completed already (e.g. the reset of a closing socket with unread TLS tickets). */
  afterComplete: boolean;
}

/** The report of one session (main connection and its preempt connection). Latencies in µs, times in ms after `startedAt`. */
export interface TapReport extends Omit<AnalysisReport, 'forwardDelay' | 'forwardDelayUnqueued' | 'backpressure' | 'analysisPerChunk'> {
  /** 1, 2, … in order of main connections. */
  session: number;
  /** 'running' until every connection of the session has closed. */
  state: 'running' | 'ended';
  listen: string;
  to: string;
  tls: { in: boolean; out: boolean };
  startedAt: string;
  durationMs: number;
  connections: { main: TapConnectionReport; preempt: TapConnectionReport | null };
  /** What the tap itself costs. */
  overhead: {
    /**
     * Chunk arrival → its write callback (the bytes were handed to the
     * outgoing socket), µs. Includes waiting behind earlier bytes when the
     * receiving QEMU reads slower than the sender writes.
     */
    forwardDelay: AnalysisReport['forwardDelay'];
    /** The same for chunks the kernel took at once: the tap's own cost, without the receiver's pace. */
    forwardDelayUnqueued: LatencySummary;
    /** Reading paused because the outgoing socket was full (the slower side's pace). */
    backpressure: AnalysisReport['backpressure'];
    /** Parsing time per chunk, µs (after the chunk was written; delays the next event). */
    analysisPerChunk: LatencySummary;
    /**
     * Event-loop delay of this process during the session (perf_hooks, 1 ms
     * sampling), µs: how late any socket event, a chunk's arrival included, can
     * be handled. Process-wide.
     */
    eventLoopDelay: { p50: number; p99: number; max: number };
    /** Most bytes one outgoing socket held in user space (bounded by backpressure). */
    peakQueuedBytes: number;
    /** Average rate of each direction over its active span. */
    throughputBytesPerSecond: { main: number; returnPath: number; preempt: number };
    /** CPU time of this whole process during the session (everything it runs, not only the tap). */
    processCpu: { userMs: number; systemMs: number; percentOfOneCore: number };
  };
  transportErrors: TapTransportErrorReport[];
}

export interface TapChannelEvent {
  session: number;
  role: TapRole;
  tlsIn: TapConnectionReport['tlsIn'];
  tlsOut: TapConnectionReport['tlsOut'];
}

export interface TapEvents {
  /** A main connection arrived: a new session (report) starts. */
  session: [{ session: number }];
  /** A connection is established on both sides and forwarding. */
  channel: [TapChannelEvent];
  /** SWITCHOVER_START, PACKAGED, POSTCOPY_LISTEN, POSTCOPY_RUN, EOF, SHUT went through. */
  milestone: [{ session: number; name: Milestone; atMs: number }];
  'page-request': [PageRequestEvent & { session: number }];
  'page-answered': [PageAnsweredEvent & { session: number }];
  /** A direction could not be parsed any further (forwarding goes on). */
  'parse-error': [{ session: number; direction: TapDirection; error: StreamError }];
  /** Every connection of a session has closed: its final report. */
  'session-end': [TapReport];
  /** A connection failed (also in the report's transportErrors). Emitted only when listened to. */
  error: [TransportError];
}

const noop = (): void => undefined;
const LINGER_MS = 10_000;

function tlsInfo(s: AnySocket | undefined): { protocol: string | null; cipher: string } | null {
  const t = s as tls.TLSSocket | undefined;
  if (!t || typeof t.getProtocol !== 'function') return null;
  return { protocol: t.getProtocol(), cipher: t.getCipher()?.name ?? '' };
}

function round3(x: number): number {
  return Math.round(x * 1000) / 1000;
}

class Link {
  src: AnySocket | undefined;
  dst: AnySocket | undefined;
  srcClosed = false;
  dstClosed = false;
  establishedAt: number | undefined;
  closedAt: number | undefined;
  /** Read when forwarding starts: a closed TLS socket no longer knows its protocol. */
  tlsIn: TapConnectionReport['tlsIn'] = null;
  tlsOut: TapConnectionReport['tlsOut'] = null;
  linger: NodeJS.Timeout | undefined;
  constructor(
    readonly role: TapRole,
    readonly acceptedAt: number,
  ) {}

  get closed(): boolean {
    return this.closedAt !== undefined;
  }

  destroy(reset: boolean): void {
    for (const s of [this.src, this.dst]) if (s) destroySocket(s, reset);
  }
}

/**
 * RST for a plain TCP socket (the peer must notice a failure); a TLS socket is
 * closed through itself, never under it. While the FIN of an ended socket is
 * pending in libuv (every write done, the shutdown not yet), libuv refuses the
 * reset (EINVAL) and Node then never closes the handle: such a socket is only
 * closed (its peer has the FIN; its next write is refused).
 */
function destroySocket(s: AnySocket, reset: boolean): void {
  if (s.destroyed) return;
  const isTls = typeof (s as tls.TLSSocket).getProtocol === 'function';
  if (reset && !isTls && !s.connecting && typeof s.resetAndDestroy === 'function') {
    try {
      const shutdownPending = s.writableEnded && !s.writableFinished && s.writableLength === 0;
      if (shutdownPending) s.destroy();
      else s.resetAndDestroy();
      return;
    } catch {
      // not TCP (unix socket): a plain close
    }
  }
  s.destroy();
}

class Session {
  readonly startedAt = new Date();
  readonly t0 = performance.now();
  readonly cpu0 = process.cpuUsage();
  readonly loop = monitorEventLoopDelay({ resolution: 1 });
  readonly analysis: MigrationAnalysis;
  readonly main: Link;
  preempt: Link | undefined;
  endedAt: number | undefined;
  cpu: NodeJS.CpuUsage | undefined;
  peakQueued = 0;
  readonly errors: TapTransportErrorReport[] = [];
  /** Settles when the main connection is established on both sides (or failed). */
  readonly mainUp: Promise<void>;
  resolveMainUp: () => void = noop;
  rejectMainUp: (e: TransportError) => void = noop;

  constructor(
    readonly id: number,
    previous: Session | undefined,
    tap: Tap,
  ) {
    this.main = new Link('main', this.t0);
    this.mainUp = new Promise<void>((resolve, reject) => {
      this.resolveMainUp = resolve;
      this.rejectMainUp = reject;
    });
    this.mainUp.catch(noop);
    this.loop.enable();
    const session = id;
    this.analysis = new MigrationAnalysis({
      t0: this.t0,
      ...(previous ? { previous: previous.analysis } : {}),
      hooks: {
        parseError: (direction, error) => tap.emit('parse-error', { session, direction, error }),
        milestone: (name, atMs) => tap.emit('milestone', { session, name, atMs }),
        pageRequest: (r) => tap.listenerCount('page-request') > 0 && tap.emit('page-request', { ...r, session }),
        pageAnswered: (a) => tap.listenerCount('page-answered') > 0 && tap.emit('page-answered', { ...a, session }),
      },
    });
  }

  get ended(): boolean {
    return this.endedAt !== undefined;
  }

  rel(t: number): number {
    return round3(t - this.t0);
  }
}

/**
 * A running tap. `uri` is where the source must connect; `report()` the
 * current session's report at any time; events as listed in
 * {@link TapEvents}; `close()` stops it.
 */
export class Tap extends EventEmitter<TapEvents> {
  private readonly sessions: Session[] = [];
  private connectChain: Promise<void> = Promise.resolve();
  private closing = false;
  private readonly endWaiters: Array<{ session: number; resolve: (r: TapReport) => void }> = [];

  private constructor(
    private readonly server: net.Server,
    private readonly listenEp: Endpoint,
    private readonly target: Endpoint,
    private readonly serverTls: tls.TlsOptions | undefined,
    private readonly clientTls: tls.ConnectionOptions | undefined,
    private readonly timeoutMs: number,
  ) {
    super();
  }

  /** @internal use {@link startTap} */
  static async start(opts: TapOptions): Promise<Tap> {
    const listenEp = parseEndpoint(opts.listen);
    const target = parseEndpoint(opts.to);
    let serverTls: tls.TlsOptions | undefined;
    let clientTls: tls.ConnectionOptions | undefined;
    if (opts.tlsIn) serverTls = serverTlsOptions(await loadTlsDir(opts.tlsIn, 'server'), { dir: opts.tlsIn, endpoint: 'server' });
    if (opts.tlsOut) {
      const settings = { dir: opts.tlsOut, endpoint: 'client' as const, ...(opts.tlsHostname ? { hostname: opts.tlsHostname } : {}) };
      clientTls = clientTlsOptions(await loadTlsDir(opts.tlsOut, 'client'), settings, target.kind === 'tcp' ? target.host : undefined);
    }
    if (listenEp.kind === 'unix') await removeStaleSocket(listenEp.path);
    // A plain source waits unread until its destination connection is up; a TLS one must run its handshake.
    const server = net.createServer({ allowHalfOpen: true, pauseOnConnect: !serverTls });
    const actual = await new Promise<Endpoint>((resolve, reject) => {
      server.once('error', (e) => reject(classifySocketError(e)));
      const done = (): void => {
        server.removeAllListeners('error');
        const a = server.address();
        resolve(listenEp.kind === 'tcp' && a && typeof a === 'object' ? { kind: 'tcp', host: listenEp.host, port: a.port } : listenEp);
      };
      if (listenEp.kind === 'tcp') server.listen({ host: listenEp.host, port: listenEp.port }, done);
      else server.listen(listenEp.path, done);
    });
    const tap = new Tap(server, actual, target, serverTls, clientTls, opts.connectTimeoutMs ?? 10_000);
    server.on('connection', (raw: net.Socket) => tap.accepted(raw));
    server.on('error', (e) => tap.fail(classifySocketError(e)));
    return tap;
  }

  /** Where the source connects (`migrate uri=...`), with the real port when 0 was asked. */
  get uri(): string {
    return formatEndpoint(this.listenEp);
  }

  /** The destination URI. */
  get to(): string {
    return formatEndpoint(this.target);
  }

  /** The report of the latest session (undefined before the first connection). */
  report(): TapReport | undefined {
    const s = this.sessions[this.sessions.length - 1];
    return s && this.build(s);
  }

  /** The reports of every session so far, oldest first. */
  reports(): TapReport[] {
    return this.sessions.map((s) => this.build(s));
  }

  /**
   * Resolves with the final report of session `session` (1-based; default:
   * the latest session, or the next one if none has started) once all its
   * connections have closed.
   */
  sessionEnd(session?: number): Promise<TapReport> {
    const id = session ?? Math.max(1, this.sessions.length);
    const s = this.sessions[id - 1];
    if (s?.ended) return Promise.resolve(this.build(s));
    return new Promise((resolve) => this.endWaiters.push({ session: id, resolve }));
  }

  /** Stops listening and closes every connection (a running migration fails). Returns every session's report. */
  async close(): Promise<TapReport[]> {
    if (!this.closing) {
      this.closing = true;
      // net.Server.close() calls back only once every accepted socket has gone, including one
      // still in its TLS handshake (which ends by its timeout): do not wait for it.
      this.server.close();
      const closing: Promise<unknown>[] = [];
      for (const s of this.sessions) {
        for (const l of [s.main, s.preempt]) {
          for (const sock of [l?.src, l?.dst]) if (sock && !sock.destroyed) closing.push(new Promise((resolve) => sock.once('close', resolve)));
          l?.destroy(false);
        }
      }
      // Let the reports carry the closing times (sockets close within a loop turn or two).
      await Promise.race([Promise.all(closing), new Promise((resolve) => setTimeout(resolve, 1000).unref())]);
      if (this.listenEp.kind === 'unix') await unlink(this.listenEp.path).catch(noop);
      // Sessions whose sockets were never wired end here.
      for (const s of this.sessions) this.endSession(s);
    }
    return this.reports();
  }

  // ---- connections ---------------------------------------------------------

  private accepted(raw: net.Socket): void {
    if (this.closing) {
      raw.destroy();
      return;
    }
    raw.setNoDelay(true);
    const cur = this.sessions[this.sessions.length - 1];
    const mainOpen = cur !== undefined && !cur.main.closed && !cur.main.srcClosed;
    if (mainOpen && cur.preempt) {
      raw.destroy();
      this.transportError(cur, cur.preempt, 'source', new TransportError('channel-order', 'a third connection for one migration: refused'));
      return;
    }
    let session: Session;
    let link: Link;
    if (mainOpen) {
      session = cur;
      link = new Link('preempt', performance.now());
      session.preempt = link;
      session.analysis.preemptConnected();
    } else {
      session = new Session(this.sessions.length + 1, cur, this);
      this.sessions.push(session);
      link = session.main;
      this.emit('session', { session: session.id });
    }
    const role = link.role;

    // The source side: at once (TLS handshake), in parallel with the destination side.
    let srcReady: Promise<AnySocket>;
    if (this.serverTls) {
      raw.on('error', noop); // its errors surface on the TLS socket that takes it over
      srcReady = secureAccept(raw, this.serverTls, { channel: role, timeoutMs: this.timeoutMs });
    } else {
      srcReady = Promise.resolve(raw);
    }
    srcReady.then(
      (src) => this.attach(session, link, 'source', src),
      (e: unknown) => this.setupFailed(session, link, 'source', e),
    );

    // The destination side: strictly in accept order; preempt only after main is established.
    const task = async (): Promise<void> => {
      if (link.srcClosed) throw new TransportError('closed', 'the source closed before the destination connection was made', { channel: role });
      if (role === 'preempt') await session.mainUp;
      const dst = await this.connectUpstream(role);
      this.attach(session, link, 'destination', dst);
    };
    const run = this.connectChain.then(task);
    this.connectChain = run.catch(noop);
    run.catch((e: unknown) => this.setupFailed(session, link, 'destination', e));
  }

  private async connectUpstream(role: TapRole): Promise<AnySocket> {
    const timeoutMs = this.timeoutMs;
    // Half-open: the end of one direction is forwarded as a FIN while the other goes on.
    const raw = await connectSocket(this.target, role, timeoutMs, { allowHalfOpen: true });
    raw.setNoDelay(true);
    if (!this.clientTls) return raw;
    return secureConnect({ ...this.clientTls, socket: raw }, { channel: role, timeoutMs });
  }

  /** One side of a link is ready: watch it, and start forwarding once both are. */
  private attach(session: Session, link: Link, side: 'source' | 'destination', sock: AnySocket): void {
    if (side === 'source') link.src = sock;
    else link.dst = sock;
    const otherClosed = side === 'source' ? link.dstClosed : link.srcClosed;
    if (this.closing || otherClosed) {
      sock.on('error', noop);
      destroySocket(sock, true);
      return;
    }
    sock.on('error', (e: Error) => this.socketError(session, link, side, sock, e));
    sock.once('close', () => this.socketClosed(session, link, side));
    if (sock.destroyed) {
      this.socketClosed(session, link, side);
      return;
    }
    if (link.src && link.dst) this.wire(session, link, link.src, link.dst);
  }

  private wire(session: Session, link: Link, src: AnySocket, dst: AnySocket): void {
    const a = session.analysis;
    const out: TapDirection = link.role === 'main' ? 'main' : 'preempt';
    const back: TapDirection = link.role === 'main' ? 'return-path' : 'preempt-reverse';
    const hooks = (dir: TapDirection) => ({
      chunk: (c: Buffer, t: number) => a.push(dir, c, t),
      written: (us: number, behind: boolean) => a.forwarded(dir, us, behind),
      paused: (ms: number) => a.paused(ms),
      queued: (n: number) => {
        if (n > session.peakQueued) session.peakQueued = n;
      },
    });
    link.establishedAt = performance.now();
    link.tlsIn = tlsInfo(src);
    link.tlsOut = tlsInfo(dst);
    forward(src, dst, hooks(out));
    forward(dst, src, hooks(back));
    if (link.role === 'main') session.resolveMainUp();
    this.emit('channel', { session: session.id, role: link.role, tlsIn: link.tlsIn, tlsOut: link.tlsOut });
  }

  private setupFailed(session: Session, link: Link, side: 'source' | 'destination', e: unknown): void {
    const err = e instanceof TransportError ? e : classifySocketError(e, link.role);
    if (side === 'source') link.srcClosed = true;
    else link.dstClosed = true;
    this.transportError(session, link, side, err);
    // The other side must not wait for it: a source without its destination connection is reset.
    link.destroy(true);
    if (link.role === 'main') session.rejectMainUp(err);
    this.linkClosedCheck(session, link);
  }

  private socketError(session: Session, link: Link, side: 'source' | 'destination', sock: AnySocket, e: Error): void {
    const established = link.establishedAt !== undefined;
    const err = typeof (sock as tls.TLSSocket).getProtocol === 'function' ? classifyTlsError(e, link.role, { established }) : classifySocketError(e, link.role);
    this.transportError(session, link, side, err);
    // A reset on one side is passed on as a reset, so that QEMU on the other side notices at once.
    link.destroy(true);
  }

  private socketClosed(session: Session, link: Link, side: 'source' | 'destination'): void {
    if (side === 'source') link.srcClosed = true;
    else link.dstClosed = true;
    if (link.establishedAt === undefined) {
      // Not forwarding yet: nothing to hand over, the other side goes too.
      link.destroy(true);
      if (link.role === 'main') session.rejectMainUp(new TransportError('closed', `the ${side} closed the main connection before it was established`, { channel: 'main' }));
    } else if (!link.linger) {
      // Normally the other side follows with its own close (end is forwarded); do not wait for it forever.
      link.linger = setTimeout(() => link.destroy(false), LINGER_MS);
      link.linger.unref();
    }
    this.linkClosedCheck(session, link);
  }

  private linkClosedCheck(session: Session, link: Link): void {
    const srcDone = link.srcClosed || !link.src || link.src.destroyed;
    const dstDone = link.dstClosed || !link.dst || link.dst.destroyed;
    if (!link.closed && srcDone && dstDone && (link.srcClosed || link.dstClosed)) {
      link.closedAt = performance.now();
      if (link.linger) clearTimeout(link.linger);
    }
    const s = session;
    if (s.main.closed && (!s.preempt || s.preempt.closed)) this.endSession(s);
  }

  private endSession(s: Session): void {
    if (s.ended) return;
    s.endedAt = performance.now();
    s.cpu = process.cpuUsage(s.cpu0);
    s.loop.disable();
    // Keep what a postcopy recovery (the next main connection) continues from; drop the rest.
    if (!s.analysis.resumable) s.analysis.release();
    const r = this.build(s);
    this.emit('session-end', r);
    for (let i = this.endWaiters.length - 1; i >= 0; i--) {
      const w = this.endWaiters[i]!;
      if (w.session === s.id) {
        this.endWaiters.splice(i, 1);
        w.resolve(r);
      }
    }
  }

  private transportError(session: Session, link: Link, side: 'source' | 'destination', e: TransportError): void {
    session.errors.push({
      side,
      channel: link.role,
      code: e.code,
      message: e.message,
      atMs: session.rel(performance.now()),
      afterComplete: session.analysis.complete,
    });
    this.fail(e);
  }

  private fail(e: TransportError): void {
    if (this.listenerCount('error') > 0) this.emit('error', e);
  }

  // ---- reports -------------------------------------------------------------

  private build(s: Session): TapReport {
    const now = s.endedAt ?? performance.now();
    const { forwardDelay, forwardDelayUnqueued, backpressure, analysisPerChunk, ...a } = s.analysis.report();
    const loopUs = (ns: number): number => (Number.isFinite(ns) ? Math.round(ns / 1000) : 0);
    const cpu = s.cpu ?? process.cpuUsage(s.cpu0);
    const durationMs = round3(now - s.t0);
    const link = (l: Link): TapConnectionReport => ({
      role: l.role,
      acceptedMs: s.rel(l.acceptedAt),
      establishedMs: l.establishedAt === undefined ? null : s.rel(l.establishedAt),
      closedMs: l.closedAt === undefined ? null : s.rel(l.closedAt),
      tlsIn: l.tlsIn,
      tlsOut: l.tlsOut,
    });
    const cpuMs = (cpu.user + cpu.system) / 1000;
    return {
      session: s.id,
      state: s.ended ? 'ended' : 'running',
      listen: this.uri,
      to: this.to,
      tls: { in: this.serverTls !== undefined, out: this.clientTls !== undefined },
      startedAt: s.startedAt.toISOString(),
      durationMs,
      ...a,
      connections: {
        main: link(s.main),
        preempt: s.preempt ? link(s.preempt) : null,
      },
      overhead: {
        forwardDelay,
        forwardDelayUnqueued,
        backpressure,
        analysisPerChunk,
        eventLoopDelay: s.loop.count > 0 ? { p50: loopUs(s.loop.percentile(50)), p99: loopUs(s.loop.percentile(99)), max: loopUs(s.loop.max) } : { p50: 0, p99: 0, max: 0 },
        peakQueuedBytes: s.peakQueued,
        throughputBytesPerSecond: {
          main: a.main.bytesPerSecond,
          returnPath: a.returnPath.bytesPerSecond,
          preempt: a.preempt?.bytesPerSecond ?? 0,
        },
        processCpu: {
          userMs: Math.round(cpu.user / 1000),
          systemMs: Math.round(cpu.system / 1000),
          percentOfOneCore: durationMs > 0 ? Math.round((cpuMs / durationMs) * 1000) / 10 : 0,
        },
      },
      transportErrors: s.errors.map((e) => ({ ...e })),
    };
  }
}

/** Starts a tap listening on `opts.listen` and relaying to `opts.to`. */
export function startTap(opts: TapOptions): Promise<Tap> {
  return Tap.start(opts);
}

async function removeStaleSocket(path: string): Promise<void> {
  try {
    if ((await lstat(path)).isSocket()) await unlink(path);
  } catch {
    // nothing there
  }
}

export type { LatencySummary };
