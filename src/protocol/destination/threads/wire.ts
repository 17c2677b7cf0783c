/**
 * What crosses between a DestinationSession (the caller's thread) and its
 * channel workers: the messages both ways, the shared memory of a RAM block,
 * the counters and wake-up words, and errors (a class does not survive
 * postMessage: they travel as data and are rebuilt with their class and code).
 */
import type { ReturnPathMessage, StreamRecordWithRuns } from '../../../stream/records.js';
import { StreamError, type StreamErrorCode } from '../../../stream/errors.js';
import type { ChannelLimits, ChannelStats } from '../../../transport/channel.js';
import { TransportError, type ChannelName, type TransportErrorCode } from '../../../transport/errors.js';
import type { TlsMaterial } from '../../../transport/pki.js';
import type { TlsSettings } from '../../../transport/tls.js';
import type { TuningProfile } from '../../../transport/tuning.js';
import type { BlockFile } from '../../block-files.js';
import { MigrationError, StorageError, type MigrationErrorCode, type MigrationPhase, type StorageOperation } from '../../errors.js';
import type { DecoderResumeState } from '../../../stream/decoder.js';

/** One RAM block as every thread sees it: its memory and its bitmaps, shared. */
export interface SharedBlock {
  readonly idstr: string;
  readonly length: number;
  readonly index: number;
  /** Guest memory (the sink's buffer); or, for a sink of files, `file`, which each worker writes itself. */
  readonly memory?: SharedArrayBuffer;
  readonly file?: BlockFile;
  /** The received set (the PageTracker's bitmap words). */
  readonly received: SharedArrayBuffer;
  /** Pages ever written (a ZERO record on a page still zero-filled costs nothing). */
  readonly written: SharedArrayBuffer;
  /**
   * Pages the preempt channel brought first: its worker sets them before it
   * sets them received, so whoever sees a page received also sees which
   * channel brought it (the channel a request was answered on).
   */
  readonly byPreempt: SharedArrayBuffer;
}

/** The bitmaps of a block that only the threads keep (the received set is the PageTracker's). */
export interface WorkerBitmaps {
  readonly written: SharedArrayBuffer;
  readonly byPreempt: SharedArrayBuffer;
}

/** Counters a worker bumps (once per run or record) and the session reads: indexes into a shared Float64Array. */
export const Count = { transferred: 0, normal: 1, duplicate: 2, xbzrle: 3, preempt: 4, runs: 5, runPages: 6, placedTwice: 7 } as const;
export const COUNT_WORDS = 8;

/**
 * The wake-up word (Int32Array): bumped (and notified) after any chunk that
 * landed pages, so that waiting requests are looked at. Which channel brought
 * a page is in SharedBlock.byPreempt, not here.
 */
export const LANDED_WORDS = 1;

/**
 * A page request in the ring: [0 = REQ_PAGES | 1 = REQ_PAGES_ID, block index,
 * offset, length, return-path messages posted before it] — the last keeps the
 * ring's requests and the messages in the order the session sent them.
 */
export const REQUEST_WORDS = 5;

/** What a channel worker is given when it starts (before the socket). */
export interface ChannelWorkerData {
  readonly kind: 'tcp' | 'unix';
  readonly tls?: { readonly material: TlsMaterial; readonly settings: TlsSettings; readonly allowedPeers?: readonly string[] };
  readonly main: { readonly tuning?: Partial<TuningProfile>; readonly limits: ChannelLimits };
  readonly preempt: { readonly tuning?: Partial<TuningProfile>; readonly limits: ChannelLimits };
  readonly multifd: { readonly tuning?: Partial<TuningProfile>; readonly limits: ChannelLimits };
}

/**
 * The SYNC barrier across threads (QEMU's multifd_recv_sync_main) in an
 * Int32Array: a multifd worker that read its k-th SYNC packet sets its
 * `synced` word to k, bumps WAKE and waits (Atomics.waitAsync) until RELEASE
 * moves past the value it read; the main worker at a MULTIFD_FLUSH waits on
 * WAKE until every channel's `synced` is past RELEASE (or one ENDED before
 * it), then bumps RELEASE. LISTENING: set by the main worker at
 * POSTCOPY_LISTEN (multifd is idle in postcopy). No message per packet.
 * With a sink of files a worker arrives only once its writes are done.
 */
export const Sync = { WAKE: 0, RELEASE: 1, LISTENING: 2 } as const;
export const syncedWord = (id: number): number => 4 + 3 * id;
export const endedWord = (id: number): number => 5 + 3 * id;
/**
 * A sink of files: set (and WAKE bumped) by a multifd worker once it saw
 * LISTENING and every write it took is done; the main worker waits for all
 * of them before it reads on past POSTCOPY_LISTEN (multifd-worker.ts).
 */
export const listenDrainedWord = (id: number): number => 6 + 3 * id;
export const syncWords = (channels: number): number => 4 + 3 * channels;

/** A multifd worker's counters (Float64Array, the fields of MultifdChannelCounters). */
export const MfdCount = { bytes: 0, packets: 1, syncs: 2, normal: 3, zero: 4, runs: 5, runPages: 6 } as const;
export const MFD_COUNT_WORDS = 7;

export type ErrorData =
  | { family: 'stream'; code: StreamErrorCode; message: string; offset: number }
  | { family: 'transport'; code: TransportErrorCode; message: string; channel?: ChannelName }
  | { family: 'migration'; code: MigrationErrorCode; message: string; phase?: MigrationPhase }
  | { family: 'storage'; operation: StorageOperation; file: string; position: number; errno: string | undefined; message: string }
  | { family: 'other'; message: string; name: string };

export function errorToData(e: unknown): ErrorData {
  if (StreamError.is(e)) return { family: 'stream', code: e.code, message: e.message, offset: e.offset };
  if (TransportError.is(e)) return { family: 'transport', code: e.code, message: e.message, ...(e.channel ? { channel: e.channel } : {}) };
  // Before MigrationError.is: a StorageError is of the migration family too.
  if (e instanceof StorageError) return { family: 'storage', operation: e.operation, file: e.file, position: e.position, errno: e.errno, message: (e.cause as Error | undefined)?.message ?? e.message };
  if (MigrationError.is(e)) return { family: 'migration', code: e.code, message: e.reason, phase: e.phase };
  return { family: 'other', message: e instanceof Error ? e.message : String(e), name: e instanceof Error ? e.name : 'Error' };
}

export function errorFromData(d: ErrorData): Error {
  switch (d.family) {
    case 'stream':
      return new StreamError(d.code, d.offset, d.message);
    case 'transport':
      return new TransportError(d.code, d.message, d.channel ? { channel: d.channel } : {});
    case 'migration':
      return new MigrationError(d.code, d.phase ?? 'postcopy', d.message);
    case 'storage':
      return new StorageError(d.operation, d.file, d.position, Object.assign(new Error(d.message), d.errno ? { code: d.errno } : {}));
    default: {
      const e = d.name === 'RangeError' ? new RangeError(d.message) : new Error(d.message);
      return e;
    }
  }
}

/** A record of the main stream that is not a page: to the session, in stream order. */
export type ControlRecord = Exclude<StreamRecordWithRuns, { type: 'ram-pages' | 'ram-zeros' | 'ram-xbzrle' | 'ram-page' | 'ram-zero' }>;

/** The session → a channel worker. */
export type ToWorker =
  /** The accepted socket, transferred before anything read it, and the role it is a candidate for. */
  | { t: 'socket'; socket: unknown; role: 'main' | 'preempt' }
  /** Its verdict came: serve as the main channel (a new stream, or a recovery's continuing `resume`). */
  | { t: 'serve-main'; resume?: DecoderResumeState; blocks?: SharedBlock[]; counts: SharedArrayBuffer; landed: SharedArrayBuffer; requests: SharedArrayBuffer; multifd?: { channels: number; sync: SharedArrayBuffer } }
  /** A multifd channel (its init message was judged by the listener): decode and land its packets. */
  | { t: 'serve-multifd'; id: number; channels: number; uuid?: Uint8Array; blocks: SharedBlock[]; counts: SharedArrayBuffer; landed: SharedArrayBuffer; sync: SharedArrayBuffer }
  | { t: 'serve-preempt'; blocks: SharedBlock[]; counts: SharedArrayBuffer; landed: SharedArrayBuffer }
  /** Answer to 'ram-blocks': the sink and the tracker are sized, here is their memory. */
  | { t: 'blocks'; blocks: SharedBlock[] }
  /** A return-path message (written in order with the ring's requests: `seq` is the ring position it follows). */
  | { t: 'rp'; m: ReturnPathMessage; seq: number }
  | { t: 'shut'; value: number }
  /** The decoder's state for the recovery connection's worker. */
  | { t: 'export' }
  /** A sink of files: every page this worker took written to its file (answered by 'drained'). */
  | { t: 'drain' };

/** A channel worker → the session. */
export type FromWorker =
  /** Before it is a channel. */
  | { t: 'secured' }
  | { t: 'tls-failed'; error: ErrorData; bytesRead: number }
  | { t: 'seen'; bytes: Uint8Array }
  | { t: 'closed-early' }
  /** Serving. */
  | { t: 'stats'; stats: ChannelStats; cpuSeconds: number }
  | { t: 'ram-blocks'; rec: ControlRecord }
  | { t: 'records'; recs: ControlRecord[]; iterationPages: number[] }
  | { t: 'first-command' }
  | { t: 'decode-error'; error: ErrorData }
  | { t: 'lost'; error: ErrorData }
  /** The source ended the channel (FIN); `error`: the decoder's verdict on what was left. */
  | { t: 'ended'; error?: ErrorData }
  /** The socket closed: the records its end completed, and the decoder's verdict. */
  | { t: 'closed'; recs: ControlRecord[]; error?: ErrorData }
  | { t: 'shut-done' }
  | { t: 'state'; state: DecoderResumeState | undefined }
  /** Answer to 'drain': every write done; `error` if one failed (a storage error). */
  | { t: 'drained'; error?: ErrorData };
