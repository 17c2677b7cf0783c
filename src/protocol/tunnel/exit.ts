/**
 * The exit of a tunnel, on the destination host: takes the entry's hop
 * connections (mutual TLS; a connection that is not a hop connection — a
 * probe, a client of another CA, an HTTP request, a silent client — is dropped
 * as a stranger and ends nothing) and, for each new one, connects to the
 * destination QEMU's `migrate-incoming` URI, strictly in the entry's order,
 * each connection once the previous one is established (QEMU gives channels
 * their roles by order). A hop connection that comes back for a connection it
 * knows (same tunnel id and number) resumes it: both sides send again what
 * the other has not acknowledged and the QEMU-side socket never notices.
 */
import type net from 'node:net';
import type tls from 'node:tls';
import { parseEndpoint, formatEndpoint, type Endpoint } from '../../transport/endpoint.js';
import { TransportError } from '../../transport/errors.js';
import { loadTlsDir } from '../../transport/pki.js';
import { HopAcceptor, sendWelcome, type FirstFrame, type HelloFrame } from '../../transport/resumable-hop.js';
import { ResumableLink } from '../../transport/resumable.js';
import { connect } from '../../transport/sockets.js';
import { hopLinkOptions, type TunnelCommonOptions } from './options.js';
import { TunnelEnd, type TunnelConnection, type TunnelReport, type TunnelSession } from './session.js';

export interface TunnelExitOptions extends TunnelCommonOptions {
  /** Where the entry connects: `tcp:HOST:PORT` (port 0: any free port, see `uri`). */
  listen: string;
  /** The destination QEMU's `migrate-incoming` URI (or its `migrate-recover` URI): `tcp:HOST:PORT` or `unix:PATH`. */
  to: string;
  /** A tls-creds-x509 directory with server credentials (ca-cert.pem, server-cert.pem, server-key.pem): the entry's client certificate must chain to its CA. */
  tls: string;
  /** Accept only entries whose certificate carries one of these names (as QEMU's tls-authz). */
  tlsAllow?: readonly string[];
  /** Connections waiting to qualify at once (default 16; the oldest makes room). */
  maxPendingConnections?: number;
}

/** A connection the exit knows: connecting onward, then linked. */
interface ExitConnection {
  readonly tunnel: string;
  readonly hello: HelloFrame;
  c: TunnelConnection | undefined;
  link: ResumableLink | undefined;
  /** The latest hop socket waiting for its WELCOME while the QEMU-side connection is made. */
  waiting: { socket: tls.TLSSocket; raw: net.Socket; hello: HelloFrame; first: FirstFrame } | undefined;
}

/** Per entry (tunnel id): the highest connection number seen, and its open session. */
interface TunnelState {
  highest: number;
  session: TunnelSession | undefined;
}

/** How long the exit remembers a connection that ended (a late resume then learns it ended). */
const ENDED_KEPT_MS = 60_000;

export class TunnelExit extends TunnelEnd {
  private readonly known = new Map<string, ExitConnection>();
  private readonly tunnels = new Map<string, TunnelState>();
  private connectChain: Promise<void> = Promise.resolve();
  private closing = false;
  private acceptor!: HopAcceptor;

  private constructor(
    private readonly target: Endpoint,
    private readonly opts: TunnelExitOptions,
  ) {
    super('exit', 'destination', opts.transport ?? {});
  }

  static async start(opts: TunnelExitOptions): Promise<TunnelExit> {
    const listenEp = parseEndpoint(opts.listen);
    const target = parseEndpoint(opts.to);
    const material = await loadTlsDir(opts.tls, 'server');
    const exit = new TunnelExit(target, opts);
    exit.acceptor = await HopAcceptor.start({
      listen: listenEp,
      tls: { material, settings: { dir: opts.tls, endpoint: 'server', ...(opts.tlsAllow ? { allowedPeers: opts.tlsAllow } : {}) } },
      ...(opts.connectTimeoutMs !== undefined ? { qualifyTimeoutMs: opts.connectTimeoutMs } : {}),
      ...(opts.maxPendingConnections !== undefined ? { maxPendingConnections: opts.maxPendingConnections } : {}),
      ...(opts.tlsAllow ? { allowedPeers: opts.tlsAllow } : {}),
      hello: (h, s, raw, first) => exit.hello(h, s, raw, first),
      stranger: (ev) => exit.stranger(ev),
    });
    return exit;
  }

  get uri(): string {
    return this.acceptor.uri;
  }

  get to(): string {
    return formatEndpoint(this.target);
  }

  /** Connections waiting to qualify (TLS handshake or HELLO not in yet). */
  get pendingConnections(): number {
    return this.acceptor.pendingConnections;
  }

  protected get hopKind(): Endpoint['kind'] {
    return 'tcp';
  }

  protected get localKind(): Endpoint['kind'] {
    return this.target.kind;
  }

  private hello(h: HelloFrame, socket: tls.TLSSocket, raw: net.Socket, first: FirstFrame): void {
    if (this.closing) {
      socket.destroy();
      return;
    }
    const tunnel = h.tunnel.toString('hex');
    const key = `${tunnel}:${h.connection}`;
    const known = this.known.get(key);
    if (known) {
      if (!known.link) {
        // Still connecting onward: this newer socket gets the WELCOME.
        known.waiting?.socket.destroy();
        known.waiting = { socket, raw, hello: h, first };
        return;
      }
      this.resume(known, socket, raw, h, first);
      return;
    }
    let t = this.tunnels.get(tunnel);
    if (!t) {
      t = { highest: -1, session: undefined };
      this.tunnels.set(tunnel, t);
    }
    if (h.connection <= t.highest || h.resume) {
      // It existed and is gone (ended, or given up after the outage limit).
      this.answer(socket, 'unknown');
      return;
    }
    t.highest = h.connection;
    const x: ExitConnection = { tunnel, hello: h, c: undefined, link: undefined, waiting: { socket, raw, hello: h, first } };
    this.known.set(key, x);
    const run = this.connectChain.then(() => this.connectOnward(t, x, key));
    this.connectChain = run.catch(() => undefined);
  }

  private answer(socket: tls.TLSSocket, status: 'unknown' | 'refused'): void {
    sendWelcome(socket, status, 0);
    socket.end();
    setTimeout(() => socket.destroy(), 1000).unref();
  }

  /** Connects to QEMU for a new connection, after the previous one (QEMU's order), then welcomes the entry. */
  private async connectOnward(t: TunnelState, x: ExitConnection, key: string): Promise<void> {
    const main = x.hello.role === 'main';
    const session = main || !t.session?.open ? this.newSession(t.session) : t.session;
    if (main || session !== t.session) t.session = session;
    const c = session.add(x.hello.connection);
    let local: net.Socket;
    try {
      if (this.closing) throw new TransportError('closed', 'the tunnel exit was closed');
      const made = await connect(this.target, {
        allowHalfOpen: true,
        role: c.role,
        ...(this.opts.connectTimeoutMs !== undefined ? { timeoutMs: this.opts.connectTimeoutMs } : {}),
        beforeHandshake: (s) => this.tuneLocal(c, s, this.target.kind),
      });
      local = made.socket;
    } catch (e) {
      const err = e instanceof TransportError ? e : new TransportError('connect-failed', String(e), { channel: c.role });
      this.known.delete(key);
      if (x.waiting) this.answer(x.waiting.socket, 'refused');
      x.waiting = undefined;
      // The connection stays in the report, ended before it began.
      const refused = new TransportError('hop-refused', `could not connect to ${this.to}: ${err.message}`, { channel: c.role, cause: err });
      c.ended(false, refused);
      this.emit('closed', { ...c.event, ok: false, error: refused });
      this.attemptFailed(err);
      return;
    }
    if (this.closing) {
      local.destroy();
      return;
    }
    const link = new ResumableLink({
      local,
      name: c.role,
      ...hopLinkOptions(this.opts, c.role),
      onRead: (chunk, tt) => c.reverse(chunk, tt),
      onDelivered: (chunk, tt) => c.forward(chunk, tt),
    });
    x.c = c;
    x.link = link;
    this.watch(c, link);
    link.once('done', () => setTimeout(() => this.known.delete(key), ENDED_KEPT_MS).unref());
    const w = x.waiting;
    x.waiting = undefined;
    if (w && !w.socket.destroyed) this.welcome(x, 'new', w.socket, w.raw, w.hello, w.first);
  }

  private resume(x: ExitConnection, socket: tls.TLSSocket, raw: net.Socket, h: HelloFrame, first: FirstFrame): void {
    if (x.link!.done) {
      this.answer(socket, 'unknown');
      return;
    }
    this.welcome(x, 'resumed', socket, raw, h, first);
  }

  private welcome(x: ExitConnection, status: 'new' | 'resumed', socket: tls.TLSSocket, raw: net.Socket, h: HelloFrame, first: FirstFrame): void {
    const link = x.link!;
    this.tuneHop(x.c!, raw, this.hopKind);
    sendWelcome(socket, status, link.receivedSeq);
    try {
      link.attach(socket, h.received, first.decoder, first.rest);
    } catch (e) {
      // An impossible position: the link failed (its QEMU connection is reset).
      this.attemptFailed(e as TransportError);
    }
  }

  /** Stops listening and closes every connection (their QEMU-side sockets are reset). Returns the report. */
  async close(): Promise<TunnelReport> {
    if (!this.closing) {
      this.closing = true;
      await this.acceptor.close();
      const closing: Promise<unknown>[] = [];
      for (const x of this.known.values()) {
        x.waiting?.socket.destroy();
        const local = x.c?.local;
        if (local && !local.destroyed) closing.push(new Promise((resolve) => local.once('close', resolve)));
        x.link?.close(new TransportError('closed', 'the tunnel exit was closed', { channel: x.c?.role ?? 'main' }));
      }
      await this.connectChain;
      await Promise.race([Promise.all(closing), new Promise((resolve) => setTimeout(resolve, 1000).unref())]);
    }
    return this.report();
  }
}

/** Starts a tunnel exit (see {@link TunnelExitOptions}). */
export function startTunnelExit(opts: TunnelExitOptions): Promise<TunnelExit> {
  return TunnelExit.start(opts);
}
