/**
 * The exit of `qmt tunnel`, on the destination host: accepts the entry's hop
 * connections (mutual TLS with our PKI: a connection without a certificate
 * of our CA, or whose first frame is not a HELLO in time, is a stranger,
 * dropped and reported, and touches nothing), and for each new QEMU
 * connection the entry announces connects to the destination QEMU's
 * `migrate-incoming` URI, then welcomes it. The entry announces connection N
 * only once N-1 was welcomed, so the destination QEMU accepts them in the
 * order the source QEMU opened them (its roles go by accept order).
 *
 * A HELLO for a connection the exit carries (a reconnect after a cut, or a
 * retry whose WELCOME was lost) takes it over on the new hop connection, from
 * the last byte each side has. A connection that ended or failed is kept for
 * `lingerMs` to answer a late reconnect (a lost last ACK), then forgotten: a
 * resume of a forgotten one is refused ('unknown').
 */
import { EventEmitter } from 'node:events';
import type net from 'node:net';
import type tls from 'node:tls';
import { classifySocketError } from '../../transport/channel.js';
import { formatEndpoint, parseEndpoint, type Endpoint } from '../../transport/endpoint.js';
import { TransportError, type ChannelName } from '../../transport/errors.js';
import { loadTlsDir, type TlsMaterial } from '../../transport/pki.js';
import type { StrangerEvent, StrangerReason } from '../../transport/qualify.js';
import { ResumableConnection } from '../../transport/resumable.js';
import { readHello, welcome, type HandshakeRead } from '../../transport/resumable-hop.js';
import type { HopFrame } from '../../transport/resumable-frames.js';
import { connectSocket, listen, type Listening } from '../../transport/sockets.js';
import { checkAllowedPeer, secureAccept, serverTlsOptions, type TlsSettings } from '../../transport/tls.js';
import { usageError } from '../../errors.js';
import { TunnelAnalysis } from './analysis.js';
import { forwardEvents, profileOf, pruneFinished, settleRole, roleOf, statsOf, tuneFor, type Carried, type TunnelEvents, type TunnelLimits, type TunnelStats } from './common.js';

export interface TunnelExitOptions {
  /** Where the entry's hop connections come: `tcp:HOST:PORT`. */
  readonly listen: string;
  /** The destination QEMU's `migrate-incoming` URI: `unix:PATH` or `tcp:HOST:PORT`. */
  readonly to: string;
  /** Our PKI directory (server certificate and key, CA; clients must present a certificate of it), an allow-list of entries. */
  readonly tls: { readonly dir: string; readonly allowedPeers?: readonly string[] };
  readonly limits?: TunnelLimits;
  /** How long an ended connection is kept to answer a late reconnect (default 30 s). */
  readonly lingerMs?: number;
  /** Hop connections in their handshake at once, at most (default 64): more are strangers ('too-many'). */
  readonly maxPending?: number;
}

export interface TunnelExitEvents extends TunnelEvents {
  stranger: [event: StrangerEvent];
}

interface ExitConn extends Carried {
  readonly name: ChannelName;
  readonly tunnel: string;
  local: net.Socket | undefined;
  /** The hop connection it rides on now (retuned once its role is known). */
  hop: tls.TLSSocket | undefined;
}

/** A connection of the entry's: its QEMU side connecting, then carried (a second HELLO for it waits for the same outcome). */
interface Slot {
  readonly ready: Promise<ExitConn | TransportError>;
}

export class TunnelExit extends EventEmitter<TunnelExitEvents> {
  private readonly slots = new Map<string, Slot>();
  private readonly carried: ExitConn[] = [];
  private readonly analysis = new TunnelAnalysis();
  private pending = 0;
  private closing = false;
  private readonly timeoutMs: number;
  private readonly strangerCount = { total: 0 };

  private constructor(
    private readonly listening: Listening,
    private readonly target: Endpoint,
    private readonly material: TlsMaterial,
    private readonly settings: TlsSettings,
    private readonly opts: TunnelExitOptions,
  ) {
    super();
    this.timeoutMs = opts.limits?.connectTimeoutMs ?? 5000;
    listening.server.on('connection', (raw: net.Socket) => void this.onHop(raw));
  }

  static async start(opts: TunnelExitOptions): Promise<TunnelExit> {
    const ep = parseEndpoint(opts.listen);
    if (ep.kind !== 'tcp') throw usageError('type', 'bad-option', 'listen', `the exit listens for the entry on TCP (tcp:HOST:PORT), got ${opts.listen}`);
    const target = parseEndpoint(opts.to);
    const material = await loadTlsDir(opts.tls.dir, 'server');
    const settings: TlsSettings = { dir: opts.tls.dir, endpoint: 'server', ...(opts.tls.allowedPeers ? { allowedPeers: opts.tls.allowedPeers } : {}) };
    serverTlsOptions(material, settings); // refuses unusable credentials here, at the call
    const listening = await listen(ep);
    return new TunnelExit(listening, target, material, settings, opts);
  }

  /** Where the entry connects (the bound port when 0 was asked). */
  get uri(): string {
    return formatEndpoint(this.listening.endpoint);
  }

  /** Strangers dropped so far. */
  get strangers(): number {
    return this.strangerCount.total;
  }

  stats(): TunnelStats {
    // Up is the source's direction: what this end delivers to its QEMU.
    return statsOf(
      this.carried,
      (c) => c.conn.stats().received,
      (c) => c.conn.stats().sent,
      this.analysis,
    );
  }

  async close(): Promise<void> {
    if (this.closing) return;
    this.closing = true;
    await this.listening.close();
    for (const c of this.carried) c.conn.fail(new TransportError('closed', 'the tunnel exit was closed', { channel: c.name }));
  }

  private stranger(reason: StrangerReason, error: TransportError, remote: string | undefined): void {
    this.strangerCount.total++;
    this.emit('stranger', { reason, error, ...(remote ? { remote } : {}) });
  }

  private async onHop(raw: net.Socket): Promise<void> {
    raw.on('error', () => undefined);
    // Read now: a destroyed socket no longer says who it was.
    const remote = raw.remoteAddress ? `${raw.remoteAddress}:${raw.remotePort}` : undefined;
    if (this.closing) {
      raw.destroy();
      return;
    }
    if (this.pending >= (this.opts.maxPending ?? 64)) {
      raw.destroy();
      this.stranger('too-many', new TransportError('too-many-connections', `${this.pending} hop connections were already in their handshake`), remote);
      return;
    }
    this.pending++;
    // Until the role is known: the main channel's profile at a destination, Nagle off — this end
    // writes the return path (a page request) and the ACKs on it, small and urgent.
    tuneFor(raw, 'main', 'destination', 'tcp');
    let secure: tls.TLSSocket;
    let h: HandshakeRead<Extract<HopFrame, { type: 'hello' }>>;
    try {
      try {
        secure = await secureAccept(raw, serverTlsOptions(this.material, this.settings), { timeoutMs: this.timeoutMs });
      } catch (e) {
        const err = TransportError.is(e) ? e : classifySocketError(e);
        this.stranger(raw.bytesRead === 0 ? 'closed' : err.code === 'qualify-timeout' ? 'timeout' : 'tls', err, remote);
        return;
      }
      const notAllowed = checkAllowedPeer(secure, this.settings.allowedPeers);
      if (notAllowed) {
        secure.destroy();
        this.stranger('tls', notAllowed, remote);
        return;
      }
      try {
        h = await readHello(secure, this.timeoutMs);
      } catch (e) {
        const err = e as TransportError;
        this.stranger(err.code === 'hop-protocol' ? 'not-migration' : err.code === 'qualify-timeout' ? 'timeout' : 'closed', err, remote);
        return;
      }
    } finally {
      this.pending--;
    }
    if (this.closing) {
      secure.destroy();
      return;
    }
    await this.onHello(secure, h);
  }

  private async onHello(secure: tls.TLSSocket, h: HandshakeRead<Extract<HopFrame, { type: 'hello' }>>): Promise<void> {
    const f = h.frame;
    const tunnel = f.tunnel.toString('hex');
    const key = `${tunnel}/${f.connection}`;
    let slot = this.slots.get(key);
    if (!slot) {
      if (f.resume) {
        welcome(secure, 'unknown', 0);
        secure.end();
        return;
      }
      slot = this.openSlot(key, tunnel, f.connection, f.role === 'main' ? 'main' : 'preempt');
    }
    const c = await slot.ready;
    if (this.closing) {
      secure.destroy();
      return;
    }
    if (c instanceof TransportError || c.conn.state === 'failed') {
      welcome(secure, c instanceof TransportError ? 'refused' : 'unknown', 0);
      secure.end();
      return;
    }
    const first = c.conn.stats().hops === 0;
    welcome(secure, first ? 'new' : 'resumed', c.conn.received);
    if (c.role !== 'pending') tuneFor(secure, profileOf(c.role, f.connection, false), 'destination', 'tcp');
    c.hop = secure;
    c.conn.attach(secure, h.decoder, f.received, h.after);
    if (first) this.emit('connection', { index: c.index, role: c.role });
  }

  /** Connects the QEMU side of a new connection (the entry's order is QEMU's: one at a time). */
  private openSlot(key: string, tunnel: string, index: number, name: ChannelName): Slot {
    const feedOf = this.analysis.opened(name === 'main');
    const slot: Slot = {
      ready: connectSocket(this.target, name, this.timeoutMs, { allowHalfOpen: true }).then(
        (local) => {
          const conn = new ResumableConnection(local, name, this.opts.limits);
          const c: ExitConn = { index, conn, role: 'pending', name, tunnel, local, hop: undefined };
          this.carried.push(c);
          forwardEvents(c, this);
          const prune = (): void => pruneFinished(this.carried);
          conn.once('done', prune);
          conn.once('failed', prune);
          // The entry's bytes say the role (the exit sees them first as what it writes to QEMU).
          conn.on('peer-first-bytes', (b) => {
            c.role = roleOf(b);
            const feed = feedOf(c.role);
            if (feed) conn.observer = { read: feed.back, delivered: feed.toward };
            const profile = profileOf(c.role, index, false);
            tuneFor(local, profile, 'source', this.target.kind);
            if (c.hop && !c.hop.destroyed) tuneFor(c.hop, profile, 'destination', 'tcp');
            settleRole(c, profile);
          });
          const forget = (): void => {
            setTimeout(() => this.slots.delete(key), this.opts.lingerMs ?? 30_000).unref();
          };
          conn.once('done', forget);
          conn.once('failed', forget);
          return c;
        },
        (e: unknown) => {
          this.slots.delete(key);
          const err = TransportError.is(e) ? e : classifySocketError(e, name);
          this.emit('failed', { index, role: 'pending', error: new TransportError('hop-refused', `connection ${index}: the destination ${formatEndpoint(this.target)} refused it: ${err.message}`, { channel: name, cause: err }) });
          return err;
        },
      ),
    };
    this.slots.set(key, slot);
    return slot;
  }
}
