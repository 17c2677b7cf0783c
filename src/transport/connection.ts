import { EventEmitter } from 'node:events';
import { lstat, unlink } from 'node:fs/promises';
import net from 'node:net';
import tls from 'node:tls';
import { Channel, classifySocketError, type ChannelLimits, type ChannelRole, type ChannelStats } from './channel.js';
import { formatEndpoint, parseEndpoint, type Endpoint } from './endpoint.js';
import { TransportError } from './errors.js';
import { loadTlsDir, type TlsMaterial } from './pki.js';
import {
  DEFAULT_MAX_PENDING_CONNECTIONS,
  DEFAULT_QUALIFY_TIMEOUT_MS,
  judgeMainStart,
  judgePreemptStart,
  type ChannelStart,
  type QualifyOptions,
  type StrangerEvent,
  type StrangerReason,
} from './qualify.js';
import { checkAllowedPeer, classifyTlsError, clientTlsOptions, serverTlsOptions, type TlsSettings } from './tls.js';
import { BULK_PROFILE, URGENT_PROFILE, applyTuning, mergeProfile, type TuningProfile } from './tuning.js';

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
  /** TCP connect plus TLS handshake, per channel (default 10 s). */
  readonly connectTimeoutMs?: number;
}

/** `qualifyTimeoutMs`, else `connectTimeoutMs` (the handshake limit it replaces on the destination), else the default. */
function qualifyTimeout(opts: TransportOptions): number {
  return opts.qualifyTimeoutMs ?? opts.connectTimeoutMs ?? DEFAULT_QUALIFY_TIMEOUT_MS;
}

function profileFor(role: ChannelRole, opts: TransportOptions): TuningProfile {
  return role === 'main' ? mergeProfile(BULK_PROFILE, opts.main?.tuning) : mergeProfile(URGENT_PROFILE, opts.preempt?.tuning);
}

function limitsFor(role: ChannelRole, opts: TransportOptions): ChannelLimits {
  return (role === 'main' ? opts.main : opts.preempt) ?? {};
}

/**
 * Connects one TCP/unix socket to `ep` within `timeoutMs`; failures are
 * TransportErrors of channel `role` (`connect-timeout`, or as the socket
 * error says). `allowHalfOpen`: keep the socket writable after the peer's
 * FIN (a relay forwards the half-close).
 */
export function connectSocket(ep: Endpoint, role: ChannelRole, timeoutMs: number, opts: { allowHalfOpen?: boolean } = {}): Promise<net.Socket> {
  return new Promise<net.Socket>((resolve, reject) => {
    const allowHalfOpen = opts.allowHalfOpen ?? false;
    const s = ep.kind === 'tcp' ? net.connect({ host: ep.host, port: ep.port, allowHalfOpen }) : net.connect({ path: ep.path, allowHalfOpen });
    const timer = setTimeout(() => {
      s.destroy();
      reject(new TransportError('connect-timeout', `no connection to ${formatEndpoint(ep)} within ${timeoutMs} ms`, { channel: role }));
    }, timeoutMs);
    s.once('connect', () => {
      clearTimeout(timer);
      s.removeAllListeners('error');
      resolve(s);
    });
    s.once('error', (e) => {
      clearTimeout(timer);
      s.destroy();
      reject(classifySocketError(e, role));
    });
  });
}

/** Connects one TCP/unix socket, then (optionally) runs the TLS client handshake on it. */
async function openClientChannel(
  ep: Endpoint,
  role: ChannelRole,
  opts: TransportOptions,
  material: TlsMaterial | undefined,
  session: Buffer | undefined,
  onSession: (s: Buffer) => void,
): Promise<Channel> {
  const timeoutMs = opts.connectTimeoutMs ?? 10_000;
  const raw = await connectSocket(ep, role, timeoutMs);
  // Tune before the handshake so that even the handshake runs with the channel's options.
  const tuning = applyTuning(raw, profileFor(role, opts), ep.kind);
  if (!material || !opts.tls) return new Channel(raw, role, tuning, limitsFor(role, opts));

  const settings: TlsSettings = { ...opts.tls, endpoint: 'client' };
  const uriHost = ep.kind === 'tcp' ? ep.host : undefined;
  let tlsOpts: tls.ConnectionOptions;
  try {
    tlsOpts = clientTlsOptions(material, settings, uriHost, session);
  } catch (e) {
    raw.destroy();
    throw e instanceof TransportError ? e : classifyTlsError(e, role);
  }
  const secure = await new Promise<tls.TLSSocket>((resolve, reject) => {
    const t = tls.connect({ ...tlsOpts, socket: raw });
    const timer = setTimeout(() => {
      t.destroy();
      reject(new TransportError('connect-timeout', `TLS handshake with ${formatEndpoint(ep)} took longer than ${timeoutMs} ms`, { channel: role }));
    }, timeoutMs);
    t.on('session', onSession);
    t.once('secureConnect', () => {
      clearTimeout(timer);
      const notAllowed = checkAllowedPeer(t, settings.allowedPeers, role);
      if (notAllowed) {
        t.destroy();
        reject(notAllowed);
        return;
      }
      t.removeAllListeners('error');
      resolve(t);
    });
    t.once('error', (e) => {
      clearTimeout(timer);
      t.destroy();
      raw.destroy();
      reject(classifyTlsError(e, role));
    });
  });
  return new Channel(secure, role, tuning, limitsFor(role, opts));
}

/**
 * The source's side of a migration connection: the main channel (bulk pages;
 * the return path comes back on it) and, once asked for, the preempt channel.
 * As in QEMU 10.0 there is no handshake byte: the destination tells the
 * channels apart by arrival, so the preempt channel must only be connected once
 * the main channel is established (QEMU waits for the first PONG; the session
 * layer does the same before calling `connectPreempt`).
 */
export class SourceConnection {
  preempt: Channel | undefined;
  private session: Buffer | undefined;

  private constructor(
    readonly endpoint: Endpoint,
    readonly main: Channel,
    private readonly opts: TransportOptions,
    private readonly material: TlsMaterial | undefined,
  ) {}

  /** Connects the main channel (TCP/unix, then TLS when configured). */
  static async connect(uri: string, opts: TransportOptions = {}): Promise<SourceConnection> {
    const ep = parseEndpoint(uri);
    const material = opts.tls ? await loadTlsDir(opts.tls.dir, 'client') : undefined;
    let session: Buffer | undefined;
    const main = await openClientChannel(ep, 'main', opts, material, undefined, (s) => (session = s));
    const c = new SourceConnection(ep, main, opts, material);
    // TLS 1.3 tickets arrive after the handshake; keep the latest for the preempt channel.
    main.socket.on('session', (s: Buffer) => (c.session = s));
    if (session) c.session = session;
    return c;
  }

  /**
   * Connects the preempt channel, resuming the main channel's TLS session when
   * the server allows it. Refused while the main channel is not established.
   */
  async connectPreempt(): Promise<Channel> {
    if (this.preempt) return this.preempt;
    if (this.main.isClosed) throw new TransportError('channel-order', 'the preempt channel needs an established main channel', { channel: 'preempt' });
    const ch = await openClientChannel(this.endpoint, 'preempt', this.opts, this.material, this.session, (s) => (this.session = s));
    this.preempt = ch;
    return ch;
  }

  stats(): { main: ChannelStats; preempt?: ChannelStats } {
    return { main: this.main.stats, ...(this.preempt ? { preempt: this.preempt.stats } : {}) };
  }

  /** Flushes and closes both channels. */
  async close(): Promise<void> {
    await Promise.allSettled([this.main.close(), this.preempt?.close()]);
  }

  destroy(reason?: unknown): void {
    this.main.destroy(reason);
    this.preempt?.destroy(reason);
  }
}

/** The destination's side of one migration: the channels in the order they qualified. */
export class DestinationConnection {
  private preemptChannel: Channel | undefined;
  private preemptWaiters: { resolve: (c: Channel) => void; reject: (e: TransportError) => void }[] = [];
  /** @internal plain-TCP connections that may still turn out to be the (silent) preempt channel. */
  preemptCandidates = 0;

  constructor(readonly main: Channel) {}

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

  stats(): { main: ChannelStats; preempt?: ChannelStats } {
    return { main: this.main.stats, ...(this.preemptChannel ? { preempt: this.preemptChannel.stats } : {}) };
  }

  async close(): Promise<void> {
    await Promise.allSettled([this.main.close(), this.preemptChannel?.close()]);
  }

  destroy(reason?: unknown): void {
    this.main.destroy(reason);
    this.preemptChannel?.destroy(reason);
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
}

interface ListenerEvents {
  /** A connection was dropped before it became a channel; the listener keeps waiting. */
  stranger: [StrangerEvent];
  main: [Channel];
  preempt: [Channel];
}

/** A connection waiting to qualify as a channel. */
interface Candidate {
  readonly raw: net.Socket;
  /** The TLS socket over `raw`, once its handshake succeeded. */
  secure?: tls.TLSSocket;
  /** Accepted after the main channel qualified: it may become the preempt channel, never the main one. */
  readonly forPreempt: boolean;
  readonly remote: string | undefined;
  timer?: NodeJS.Timeout;
  /** Removes the listeners the first-bytes wait installed. */
  unwatch?: () => void;
  /** Our listeners on the sockets, removed when it qualifies (Node's own must stay). */
  readonly onRawClose: () => void;
  onSecureError?: () => void;
}

const ignoreError = (): void => undefined;

function remoteOf(s: net.Socket): string | undefined {
  return s.remoteAddress ? `${s.remoteAddress.includes(':') ? `[${s.remoteAddress}]` : s.remoteAddress}:${s.remotePort}` : undefined;
}

/** The first bytes of a connection, for a log line: hex, and the text when it is printable. */
function describeBytes(b: Buffer): string {
  const head = b.subarray(0, 8);
  const text = head.toString('latin1');
  const printable = /^[\x20-\x7e]*$/.test(text) ? ` ("${text}")` : '';
  const hint = head[0] === 0x16 ? ' (a TLS ClientHello: the peer uses TLS, this listener does not)' : '';
  return `${head.toString('hex').replace(/(..)(?!$)/g, '$1 ')}${printable}${hint}`;
}

/**
 * Listens for one migration. Channel roles go only to connections that
 * qualify (see qualify.ts): the main channel is the first whose first bytes
 * are the stream magic (with TLS: after a handshake with a valid client
 * certificate), then the preempt channel by order, as QEMU 10.0. Anything
 * else on the port — a probe that connects and closes, an HTTP request, a TLS
 * client of another CA, a client that says nothing — is dropped and reported
 * as a 'stranger' event; the listener keeps waiting. `accept()` rejects only
 * when the listener is closed.
 */
export class MigrationListener extends EventEmitter<ListenerEvents> {
  private conn: DestinationConnection | undefined;
  private acceptWaiters: { resolve: (c: DestinationConnection) => void; reject: (e: TransportError) => void }[] = [];
  private readonly pending = new Set<Candidate>();
  private closing = false;
  private readonly maxPending: number;
  private readonly qualifyMs: number;

  private constructor(
    private readonly server: net.Server,
    readonly endpoint: Endpoint,
    private readonly opts: TransportOptions,
    private readonly listenOpts: ListenOptions,
  ) {
    super();
    this.maxPending = opts.maxPendingConnections ?? DEFAULT_MAX_PENDING_CONNECTIONS;
    this.qualifyMs = qualifyTimeout(opts);
  }

  static async listen(uri: string, opts: TransportOptions = {}, listenOpts: ListenOptions = {}): Promise<MigrationListener> {
    const ep = parseEndpoint(uri);
    for (const [name, v, min] of [
      ['maxPendingConnections', opts.maxPendingConnections, 1],
      ['qualifyTimeoutMs', opts.qualifyTimeoutMs, 1],
    ] as const) {
      if (v !== undefined && !(Number.isInteger(v) && v >= min && v <= 2_147_483_647)) throw new RangeError(`${name} must be an integer from ${min} to 2147483647, got ${String(v)}`);
    }
    const material = opts.tls ? await loadTlsDir(opts.tls.dir, 'server') : undefined;
    if (ep.kind === 'unix') await removeStaleSocket(ep.path);
    let server: net.Server;
    if (material && opts.tls) {
      const settings: TlsSettings = { ...opts.tls, endpoint: 'server' };
      // A handshake that never completes must not hold a socket forever.
      server = tls.createServer({ ...serverTlsOptions(material, settings), handshakeTimeout: qualifyTimeout(opts) });
    } else {
      server = net.createServer();
    }
    const actual = await new Promise<Endpoint>((resolve, reject) => {
      server.once('error', (e) => reject(classifySocketError(e)));
      const onListening = () => {
        server.removeAllListeners('error');
        const a = server.address();
        resolve(ep.kind === 'tcp' && a && typeof a === 'object' ? { kind: 'tcp', host: ep.host, port: a.port } : ep);
      };
      if (ep.kind === 'tcp') server.listen({ host: ep.host, port: ep.port }, onListening);
      else server.listen(ep.path, onListening);
    });
    const l = new MigrationListener(server, actual, opts, listenOpts);
    l.wire(server, ep.kind, material !== undefined);
    return l;
  }

  /** `tcp:HOST:PORT` with the port actually bound (useful with port 0), or `unix:PATH`. */
  get uri(): string {
    return formatEndpoint(this.endpoint);
  }

  /** Connections waiting to qualify right now. */
  get pendingConnections(): number {
    return this.pending.size;
  }

  private wire(server: net.Server, kind: 'tcp' | 'unix', secure: boolean): void {
    // tls.Server emits 'connection' with the raw socket before it starts the handshake.
    server.on('connection', (raw: net.Socket) => this.admit(raw, kind, secure));
    if (secure) {
      server.on('secureConnection', (s: tls.TLSSocket) => this.secured(s, kind));
      server.on('tlsClientError', (e: Error, s: tls.TLSSocket) => {
        // The verification result is on the socket: the error alone is often just "socket hang up".
        // A TLSSocket counts decrypted bytes only; the raw socket under it (Node's
        // long-standing `_parent`) tells a client that sent its hello and hung up
        // (it refused our certificate) from one that never spoke.
        const raw = (s as tls.TLSSocket & { _parent?: net.Socket })._parent;
        const c = this.candidateOf(raw);
        s.destroy();
        if (!c) return; // already dropped (timed out, or the listener is closing)
        const channel = c.forPreempt ? 'preempt' : 'main';
        if ((e as { code?: string }).code === 'ERR_TLS_HANDSHAKE_TIMEOUT') {
          this.drop(c, raw, 'timeout', new TransportError('qualify-timeout', `no TLS handshake within ${this.qualifyMs} ms`, { channel, cause: e }));
          return;
        }
        this.drop(c, raw, 'tls', classifyTlsError(e, channel, { side: 'server', socket: s, rawBytesRead: raw?.bytesRead ?? 0 }));
      });
    }
    // Accept errors (EMFILE …) cost one connection, not the migration.
    server.on('error', (e) => this.report({ reason: 'closed', error: classifySocketError(e) }));
  }

  private candidateOf(raw: net.Socket | undefined): Candidate | undefined {
    for (const c of this.pending) if (c.raw === raw) return c;
    return undefined;
  }

  private rolesTaken(): boolean {
    return this.conn?.preempt !== undefined;
  }

  /** A TCP/unix connection arrived: it waits to qualify, within the bounds. */
  private admit(raw: net.Socket, kind: 'tcp' | 'unix', secure: boolean): void {
    const remote = remoteOf(raw);
    if (this.closing) {
      raw.destroy();
      return;
    }
    if (this.rolesTaken()) {
      raw.destroy();
      this.report({ reason: 'extra', error: new TransportError('channel-order', 'a connection after every channel of this migration had arrived'), ...(remote ? { remote } : {}) });
      return;
    }
    if (this.pending.size >= this.maxPending) {
      const tooMany = new TransportError('too-many-connections', `${this.pending.size} connections were already waiting to qualify (maxPendingConnections)`);
      // Make room by dropping the oldest main-channel candidate: a real source's main channel
      // speaks within milliseconds, so a flood must outpace it to matter, and silent
      // connections cannot hold the port. Plain preempt candidates are kept (the oldest is
      // most likely the real, silent, preempt channel): then the newcomer is refused.
      const oldest = [...this.pending].find((p) => !p.forPreempt || secure);
      if (!oldest) {
        raw.destroy();
        this.report({ reason: 'too-many', error: tooMany, ...(remote ? { remote } : {}) });
        return;
      }
      this.drop(oldest, oldest.raw, 'too-many', tooMany);
    }
    const forPreempt = this.conn !== undefined;
    const c: Candidate = {
      raw,
      forPreempt,
      remote,
      onRawClose: () => {
        const closed = (): void => {
          if (this.pending.has(c)) this.drop(c, raw, 'closed', new TransportError('closed', 'the connection closed before it was a migration channel', forPreempt ? { channel: 'preempt' } : {}));
        };
        // With TLS, 'tlsClientError' may follow the close and knows better why: let it come first.
        if (secure) setImmediate(closed);
        else closed();
      },
    };
    this.pending.add(c);
    this.countCandidates();
    raw.on('error', ignoreError); // reported as its close
    raw.once('close', c.onRawClose);
    if (secure) return; // the handshake comes first: see secured()
    // A silent plain-TCP preempt candidate may be the real preempt channel: no time limit (see qualify.ts).
    if (!c.forPreempt) this.startTimer(c);
    this.awaitFirstBytes(c, raw, kind);
  }

  /** A TLS handshake succeeded with a valid client certificate. */
  private secured(s: tls.TLSSocket, kind: 'tcp' | 'unix'): void {
    const raw = (s as tls.TLSSocket & { _parent?: net.Socket })._parent;
    const c = this.candidateOf(raw);
    if (!c || this.closing) {
      s.destroy();
      return;
    }
    c.secure = s;
    const channel = c.forPreempt ? 'preempt' : 'main';
    s.on('error', ignoreError); // reported as the raw socket's close
    const notAllowed = checkAllowedPeer(s, this.opts.tls?.allowedPeers, channel);
    if (notAllowed) {
      this.drop(c, raw, 'tls', notAllowed);
      return;
    }
    if (c.forPreempt) {
      // An authenticated peer: the preempt channel by order, as QEMU.
      this.qualified(c, s, kind);
      return;
    }
    if (this.conn) {
      this.drop(c, raw, 'extra', new TransportError('channel-order', 'another connection became the main channel first', { channel }));
      return;
    }
    this.startTimer(c);
    this.awaitFirstBytes(c, s, kind);
  }

  private startTimer(c: Candidate): void {
    c.timer = setTimeout(() => {
      this.drop(c, c.raw, 'timeout', new TransportError('qualify-timeout', `no migration stream within ${this.qualifyMs} ms of connecting`, c.forPreempt ? { channel: 'preempt' } : {}));
    }, this.qualifyMs);
  }

  /** Peeks at the first bytes (they stay in the socket for the decoder) and judges them. */
  private awaitFirstBytes(c: Candidate, s: net.Socket, kind: 'tcp' | 'unix'): void {
    const start = this.listenOpts.start ?? 'stream';
    if (start === 'any') {
      this.qualified(c, s, kind);
      return;
    }
    let seen: Buffer = Buffer.alloc(0);
    const onReadable = (): void => {
      for (let chunk: Buffer | null; (chunk = s.read() as Buffer | null) !== null; ) seen = seen.length === 0 ? chunk : Buffer.concat([seen, chunk]);
      const verdict = c.forPreempt ? judgePreemptStart(seen) : judgeMainStart(start, seen);
      if (verdict === 'more') return;
      c.unwatch?.();
      // Handing the bytes back: the channel's reader sees the stream from its first byte.
      if (seen.length > 0) s.unshift(seen);
      if (verdict === 'yes') {
        this.qualified(c, s, kind);
        return;
      }
      if (c.forPreempt && judgeMainStart('resume', seen) === 'yes') {
        this.drop(c, c.raw, 'recovery', new TransportError('not-a-migration-channel', `a postcopy-recovery connection (first bytes ${describeBytes(seen)}) while the migration's connection stands`, { channel: 'preempt' }));
        return;
      }
      const what = c.forPreempt ? 'a RAM page record (the preempt channel)' : start === 'stream' ? 'the migration stream magic QEVM' : 'a postcopy-recovery command';
      this.drop(c, c.raw, 'not-migration', new TransportError('not-a-migration-channel', `first bytes ${describeBytes(seen)} are not ${what}`, c.forPreempt ? { channel: 'preempt' } : {}));
    };
    s.on('readable', onReadable);
    c.unwatch = () => s.off('readable', onReadable);
  }

  private qualified(c: Candidate, s: net.Socket | tls.TLSSocket, kind: 'tcp' | 'unix'): void {
    this.forget(c);
    s.off('error', ignoreError);
    c.raw.off('error', ignoreError);
    c.raw.off('close', c.onRawClose);
    if (this.closing || this.rolesTaken()) {
      s.destroy();
      return;
    }
    const role: ChannelRole = this.conn ? 'preempt' : 'main';
    // The destination writes only return-path messages on the main channel:
    // small and urgent (a page request), so no Nagle and no corking there.
    const profile = role === 'main' ? mergeProfile(mergeProfile(BULK_PROFILE, { noDelay: true, cork: false }), this.opts.main?.tuning) : profileFor(role, this.opts);
    const tuning = applyTuning(s, profile, kind);
    const ch = new Channel(s, role, tuning, limitsFor(role, this.opts));
    if (role === 'main') {
      this.conn = new DestinationConnection(ch);
      // Connections that came before the main channel spoke are not the preempt channel: QEMU's
      // source opens that one only after its main channel has been answered (PONG 1).
      this.dropAllPending('another connection became the main channel');
      for (const w of this.acceptWaiters.splice(0)) w.resolve(this.conn);
      this.emit('main', ch);
    } else {
      this.dropAllPending('another connection became the preempt channel');
      this.conn!.attachPreempt(ch);
      this.emit('preempt', ch);
    }
  }

  private dropAllPending(why: string): void {
    for (const other of [...this.pending]) this.drop(other, other.raw, 'extra', new TransportError('channel-order', why));
  }

  /** Stops waiting for `c` without touching its sockets. */
  private forget(c: Candidate): void {
    this.pending.delete(c);
    clearTimeout(c.timer);
    c.unwatch?.();
    this.countCandidates();
  }

  private countCandidates(): void {
    if (!this.conn) return;
    let n = 0;
    for (const c of this.pending) if (c.forPreempt) n++;
    this.conn.preemptCandidates = n;
  }

  /** Drops a connection that did not qualify, and reports it. */
  private drop(c: Candidate, raw: net.Socket | undefined, reason: StrangerReason, error: TransportError): void {
    if (!this.pending.has(c)) return;
    this.forget(c);
    // Through the TLS socket when there is one: destroying the raw socket under a live TLS
    // socket first crashes Node 20 (see secureAccept).
    if (c.secure) c.secure.destroy();
    else (raw ?? c.raw).destroy();
    this.report({ reason, error, ...(c.remote ? { remote: c.remote } : {}) });
  }

  private report(ev: StrangerEvent): void {
    if (this.closing) return;
    this.emit('stranger', ev);
  }

  /** Resolves with the connection once its main channel has qualified; rejects when the listener is closed first. */
  accept(): Promise<DestinationConnection> {
    if (this.conn) return Promise.resolve(this.conn);
    if (this.closing) return Promise.reject(new TransportError('closed', 'listener closed'));
    return new Promise((resolve, reject) => this.acceptWaiters.push({ resolve, reject }));
  }

  /**
   * Stops listening and drops every connection still waiting to qualify.
   * Channels that qualified stay open (close them through the connection).
   */
  close(): void {
    if (this.closing) return;
    this.closing = true;
    const e = new TransportError('closed', 'listener closed');
    for (const c of [...this.pending]) {
      this.forget(c);
      if (c.secure) c.secure.destroy();
      else c.raw.destroy();
    }
    for (const w of this.acceptWaiters.splice(0)) w.reject(e);
    this.conn?.abandonPreempt(e);
    // net.Server.close() calls back only once every accepted socket has ended: do not wait for it.
    this.server.close();
  }
}

async function removeStaleSocket(path: string): Promise<void> {
  try {
    const st = await lstat(path);
    if (st.isSocket()) await unlink(path);
  } catch {
    // nothing there
  }
}
