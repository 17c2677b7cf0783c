/**
 * The entry of a tunnel, on the source host: the source QEMU migrates to its
 * local listener (`migrate uri=…`, plain TCP or unix, bound only where told);
 * each connection it opens — main with its return path, preempt, every
 * multifd channel — crosses to the exit on a hop connection of its own, over
 * mutual TLS, tuned for its role, and resumable: a cut of the hop is repaired
 * (reconnect with backoff, resume from the last acknowledged byte) while the
 * QEMU connection stays open. Only an outage longer than `maxOutageMs` closes
 * it, so that QEMU's own recovery takes over.
 */
import type net from 'node:net';
import { parseEndpoint, formatEndpoint, type Endpoint } from '../../transport/endpoint.js';
import { TransportError } from '../../transport/errors.js';
import { loadTlsDir } from '../../transport/pki.js';
import { HopDialer } from '../../transport/resumable-hop.js';
import { ResumableLink } from '../../transport/resumable.js';
import { TlsSessionCache, listen, type Listening, type TlsClientSpec } from '../../transport/sockets.js';
import { clientTlsOptions, type TlsSettings } from '../../transport/tls.js';
import { hopLinkOptions, type TunnelCommonOptions } from './options.js';
import { TunnelEnd, type TunnelReport, type TunnelSession } from './session.js';

export interface TunnelEntryOptions extends TunnelCommonOptions {
  /** Where the source QEMU connects (`migrate uri=…`): `tcp:HOST:PORT` (port 0: any free port, see `uri`) or `unix:PATH`. Plain: it is local. */
  listen: string;
  /** The exit's hop listener: `tcp:HOST:PORT`. */
  to: string;
  /**
   * A tls-creds-x509 directory with client credentials (ca-cert.pem,
   * client-cert.pem, client-key.pem; `qmt pki init` makes them): the hop is
   * mutual TLS, always.
   */
  tls: string;
  /** The name the exit's certificate must carry (default: the host of `to`). */
  tlsHostname?: string;
  /** Accept only an exit whose certificate carries one of these names. */
  tlsAllow?: readonly string[];
  /** Reconnection backoff: from `initialMs` doubled up to `maxMs` (default 50 → 1000 ms), until the outage limit. */
  backoff?: { initialMs?: number; maxMs?: number };
}

export class TunnelEntry extends TunnelEnd {
  private nextConnection = 0;
  private closing = false;
  private readonly locals = new Set<net.Socket>();

  private constructor(
    private readonly listening: Listening,
    private readonly dialer: HopDialer,
    private readonly hopEndpointKind: Endpoint['kind'],
    private readonly opts: TunnelEntryOptions,
  ) {
    super('entry', 'source', opts.transport ?? {});
    listening.server.on('connection', (s: net.Socket) => this.accept(s));
  }

  /** Starts an entry: loads the credentials, checks the exit's name can be verified, listens. */
  static async start(opts: TunnelEntryOptions): Promise<TunnelEntry> {
    const listenEp = parseEndpoint(opts.listen);
    const to = parseEndpoint(opts.to);
    const settings: TlsSettings = {
      dir: opts.tls,
      endpoint: 'client',
      ...(opts.tlsHostname ? { hostname: opts.tlsHostname } : {}),
      ...(opts.tlsAllow ? { allowedPeers: opts.tlsAllow } : {}),
    };
    const material = await loadTlsDir(opts.tls, 'client');
    // Refused now rather than at the first migration: no name to check the exit against.
    clientTlsOptions(material, settings, to.kind === 'tcp' ? to.host : undefined);
    const spec: TlsClientSpec = { material, settings, sessions: new TlsSessionCache() };
    const dialer = new HopDialer({
      to,
      tls: spec,
      ...(opts.connectTimeoutMs !== undefined ? { connectTimeoutMs: opts.connectTimeoutMs } : {}),
      ...(opts.backoff ? { backoff: opts.backoff } : {}),
    });
    const listening = await listen(listenEp, { allowHalfOpen: true, pauseOnConnect: true });
    return new TunnelEntry(listening, dialer, to.kind, opts);
  }

  get uri(): string {
    return formatEndpoint(this.listening.endpoint);
  }

  get to(): string {
    return this.dialer.to;
  }

  /** The id the exit knows this entry's connections by (hex). */
  get tunnelId(): string {
    return this.dialer.tunnel.toString('hex');
  }

  private current(): TunnelSession | undefined {
    return this.sessions[this.sessions.length - 1];
  }

  private accept(local: net.Socket): void {
    if (this.closing) {
      local.destroy();
      return;
    }
    this.locals.add(local);
    local.once('close', () => this.locals.delete(local));
    const cur = this.current();
    const session = cur?.open ? cur : this.newSession(cur);
    const c = session.add(this.nextConnection++);
    this.tuneLocal(c, local, this.localKind);
    const link = new ResumableLink({
      local,
      name: c.role,
      ...hopLinkOptions(this.opts, c.role),
      onRead: (chunk, t) => c.forward(chunk, t),
      onDelivered: (chunk, t) => c.reverse(chunk, t),
    });
    this.watch(c, link);
    this.dialer.open({
      link,
      connection: c.connection,
      role: c.role === 'main' ? 'main' : 'secondary',
      tune: (raw) => this.tuneHop(c, raw, this.hopKind),
      attemptFailed: (e) => this.attemptFailed(e),
    });
  }

  protected get hopKind(): Endpoint['kind'] {
    return this.hopEndpointKind;
  }

  protected get localKind(): Endpoint['kind'] {
    return this.listening.endpoint.kind;
  }

  /**
   * Stops listening and closes every connection (their QEMU-side sockets are
   * reset: a migration through the tunnel fails or pauses). Returns the report.
   */
  async close(): Promise<TunnelReport> {
    if (!this.closing) {
      this.closing = true;
      this.dialer.close();
      const unlisten = this.listening.close();
      const closing: Promise<unknown>[] = [];
      for (const s of this.locals) closing.push(new Promise((resolve) => s.once('close', resolve)));
      for (const sess of this.sessions) for (const c of sess.connections) c.link?.close(new TransportError('closed', 'the tunnel entry was closed', { channel: c.role }));
      for (const s of this.locals) s.destroy();
      await Promise.race([Promise.all(closing), new Promise((resolve) => setTimeout(resolve, 1000).unref())]);
      await unlisten;
    }
    return this.report();
  }
}

/** Starts a tunnel entry (see {@link TunnelEntryOptions}). */
export function startTunnelEntry(opts: TunnelEntryOptions): Promise<TunnelEntry> {
  return TunnelEntry.start(opts);
}
