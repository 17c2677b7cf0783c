import { StreamError } from './errors.js';

/**
 * The error contract of every push decoder (main channel, preempt channel,
 * return path), kept in one place so that the three cannot drift apart:
 *
 * - `push()`/`end()` return the records the input so far completes;
 * - records parsed before an error in the same call are still returned (a
 *   PING or a page request before a corrupt record must still be acted on),
 *   the error is recorded at once in `error` and thrown by the next call;
 * - a call that completes no record throws the error itself;
 * - once failed, every later call throws the same error.
 *
 * With that, what a decoder yields (records and error) does not depend on how
 * the input was cut into chunks.
 */
export abstract class PushDecoder<R> {
  protected failed: StreamError | undefined;

  /** The error the stream failed with, if it has (also thrown by every later call). */
  get error(): StreamError | undefined {
    return this.failed;
  }

  /** Parses one record (or one step) into `out`; false when more input is needed. */
  protected abstract step(out: R[]): boolean;

  /** Throws the recorded error, if any. */
  protected throwIfFailed(): void {
    if (this.failed) throw this.failed;
  }

  /** Runs `step` until it needs more input or fails (see the class comment). */
  protected parseAvailable(): R[] {
    const out: R[] = [];
    try {
      while (this.step(out));
    } catch (e) {
      if (!(e instanceof StreamError)) throw e;
      this.failed = e;
      if (out.length === 0) throw e;
    }
    return out;
  }

  /** Records `e` as the stream's error and throws it. */
  protected fail(e: StreamError): never {
    this.failed = e;
    throw e;
  }
}
