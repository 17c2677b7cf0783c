/**
 * The one place where sockets are made: connect (TCP/unix, time limit, TLS
 * client with a session cache, typed refusals), listen (TCP/unix, a stale unix
 * socket removed, address-in-use typed, optionally a TLS server) and the
 * per-channel tuning of a migration channel. The sessions (through
 * SourceConnection / MigrationListener), the tap and the test relays all use
 * it, so a socket is set up one way everywhere. Which accepted connections may
 * become a channel is admission.ts.
 */
import { lstat, unlink } from 'node:fs/promises';
import net from 'node:net';
import tls from 'node:tls';
import { classifySocketError, type ChannelRole } from './channel.js';
import { formatEndpoint, type Endpoint } from './endpoint.js';
import { TransportError, type ChannelName } from './errors.js';
import type { TlsMaterial } from './pki.js';
import { checkAllowedPeer, classifyTlsError, clientTlsOptions, latestSession, secureConnect, serverTlsOptions, type TlsSettings } from './tls.js';
import { BULK_PROFILE, URGENT_PROFILE, applyTuning, mergeProfile, type EffectiveTuning, type TuningProfile } from './tuning.js';

/** Default limit of one TCP connect plus TLS handshake. */
export const DEFAULT_CONNECT_TIMEOUT_MS = 10_000;

// ---------------------------------------------------------------------------
// Connect
// ---------------------------------------------------------------------------

export interface DialOptions {
  /** Limit of the TCP/unix connect (default 10 s). Error: 'connect-timeout'. */
  readonly timeoutMs?: number;
  /** Keep the socket writable after the peer's FIN (a relay forwards the half-close). */
  readonly allowHalfOpen?: boolean;
  /** Named in errors. */
  readonly role?: ChannelName;
  /** Connect this socket (made earlier, its listeners in place) instead of a new one; `allowHalfOpen` is then its own. */
  readonly socket?: net.Socket;
}

/** A connect under way: the socket at once (to destroy it while it connects), and the outcome. */
export interface Dialing {
  readonly socket: net.Socket;
  /** Resolves once connected; rejects with a TransportError (`connect-timeout`, `connect-failed` …) after destroying the socket. */
  readonly connected: Promise<net.Socket>;
}

/**
 * Starts connecting a TCP/unix socket to `ep`. A socket destroyed by its owner
 * while it connects rejects `connected` with 'closed' (so a chain waiting on it
 * never stalls).
 */
export function dial(ep: Endpoint, opts: DialOptions = {}): Dialing {
  const allowHalfOpen = opts.allowHalfOpen ?? false;
  const timeoutMs = opts.timeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS;
  const role = opts.role;
  const target = ep.kind === 'tcp' ? { host: ep.host, port: ep.port } : { path: ep.path };
  const s = opts.socket ? opts.socket.connect(target) : net.connect({ ...target, allowHalfOpen });
  const connected = new Promise<net.Socket>((resolve, reject) => {
    const done = (): void => {
      clearTimeout(timer);
      s.off('connect', onConnect);
      s.off('error', onError);
      s.off('close', onClose);
    };
    const timer = setTimeout(() => {
      done();
      s.destroy();
      reject(new TransportError('connect-timeout', `no connection to ${formatEndpoint(ep)} within ${timeoutMs} ms`, role ? { channel: role } : {}));
    }, timeoutMs);
    const onConnect = (): void => {
      done();
      resolve(s);
    };
    const onError = (e: Error): void => {
      done();
      s.destroy();
      reject(classifySocketError(e, role));
    };
    const onClose = (): void => {
      done();
      reject(new TransportError('closed', `the connection to ${formatEndpoint(ep)} was closed while connecting`, role ? { channel: role } : {}));
    };
    s.once('connect', onConnect);
    s.once('error', onError);
    s.once('close', onClose);
  });
  return { socket: s, connected };
}

/**
 * Connects one TCP/unix socket to `ep` within `timeoutMs`; failures are
 * TransportErrors of channel `role` (`connect-timeout`, or as the socket
 * error says). `allowHalfOpen`: keep the socket writable after the peer's
 * FIN (a relay forwards the half-close).
 */
export function connectSocket(ep: Endpoint, role: ChannelName | undefined, timeoutMs: number, opts: { allowHalfOpen?: boolean } = {}): Promise<net.Socket> {
  return dial(ep, { timeoutMs, ...(role ? { role } : {}), ...(opts.allowHalfOpen !== undefined ? { allowHalfOpen: opts.allowHalfOpen } : {}) }).connected;
}

/**
 * The latest TLS session ticket of a destination, so that the next channel
 * (the preempt channel, a tap's second connection) resumes the first one's
 * session. TLS 1.3 tickets arrive after the handshake: a tracked socket keeps
 * updating it.
 */
export class TlsSessionCache {
  private latest: Buffer | undefined;

  get ticket(): Buffer | undefined {
    return this.latest;
  }

  /** Keeps every ticket `sock` receives from now on, and the one it already has. */
  track(sock: tls.TLSSocket): void {
    const early = latestSession(sock);
    if (early) this.latest = early;
    sock.on('session', (s: Buffer) => (this.latest = s));
  }
}

/** The client side of TLS on a connected socket: what {@link connectTls} needs. */
export interface TlsClientSpec {
  readonly material: TlsMaterial;
  /** `endpoint: 'client'`. */
  readonly settings: TlsSettings;
  /** Tickets to resume from and to keep (optional). */
  readonly sessions?: TlsSessionCache;
}

/**
 * Runs the TLS client handshake on `raw` (connected to `ep`) within
 * `timeoutMs`: our certificate, the server's name checked against
 * `tls-hostname` or the URI host, resumption from `spec.sessions`, the
 * allow-list. Every failure is a typed TransportError and destroys both sockets.
 */
export async function connectTls(raw: net.Socket, ep: Endpoint, role: ChannelName | undefined, spec: TlsClientSpec, timeoutMs: number): Promise<tls.TLSSocket> {
  let opts: tls.ConnectionOptions;
  try {
    opts = clientTlsOptions(spec.material, spec.settings, ep.kind === 'tcp' ? ep.host : undefined, spec.sessions?.ticket);
  } catch (e) {
    raw.destroy();
    throw e instanceof TransportError ? e : classifyTlsError(e, role);
  }
  const secure = await secureConnect({ ...opts, socket: raw }, { ...(role ? { channel: role } : {}), timeoutMs });
  spec.sessions?.track(secure);
  const notAllowed = checkAllowedPeer(secure, spec.settings.allowedPeers, role);
  if (notAllowed) {
    secure.destroy();
    throw notAllowed;
  }
  return secure;
}

/** Connect options of {@link connect}. */
export interface ConnectOptions extends DialOptions {
  /** TLS client on top (QEMU's tls-creds with endpoint=client). */
  readonly tls?: TlsClientSpec;
  /** Called with the TCP/unix socket before any TLS handshake (tuning: the handshake then runs with the channel's options). */
  readonly beforeHandshake?: (raw: net.Socket) => void;
}

/** A TCP/unix connection to `ep`, with TLS when asked for; the raw socket stays reachable for tuning and resets. */
export interface Connected {
  readonly socket: net.Socket | tls.TLSSocket;
  readonly raw: net.Socket;
}

/** Connects to `ep` (TCP/unix, then the TLS client handshake when `opts.tls`), each step within `timeoutMs`. */
export async function connect(ep: Endpoint, opts: ConnectOptions = {}): Promise<Connected> {
  const timeoutMs = opts.timeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS;
  const raw = await dial(ep, opts).connected;
  opts.beforeHandshake?.(raw);
  if (!opts.tls) return { socket: raw, raw };
  const socket = await connectTls(raw, ep, opts.role, opts.tls, timeoutMs);
  return { socket, raw };
}

// ---------------------------------------------------------------------------
// Listen
// ---------------------------------------------------------------------------

export interface ListenSpec {
  /** A TLS server (QEMU's tls-creds with endpoint=server); its handshakes run as connections arrive. */
  readonly tls?: { readonly material: TlsMaterial; readonly settings: TlsSettings; readonly handshakeTimeoutMs: number };
  readonly allowHalfOpen?: boolean;
  /** Accepted plain sockets are not read until resumed (a relay connects onward first). */
  readonly pauseOnConnect?: boolean;
}

/** A listening server and where it listens (the bound port when 0 was asked). */
export interface Listening {
  readonly server: net.Server | tls.Server;
  readonly endpoint: Endpoint;
  readonly secure: boolean;
  /** Stops listening (returns at once: net.Server.close() waits for every accepted socket) and removes a unix socket file. */
  close(): Promise<void>;
}

/**
 * Listens on `ep`. A unix socket file left behind by a process that is gone
 * is removed first; a port or path in use is 'address-in-use'. With
 * `spec.tls` the server is a tls.Server: 'connection' carries the raw socket,
 * 'secureConnection' / 'tlsClientError' the handshake's outcome.
 */
export async function listen(ep: Endpoint, spec: ListenSpec = {}): Promise<Listening> {
  if (ep.kind === 'unix') await removeStaleSocket(ep.path);
  const base = { ...(spec.allowHalfOpen ? { allowHalfOpen: true } : {}), ...(spec.pauseOnConnect ? { pauseOnConnect: true } : {}) };
  const server = spec.tls
    ? tls.createServer({ ...base, ...serverTlsOptions(spec.tls.material, spec.tls.settings), handshakeTimeout: spec.tls.handshakeTimeoutMs })
    : net.createServer(base);
  const endpoint = await new Promise<Endpoint>((resolve, reject) => {
    server.once('error', (e) => reject(classifySocketError(e)));
    const onListening = (): void => {
      server.removeAllListeners('error');
      const a = server.address();
      resolve(ep.kind === 'tcp' && a && typeof a === 'object' ? { kind: 'tcp', host: ep.host, port: a.port } : ep);
    };
    if (ep.kind === 'tcp') server.listen({ host: ep.host, port: ep.port }, onListening);
    else server.listen(ep.path, onListening);
  });
  let closed = false;
  return {
    server,
    endpoint,
    secure: spec.tls !== undefined,
    async close() {
      if (closed) return;
      closed = true;
      // net.Server.close() calls back only once every accepted socket has ended: do not wait for it.
      server.close();
      if (ep.kind === 'unix') await unlink(ep.path).catch(() => undefined);
    },
  };
}

/** Removes a unix socket file nobody listens on any more (never a regular file). */
export async function removeStaleSocket(path: string): Promise<void> {
  try {
    if ((await lstat(path)).isSocket()) await unlink(path);
  } catch {
    // nothing there
  }
}

// ---------------------------------------------------------------------------
// Per-channel tuning
// ---------------------------------------------------------------------------

/** Tuning overrides per channel, as in TransportOptions. */
export interface ChannelTuningOptions {
  readonly main?: { readonly tuning?: Partial<TuningProfile> };
  readonly preempt?: { readonly tuning?: Partial<TuningProfile> };
  readonly multifd?: { readonly tuning?: Partial<TuningProfile> };
}

/**
 * The socket options of a channel: the role's profile, adjusted to the side,
 * then the user's overrides. The destination writes only return-path messages
 * on the main channel: small and urgent (a page request), so no Nagle and no
 * corking there.
 */
export function channelProfile(role: ChannelRole, side: 'source' | 'destination', opts: ChannelTuningOptions = {}): TuningProfile {
  if (role === 'preempt') return mergeProfile(URGENT_PROFILE, opts.preempt?.tuning);
  // A multifd channel carries bulk pages one way: the bulk profile on both sides.
  if (role === 'multifd') return mergeProfile(BULK_PROFILE, opts.multifd?.tuning);
  const base = side === 'destination' ? mergeProfile(BULK_PROFILE, { noDelay: true, cork: false }) : BULK_PROFILE;
  return mergeProfile(base, opts.main?.tuning);
}

/** Applies {@link channelProfile} to a channel's socket and returns what the kernel took. */
export function tuneChannel(socket: net.Socket | tls.TLSSocket, role: ChannelRole, side: 'source' | 'destination', kind: Endpoint['kind'], opts: ChannelTuningOptions = {}): EffectiveTuning {
  return applyTuning(socket, channelProfile(role, side, opts), kind);
}
