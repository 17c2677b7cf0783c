import { QmtError, type MigrationPhase } from '../errors.js';
import { StreamError, type StreamErrorCode } from '../stream/errors.js';
import { TransportError, type TransportErrorCode } from '../transport/errors.js';

export type { MigrationPhase } from '../errors.js';

/** Codes only a session raises (the others are the stream's and the transport's own). */
export type SessionErrorCode =
  | 'protocol' // well-formed records in an order or with values the protocol forbids
  | 'peer-disconnected' // the peer closed before the migration completed
  | 'idle-timeout' // no bytes (or no progress) for longer than the timeout (in postcopy: a pause, not a failure)
  | 'accept-timeout' // a destination nobody connected to within acceptTimeoutMs
  | 'paused' // the operator paused postcopy (pause(), QEMU's migrate-pause): the reason of a 'paused' event
  | 'invalid-state' // a call the session's current state does not allow (pause() outside postcopy)
  | 'storage' // the guest-memory sink failed (disk full, ...)
  | 'length-mismatch' // the stream's RAM block list differs from the sink's preallocated blocks (QEMU: "Length mismatch")
  | 'bad-page-request' // the destination asked for a page the source does not have
  | 'source-refused' // the source ended the stream early: it refused one of our page requests
  | 'thread-failed' // a channel's worker thread could not start (its module failed to load) or ended before it served
  | 'cancelled'; // cancel()/close(), or the AbortSignal fired (`cause`: the signal's reason)

/**
 * A session's error carries the specific code: a StreamError's (`bad-magic`),
 * a TransportError's (`connect-failed`, `tls-unknown-ca`, `reset`), or a
 * session's own. `kind` tells the family apart.
 */
export type MigrationErrorCode = SessionErrorCode | StreamErrorCode | TransportErrorCode;

/**
 * What kind of failure a MigrationError is:
 * - 'stream': a malformed record (`cause`: the StreamError, `offset` its offset);
 * - 'network': the connection failed or went quiet (`cause`: the TransportError
 *   if any) — in postcopy such a failure pauses instead of failing;
 * - 'protocol': well-formed records the protocol forbids, or a mismatch;
 * - 'storage': the guest-memory sink failed;
 * - 'cancelled': the caller ended it.
 */
export type MigrationErrorKind = 'stream' | 'network' | 'protocol' | 'storage' | 'cancelled';

function kindOf(code: MigrationErrorCode, cause: unknown): MigrationErrorKind {
  // A session's own restatement of an earlier failure (recovery gave up, …) keeps its kind.
  if (cause instanceof MigrationError && cause.code === code) return cause.kind;
  if (cause instanceof StreamError) return 'stream';
  if (cause instanceof TransportError) return 'network';
  switch (code) {
    case 'peer-disconnected':
    case 'idle-timeout':
    case 'paused': // migrate-pause: a forced network failure, cured by a new connection
      return 'network';
    case 'storage':
      return 'storage';
    case 'cancelled':
      return 'cancelled';
    default:
      return 'protocol';
  }
}

/** The one error a session ends with: what went wrong (`code`, `kind`) and in which phase. */
export class MigrationError extends QmtError {
  static readonly family = 'migration';
  override readonly name = 'MigrationError';
  readonly family = 'migration';
  readonly kind: MigrationErrorKind;
  /** The message without the phase, to quote inside another message. */
  readonly reason: string;
  declare readonly phase: MigrationPhase;
  constructor(
    readonly code: MigrationErrorCode,
    phase: MigrationPhase,
    message: string,
    options: { cause?: unknown; offset?: number; kind?: MigrationErrorKind } = {},
  ) {
    super(`${message} (phase: ${phase})`, { cause: options.cause, phase, offset: options.offset });
    this.reason = message;
    this.kind = options.kind ?? kindOf(code, options.cause);
  }

  /** Wraps any failure of a session's parts into a MigrationError with the part's own code. */
  static from(e: unknown, phase: MigrationPhase): MigrationError {
    if (e instanceof MigrationError) return e;
    if (e instanceof StorageError) return new MigrationError('storage', phase, e.message, { cause: e });
    // The code is the part's own; the message must not repeat it (the CLI prints `code: message`).
    if (e instanceof StreamError) return new MigrationError(e.code, phase, `${e.message} at offset ${e.offset}`, { cause: e, offset: e.offset });
    if (e instanceof TransportError) return new MigrationError(e.code, phase, `${e.channel ? `(${e.channel} channel) ` : ''}${e.message}`, { cause: e });
    const code = (e as NodeJS.ErrnoException | undefined)?.code;
    if (code === 'ENOSPC' || code === 'EIO' || code === 'EACCES' || code === 'EROFS') {
      return new MigrationError('storage', phase, (e as Error).message, { cause: e });
    }
    return new MigrationError('protocol', phase, e instanceof Error ? e.message : String(e), { cause: e });
  }
}

/** What a guest-memory sink or source was doing with its file when it failed. */
export type StorageOperation = 'open' | 'truncate' | 'write' | 'read' | 'fsync' | 'close';

/**
 * An I/O failure of a guest-memory sink or source (disk full, EIO, a file
 * that cannot be opened): which file, which byte of it, which operation, the
 * system error as `cause`. The sinks raise it outside any session, so it has
 * no phase; a session wraps it as MigrationError `storage` of its own phase
 * (MigrationError.from), whose `cause` it then is.
 */
export class StorageError extends QmtError {
  static readonly family = 'migration';
  override readonly name = 'StorageError';
  readonly family = 'migration';
  readonly code = 'storage';
  readonly kind = 'storage';
  /** The system error's code (`ENOSPC`, `EIO`, …), when it has one. */
  readonly errno: string | undefined;
  constructor(
    readonly operation: StorageOperation,
    /** The file's path. */
    readonly file: string,
    /** Byte position in the file of the failed operation (0 for open, fsync, close). */
    readonly position: number,
    cause: unknown,
  ) {
    const errno = (cause as NodeJS.ErrnoException | undefined)?.code;
    const what = cause instanceof Error ? cause.message : String(cause);
    super(`${operation} of ${file}${operation === 'write' || operation === 'read' ? ` at byte 0x${position.toString(16)}` : ''} failed: ${what}`, { cause });
    this.errno = typeof errno === 'string' ? errno : undefined;
  }
}

/** The error of a session ended by its AbortSignal: 'cancelled', the signal's reason as `cause`. */
export function abortError(signal: AbortSignal, phase: MigrationPhase): MigrationError {
  return new MigrationError('cancelled', phase, 'the migration was aborted (signal)', { cause: signal.reason });
}
