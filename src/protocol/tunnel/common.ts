/**
 * What both ends of `qmt tunnel` share: the options of the hop, the role a
 * QEMU connection plays (for its socket tuning and the stats), the events and
 * the stats of every connection carried.
 */
import { FILE_MAGIC, RecordType } from '../../stream/constants.js';
import { MULTIFD_MAGIC } from '../../stream/multifd.js';
import type { ChannelRole } from '../../transport/channel.js';
import type { TransportError } from '../../transport/errors.js';
import type { ResumableConnection, ResumableLimits, ResumableStats } from '../../transport/resumable.js';
import { tuneChannel } from '../../transport/sockets.js';
import type { Endpoint } from '../../transport/endpoint.js';
import type { EventEmitter } from 'node:events';
import type { AnalysisReport } from '../tap/analysis.js';
import type { TunnelAnalysis } from './analysis.js';
import type net from 'node:net';
import type tls from 'node:tls';

/** The hop's limits (ResumableLimits), the same at both ends. */
export interface TunnelLimits extends ResumableLimits {
  /** Limit of one hop connect (TCP and TLS) and of waiting for the other end's handshake frame (default 5 s). */
  readonly connectTimeoutMs?: number;
}

/**
 * The role of a QEMU connection as the tunnel can tell it: by its first bytes
 * (the stream magic or a recovery command: main; the multifd magic: a
 * multifd channel; a bare page record: preempt), and by order where QEMU's
 * own TLS hides them (`tls`). 'pending' until the first bytes come: such a
 * connection is tuned as the urgent one (a preempt channel says nothing before
 * its first urgent page) and tuned again once its bytes say otherwise.
 */
export type TunnelRole = 'main' | 'preempt' | 'multifd' | 'tls' | 'pending';

export function roleOf(first: Buffer | undefined): TunnelRole {
  if (!first || first.length === 0) return 'pending';
  if (first[0] === 0x16) return 'tls'; // a TLS handshake record: QEMU's own TLS, end to end through the tunnel
  if (first.length >= 4 && first.readUInt32BE(0) === FILE_MAGIC) return 'main';
  if (first[0] === RecordType.COMMAND) return 'main'; // a recovery's main channel starts with RECV_BITMAP
  if (first.length >= 4 && first.readUInt32BE(0) === MULTIFD_MAGIC) return 'multifd';
  return 'preempt';
}

/** The socket profile of a role: bulk for main and multifd, urgent for the rest (QEMU's TLS: by order, see the tunnel). */
export function profileOf(role: TunnelRole, index: number, secondaryBulk: boolean): ChannelRole {
  if (role === 'main' || role === 'multifd') return role;
  if (role === 'tls') return index === 0 || secondaryBulk ? 'main' : 'preempt';
  return 'preempt';
}

/**
 * What a bulk connection reads in one turn of the event loop before it lets
 * the others (the preempt channel, the return path) be served: about a
 * quarter of a millisecond of TLS on these machines.
 */
export const BULK_YIELD_BYTES = 256 * 1024;

/** Tunes one of the tunnel's sockets for `role`: the hop connection and the QEMU-facing one alike. */
export function tuneFor(socket: net.Socket | tls.TLSSocket, role: ChannelRole, side: 'source' | 'destination', kind: Endpoint['kind']): void {
  tuneChannel(socket, role, side, kind);
}

/** A connection whose role is known: tuned sockets, and bulk reads that yield (see BULK_YIELD_BYTES). */
export function settleRole(c: Carried, profile: ChannelRole): void {
  c.conn.setYield(profile === 'preempt' ? undefined : BULK_YIELD_BYTES);
}

/** One QEMU connection carried by the tunnel, as its events and stats name it. */
export interface TunnelConnectionInfo {
  /** Its number in the order QEMU opened it (0, 1, …, over the tunnel's life). */
  readonly index: number;
  readonly role: TunnelRole;
}

export interface TunnelEvents {
  /** A QEMU connection crossed the hop (its first hop connection is up). */
  connection: [info: TunnelConnectionInfo];
  /** A hop connection was lost: an outage of this QEMU connection begins (QEMU sees only a delay). */
  lost: [info: TunnelConnectionInfo & { error: TransportError }];
  /** A new hop connection continues it. */
  resumed: [info: TunnelConnectionInfo & { outageMs: number; replayed: number }];
  /** Both directions delivered: the QEMU connection ended cleanly at both ends. */
  ended: [info: TunnelConnectionInfo];
  /** It failed (a QEMU side failed, the outage lasted too long, the other end refused it): both QEMU sides are closed. */
  failed: [info: TunnelConnectionInfo & { error: TransportError }];
}

export interface TunnelConnectionStats extends TunnelConnectionInfo, ResumableStats {
  readonly state: ResumableConnection['state'];
  readonly error?: string;
}

export interface TunnelStats {
  readonly connections: TunnelConnectionStats[];
  /** The migrations carried, as parsed at this end (the tap's report: pages per channel, passes, switchover, request → page latency). */
  readonly migrations: AnalysisReport[];
  /** Over every connection. */
  readonly outages: number;
  readonly replayedBytes: number;
  readonly bytesUp: number;
  readonly bytesDown: number;
}

/** One carried connection and its role as far as known. */
export interface Carried {
  readonly index: number;
  readonly conn: ResumableConnection;
  role: TunnelRole;
}

export function statsOf(all: readonly Carried[], up: (c: Carried) => number, down: (c: Carried) => number, analysis: TunnelAnalysis): TunnelStats {
  const connections = all.map((c) => ({ index: c.index, role: c.role, state: c.conn.state, ...c.conn.stats(), ...(c.conn.error ? { error: c.conn.error.describe() } : {}) }));
  return {
    connections,
    migrations: analysis.reports(),
    outages: connections.reduce((n, c) => n + c.outages, 0),
    replayedBytes: connections.reduce((n, c) => n + c.replayed, 0),
    bytesUp: all.reduce((n, c) => n + up(c), 0),
    bytesDown: all.reduce((n, c) => n + down(c), 0),
  };
}

/** Ended or failed connections kept for the stats (the latest); a long-running tunnel forgets older ones. */
export const KEEP_FINISHED = 64;

/** Drops the oldest finished connections beyond KEEP_FINISHED from `all` (in place). */
export function pruneFinished<C extends Carried>(all: C[]): void {
  let finished = all.filter((c) => c.conn.state === 'done' || c.conn.state === 'failed').length;
  for (let i = 0; i < all.length && finished > KEEP_FINISHED; ) {
    const st = all[i]!.conn.state;
    if (st === 'done' || st === 'failed') {
      all.splice(i, 1);
      finished--;
    } else i++;
  }
}

/** Wires a carried connection's events to the tunnel's. */
export function forwardEvents(c: Carried, to: Pick<EventEmitter<TunnelEvents>, 'emit'>): void {
  c.conn.on('lost', (error) => to.emit('lost', { index: c.index, role: c.role, error }));
  c.conn.on('resumed', (r) => to.emit('resumed', { index: c.index, role: c.role, ...r }));
  c.conn.on('done', () => to.emit('ended', { index: c.index, role: c.role }));
  c.conn.on('failed', (error) => to.emit('failed', { index: c.index, role: c.role, error }));
}
