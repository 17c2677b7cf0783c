/**
 * Hop connections of `qmt tunnel`: how the entry opens them (HopDialer) and
 * how the exit takes them (HopAcceptor), each over mutual TLS made by the one
 * socket factory (sockets.ts), the exit's candidates judged by admission.ts
 * like a destination's: a connection becomes a hop connection only after a
 * TLS handshake with a valid client certificate and a well-formed HELLO as its
 * first bytes; anything else is dropped and reported as a stranger, and ends
 * nothing.
 *
 * One hop connection carries one local connection (a {@link ResumableLink}).
 * The entry opens the hop connections of new local connections one after the
 * other, each once the previous one was welcomed: the exit answers a new
 * connection only after it has connected onward, so the far side sees its
 * connections in the order the near side accepted them (QEMU gives channels
 * their roles by order). A link whose hop fails is reconnected by the entry
 * with backoff (HELLO with the same tunnel id and connection number) until it
 * is welcomed back or its outage limit ends it.
 */
import { randomBytes } from 'node:crypto';
import type net from 'node:net';
import type tls from 'node:tls';
import { Admission, describeBytes, type FirstBytesJudgement } from './admission.js';
import { formatEndpoint, type Endpoint } from './endpoint.js';
import { TransportError, type ChannelName } from './errors.js';
import type { StrangerEvent } from './qualify.js';
import { HopFrameDecoder, encodeHello, encodeWelcome, type HopFrame, type HopRole, type WelcomeStatus } from './resumable-frames.js';
import type { HopSocket, ResumableLink } from './resumable.js';
import { connect, listen, type Listening, type TlsClientSpec } from './sockets.js';
import type { TlsMaterial } from './pki.js';
import type { TlsSettings } from './tls.js';

export type HelloFrame = Extract<HopFrame, { type: 'hello' }>;

/** The first frame of a hop connection and what its decoder read after it. */
export interface FirstFrame {
  readonly frame: HopFrame;
  readonly decoder: HopFrameDecoder;
  /** Frames that came in the same bytes, after the first. */
  readonly rest: HopFrame[];
}

const noop = (): void => undefined;

/**
 * Reads the first frame of `socket` within `timeoutMs`. The socket is paused
 * once it is in: whatever follows waits in the socket for the link's reader.
 * Rejects with a TransportError ('hop-protocol' for other bytes, 'closed',
 * 'qualify-timeout') and destroys the socket.
 */
export function readFirstFrame(socket: HopSocket, timeoutMs: number, role?: ChannelName): Promise<FirstFrame> {
  const decoder = new HopFrameDecoder();
  return new Promise((resolve, reject) => {
    const opts = role ? { channel: role } : {};
    const cleanup = (): void => {
      clearTimeout(timer);
      socket.off('data', onData);
      socket.off('error', onError);
      socket.off('close', onClose);
    };
    const failWith = (e: TransportError): void => {
      cleanup();
      socket.on('error', noop);
      socket.destroy();
      reject(e);
    };
    const onData = (c: Buffer): void => {
      let frames: HopFrame[];
      try {
        frames = decoder.push(c);
      } catch (e) {
        failWith(e as TransportError);
        return;
      }
      if (frames.length === 0) return;
      socket.pause();
      cleanup();
      const [frame, ...rest] = frames;
      resolve({ frame: frame!, decoder, rest });
    };
    const onError = (e: Error): void => failWith(new TransportError('closed', `the hop connection failed during its handshake: ${e.message}`, { ...opts, cause: e }));
    const onClose = (): void => failWith(new TransportError('closed', 'the hop connection closed during its handshake', opts));
    const timer = setTimeout(() => failWith(new TransportError('qualify-timeout', `no hop handshake within ${timeoutMs} ms`, opts)), timeoutMs);
    socket.on('data', onData);
    socket.on('error', onError);
    socket.on('close', onClose);
    socket.resume();
  });
}

// ---------------------------------------------------------------------------
// The entry's side
// ---------------------------------------------------------------------------

export interface HopDialerOptions {
  /** The exit's hop listener. */
  readonly to: Endpoint;
  /** Our client certificate and the exit's name to check (mutual TLS is not optional). */
  readonly tls: TlsClientSpec;
  /** One connect plus TLS handshake, and the wait for a WELCOME of a resume (default 10 000 ms). */
  readonly connectTimeoutMs?: number;
  /** The wait for the WELCOME of a new connection, which the exit sends once it reached its QEMU (default 2 × connectTimeoutMs). */
  readonly welcomeTimeoutMs?: number;
  /** Backoff between reconnection attempts: from `initialMs`, doubled up to `maxMs` (default 50 → 1000 ms). */
  readonly backoff?: { readonly initialMs?: number; readonly maxMs?: number };
}

/** One hop connection the dialer keeps up. */
export interface DialedLink {
  readonly link: ResumableLink;
  /** The tunnel-wide number of the connection (the order the exit connects onward in). */
  readonly connection: number;
  readonly role: HopRole;
  /** Called with every new hop socket (TCP, before TLS) to tune it, and with the TLS socket once secure. */
  readonly tune: (raw: net.Socket) => void;
  /** A connection attempt failed (the dialer retries while the link lives). */
  readonly attemptFailed?: (e: TransportError) => void;
  /** The exit's answer was the end of the link (unknown / refused): the link is closed with `hop-refused`. */
  readonly refused?: (status: WelcomeStatus) => void;
}

export class HopDialer {
  /** This entry's tunnel id: the exit's key to its connections. */
  readonly tunnel: Buffer = randomBytes(16);
  private chain: Promise<void> = Promise.resolve();
  private readonly connectTimeoutMs: number;
  private readonly welcomeTimeoutMs: number;
  private readonly initialBackoffMs: number;
  private readonly maxBackoffMs: number;
  private closed = false;
  private readonly dialing = new Set<net.Socket>();

  constructor(private readonly opts: HopDialerOptions) {
    this.connectTimeoutMs = opts.connectTimeoutMs ?? 10_000;
    this.welcomeTimeoutMs = opts.welcomeTimeoutMs ?? 2 * this.connectTimeoutMs;
    this.initialBackoffMs = opts.backoff?.initialMs ?? 50;
    this.maxBackoffMs = opts.backoff?.maxMs ?? 1000;
  }

  /** Where hop connections go. */
  get to(): string {
    return formatEndpoint(this.opts.to);
  }

  /**
   * Opens the hop connection of a new local connection, after the previous
   * new one was welcomed, and keeps it up: on every 'down' of the link it
   * reconnects with backoff.
   */
  open(d: DialedLink): void {
    let welcomed = false;
    let reconnecting = false;
    const keepUp = async (): Promise<void> => {
      welcomed = await this.establish(d, welcomed);
    };
    d.link.on('down', () => {
      if (reconnecting || this.closed) return;
      reconnecting = true;
      void keepUp().finally(() => (reconnecting = false));
    });
    const first = this.chain.then(keepUp);
    this.chain = first.catch(noop);
  }

  /** Stops every attempt under way. */
  close(): void {
    this.closed = true;
    for (const s of this.dialing) s.destroy();
    this.dialing.clear();
  }

  /** Tries until the link has a hop socket again, or is over. Returns whether it was ever welcomed. */
  private async establish(d: DialedLink, welcomedBefore: boolean): Promise<boolean> {
    let delay = this.initialBackoffMs;
    for (;;) {
      if (this.closed || d.link.done) return welcomedBefore;
      let socket: HopSocket | undefined;
      try {
        const c = await connect(this.opts.to, {
          timeoutMs: this.connectTimeoutMs,
          role: d.link.name,
          tls: this.opts.tls,
          beforeHandshake: (raw) => {
            this.dialing.add(raw);
            raw.once('close', () => this.dialing.delete(raw));
            d.tune(raw);
          },
        });
        socket = c.socket;
        if (this.closed || d.link.done) {
          socket.destroy();
          return welcomedBefore;
        }
        socket.write(encodeHello({ resume: welcomedBefore, tunnel: this.tunnel, connection: d.connection, role: d.role, received: d.link.receivedSeq }));
        const first = await readFirstFrame(socket, welcomedBefore ? this.connectTimeoutMs : this.welcomeTimeoutMs, d.link.name);
        if (first.frame.type !== 'welcome') throw new TransportError('hop-protocol', `the exit answered a HELLO with ${first.frame.type.toUpperCase()}`, { channel: d.link.name });
        const status = first.frame.status;
        if (status === 'unknown' || status === 'refused') {
          socket.destroy();
          d.refused?.(status);
          d.link.close(
            new TransportError(
              'hop-refused',
              status === 'refused' ? 'the exit could not connect to its QEMU for this connection' : 'the exit no longer knows this connection (its outage limit passed, or it restarted)',
              { channel: d.link.name },
            ),
          );
          return true;
        }
        if (this.closed || d.link.done) {
          socket.destroy();
          return true;
        }
        d.link.attach(socket, first.frame.received, first.decoder, first.rest);
        return true;
      } catch (e) {
        socket?.destroy();
        const err = e instanceof TransportError ? e : new TransportError('closed', String(e), { channel: d.link.name });
        if (this.closed || d.link.done) return welcomedBefore;
        d.attemptFailed?.(err);
      }
      // Backoff with jitter, bounded by the link's own outage limit (it ends the loop through `done`).
      await sleepUnlessDone(d.link, delay * (0.75 + Math.random() * 0.5));
      delay = Math.min(this.maxBackoffMs, delay * 2);
    }
  }
}

function sleepUnlessDone(link: ResumableLink, ms: number): Promise<void> {
  return new Promise((resolve) => {
    const t = setTimeout(done, ms);
    function done(): void {
      clearTimeout(t);
      link.off('done', done);
      resolve();
    }
    link.once('done', done);
  });
}

// ---------------------------------------------------------------------------
// The exit's side
// ---------------------------------------------------------------------------

export interface HopAcceptorOptions {
  readonly listen: Endpoint;
  /** Server credentials; a client certificate chaining to the CA is required. */
  readonly tls: { readonly material: TlsMaterial; readonly settings: TlsSettings };
  /** The TLS handshake, then the HELLO, each within this (default 10 000 ms). */
  readonly qualifyTimeoutMs?: number;
  /** Connections waiting to qualify at once (default 16; the oldest makes room). */
  readonly maxPendingConnections?: number;
  /** Accept only entries whose certificate names one of these (tls-authz). */
  readonly allowedPeers?: readonly string[];
  /** A qualified hop connection: its HELLO, with the socket paused right after it. */
  readonly hello: (hello: HelloFrame, socket: tls.TLSSocket, raw: net.Socket, first: FirstFrame) => void;
  readonly stranger: (ev: StrangerEvent) => void;
}

/** A HELLO as a connection's first bytes: 'yes' once one is whole, 'more' on a prefix of one. */
export function judgeHello(seen: Buffer): FirstBytesJudgement {
  let frames: HopFrame[];
  try {
    frames = new HopFrameDecoder().push(seen);
  } catch (e) {
    return { verdict: 'no', reason: 'not-migration', error: new TransportError('not-a-migration-channel', `first bytes ${describeBytes(seen)} are not a tunnel HELLO (${(e as Error).message})`, { cause: e }) };
  }
  if (frames.length === 0) return { verdict: 'more' };
  if (frames[0]!.type === 'hello') return { verdict: 'yes' };
  return { verdict: 'no', reason: 'not-migration', error: new TransportError('not-a-migration-channel', `first bytes ${describeBytes(seen)} are not a tunnel HELLO`) };
}

export class HopAcceptor {
  private readonly admission: Admission;
  private closed = false;

  private constructor(
    private readonly listening: Listening,
    private readonly opts: HopAcceptorOptions,
    private readonly qualifyMs: number,
  ) {
    this.admission = new Admission(
      {
        offer: () => 'main',
        judge: () => judgeHello,
        take: (_role, s, raw) => {
          if (this.closed) return false;
          void this.handshake(s as tls.TLSSocket, raw);
          return true;
        },
      },
      {
        maxPending: opts.maxPendingConnections ?? 16,
        qualifyMs,
        ...(opts.allowedPeers ? { allowedPeers: opts.allowedPeers } : {}),
        stranger: (ev) => opts.stranger(ev),
      },
    );
    this.admission.wire(listening.server, true);
  }

  static async start(opts: HopAcceptorOptions): Promise<HopAcceptor> {
    const qualifyMs = opts.qualifyTimeoutMs ?? 10_000;
    const listening = await listen(opts.listen, { tls: { ...opts.tls, handshakeTimeoutMs: qualifyMs } });
    return new HopAcceptor(listening, opts, qualifyMs);
  }

  /** Where the entry connects (the bound port when 0 was asked). */
  get uri(): string {
    return formatEndpoint(this.listening.endpoint);
  }

  get pendingConnections(): number {
    return this.admission.size;
  }

  async close(): Promise<void> {
    this.closed = true;
    this.admission.close();
    await this.listening.close();
  }

  private async handshake(s: tls.TLSSocket, raw: net.Socket): Promise<void> {
    let first: FirstFrame;
    try {
      // The HELLO is whole in the socket already (admission peeked at it).
      first = await readFirstFrame(s, this.qualifyMs);
    } catch {
      return;
    }
    if (this.closed || first.frame.type !== 'hello') {
      s.destroy();
      return;
    }
    this.opts.hello(first.frame, s, raw, first);
  }
}

/** Writes the exit's answer to a HELLO. */
export function sendWelcome(socket: HopSocket, status: WelcomeStatus, received: number): void {
  socket.write(encodeWelcome({ status, received }));
}
