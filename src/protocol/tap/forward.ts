import type { Socket } from 'node:net';
import { performance } from 'node:perf_hooks';
import type { TLSSocket } from 'node:tls';

export type AnySocket = Socket | TLSSocket;

/** Callbacks of one forwarded direction; none may throw. */
export interface ForwardHooks {
  /**
   * The chunk has been written. Called from a microtask queued after the
   * write: after the write's own callback when the kernel took the bytes at
   * once, and always before the next socket event is handled, so chunks of
   * all directions are seen in the order they arrived. A promise returned
   * holds the reading of `from` until it settles (a capture file waiting for
   * the disk).
   */
  chunk(chunk: Buffer, arrivedAt: number): Promise<void> | void;
  /**
   * The write of a chunk completed `micros` after the chunk arrived.
   * `queuedBehind`: the kernel did not take the chunk at once (its socket
   * buffer was full, or a TLS write was pending), so part of the delay is the
   * receiver's pace, not the tap.
   */
  written(micros: number, queuedBehind: boolean): void;
  /** `from` was paused for `ms` waiting for `to` to drain. */
  paused(ms: number): void;
  /** Bytes held in user space by the writer right after a write (its `writableLength`). */
  queued(bytes: number): void;
}

/**
 * Forwards `from` → `to` chunk by chunk, unchanged: each chunk is written as
 * it arrives and only then shown to the analysis. Backpressure as in
 * `stream.pipe`: when `to` refuses more, `from` is paused until 'drain', so at
 * most one socket write buffer (its highWaterMark plus one chunk) is held.
 * The end of `from` ends `to` (half-close; both sockets need allowHalfOpen).
 * Starts reading `from`.
 */
export function forward(from: AnySocket, to: AnySocket, hooks: ForwardHooks): void {
  let pausedAt = -1;
  /** Holds of the chunk hook still pending: reading resumes when none is left and `to` has drained. */
  let holds = 0;
  const resume = (): void => {
    hooks.paused(performance.now() - pausedAt);
    pausedAt = -1;
    if (!from.destroyed && holds === 0) from.resume();
  };
  const held = (p: Promise<void>): void => {
    holds++;
    from.pause();
    void p.then(() => {
      if (--holds === 0 && pausedAt < 0 && !from.destroyed) from.resume();
    });
  };
  from.on('data', (chunk: Buffer) => {
    const t = performance.now();
    if (to.destroyed || to.writableEnded) return; // the peer is gone; the close handlers tear down
    let behind = false;
    const more = to.write(chunk, (err) => {
      if (!err) hooks.written((performance.now() - t) * 1000, behind);
    });
    // A write the kernel took at once has left user space already (its callback still runs later).
    const queued = to.writableLength;
    behind = queued > 0;
    hooks.queued(queued);
    if (!more && pausedAt < 0) {
      pausedAt = performance.now();
      from.pause();
      to.once('drain', resume);
    }
    queueMicrotask(() => {
      const hold = hooks.chunk(chunk, t);
      if (hold) held(hold);
    });
  });
  from.on('end', () => {
    if (!to.destroyed && !to.writableEnded) to.end();
  });
  from.resume();
}
