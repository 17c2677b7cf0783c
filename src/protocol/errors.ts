import { StreamError } from '../stream/errors.js';
import { TransportError } from '../transport/errors.js';

/** Where in a migration a failure happened. */
export type MigrationPhase = 'setup' | 'precopy' | 'device-state' | 'postcopy' | 'completion';

export type MigrationErrorCode =
  | 'stream' // malformed record (cause: StreamError)
  | 'transport' // socket or TLS failure (cause: TransportError)
  | 'protocol' // well-formed records in an order or with values the protocol forbids
  | 'peer-disconnected' // the peer closed before the migration completed
  | 'idle-timeout' // no bytes for longer than the idle timeout (in postcopy: a pause, not a failure)
  | 'paused' // the operator paused postcopy (pause(), QEMU's migrate-pause): the reason of a 'paused' event
  | 'invalid-state' // a call the session's current state does not allow (pause() outside postcopy)
  | 'storage' // the guest-memory sink failed (disk full, ...)
  | 'cancelled';

/** The one error a session ends with: what went wrong and in which phase. */
export class MigrationError extends Error {
  override readonly name = 'MigrationError';
  /** The message without the phase, to quote inside another message. */
  readonly reason: string;
  constructor(
    readonly code: MigrationErrorCode,
    readonly phase: MigrationPhase,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(`${message} (phase: ${phase})`, options);
    this.reason = message;
  }

  /** Wraps any failure of a session's parts into a MigrationError. */
  static from(e: unknown, phase: MigrationPhase): MigrationError {
    if (e instanceof MigrationError) return e;
    if (e instanceof StreamError) return new MigrationError('stream', phase, `${e.code} at offset ${e.offset}: ${e.message}`, { cause: e });
    if (e instanceof TransportError) return new MigrationError('transport', phase, e.describe(), { cause: e });
    const code = (e as NodeJS.ErrnoException | undefined)?.code;
    if (code === 'ENOSPC' || code === 'EIO' || code === 'EACCES' || code === 'EROFS') {
      return new MigrationError('storage', phase, (e as Error).message, { cause: e });
    }
    return new MigrationError('protocol', phase, e instanceof Error ? e.message : String(e), { cause: e });
  }

  describe(): string {
    return `${this.code}: ${this.message}`;
  }
}
