/**
 * The one error base of the library. It lives in its own leaf module (no
 * imports) because all three layers throw it: `src/stream` must stay pure and
 * know nothing of sockets, `src/transport` must not depend on the codec, and
 * `src/protocol` wraps both — so the base can sit in none of them.
 */

/** Where in a migration a failure happened. */
export type MigrationPhase = 'setup' | 'precopy' | 'device-state' | 'postcopy' | 'completion';

/** Which layer an error comes from: its class, as a string that survives any build. */
export type QmtErrorFamily = 'stream' | 'transport' | 'migration';

/**
 * The brand of every error of this library. The ESM and the CJS build each
 * have their own class objects, so `instanceof` fails across them (a CJS
 * dependency's error seen by ESM code); `Symbol.for` is one symbol per
 * process, so `QmtError.is(e)` (or `e.code`) works whichever build made `e`.
 */
export const QMT_ERROR_BRAND: unique symbol = Symbol.for('qemu-migration-transport.error') as never;

/**
 * Base of StreamError, TransportError and MigrationError: a stable `code`
 * (part of the API: switch on it), the `cause` (a system, OpenSSL or inner
 * library error), and — where they apply — the migration `phase` and the
 * stream `offset`.
 */
export abstract class QmtError extends Error {
  /** The layer that raised it (StreamError: 'stream', …). */
  abstract readonly family: QmtErrorFamily;
  abstract readonly code: string;
  /** The migration phase it happened in (set by the sessions). */
  readonly phase: MigrationPhase | undefined;
  /** Byte offset in the channel's stream of the record or field that is wrong. */
  readonly offset: number | undefined;

  constructor(message: string, opts: { cause?: unknown; phase?: MigrationPhase; offset?: number } = {}) {
    super(message, opts.cause === undefined ? undefined : { cause: opts.cause });
    this.phase = opts.phase;
    this.offset = opts.offset;
  }

  /** The one-line form the CLI prints: `<code>: <what>`. */
  describe(): string {
    return `${this.code}: ${this.message}`;
  }

  /**
   * Whether `e` is an error of this library — of this class's family when
   * called on a subclass (`TransportError.is(e)`) — from any build of it
   * (ESM or CJS, any copy in node_modules), unlike `instanceof`.
   */
  static is<T extends QmtError>(this: abstract new (...args: never[]) => T, e: unknown): e is T {
    if (typeof e !== 'object' || e === null || (e as Record<symbol, unknown>)[QMT_ERROR_BRAND] !== true) return false;
    const family = (this as unknown as { readonly family?: QmtErrorFamily }).family;
    return family === undefined || (e as QmtError).family === family;
  }
}
Object.defineProperty(QmtError.prototype, QMT_ERROR_BRAND, { value: true });

/** Codes of the synchronous TypeError/RangeError thrown for bad options and arguments. */
export type UsageErrorCode =
  | 'bad-endpoint' // a URI that is not tcp:HOST:PORT or unix:PATH
  | 'bad-postcopy-policy'
  | 'bad-option' // any other option of the wrong type or out of range
  | 'threads-unavailable' // threads: 'on' where channels cannot run in worker threads (the message says why)
  | 'unknown-ram-block' // requestPage: a block the migration does not have
  | 'page-out-of-range' // requestPage: negative or past the block's end
  | 'unaligned-offset' // requestPage: not a multiple of the page size
  | 'bad-vcpu' // requestPage: a vCPU id that is not an integer from 0 to the declared vcpus - 1
  | 'already-started'; // start() twice, or after cancel()/close() (a plain Error: the call, not a value, is wrong)

/** A TypeError or RangeError of this library: what was wrong (`code`) and which option or argument (`option`). */
export interface UsageError extends Error {
  readonly code: UsageErrorCode;
  /** The option or argument at fault, as a path: `to`, `transport.main.maxQueuedBytes`, `offset`. */
  readonly option: string;
}

/**
 * A TypeError (wrong kind of value), RangeError (right kind, bad value) or,
 * for a call made in the wrong state, an Error — as node's own APIs throw
 * them (`server.listen` twice) — with a stable `code`.
 */
export function usageError(kind: 'type' | 'range' | 'state', code: UsageErrorCode, option: string, message: string, cause?: unknown): UsageError {
  const o = cause === undefined ? undefined : { cause };
  const e = kind === 'type' ? new TypeError(message, o) : kind === 'range' ? new RangeError(message, o) : new Error(message, o);
  return Object.assign(e, { code, option });
}
