/**
 * What the caller's thread and a source channel's worker say to each other.
 * Control goes by message (records to write, a pass to run, flush, close,
 * the destination's return-path messages other than page requests); what
 * is per page goes through AtomicRings (requests main → preempt, answers and
 * request notices → the caller), never a message per page.
 */
import type { ChannelLimits, ChannelRole, ChannelStats } from '../../../transport/channel.js';
import type { Endpoint } from '../../../transport/endpoint.js';
import type { TlsMaterial } from '../../../transport/pki.js';
import type { TlsSettings } from '../../../transport/tls.js';
import type { EffectiveTuning } from '../../../transport/tuning.js';
import type { ReturnPathMessage } from '../../../stream/records.js';
import type { BlockFile } from '../../block-files.js';
import type { StorageOperation } from '../../errors.js';
import type { ReadCounts } from './page-batches.js';

/** One RAM block's memory (or file) and page sets, as every thread of a session sees them. */
export interface SharedBlock {
  readonly idstr: string;
  readonly length: number;
  /** The block's bytes in shared memory; or, for a file-backed source, `file`, which each worker reads itself. */
  readonly memory?: SharedArrayBuffer;
  readonly file?: BlockFile;
  readonly toSend: SharedArrayBuffer;
  readonly sentOnce: SharedArrayBuffer;
  readonly sentAfterListen: SharedArrayBuffer;
  readonly sentOnPreempt: SharedArrayBuffer;
}

/** Words of the session's control Int32Array (a SharedArrayBuffer every thread of the link sees). */
export const Control = {
  /** The caller asked for postcopy: a precopy pass stops at its next batch. */
  POSTCOPY_REQUESTED: 0,
  /** LISTEN is written: requests are answered, pages are exactly-once. */
  LISTENED: 1,
  /** The preempt worker runs: the main worker hands requests to it. */
  PREEMPT_UP: 2,
  WORDS: 4,
} as const;

/** Entry of the request ring (main worker → preempt worker): [block index, first page, end page, arrived (epoch ms)]. */
export const REQUEST_WORDS = 4;

/** Entry of a notice ring (worker → caller): [kind, block index, page or count, reason, latency µs]. */
export const NOTICE_WORDS = 5;
export const Notice = {
  /** A page request arrived (entry: pages it covers). */
  REQUEST: 1,
  /** A requested page had already gone out since LISTEN. */
  ALREADY_SENT: 2,
  /** A requested page answered: reason and latency. */
  ANSWERED: 3,
} as const;
export const REASONS = ['preempt', 'main-in-flight', 'main-no-preempt'] as const;

/** Times that cross threads: each thread's performance.now() has its own origin. */
export function epochMs(now: number, origin: number): number {
  return origin + now;
}

/** What a channel worker is started with (workerData; the socket is in the transfer list). */
export interface ChannelWorkerData {
  readonly role: ChannelRole;
  readonly socket: unknown;
  readonly endpoint: Endpoint;
  readonly tuning: EffectiveTuning;
  readonly limits: ChannelLimits;
  readonly tls?: { readonly material: TlsMaterial; readonly settings: TlsSettings; readonly ticket?: Uint8Array };
  readonly connectTimeoutMs: number;
  readonly blocks: readonly SharedBlock[];
  readonly control: SharedArrayBuffer;
  /** Requests main → preempt. */
  readonly requests: SharedArrayBuffer;
  /** This worker's notices → the caller. */
  readonly notices: SharedArrayBuffer;
  readonly sectionId: number;
  readonly sectionBytes: number;
  /** A multifd channel's worker: its id, the UUID of its init message, and what every multifd worker shares. */
  readonly multifd?: MultifdWorkerData;
}

/** What a multifd channel's worker needs beyond a channel worker's. */
export interface MultifdWorkerData {
  readonly id: number;
  readonly uuid?: Uint8Array;
  /** QEMU's global packet number: one BigInt64 cell every channel draws from (MultifdPacketCounter). */
  readonly packets: SharedArrayBuffer;
  /** Per block, the next chunk (MULTIFD_CHUNK_WORDS words of toSend) a multifd worker takes in this pass: reset by the caller between passes. */
  readonly cursors: SharedArrayBuffer;
}

/** Words of `toSend` (32 pages each) a multifd worker takes per atomic step: 128 pages, one full packet. */
export const MULTIFD_CHUNK_WORDS = 4;

export interface PassCommand {
  readonly precopy: boolean;
  readonly kind: 'part' | 'end';
  readonly postcopy: boolean;
  readonly bandwidthLimit: number | undefined;
}

/** Caller → worker. */
export type ToWorker =
  | { readonly t: 'write'; readonly id: number; readonly pieces: readonly Uint8Array[]; readonly urgent: boolean }
  | { readonly t: 'flush'; readonly id: number }
  | { readonly t: 'pass'; readonly id: number; readonly pass: PassCommand }
  | { readonly t: 'drain'; readonly id: number }
  /** A multifd worker: send this pass's share of `toSend` in packets (the barrier is the caller's: 'sync'). */
  | { readonly t: 'mpass'; readonly id: number; readonly pass: PassCommand }
  /** A multifd worker: a SYNC packet, answered once it is handed to the channel. */
  | { readonly t: 'sync'; readonly id: number }
  | { readonly t: 'postcopy'; readonly notSentLowat: number; readonly bulkYield: number }
  | { readonly t: 'close'; readonly id: number }
  | { readonly t: 'destroy' };

/** What a worker counted since its last report (added to the session's counters). */
export interface CountDelta {
  normal: number;
  duplicate: number;
  transferred: number;
}

/** A TransportError as it crosses threads. */
export interface WireError {
  readonly code: string;
  readonly message: string;
  readonly channel?: string;
  /** A MigrationError (refused request) rather than a TransportError. */
  readonly migration?: boolean;
}

/** A StorageError as it crosses threads (a worker's read of a block file failed). */
export interface WireStorageError {
  readonly operation: StorageOperation;
  readonly file: string;
  readonly position: number;
  /** The system error's code and message. */
  readonly errno: string | undefined;
  readonly message: string;
}

/** Worker → caller. */
export type FromWorker =
  | { readonly t: 'ready'; readonly stats: ChannelStats; readonly threadId: number }
  | { readonly t: 'connect-failed'; readonly error: WireError }
  | { readonly t: 'done'; readonly id: number; readonly error?: WireError; readonly sent?: number; readonly refused?: boolean; readonly interrupted?: boolean }
  | { readonly t: 'written'; readonly id: number }
  | { readonly t: 'rp'; readonly msgs: readonly ReturnPathMessage[] }
  | { readonly t: 'bad-request'; readonly reason: string }
  /** The return path could not be decoded (or REQ_PAGES came before any REQ_PAGES_ID): the migration fails. */
  | { readonly t: 'rp-error'; readonly reason: string }
  | { readonly t: 'ticket'; readonly ticket: Uint8Array }
  | { readonly t: 'stats'; readonly stats: ChannelStats; readonly unacked: number | undefined; readonly writable: number; readonly counts: CountDelta; readonly cpuSeconds: number; readonly reads?: ReadCounts }
  /** Reading the pages to send failed: the migration fails ('storage'), in postcopy too. */
  | { readonly t: 'storage-error'; readonly error: WireStorageError }
  /** `at`: when the worker saw it (performance.timeOrigin + now(), comparable across threads): the link names the first of several losses. */
  | { readonly t: 'error'; readonly error: WireError; readonly at: number }
  | { readonly t: 'close'; readonly at: number };
