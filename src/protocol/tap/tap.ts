/**
 * `qmt tap`: a protocol-aware relay between a QEMU source and a QEMU
 * destination.
 *
 * Connections qualify as the destination's do (src/transport/admission.ts):
 * the main channel is the first whose first bytes begin a migration stream
 * (the magic) or a postcopy recovery (RECV_BITMAP / POSTCOPY_RESUME) — with
 * TLS in, after a handshake with a valid client certificate — and anything
 * else (a probe, an HTTP request, a client of another CA, a silent client) is
 * dropped and reported as a 'stranger'; the preempt channel is the next
 * connection while the main one is open (after its TLS handshake), by order as
 * QEMU takes it: a QEMU destination waits for it at POSTCOPY_LISTEN, before
 * the source has anything urgent to send on it. For each, the tap opens the matching connection to the
 * destination, in the same order: the preempt one only once the main one is
 * established (TCP, and TLS when configured), so the destination, which tells
 * channels apart by arrival alone, sees the right order. Bytes are forwarded
 * unchanged in every direction — main, return path, preempt — with no
 * buffering beyond what backpressure needs, and are then parsed by
 * {@link MigrationAnalysis} into a {@link TapReport}.
 *
 * Multifd (QEMU's `multifd` capability, precopy): each multifd channel is a
 * connection whose first bytes are the multifd magic 0x11223344 (plain, or
 * the first bytes after the TLS handshake). A QEMU 10.0 source opens them
 * right after its main connection and before the main channel says anything
 * (its migration thread waits for every channel before it writes the file
 * header), so they usually qualify before the main channel does: such a
 * channel waits, unread, for its main channel (within the qualify time limit)
 * and becomes part of its session. Its connection to the destination is
 * opened after the main one is established, in the order the tap took them:
 * a TLS destination (QEMU 10.0 cannot peek under TLS) takes the first
 * connection as main and the next ones as multifd channels, each naming its
 * id in its init message. A connection taken after the main channel without
 * bytes yet is the preempt channel by order unless its first bytes turn out
 * to be the multifd magic. Every multifd channel is parsed (MultifdDecoder)
 * into per-channel counts of packets, normal and zero pages, syncs and bytes.
 *
 * One report per main connection ("session"): a postcopy recovery opens a new
 * main connection and gets its own report (kind 'resume').
 */
import { EventEmitter } from 'node:events';
import type net from 'node:net';
import { monitorEventLoopDelay, performance } from 'node:perf_hooks';
import type tls from 'node:tls';
import type { LatencySummary } from '../latency.js';
import { mkdir } from 'node:fs/promises';
import type { StreamError } from '../../stream/errors.js';
import { MULTIFD_MAGIC } from '../../stream/multifd.js';
import { Admission, describeBytes, type FirstBytesJudgement } from '../../transport/admission.js';
import { classifySocketError } from '../../transport/channel.js';
import { formatEndpoint, parseEndpoint, type Endpoint } from '../../transport/endpoint.js';
import { TransportError, type ChannelName } from '../../transport/errors.js';
import { loadTlsDir, type TlsMaterial } from '../../transport/pki.js';
import { DEFAULT_MAX_PENDING_CONNECTIONS, judgeMainStart, type StrangerEvent } from '../../transport/qualify.js';
import { connect, listen, type Listening, type TlsClientSpec } from '../../transport/sockets.js';
import { classifyTlsError, clientTlsOptions, type TlsSettings } from '../../transport/tls.js';
import {
  MigrationAnalysis,
  type AnalysisReport,
  type Milestone,
  type PageAnsweredEvent,
  type PageRequestEvent,
  type TapDirection,
} from './analysis.js';
import { SessionCapture, type CaptureFileReport } from './capture.js';
import { forward, type AnySocket } from './forward.js';

export type TapRole = 'main' | 'preempt' | 'multifd';

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
  /**
   * Limit of one connection to the destination, TCP plus TLS, and of a
   * source's connection to qualify (TLS handshake, then its first bytes)
   * (default 10 000 ms).
   */
  connectTimeoutMs?: number;
  /** Most connections waiting to qualify at once (default 16; at the bound the oldest is dropped). */
  maxPendingConnections?: number;
  /**
   * A directory (created if missing) to write every direction of every
   * connection to, one file each, as forwarded: see capture.ts for the names.
   */
  capture?: string;
}

/** One relayed connection. Times are ms after the session started. */
export interface TapConnectionReport {
  role: TapRole;
  /** Multifd: the number of the connection in the session (0, 1, … as taken; MultifdChannelReport.connection). */
  multifdConnection?: number;
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
  connections: { main: TapConnectionReport; preempt: TapConnectionReport | null; multifd: TapConnectionReport[] };
  /** With `capture`: the files written (names as in capture.ts). */
  capture: { dir: string; files: CaptureFileReport[] } | null;
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
    /** Average rate of each direction over its active span (multifd: the sum of the channels' rates). */
    throughputBytesPerSecond: { main: number; returnPath: number; preempt: number; multifd: number };
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
  /** A direction could not be parsed any further (forwarding goes on); `channel`: the multifd connection. */
  'parse-error': [{ session: number; direction: TapDirection; error: StreamError; channel?: number }];
  /** Every connection of a session has closed: its final report. */
  'session-end': [TapReport];
  /** A connection was dropped before it became a channel (see the file comment); the tap keeps listening. */
  stranger: [StrangerEvent];
  /** A connection failed (also in the report's transportErrors). Emitted only when listened to. */
  error: [TransportError];
}

const noop = (): void => undefined;
const LINGER_MS = 10_000;
const MAX_STRANGERS_KEPT = 100;
/** QEMU allows 1–255 multifd channels; with a preempt channel, one more. */
const MAX_SECONDARY_LINKS = 256;
/** Multifd channels waiting for their main channel, at most (the oldest makes room). */
const MAX_WAITING_MULTIFD = 255;

const MULTIFD_MAGIC_BYTES = Buffer.from([MULTIFD_MAGIC >>> 24, (MULTIFD_MAGIC >>> 16) & 0xff, (MULTIFD_MAGIC >>> 8) & 0xff, MULTIFD_MAGIC & 0xff]);

/** Does `b` (at least its first byte) begin with the multifd magic: 'yes', 'no', or 'more' (a prefix of it). */
function multifdStart(b: Uint8Array): 'yes' | 'no' | 'more' {
  const n = Math.min(b.length, 4);
  for (let i = 0; i < n; i++) if (b[i] !== MULTIFD_MAGIC_BYTES[i]) return 'no';
  return n === 4 ? 'yes' : 'more';
}


function tlsInfo(s: AnySocket | undefined): { protocol: string | null; cipher: string } | null {
  const t = s as tls.TLSSocket | undefined;
  if (!t || typeof t.getProtocol !== 'function') return null;
  return { protocol: t.getProtocol(), cipher: t.getCipher()?.name ?? '' };
}

function round3(x: number): number {
  return Math.round(x * 1000) / 1000;
}

class Link {
  /** A connection taken after the main channel before it spoke: its role comes with its first bytes (see the file comment). */
  classified = true;
  /** Its bytes before it was classified (at most the 4 bytes of a magic, in the chunks they came in). */
  head: Buffer[] = [];
  /** Multifd: its number in the session's analysis. */
  multifd = -1;
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
    public role: TapRole,
    readonly acceptedAt: number,
  ) {}

  /** Capture file name of a direction. */
  captureName(forward: boolean): string {
    const base = this.role === 'multifd' ? `multifd-${this.multifd}` : this.role;
    if (this.role === 'main') return forward ? 'main' : 'return-path';
    return forward ? base : `${base}-reverse`;
  }

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
  /** The preempt connection once known (classified). */
  preempt: Link | undefined;
  /** Every connection after the main one, in the order taken: preempt, multifd and not yet classified. */
  readonly secondaries: Link[] = [];
  readonly capture: SessionCapture | undefined;
  captureClosed: Promise<void> | undefined;
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
    captureDir: string | undefined,
  ) {
    this.main = new Link('main', this.t0);
    this.capture = captureDir === undefined ? undefined : new SessionCapture(captureDir, id);
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
        parseError: (direction, error, channel) => tap.emit('parse-error', { session, direction, error, ...(channel === undefined ? {} : { channel }) }),
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

  /** The preempt connection as reported: the classified one, else the first connection that never spoke (by order, it is). */
  reportedPreempt(): Link | undefined {
    return this.preempt ?? this.secondaries.find((l) => !l.classified);
  }

  multifdLinks(): Link[] {
    return this.secondaries.filter((l) => l.role === 'multifd');
  }
}

/** A multifd channel that qualified before its main channel: held, unread, until the main channel comes. */
interface WaitingMultifd {
  readonly src: AnySocket;
  readonly raw: net.Socket;
  readonly remote: string | undefined;
  readonly timer: NodeJS.Timeout;
  readonly onClose: () => void;
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

  private readonly admission: Admission;
  private readonly waitingMultifd: WaitingMultifd[] = [];
  private readonly strangerEvents: StrangerEvent[] = [];
  private strangerCount = 0;

  private constructor(
    private readonly listening: Listening,
    private readonly target: Endpoint,
    private readonly tlsIn: boolean,
    private readonly clientTls: TlsClientSpec | undefined,
    private readonly timeoutMs: number,
    maxPending: number,
    private readonly captureDir: string | undefined,
  ) {
    super();
    this.admission = new Admission(
      {
        offer: () => {
          const cur = this.current();
          // Before the main channel: judged by its first bytes (the main channel, or one of its multifd channels).
          if (!cur || !this.mainOpen(cur)) return 'main';
          if (!cur.preempt && cur.secondaries.length < MAX_SECONDARY_LINKS) return 'preempt';
          // Refused (reported as a stranger too): it also counts against the open session, as QEMU would fail on it.
          const why = cur.preempt ? 'a connection after the preempt channel of a migration: refused' : `more than ${MAX_SECONDARY_LINKS} connections for one migration: refused`;
          this.transportError(cur, cur.preempt ?? cur.main, 'source', new TransportError('channel-order', why));
          return undefined;
        },
        // After the main channel: the preempt channel by order, unless its first bytes say multifd (see the file comment).
        judge: (role) => (role === 'main' ? judgeTapMain : undefined),
        take: (role, s, raw) => (role === 'main' ? this.takeMain(s, raw) : role === 'multifd' ? this.takeMultifd(s, raw) : this.takeSecondary(s, raw)),
      },
      { maxPending, qualifyMs: timeoutMs, stranger: (ev) => this.stranger(ev) },
    );
    this.admission.wire(listening.server, listening.secure);
  }

  /** @internal use {@link startTap} */
  static async start(opts: TapOptions): Promise<Tap> {
    const listenEp = parseEndpoint(opts.listen);
    const target = parseEndpoint(opts.to);
    const timeoutMs = opts.connectTimeoutMs ?? 10_000;
    let serverTls: { material: TlsMaterial; settings: TlsSettings; handshakeTimeoutMs: number } | undefined;
    let clientTls: TlsClientSpec | undefined;
    if (opts.tlsIn) serverTls = { material: await loadTlsDir(opts.tlsIn, 'server'), settings: { dir: opts.tlsIn, endpoint: 'server' }, handshakeTimeoutMs: timeoutMs };
    if (opts.tlsOut) {
      const settings: TlsSettings = { dir: opts.tlsOut, endpoint: 'client', ...(opts.tlsHostname ? { hostname: opts.tlsHostname } : {}) };
      clientTls = { material: await loadTlsDir(opts.tlsOut, 'client'), settings };
      // Refused now rather than at the first migration: no name to check the destination against (a unix `to`).
      clientTlsOptions(clientTls.material, settings, target.kind === 'tcp' ? target.host : undefined);
    }
    // A plain source waits unread until it has qualified; a TLS one must run its handshake.
    if (opts.capture !== undefined) await mkdir(opts.capture, { recursive: true });
    const listening = await listen(listenEp, { allowHalfOpen: true, pauseOnConnect: !serverTls, ...(serverTls ? { tls: serverTls } : {}) });
    return new Tap(listening, target, serverTls !== undefined, clientTls, timeoutMs, opts.maxPendingConnections ?? DEFAULT_MAX_PENDING_CONNECTIONS, opts.capture);
  }

  /** Where the source connects (`migrate uri=...`), with the real port when 0 was asked. */
  get uri(): string {
    return formatEndpoint(this.listening.endpoint);
  }

  /** Connections waiting to qualify right now (TLS handshake or first bytes not yet in). */
  get pendingConnections(): number {
    return this.admission.size;
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
      this.admission.close();
      for (const w of this.waitingMultifd.splice(0)) this.forgetWaiting(w, true);
      // Returns at once: net.Server.close() would wait for every accepted socket.
      const unlisten = this.listening.close();
      const closing: Promise<unknown>[] = [];
      for (const s of this.sessions) {
        for (const l of [s.main, ...s.secondaries]) {
          for (const sock of [l.src, l.dst]) if (sock && !sock.destroyed) closing.push(new Promise((resolve) => sock.once('close', resolve)));
          l.destroy(false);
        }
      }
      // Let the reports carry the closing times (sockets close within a loop turn or two).
      await Promise.race([Promise.all(closing), new Promise((resolve) => setTimeout(resolve, 1000).unref())]);
      await unlisten;
      // Sessions whose sockets were never wired end here.
      for (const s of this.sessions) this.endSession(s);
    }
    await Promise.all(this.sessions.map((s) => s.captureClosed));
    return this.reports();
  }

  // ---- connections ---------------------------------------------------------

  private current(): Session | undefined {
    return this.sessions[this.sessions.length - 1];
  }

  private mainOpen(s: Session): boolean {
    return !s.main.closed && !s.main.srcClosed;
  }

  /**
   * A connection qualified as a main channel: a new session. False when the
   * tap is closing or a main channel is open. Connections still waiting to
   * qualify stay: they may be this migration's multifd channels (their TLS
   * handshake or first bytes not in yet), each judged by its own bytes.
   */
  private takeMain(src: AnySocket, raw: net.Socket): boolean {
    if (this.closing) return false;
    const cur = this.current();
    if (cur && this.mainOpen(cur)) return false;
    const session = new Session(this.sessions.length + 1, cur, this, this.captureDir);
    this.sessions.push(session);
    this.emit('session', { session: session.id });
    this.relay(session, session.main, src, raw);
    // Its multifd channels that came first: their destination connections follow the main one's.
    for (const w of this.waitingMultifd.splice(0)) {
      this.forgetWaiting(w, false);
      this.addMultifd(session, w.src, w.raw);
    }
    return true;
  }

  /** A connection whose first bytes are the multifd magic: a channel of the open session, or waiting for its main channel. */
  private takeMultifd(src: AnySocket, raw: net.Socket): boolean {
    if (this.closing) return false;
    const cur = this.current();
    if (cur && this.mainOpen(cur)) {
      if (cur.preempt || cur.secondaries.length >= MAX_SECONDARY_LINKS) return false;
      this.addMultifd(cur, src, raw);
      return true;
    }
    if (this.waitingMultifd.length >= MAX_WAITING_MULTIFD) {
      const oldest = this.waitingMultifd.shift()!;
      this.forgetWaiting(oldest, true);
      this.stranger({ reason: 'too-many', error: new TransportError('too-many-connections', `${MAX_WAITING_MULTIFD} multifd channels were already waiting for their main channel`), ...(oldest.remote ? { remote: oldest.remote } : {}) });
    }
    const remote = raw.remoteAddress ? `${raw.remoteAddress.includes(':') ? `[${raw.remoteAddress}]` : raw.remoteAddress}:${raw.remotePort}` : undefined;
    const drop = (reason: 'timeout' | 'closed', error: TransportError): void => {
      const i = this.waitingMultifd.indexOf(w);
      if (i < 0) return;
      this.waitingMultifd.splice(i, 1);
      this.forgetWaiting(w, true);
      this.stranger({ reason, error, ...(remote ? { remote } : {}) });
    };
    const w: WaitingMultifd = {
      src,
      raw,
      remote,
      timer: setTimeout(() => drop('timeout', new TransportError('qualify-timeout', `a multifd channel whose main channel did not come within ${this.timeoutMs} ms`)), this.timeoutMs),
      onClose: () => drop('closed', new TransportError('closed', 'a multifd channel closed before its main channel came')),
    };
    src.on('error', noop);
    src.once('close', w.onClose);
    this.waitingMultifd.push(w);
    return true;
  }

  /** Stops holding a waiting multifd channel; `destroy` for one that is dropped. */
  private forgetWaiting(w: WaitingMultifd, destroy: boolean): void {
    clearTimeout(w.timer);
    w.src.off('close', w.onClose);
    w.src.off('error', noop);
    if (destroy) {
      w.src.on('error', noop);
      destroySocket(w.src, true);
    }
  }

  private addMultifd(session: Session, src: AnySocket, raw: net.Socket): void {
    const link = new Link('multifd', performance.now());
    link.multifd = session.analysis.multifdConnected();
    session.secondaries.push(link);
    this.relay(session, link, src, raw);
  }

  /**
   * A connection taken after the main channel before it said anything: the
   * preempt channel by order, unless its first bytes are the multifd magic
   * (then it is a multifd channel): see classify().
   */
  private takeSecondary(src: AnySocket, raw: net.Socket): boolean {
    const session = this.current();
    if (this.closing || !session || !this.mainOpen(session) || session.preempt || session.secondaries.length >= MAX_SECONDARY_LINKS) return false;
    const link = new Link('preempt', performance.now());
    link.classified = false;
    session.secondaries.push(link);
    this.relay(session, link, src, raw);
    return true;
  }

  /** The source side is ready (qualified); the destination side is opened strictly in order, preempt after main. */
  private relay(session: Session, link: Link, src: AnySocket, raw: net.Socket): void {
    raw.setNoDelay(true);
    this.attach(session, link, 'source', src);
    const role = link.role;
    const task = async (): Promise<void> => {
      if (link.srcClosed) throw new TransportError('closed', 'the source closed before the destination connection was made', { channel: role });
      if (role !== 'main') await session.mainUp;
      const dst = await this.connectUpstream(role);
      this.attach(session, link, 'destination', dst);
    };
    const run = this.connectChain.then(task);
    this.connectChain = run.catch(noop);
    run.catch((e: unknown) => this.setupFailed(session, link, 'destination', e));
  }

  /** A connection that did not qualify (or was refused): reported, kept for the command's report. */
  private stranger(ev: StrangerEvent): void {
    if (this.closing) return;
    this.strangerCount++;
    this.strangerEvents.push(ev);
    // Bounded: a port scanned for days keeps only the latest.
    if (this.strangerEvents.length > MAX_STRANGERS_KEPT) this.strangerEvents.shift();
    this.emit('stranger', ev);
  }

  /** Connections dropped before they became a channel: how many, and the latest (at most 100), oldest first. */
  strangers(): { count: number; latest: StrangerEvent[] } {
    return { count: this.strangerCount, latest: [...this.strangerEvents] };
  }

  private async connectUpstream(role: TapRole): Promise<AnySocket> {
    // Half-open: the end of one direction is forwarded as a FIN while the other goes on.
    const { socket } = await connect(this.target, {
      timeoutMs: this.timeoutMs,
      role,
      allowHalfOpen: true,
      beforeHandshake: (raw) => raw.setNoDelay(true),
      ...(this.clientTls ? { tls: this.clientTls } : {}),
    });
    return socket;
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
    const hooks = (fwd: boolean) => ({
      chunk: (c: Buffer, t: number) => this.chunk(session, link, fwd, c, t),
      written: (us: number, behind: boolean) => a.forwarded(direction(link.role, fwd), us, behind),
      paused: (ms: number) => a.paused(ms),
      queued: (n: number) => {
        if (n > session.peakQueued) session.peakQueued = n;
      },
    });
    link.establishedAt = performance.now();
    link.tlsIn = tlsInfo(src);
    link.tlsOut = tlsInfo(dst);
    forward(src, dst, hooks(true));
    forward(dst, src, hooks(false));
    // The end of a multifd channel is checked (cut inside a packet?) after its last chunk was parsed.
    src.once('end', () => queueMicrotask(() => this.sourceEnded(session, link)));
    if (link.role === 'main') session.resolveMainUp();
    this.emit('channel', { session: session.id, role: link.role, tlsIn: link.tlsIn, tlsOut: link.tlsOut });
  }

  /** A forwarded chunk: classified (see takeSecondary), parsed, captured. */
  private chunk(session: Session, link: Link, fwd: boolean, c: Buffer, t: number): Promise<void> | undefined {
    if (!link.classified && fwd) {
      link.head.push(c);
      const verdict = multifdStart(link.head.length === 1 ? c : Buffer.concat(link.head));
      if (verdict === 'more') return undefined;
      this.classify(session, link, verdict === 'yes' ? 'multifd' : 'preempt');
      if (link.closed || link.dstClosed) return undefined;
      let hold: Promise<void> | undefined;
      for (const h of link.head.splice(0)) hold = this.deliver(session, link, true, h, t) ?? hold;
      return hold;
    }
    return this.deliver(session, link, fwd, c, t);
  }

  private deliver(session: Session, link: Link, fwd: boolean, c: Buffer, t: number): Promise<void> | undefined {
    session.analysis.push(direction(link.role, fwd), c, t, link.multifd);
    return session.capture?.write(link.captureName(fwd), c);
  }

  /** A connection taken after main (see takeSecondary) showed what it is. */
  private classify(session: Session, link: Link, role: 'preempt' | 'multifd'): void {
    link.classified = true;
    link.role = role;
    if (role === 'multifd') {
      link.multifd = session.analysis.multifdConnected();
      return;
    }
    if (session.preempt) {
      // A second preempt channel: QEMU would fail on it; so does this connection.
      this.transportError(session, link, 'source', new TransportError('channel-order', 'a second preempt channel for one migration: refused'));
      link.destroy(true);
      return;
    }
    session.preempt = link;
    session.analysis.preemptConnected();
  }

  /** As errors name a channel: `multifd-ID` once its init message was read. */
  private channelName(session: Session, link: Link): ChannelName {
    if (link.role !== 'multifd') return link.role;
    const id = session.analysis.multifdChannelId(link.multifd);
    return id === null ? 'multifd' : `multifd-${id}`;
  }

  private sourceEnded(session: Session, link: Link): void {
    const t = performance.now();
    // A connection that ended inside what could be the multifd magic was one (a truncated one).
    if (!link.classified && link.head.length > 0) {
      this.classify(session, link, 'multifd');
      for (const h of link.head.splice(0)) void this.deliver(session, link, true, h, t);
    }
    if (link.role === 'multifd') session.analysis.multifdEnded(link.multifd, t);
  }

  private setupFailed(session: Session, link: Link, side: 'source' | 'destination', e: unknown): void {
    const err = e instanceof TransportError ? e : classifySocketError(e, this.channelName(session, link));
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
    const name = this.channelName(session, link);
    const err = typeof (sock as tls.TLSSocket).getProtocol === 'function' ? classifyTlsError(e, name, { established }) : classifySocketError(e, name);
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
    if (s.main.closed && s.secondaries.every((l) => l.closed)) this.endSession(s);
  }

  private endSession(s: Session): void {
    if (s.ended) return;
    s.endedAt = performance.now();
    s.cpu = process.cpuUsage(s.cpu0);
    s.loop.disable();
    s.captureClosed = s.capture?.close();
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
      ...(l.role === 'multifd' ? { multifdConnection: l.multifd } : {}),
      acceptedMs: s.rel(l.acceptedAt),
      establishedMs: l.establishedAt === undefined ? null : s.rel(l.establishedAt),
      closedMs: l.closedAt === undefined ? null : s.rel(l.closedAt),
      tlsIn: l.tlsIn,
      tlsOut: l.tlsOut,
    });
    const cpuMs = (cpu.user + cpu.system) / 1000;
    const preemptLink = s.reportedPreempt();
    // A preempt connection that never spoke has its (empty) report, as one that did.
    const preempt = a.preempt ?? (preemptLink ? { bytes: 0, chunks: 0, firstByteMs: null, lastByteMs: null, bytesPerSecond: 0, pages: { normal: 0, zero: 0, xbzrle: 0 } } : null);
    return {
      session: s.id,
      state: s.ended ? 'ended' : 'running',
      listen: this.uri,
      to: this.to,
      tls: { in: this.tlsIn, out: this.clientTls !== undefined },
      startedAt: s.startedAt.toISOString(),
      durationMs,
      ...a,
      preempt,
      connections: {
        main: link(s.main),
        preempt: preemptLink ? link(preemptLink) : null,
        multifd: s.multifdLinks().map(link),
      },
      capture: s.capture ? s.capture.report() : null,
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
          multifd: a.multifd ? a.multifd.channels.reduce((sum, c) => sum + c.bytesPerSecond, 0) : 0,
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

/** The direction of a link's bytes: `fwd` source → destination. */
function direction(role: TapRole, fwd: boolean): TapDirection {
  if (role === 'main') return fwd ? 'main' : 'return-path';
  if (role === 'preempt') return fwd ? 'preempt' : 'preempt-reverse';
  return fwd ? 'multifd' : 'multifd-reverse';
}

/** Starts a tap listening on `opts.listen` and relaying to `opts.to`. */
export function startTap(opts: TapOptions): Promise<Tap> {
  return Tap.start(opts);
}

/**
 * A connection before the main channel begins a new migration (the magic), a
 * postcopy recovery (RECV_BITMAP / POSTCOPY_RESUME) or a multifd channel (its
 * magic 0x11223344: the role its bytes show; its init message is the
 * decoder's to check, the tap relays what the destination will judge).
 */
function judgeTapMain(seen: Buffer): FirstBytesJudgement {
  const stream = judgeMainStart('stream', seen);
  const resume = judgeMainStart('resume', seen);
  const multifd = multifdStart(seen);
  if (stream === 'yes' || resume === 'yes') return { verdict: 'yes' };
  if (multifd === 'yes') return { verdict: 'yes', role: 'multifd' };
  if (stream === 'more' || resume === 'more' || multifd === 'more') return { verdict: 'more' };
  return {
    verdict: 'no',
    reason: 'not-migration',
    error: new TransportError(
      'not-a-migration-channel',
      `first bytes ${describeBytes(seen)} are neither the migration stream magic QEVM, a postcopy-recovery command nor the multifd magic 11 22 33 44`,
    ),
  };
}

export type { LatencySummary };
