import { EventEmitter } from 'node:events';
import { lstat, unlink } from 'node:fs/promises';
import net from 'node:net';
import tls from 'node:tls';
import { Channel, classifySocketError, type ChannelLimits, type ChannelRole, type ChannelStats } from './channel.js';
import { formatEndpoint, parseEndpoint, type Endpoint } from './endpoint.js';
import { TransportError } from './errors.js';
import { loadTlsDir, type TlsMaterial } from './pki.js';
import { classifyTlsError, clientTlsOptions, serverTlsOptions, type TlsSettings } from './tls.js';
import { BULK_PROFILE, URGENT_PROFILE, applyTuning, mergeProfile, type TuningProfile } from './tuning.js';

/** Options of one channel: its tuning (over the role's default profile) and buffering limits. */
export interface ChannelOptions extends ChannelLimits {
  /** Overrides of BULK_PROFILE (main) or URGENT_PROFILE (preempt). */
  readonly tuning?: Partial<TuningProfile>;
}

/** Options shared by both ends. */
export interface TransportOptions {
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

/** The destination's side of one migration: the channels in the order they arrived. */
export class DestinationConnection {
  private preemptChannel: Channel | undefined;
  private preemptWaiters: { resolve: (c: Channel) => void; reject: (e: TransportError) => void }[] = [];

  constructor(readonly main: Channel) {}

  /** The preempt channel, if it has arrived. */
  get preempt(): Channel | undefined {
    return this.preemptChannel;
  }

  /** Resolves when the second connection arrives (QEMU's preempt channel). */
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

interface ListenerEvents {
  /** A connection was refused (TLS failure, or one connection too many). */
  refused: [TransportError];
  main: [Channel];
  preempt: [Channel];
}

/**
 * Listens for one migration. Roles follow arrival, as in QEMU 10.0: the first
 * connection is the main channel, the next the preempt channel. "Arrival" is
 * the TCP accept for plain sockets and the completed TLS handshake with TLS —
 * QEMU too identifies a TLS channel only after its handshake. Further
 * connections are refused. A refused main channel rejects `accept()`.
 */
export class MigrationListener extends EventEmitter<ListenerEvents> {
  private conn: DestinationConnection | undefined;
  private acceptWaiters: { resolve: (c: DestinationConnection) => void; reject: (e: TransportError) => void }[] = [];
  private firstRefusal: TransportError | undefined;
  private closing = false;

  private constructor(
    private readonly server: net.Server,
    readonly endpoint: Endpoint,
    private readonly opts: TransportOptions,
  ) {
    super();
  }

  static async listen(uri: string, opts: TransportOptions = {}): Promise<MigrationListener> {
    const ep = parseEndpoint(uri);
    const material = opts.tls ? await loadTlsDir(opts.tls.dir, 'server') : undefined;
    if (ep.kind === 'unix') await removeStaleSocket(ep.path);
    let server: net.Server;
    if (material && opts.tls) {
      const settings: TlsSettings = { ...opts.tls, endpoint: 'server' };
      // A handshake that never completes must not hold a socket forever.
      server = tls.createServer({ ...serverTlsOptions(material, settings), handshakeTimeout: opts.connectTimeoutMs ?? 10_000 });
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
    const l = new MigrationListener(server, actual, opts);
    l.wire(server, ep.kind, material !== undefined);
    return l;
  }

  /** `tcp:HOST:PORT` with the port actually bound (useful with port 0), or `unix:PATH`. */
  get uri(): string {
    return formatEndpoint(this.endpoint);
  }

  private wire(server: net.Server, kind: 'tcp' | 'unix', secure: boolean): void {
    if (secure) {
      server.on('secureConnection', (s: tls.TLSSocket) => this.arrived(s, kind));
      server.on('tlsClientError', (e: Error, s: tls.TLSSocket) => {
        // The verification result is on the socket: the error alone is often just "socket hang up".
        // A TLSSocket counts decrypted bytes only; the raw socket under it (Node's
        // long-standing `_parent`) tells a client that sent its hello and hung up
        // (it refused our certificate) from one that never spoke.
        const raw = (s as tls.TLSSocket & { _parent?: net.Socket })._parent;
        const err = classifyTlsError(e, this.conn ? 'preempt' : 'main', { side: 'server', socket: s, rawBytesRead: raw?.bytesRead ?? 0 });
        s.destroy();
        this.refuse(err);
      });
    } else {
      server.on('connection', (s: net.Socket) => this.arrived(s, kind));
    }
    server.on('error', (e) => this.refuse(classifySocketError(e)));
  }

  private arrived(s: net.Socket | tls.TLSSocket, kind: 'tcp' | 'unix'): void {
    const role: ChannelRole | undefined = !this.conn ? 'main' : !this.conn.preempt ? 'preempt' : undefined;
    if (this.closing) {
      s.destroy();
      return;
    }
    if (!role) {
      s.destroy();
      this.refuse(new TransportError('channel-order', 'a third connection for one migration'));
      return;
    }
    // The destination writes only return-path messages on the main channel:
    // small and urgent (a page request), so no Nagle and no corking there.
    const profile = role === 'main' ? mergeProfile(mergeProfile(BULK_PROFILE, { noDelay: true, cork: false }), this.opts.main?.tuning) : profileFor(role, this.opts);
    const tuning = applyTuning(s, profile, kind);
    const ch = new Channel(s, role, tuning, limitsFor(role, this.opts));
    if (role === 'main') {
      this.conn = new DestinationConnection(ch);
      for (const w of this.acceptWaiters.splice(0)) w.resolve(this.conn);
      this.emit('main', ch);
    } else {
      this.conn!.attachPreempt(ch);
      this.emit('preempt', ch);
    }
  }

  private refuse(e: TransportError): void {
    this.firstRefusal ??= e;
    if (!this.conn) for (const w of this.acceptWaiters.splice(0)) w.reject(e);
    if (this.listenerCount('refused') > 0) this.emit('refused', e);
  }

  /** Resolves with the connection once its main channel has arrived; rejects if it was refused. */
  accept(): Promise<DestinationConnection> {
    if (this.conn) return Promise.resolve(this.conn);
    if (this.firstRefusal) return Promise.reject(this.firstRefusal);
    return new Promise((resolve, reject) => this.acceptWaiters.push({ resolve, reject }));
  }

  /**
   * Stops listening. Channels that arrived stay open (close them through the
   * connection); a handshake still running is dropped when it completes.
   */
  close(): void {
    if (this.closing) return;
    this.closing = true;
    const e = new TransportError('closed', 'listener closed');
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
