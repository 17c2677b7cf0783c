import { PageBitmap } from '../stream/bitmap.js';
import { TransportError } from '../transport/errors.js';
import { MigrationError } from './errors.js';

/**
 * Postcopy recovery (QEMU's postcopy-paused → postcopy-recover): what both
 * sessions share. Once the destination runs the VM, its memory is split
 * between the two hosts; a network failure then must pause the migration,
 * never end it, and a new connection resumes it where it stopped.
 */

/** Source side: where and how to reconnect. */
export interface SourceRecoveryOptions {
  /**
   * Where to reconnect (default: the migration's `to`). `SourceSession.resume(uri)`
   * changes it at any time, as `migrate … resume=true` follows a destination's
   * `migrate-recover` URI.
   */
  readonly to?: string;
  /** Delay before the second attempt (default 100 ms); doubles per failed attempt up to maxDelayMs. */
  readonly initialDelayMs?: number;
  /** Longest delay between attempts (default 5 s). */
  readonly maxDelayMs?: number;
  /** Give up (fail the migration) after this many failed attempts in one pause (default: never). */
  readonly maxAttempts?: number;
}

/** Destination side: where to wait for the source's new connection. */
export interface DestinationRecoveryOptions {
  /**
   * Where to listen for the recovery connection (default: the address the
   * migration came in on, same port). `DestinationSession.recover(uri)`
   * moves it, as QEMU's `migrate-recover`.
   */
  readonly listen?: string;
  /** Fail the migration if no recovery has completed this long after the pause (default: never). */
  readonly timeoutMs?: number;
}

/** The pause event of either session. */
export interface PausedEvent {
  /** What broke the connection: code `idle-timeout` for a silent partition, `paused` after `pause()`. */
  readonly error: MigrationError;
  /** performance.now() of the pause. */
  readonly at: number;
}

export interface ResumedEvent {
  /** Recoveries completed in this migration, this one included. */
  readonly recoveries: number;
  /** From the failure that ended postcopy-active to RESUME_ACK, ms (recovery connections lost on the way included). */
  readonly pausedMs: number;
}

/**
 * Failures that a new connection can cure: the network, not the stream.
 * A malformed record or a protocol violation would only repeat.
 */
export function isNetworkFailure(e: unknown): boolean {
  // By brand, not instanceof: an error of the other build (ESM/CJS) counts too.
  if (TransportError.is(e)) return true;
  return MigrationError.is(e) && e.kind === 'network';
}

/** Delay before attempt `attempt` (2, 3, …): exponential, capped. */
export function retryDelayMs(attempt: number, opts: SourceRecoveryOptions): number {
  const first = opts.initialDelayMs ?? 100;
  const max = opts.maxDelayMs ?? 5000;
  return Math.min(max, first * 2 ** Math.max(0, attempt - 2));
}

/**
 * Source side, from a destination's received-bitmap: pages it holds are done
 * (never sent again), every other page is sent again — whatever we believed
 * had left before the cut. Returns the pages still to send.
 */
export function applyReceivedBitmap(block: string, pages: number, bitmap: Uint8Array, toSend: PageBitmap, sent: PageBitmap): number {
  const size = PageBitmap.byteSize(pages);
  if (bitmap.length !== size || sent.pages !== pages || toSend.pages !== pages) {
    throw new MigrationError('protocol', 'postcopy', `received bitmap of block "${block}" has ${bitmap.length} bytes; ${pages} pages need ${size}`);
  }
  // One layout on both sides (bitmap.ts): the wire bitmap is the bitmap's bytes.
  sent.assignBytes(bitmap);
  toSend.assignComplement(sent);
  return toSend.count();
}
