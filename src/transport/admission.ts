/**
 * Admission of accepted connections (the rules are in qualify.ts): each
 * connection waits as a candidate for the role its owner offers it until it
 * qualifies — a TLS handshake with a valid certificate, then, where the role
 * asks for it, first bytes of the right kind (peeked, never consumed) — or is
 * dropped and reported as a stranger. Used by MigrationListener (the
 * destination) and the tap, on a server made by sockets.ts `listen()`. The
 * offered role is where the judging starts; the bytes may name another (a
 * multifd listener offers 'main' and its judge answers 'multifd' with the
 * channel's id), and that is the role taken.
 *
 * Bounds: at most `maxPending` candidates (at the bound the oldest makes
 * room: reason 'too-many'); each has `qualifyMs` (with TLS: for the
 * handshake, then again for the first bytes). A silent plain-TCP preempt
 * candidate that reaches its limit is dropped ('timeout') only when a newer
 * candidate waits: the real preempt channel speaks only with its first urgent
 * page, so the newest silent one (the real channel is opened right before the
 * switchover; a stranger usually came earlier) keeps waiting for it.
 */
import type net from 'node:net';
import type tls from 'node:tls';
import { channelName, classifySocketError, type ChannelRole } from './channel.js';
import { TransportError } from './errors.js';
import { judgeMainStart, judgePreemptStart, type ChannelStart, type StrangerEvent, type StrangerReason } from './qualify.js';
import { checkAllowedPeer, classifyTlsError } from './tls.js';

/**
 * What the first bytes of a candidate are: a channel, not one (with why), or
 * undecided. A 'yes' may name the role the bytes show (a multifd channel's
 * init message, offered as main: the two are told apart by their bytes alone).
 */
export type FirstBytesJudgement =
  | { verdict: 'yes'; role?: ChannelRole; channelId?: number }
  | { verdict: 'more' }
  | { verdict: 'no'; reason: StrangerReason; error: TransportError };

/** How the owner of the admission decides roles. */
export interface AdmissionPolicy {
  /** The role a connection accepted now may get; undefined when every role is taken (it is refused, 'extra'). */
  offer(): ChannelRole | undefined;
  /** How a candidate for `role` qualifies once its TLS handshake (if any) is done: at once, or by its first bytes. */
  judge(role: ChannelRole, secure: boolean): ((seen: Buffer) => FirstBytesJudgement) | undefined;
  /**
   * A candidate qualified (as `role`: the offered one, or the one its bytes
   * showed; `channelId`: a multifd channel's id). Return false when its role
   * was taken meanwhile: it is then dropped and reported ('extra'). The
   * socket is the TLS socket when there is one; `raw` is the TCP/unix socket
   * under it.
   */
  take(role: ChannelRole, socket: net.Socket | tls.TLSSocket, raw: net.Socket, channelId?: number): boolean;
}

export interface AdmissionOptions {
  readonly maxPending: number;
  readonly qualifyMs: number;
  /** Accept only TLS peers whose certificate carries one of these names (tls-authz). */
  readonly allowedPeers?: readonly string[];
  /** A candidate was dropped. */
  readonly stranger: (ev: StrangerEvent) => void;
}

/** A connection waiting to qualify. */
interface Candidate {
  readonly raw: net.Socket;
  /** The TLS socket over `raw`, once its handshake succeeded. */
  secure?: tls.TLSSocket;
  readonly role: ChannelRole;
  readonly remote: string | undefined;
  timer?: NodeJS.Timeout;
  /** A silent preempt candidate past its limit, kept while it is the newest (see the file comment). */
  expired?: boolean;
  /** Its role went to another connection: dropped at the next turn unless its bytes say more first (see dropAll). */
  doomed?: boolean;
  /** Removes the listeners the first-bytes wait installed. */
  unwatch?: () => void;
  /** Our listeners on the raw socket, removed when it qualifies (Node's own must stay). */
  readonly onRawClose: () => void;
}

const ignoreError = (): void => undefined;

/** `HOST:PORT` of a TCP peer (IPv6 in brackets), undefined on a unix socket. */
export function remoteOf(s: net.Socket): string | undefined {
  return s.remoteAddress ? `${s.remoteAddress.includes(':') ? `[${s.remoteAddress}]` : s.remoteAddress}:${s.remotePort}` : undefined;
}

/** The first bytes of a connection, for a log line: hex, and the text when it is printable. */
export function describeBytes(b: Buffer): string {
  const head = b.subarray(0, 8);
  const text = head.toString('latin1');
  const printable = /^[\x20-\x7e]*$/.test(text) ? ` ("${text}")` : '';
  const hint = head[0] === 0x16 ? ' (a TLS ClientHello: the peer uses TLS, this listener does not)' : '';
  return `${head.toString('hex').replace(/(..)(?!$)/g, '$1 ')}${printable}${hint}`;
}

/** TLSSocket of a tls.Server: the raw socket under it is Node's long-standing `_parent`. */
function rawUnder(s: tls.TLSSocket): net.Socket | undefined {
  return (s as tls.TLSSocket & { _parent?: net.Socket })._parent;
}

/** The candidates of one server. `wire(server, secure)` once; `dropAll` when a role was taken; `close()` at the end. */
export class Admission {
  private readonly pending = new Set<Candidate>();
  private closing = false;

  constructor(
    private readonly policy: AdmissionPolicy,
    private readonly opts: AdmissionOptions,
  ) {}

  /** Connections waiting to qualify right now. */
  get size(): number {
    return this.pending.size;
  }

  /** Candidates for `role` waiting right now (not those about to be dropped). */
  count(role: ChannelRole): number {
    let n = 0;
    for (const c of this.pending) if (c.role === role && !c.doomed) n++;
    return n;
  }

  /** Takes the server's connections (a tls.Server when `secure`). */
  wire(server: net.Server, secure: boolean): void {
    // tls.Server emits 'connection' with the raw socket before it starts the handshake.
    server.on('connection', (raw: net.Socket) => this.admit(raw, secure));
    if (secure) {
      server.on('secureConnection', (s: tls.TLSSocket) => this.secured(s));
      server.on('tlsClientError', (e: Error, s: tls.TLSSocket) => {
        // The verification result is on the socket: the error alone is often just "socket hang up".
        // A TLSSocket counts decrypted bytes only; the raw socket under it tells a client that sent
        // its hello and hung up (it refused our certificate) from one that never spoke.
        const raw = rawUnder(s);
        const c = this.candidateOf(raw);
        s.destroy();
        if (!c) return; // already dropped (timed out, or closing)
        if ((e as { code?: string }).code === 'ERR_TLS_HANDSHAKE_TIMEOUT') {
          this.drop(c, 'timeout', new TransportError('qualify-timeout', `no TLS handshake within ${this.opts.qualifyMs} ms`, { channel: c.role, cause: e }));
          return;
        }
        this.drop(c, 'tls', classifyTlsError(e, c.role, { side: 'server', socket: s, rawBytesRead: raw?.bytesRead ?? 0 }));
      });
    }
    // Accept errors (EMFILE …) cost one connection, not the migration.
    server.on('error', (e) => this.report({ reason: 'closed', error: classifySocketError(e) }));
  }

  /**
   * Drops every waiting candidate as 'extra' (a role went to another
   * connection) — after one turn of the event loop: bytes that arrived with
   * the winner's (an HTTP request in the same instant) are judged first, so
   * the report names them ('not-migration') rather than 'extra'. Meanwhile
   * they can no longer take a role (see qualified()).
   */
  dropAll(why: string): void {
    const doomed = [...this.pending];
    if (doomed.length === 0) return;
    for (const c of doomed) c.doomed = true;
    setImmediate(() => {
      for (const c of doomed) this.drop(c, 'extra', new TransportError('channel-order', why));
    });
  }

  /** Drops every candidate without reporting them; later connections are destroyed at once. */
  close(): void {
    if (this.closing) return;
    this.closing = true;
    for (const c of [...this.pending]) {
      this.forget(c);
      if (c.secure) c.secure.destroy();
      else c.raw.destroy();
    }
  }

  private candidateOf(raw: net.Socket | undefined): Candidate | undefined {
    for (const c of this.pending) if (c.raw === raw) return c;
    return undefined;
  }

  /** A TCP/unix connection arrived: it waits to qualify, within the bounds. */
  private admit(raw: net.Socket, secure: boolean): void {
    const remote = remoteOf(raw);
    if (this.closing) {
      raw.destroy();
      return;
    }
    const role = this.policy.offer();
    if (!role) {
      raw.destroy();
      this.report({ reason: 'extra', error: new TransportError('channel-order', 'a connection after every channel of this migration had arrived'), ...(remote ? { remote } : {}) });
      return;
    }
    if (this.pending.size >= this.opts.maxPending) {
      // Make room by dropping the oldest candidate: a real source's channel qualifies within
      // milliseconds (or, a silent preempt channel, is the newest), so silent connections
      // cannot hold the port and a flood must outpace the real source to matter.
      const oldest = this.pending.values().next().value as Candidate;
      this.drop(oldest, 'too-many', new TransportError('too-many-connections', `${this.pending.size} connections were already waiting to qualify (maxPendingConnections)`, oldest.role === 'preempt' ? { channel: 'preempt' } : {}));
    }
    const c: Candidate = {
      raw,
      role,
      remote,
      onRawClose: () => {
        const closed = (): void => {
          if (this.pending.has(c)) this.drop(c, 'closed', new TransportError('closed', 'the connection closed before it was a migration channel', role === 'preempt' ? { channel: 'preempt' } : {}));
        };
        // With TLS, 'tlsClientError' may follow the close and knows better why: let it come first.
        if (secure) setImmediate(closed);
        else closed();
      },
    };
    this.pending.add(c);
    raw.on('error', ignoreError); // reported as its close
    raw.once('close', c.onRawClose);
    if (secure) return; // the handshake comes first (tls.Server's handshakeTimeout bounds it): see secured()
    this.startTimer(c);
    this.awaitFirstBytes(c, raw);
  }

  /** A TLS handshake succeeded with a valid client certificate. */
  private secured(s: tls.TLSSocket): void {
    const raw = rawUnder(s);
    const c = this.candidateOf(raw);
    if (!c || this.closing) {
      s.destroy();
      return;
    }
    c.secure = s;
    s.on('error', ignoreError); // reported as the raw socket's close
    const notAllowed = checkAllowedPeer(s, this.opts.allowedPeers, c.role);
    if (notAllowed) {
      this.drop(c, 'tls', notAllowed);
      return;
    }
    this.startTimer(c);
    this.awaitFirstBytes(c, s);
  }

  private startTimer(c: Candidate): void {
    c.timer = setTimeout(() => this.expire(c), this.opts.qualifyMs);
  }

  private expire(c: Candidate): void {
    if (!this.pending.has(c)) return;
    const error = (): TransportError => new TransportError('qualify-timeout', `no migration stream within ${this.opts.qualifyMs} ms of connecting`, c.role === 'preempt' ? { channel: 'preempt' } : {});
    if (c.role !== 'preempt' || c.secure) {
      this.drop(c, 'timeout', error());
      return;
    }
    // A silent plain-TCP preempt candidate: dropped unless it is the newest (see the file comment).
    c.expired = true;
    let newest: Candidate | undefined;
    for (const p of this.pending) newest = p;
    for (const p of [...this.pending]) if (p.expired && p !== newest) this.drop(p, 'timeout', error());
  }

  /** Peeks at the first bytes (they stay in the socket for the channel's reader) and judges them. */
  private awaitFirstBytes(c: Candidate, s: net.Socket | tls.TLSSocket): void {
    const judge = this.policy.judge(c.role, c.secure !== undefined);
    if (!judge) {
      this.qualified(c, s);
      return;
    }
    let seen: Buffer = Buffer.alloc(0);
    const onReadable = (): void => {
      for (let chunk: Buffer | null; (chunk = s.read() as Buffer | null) !== null; ) seen = seen.length === 0 ? chunk : Buffer.concat([seen, chunk]);
      const j = judge(seen);
      if (j.verdict === 'more') return;
      c.unwatch?.();
      // Handing the bytes back: the channel's reader sees the stream from its first byte.
      if (seen.length > 0) s.unshift(seen);
      if (j.verdict === 'yes') this.qualified(c, s, j.role, j.channelId);
      else this.drop(c, j.reason, j.error);
    };
    s.on('readable', onReadable);
    c.unwatch = () => s.off('readable', onReadable);
  }

  private qualified(c: Candidate, s: net.Socket | tls.TLSSocket, judged?: ChannelRole, channelId?: number): void {
    const role = judged ?? c.role;
    this.forget(c);
    s.off('error', ignoreError);
    c.raw.off('error', ignoreError);
    c.raw.off('close', c.onRawClose);
    if (this.closing) {
      s.destroy();
      return;
    }
    if (c.doomed || !this.policy.take(role, s, c.raw, channelId)) {
      // Its role went to another connection meanwhile: a stranger like any other, reported.
      s.on('error', ignoreError);
      s.destroy();
      const name = channelName(role, channelId);
      this.report({
        reason: 'extra',
        error: new TransportError('channel-order', `the ${name} channel was taken by another connection before this one qualified`, { channel: name }),
        ...(c.remote ? { remote: c.remote } : {}),
      });
    }
  }

  /** Stops waiting for `c` without touching its sockets. */
  private forget(c: Candidate): void {
    this.pending.delete(c);
    clearTimeout(c.timer);
    c.unwatch?.();
  }

  /** Drops a connection that did not qualify, and reports it. */
  private drop(c: Candidate, reason: StrangerReason, error: TransportError): void {
    if (!this.pending.has(c)) return;
    this.forget(c);
    // Through the TLS socket when there is one: destroying the raw socket under a live TLS
    // socket first crashes Node 20 (see secureAccept).
    if (c.secure) c.secure.destroy();
    else c.raw.destroy();
    this.report({ reason, error, ...(c.remote ? { remote: c.remote } : {}) });
  }

  private report(ev: StrangerEvent): void {
    if (this.closing) return;
    this.opts.stranger(ev);
  }
}

/**
 * The first-bytes judge of a main or a (plain TCP) preempt candidate without
 * multifd, by qualify.ts's rules: shared by the listener of one thread and
 * the threaded one, so that both refuse the same bytes with the same errors.
 */
export function judgeMainOrPreempt(role: 'main' | 'preempt', start: Exclude<ChannelStart, 'any'>): (seen: Buffer) => FirstBytesJudgement {
  if (role === 'main') {
    return (seen) => {
      const verdict = judgeMainStart(start, seen);
      if (verdict !== 'no') return { verdict };
      const what = start === 'stream' ? 'the migration stream magic QEVM' : 'a postcopy-recovery command';
      return { verdict, reason: 'not-migration', error: new TransportError('not-a-migration-channel', `first bytes ${describeBytes(seen)} are not ${what}`) };
    };
  }
  return (seen) => {
    const verdict = judgePreemptStart(seen);
    if (verdict !== 'no') return { verdict };
    if (judgeMainStart('resume', seen) === 'yes') {
      return {
        verdict,
        reason: 'recovery',
        error: new TransportError('not-a-migration-channel', `a postcopy-recovery connection (first bytes ${describeBytes(seen)}) while the migration's connection stands`, { channel: 'preempt' }),
      };
    }
    return { verdict, reason: 'not-migration', error: new TransportError('not-a-migration-channel', `first bytes ${describeBytes(seen)} are not a RAM page record (the preempt channel)`, { channel: 'preempt' }) };
  };
}
