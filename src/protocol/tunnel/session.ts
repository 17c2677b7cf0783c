/**
 * What both ends of a tunnel share: sessions (one per QEMU main connection,
 * with its preempt and multifd connections), how a connection after the main
 * one learns its role, the tap's parser fed with the bytes each end exchanges
 * with its QEMU, and the reports and events built from it.
 *
 * Roles: the first connection of a session is the main channel (the entry
 * takes a connection as main when no main connection is open; the exit is told
 * by the HELLO). A later one is the preempt channel unless its first bytes are
 * the multifd magic, as the tap decides: the preempt channel is silent until
 * its first urgent page, so it is tuned as urgent from the start, and a
 * multifd channel is tuned again as bulk once its magic shows. Both ends
 * decide from the same bytes.
 */
import { EventEmitter } from 'node:events';
import type net from 'node:net';
import { performance } from 'node:perf_hooks';
import type { StreamError } from '../../stream/errors.js';
import { MULTIFD_MAGIC } from '../../stream/multifd.js';
import type { Endpoint } from '../../transport/endpoint.js';
import type { TransportError } from '../../transport/errors.js';
import type { StrangerEvent } from '../../transport/qualify.js';
import type { ResumableLink, ResumableLinkStats } from '../../transport/resumable.js';
import type { HopSocket } from '../../transport/resumable.js';
import { tuneChannel, type ChannelTuningOptions } from '../../transport/sockets.js';
import type { EffectiveTuning } from '../../transport/tuning.js';
import { MigrationAnalysis, type AnalysisReport, type Milestone, type PageAnsweredEvent, type PageRequestEvent, type TapDirection } from '../tap/analysis.js';

export type TunnelEndKind = 'entry' | 'exit';
export type TunnelRole = 'main' | 'preempt' | 'multifd';

/** One QEMU connection through the tunnel, as one end saw it. Times in ms after the session started. */
export interface TunnelConnectionReport {
  /** Tunnel-wide number, in the order the entry accepted the connections (and the exit connected onward). */
  connection: number;
  role: TunnelRole;
  /** Multifd: its number in the session's analysis (MultifdChannelReport.connection). */
  multifdConnection?: number;
  acceptedMs: number;
  /** The link ended (both directions ended and acknowledged, or given up); null while open. */
  closedMs: number | null;
  /** How it ended (null while open): `code` of the failure when not ok (`outage-timeout`, `reset`, `hop-refused` …). */
  outcome: { ok: boolean; code?: string; message?: string } | null;
  /** Null for a connection the exit could not connect onward (refused before any hop traffic). */
  hop: ResumableLinkStats | null;
  /** Socket options read back: of the current hop socket (null before the first) and of the QEMU-side socket. */
  tuning: { hop: EffectiveTuning | null; local: EffectiveTuning | null };
}

/** Hop figures summed over connections. */
export interface TunnelHopTotals {
  connections: number;
  outages: number;
  outageMs: number;
  longestOutageMs: number;
  replayedBytes: number;
  /** Hop sockets beyond the first of each connection: reconnections that succeeded. */
  reconnections: number;
  /** Connections whose hop was given up (outage limit, refused), so that QEMU's own recovery takes over. */
  gaveUp: number;
}

/** The report of one session at one end. */
export interface TunnelSessionReport extends Omit<AnalysisReport, 'forwardDelay' | 'forwardDelayUnqueued' | 'backpressure' | 'analysisPerChunk'> {
  session: number;
  state: 'running' | 'ended';
  startedAt: string;
  durationMs: number;
  connections: TunnelConnectionReport[];
  hop: TunnelHopTotals;
}

/** The report of one end: every session so far. */
export interface TunnelReport {
  end: TunnelEndKind;
  /** Where this end listens, and where it connects. */
  listen: string;
  to: string;
  sessions: TunnelSessionReport[];
  hop: TunnelHopTotals;
  /** Exit: connections dropped before they were hop connections (none at the entry). */
  strangers: { count: number; latest: StrangerEvent[] };
}

export interface TunnelConnectionEvent {
  session: number;
  connection: number;
  role: TunnelRole;
}

export interface TunnelEvents {
  /** A main connection: a new session. */
  session: [{ session: number }];
  /** A connection crosses the hop (its first hop socket is up). */
  connection: [TunnelConnectionEvent];
  /** A hop socket failed; the connection waits for a new one (QEMU sees a delay). */
  down: [TunnelConnectionEvent & { error: TransportError }];
  /** A hop socket came back after an outage: `replayedBytes` sent again. */
  resumed: [TunnelConnectionEvent & { hopConnection: number; outageMs: number; replayedBytes: number }];
  /** A connection ended; `ok` false: its QEMU-side connection was closed (outage limit, reset, refused). */
  closed: [TunnelConnectionEvent & { ok: boolean; error?: TransportError }];
  /** A connection's role showed in its first bytes (multifd instead of preempt). */
  role: [TunnelConnectionEvent];
  milestone: [{ session: number; name: Milestone; atMs: number }];
  'page-request': [PageRequestEvent & { session: number }];
  'page-answered': [PageAnsweredEvent & { session: number }];
  'parse-error': [{ session: number; direction: TapDirection; error: StreamError; channel?: number }];
  /** Every connection of the session has ended: its final report. */
  'session-end': [TunnelSessionReport];
  /** Exit: a connection that was not a hop connection was dropped. */
  stranger: [StrangerEvent];
  /** A hop connection attempt failed (the entry retries). Emitted only when listened to. */
  error: [TransportError];
}

const MAGIC = [MULTIFD_MAGIC >>> 24, (MULTIFD_MAGIC >>> 16) & 0xff, (MULTIFD_MAGIC >>> 8) & 0xff, MULTIFD_MAGIC & 0xff];

/** Whether bytes begin with the multifd magic: 'yes', 'no', or 'more' (a prefix of it). */
export function multifdMagic(b: Uint8Array): 'yes' | 'no' | 'more' {
  const n = Math.min(b.length, 4);
  for (let i = 0; i < n; i++) if (b[i] !== MAGIC[i]) return 'no';
  return n === 4 ? 'yes' : 'more';
}

function round3(x: number): number {
  return Math.round(x * 1000) / 1000;
}

/** One QEMU connection of a session at one end. */
export class TunnelConnection {
  role: TunnelRole;
  /** A secondary connection whose first bytes have not decided its role yet. */
  classified: boolean;
  private head: Buffer[] = [];
  multifd = -1;
  link: ResumableLink | undefined;
  hopTuning: EffectiveTuning | null = null;
  localTuning: EffectiveTuning | null = null;
  closedAt: number | undefined;
  outcome: TunnelConnectionReport['outcome'] = null;
  hopSocket: HopSocket | undefined;
  /** The QEMU-side socket. */
  local: net.Socket | undefined;
  readonly acceptedAt = performance.now();

  constructor(
    readonly session: TunnelSession,
    readonly connection: number,
    main: boolean,
  ) {
    this.role = main ? 'main' : 'preempt';
    this.classified = main;
  }

  get event(): TunnelConnectionEvent {
    return { session: this.session.id, connection: this.connection, role: this.role };
  }

  /** Source → destination bytes (entry: read from QEMU; exit: written to QEMU). */
  forward(c: Buffer, t: number): void {
    if (!this.classified) {
      this.head.push(c);
      const verdict = multifdMagic(this.head.length === 1 ? c : Buffer.concat(this.head));
      if (verdict === 'more') return;
      this.classify(verdict === 'yes' ? 'multifd' : 'preempt');
      for (const h of this.head.splice(0)) this.session.push(this, true, h, t);
      return;
    }
    this.session.push(this, true, c, t);
  }

  /** Destination → source bytes. */
  reverse(c: Buffer, t: number): void {
    this.session.push(this, false, c, t);
  }

  private classify(role: 'preempt' | 'multifd'): void {
    this.classified = true;
    this.role = role;
    if (role === 'multifd') {
      this.multifd = this.session.analysis.multifdConnected();
      this.session.owner.retune(this);
      this.session.owner.emit('role', this.event);
    } else {
      this.session.analysis.preemptConnected();
    }
  }

  /** The link ended. */
  ended(ok: boolean, error?: TransportError): void {
    if (this.closedAt !== undefined) return;
    // A connection that ended inside what could be the multifd magic was one (a truncated one).
    if (!this.classified && this.head.length > 0) this.classify('multifd');
    const t = performance.now();
    if (this.role === 'multifd') this.session.analysis.multifdEnded(this.multifd, t);
    this.closedAt = t;
    this.outcome = ok ? { ok } : { ok, ...(error ? { code: error.code, message: error.message } : {}) };
    this.session.connectionEnded();
  }

  report(): TunnelConnectionReport {
    const s = this.session;
    return {
      connection: this.connection,
      role: this.role,
      ...(this.role === 'multifd' ? { multifdConnection: this.multifd } : {}),
      acceptedMs: s.rel(this.acceptedAt),
      closedMs: this.closedAt === undefined ? null : s.rel(this.closedAt),
      outcome: this.outcome,
      hop: this.link ? this.link.stats() : null,
      tuning: { hop: this.hopTuning, local: this.localTuning },
    };
  }
}

/** One session (a main connection and those after it) at one end. */
export class TunnelSession {
  readonly startedAt = new Date();
  readonly t0 = performance.now();
  readonly analysis: MigrationAnalysis;
  readonly connections: TunnelConnection[] = [];
  endedAt: number | undefined;

  constructor(
    readonly owner: TunnelEnd,
    readonly id: number,
    previous: TunnelSession | undefined,
  ) {
    const session = id;
    this.analysis = new MigrationAnalysis({
      t0: this.t0,
      ...(previous ? { previous: previous.analysis } : {}),
      hooks: {
        parseError: (direction, error, channel) => owner.emit('parse-error', { session, direction, error, ...(channel === undefined ? {} : { channel }) }),
        milestone: (name, atMs) => owner.emit('milestone', { session, name, atMs }),
        pageRequest: (r) => owner.listenerCount('page-request') > 0 && owner.emit('page-request', { ...r, session }),
        pageAnswered: (a) => owner.listenerCount('page-answered') > 0 && owner.emit('page-answered', { ...a, session }),
      },
    });
  }

  get ended(): boolean {
    return this.endedAt !== undefined;
  }

  get main(): TunnelConnection | undefined {
    return this.connections[0];
  }

  /** The main connection is still open: later connections belong to this session. */
  get open(): boolean {
    const m = this.main;
    return m !== undefined && m.closedAt === undefined;
  }

  rel(t: number): number {
    return round3(t - this.t0);
  }

  add(connection: number): TunnelConnection {
    const c = new TunnelConnection(this, connection, this.connections.length === 0);
    this.connections.push(c);
    return c;
  }

  push(c: TunnelConnection, forward: boolean, chunk: Buffer, t: number): void {
    this.analysis.push(direction(c.role, forward), chunk, t, c.multifd);
  }

  connectionEnded(): void {
    if (this.ended || !this.connections.every((c) => c.closedAt !== undefined)) return;
    this.endedAt = performance.now();
    // Keep what a postcopy recovery (the next main connection) continues from; drop the rest.
    if (!this.analysis.resumable) this.analysis.release();
    this.owner.emit('session-end', this.report());
  }

  report(): TunnelSessionReport {
    const { forwardDelay: _f, forwardDelayUnqueued: _u, backpressure: _b, analysisPerChunk: _a, ...a } = this.analysis.report();
    const connections = this.connections.map((c) => c.report());
    const now = this.endedAt ?? performance.now();
    return {
      session: this.id,
      state: this.ended ? 'ended' : 'running',
      startedAt: this.startedAt.toISOString(),
      durationMs: round3(now - this.t0),
      ...a,
      connections,
      hop: hopTotals(connections),
    };
  }
}

export function hopTotals(connections: readonly TunnelConnectionReport[]): TunnelHopTotals {
  const t: TunnelHopTotals = { connections: connections.length, outages: 0, outageMs: 0, longestOutageMs: 0, replayedBytes: 0, reconnections: 0, gaveUp: 0 };
  for (const c of connections) {
    if (c.outcome && !c.outcome.ok) t.gaveUp++;
    const h = c.hop;
    if (!h) continue;
    t.outages += h.outages;
    t.outageMs += h.outageMs;
    t.longestOutageMs = Math.max(t.longestOutageMs, h.longestOutageMs);
    t.replayedBytes += h.replayedBytes;
    t.reconnections += Math.max(0, h.hopConnections - 1);
  }
  return t;
}

function direction(role: TunnelRole, forward: boolean): TapDirection {
  if (role === 'main') return forward ? 'main' : 'return-path';
  if (role === 'preempt') return forward ? 'preempt' : 'preempt-reverse';
  return forward ? 'multifd' : 'multifd-reverse';
}

const MAX_STRANGERS_KEPT = 100;

/** What the entry and the exit have in common: sessions, events, reports, tuning. */
export abstract class TunnelEnd extends EventEmitter<TunnelEvents> {
  protected readonly sessions: TunnelSession[] = [];
  private readonly endWaiters: Array<{ session: number; resolve: (r: TunnelSessionReport) => void }> = [];
  private strangerCount = 0;
  private readonly strangerEvents: StrangerEvent[] = [];

  protected constructor(
    readonly end: TunnelEndKind,
    protected readonly side: 'source' | 'destination',
    protected readonly tuning: ChannelTuningOptions,
  ) {
    super();
    this.on('session-end', (r) => {
      for (let i = this.endWaiters.length - 1; i >= 0; i--) {
        const w = this.endWaiters[i]!;
        if (w.session === r.session) {
          this.endWaiters.splice(i, 1);
          w.resolve(r);
        }
      }
    });
  }

  /** Where this end listens (the bound port when 0 was asked). */
  abstract get uri(): string;
  /** Where this end connects. */
  abstract get to(): string;

  /** A new session (its main connection is the next one added). */
  protected newSession(previous: TunnelSession | undefined): TunnelSession {
    const s = new TunnelSession(this, this.sessions.length + 1, previous);
    this.sessions.push(s);
    this.emit('session', { session: s.id });
    return s;
  }

  /** Wires a connection's link to the events and the analysis' end. */
  protected watch(c: TunnelConnection, link: ResumableLink): void {
    c.link = link;
    link.on('down', (error) => this.emit('down', { ...c.event, error }));
    link.on('up', (u) => {
      if (u.hopConnection === 1) this.emit('connection', c.event);
      else this.emit('resumed', { ...c.event, hopConnection: u.hopConnection, outageMs: u.outageMs, replayedBytes: u.replayedBytes });
    });
    link.on('done', (o) => {
      c.ended(o.ok, o.error);
      this.emit('closed', { ...c.event, ok: o.ok, ...(o.error ? { error: o.error } : {}) });
    });
  }

  /** Tunes a hop socket for the connection's role (again when it turned out to be multifd). */
  tuneHop(c: TunnelConnection, socket: net.Socket, kind: Endpoint['kind']): void {
    c.hopSocket = socket;
    c.hopTuning = tuneChannel(socket, c.role, this.side, kind, this.tuning);
  }

  tuneLocal(c: TunnelConnection, socket: net.Socket, kind: Endpoint['kind']): void {
    c.local = socket;
    c.localTuning = tuneChannel(socket, c.role, this.side, kind, this.tuning);
  }

  /** A secondary connection turned out to be multifd: bulk tuning for its sockets. */
  retune(c: TunnelConnection): void {
    if (c.hopSocket && !c.hopSocket.destroyed) this.tuneHop(c, c.hopSocket, this.hopKind);
    if (c.local && !c.local.destroyed) this.tuneLocal(c, c.local, this.localKind);
  }

  /** What the hop sockets and the QEMU-side sockets are (tuning degrades on unix sockets). */
  protected abstract get hopKind(): Endpoint['kind'];
  protected abstract get localKind(): Endpoint['kind'];

  protected stranger(ev: StrangerEvent): void {
    this.strangerCount++;
    this.strangerEvents.push(ev);
    if (this.strangerEvents.length > MAX_STRANGERS_KEPT) this.strangerEvents.shift();
    this.emit('stranger', ev);
  }

  protected attemptFailed(e: TransportError): void {
    if (this.listenerCount('error') > 0) this.emit('error', e);
  }

  /** Every session so far and the totals. */
  report(): TunnelReport {
    const sessions = this.sessions.map((s) => s.report());
    return {
      end: this.end,
      listen: this.uri,
      to: this.to,
      sessions,
      hop: hopTotals(sessions.flatMap((s) => s.connections)),
      strangers: { count: this.strangerCount, latest: [...this.strangerEvents] },
    };
  }

  /**
   * Resolves with the final report of session `session` (1-based; default:
   * the latest, or the next if none started) once all its connections ended.
   */
  sessionEnd(session?: number): Promise<TunnelSessionReport> {
    const id = session ?? Math.max(1, this.sessions.length);
    const s = this.sessions[id - 1];
    if (s?.ended) return Promise.resolve(s.report());
    return new Promise((resolve) => this.endWaiters.push({ session: id, resolve }));
  }
}
