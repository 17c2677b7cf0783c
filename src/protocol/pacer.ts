import { performance } from 'node:perf_hooks';

/**
 * A bandwidth cap in one-second windows (QEMU's max-bandwidth works the same
 * way, in 100 ms windows): after `pace(n)` the caller has sent no more than
 * `limit` bytes per second on average over the current window.
 */
export class Pacer {
  private start = -Infinity;
  private bytes = 0;

  /** Starts a new window (when the limit changes, say at the postcopy switch). */
  reset(): void {
    this.start = performance.now();
    this.bytes = 0;
  }

  /** Accounts `n` bytes and sleeps as long as the limit (bytes/s) requires; no limit, no wait. */
  async pace(n: number, limit: number | undefined): Promise<void> {
    if (!limit) return;
    const now = performance.now();
    if (now - this.start > 1000) {
      this.start = now;
      this.bytes = 0;
    }
    this.bytes += n;
    const due = this.start + (this.bytes / limit) * 1000;
    if (due > now) await new Promise<void>((r) => setTimeout(r, due - now));
  }
}
