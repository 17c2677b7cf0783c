import { performance } from 'node:perf_hooks';
import type { Channel } from '../transport/channel.js';

/**
 * Tells a dead link from a slow one while a sender has bytes in flight: the
 * link is stalled when, for `windowMs`, data waits to be delivered (in our
 * queue, the socket's buffer or the kernel's send queue) and nothing moves —
 * no byte received from the peer, no byte newly handed to the kernel, none
 * newly acknowledged by the peer's kernel (Linux' tx_queue, see
 * kernel-queue.ts). Where the kernel tells, bytes merely written into our
 * own send buffer do not count: only the peer's acknowledgements do (handed
 * to the kernel minus still unacknowledged, which grows with every ACK). A
 * partition that sends neither FIN nor RST (a pulled cable, a frozen relay)
 * looks exactly like that; a slow link does not (its ACKs come), and a quiet
 * one (nothing to send) is never a stall.
 *
 * What it cannot see: a stream whose every byte was acknowledged — by the
 * peer, or by a middlebox that buffers it and then hangs. Nothing waits then,
 * and the sender's only signs of life are the peer's answers.
 *
 * Samples a few times per window, at most 4 per second: a read of
 * /proc/net/tcp per channel per sample, nothing per page.
 */
export class StallWatch {
  private timer: NodeJS.Timeout | undefined;
  private idleSince = 0;
  private last: Sample[] = [];

  /**
   * @param channels the channels to watch now (read at every sample: a new
   *   connection restarts the window)
   * @param onStall called once, when the window has passed with data waiting and nothing moving; the watch stops
   */
  constructor(
    private readonly channels: () => readonly (Channel | undefined)[],
    readonly windowMs: number,
    private readonly onStall: (idleMs: number) => void,
  ) {}

  /** Starts (or restarts) watching; a no-op when `windowMs` is 0 or less. */
  start(): void {
    this.stop();
    if (this.windowMs <= 0) return;
    this.idleSince = performance.now();
    this.last = [];
    this.timer = setInterval(() => this.sample(), Math.max(10, Math.min(250, this.windowMs / 4)));
    // A watchdog: the sockets it watches keep the process alive, not the watch.
    this.timer.unref();
  }

  stop(): void {
    clearInterval(this.timer);
    this.timer = undefined;
  }

  private sample(): void {
    const now = performance.now();
    const current = this.channels().filter((c): c is Channel => c !== undefined && !c.isClosed).map(sampleOf);
    let waiting = false;
    let moved = current.length !== this.last.length;
    for (let i = 0; i < current.length; i++) {
      const c = current[i]!;
      const p = this.last[i];
      if (c.queued > 0 || (c.unacked ?? 0) > 0) waiting = true;
      if (!p || p.channel !== c.channel || c.received !== p.received || progressOf(c) > progressOf(p)) moved = true;
    }
    this.last = current;
    if (moved || !waiting) {
      this.idleSince = now;
      return;
    }
    if (now - this.idleSince < this.windowMs) return;
    // After a long stall of our own event loop, this timer may run before the bytes that
    // arrived meanwhile are read: decide after the next poll phase.
    setImmediate(() => {
      if (this.timer === undefined) return;
      const again = this.channels().filter((c): c is Channel => c !== undefined && !c.isClosed).map(sampleOf);
      const still = again.length === this.last.length && again.every((c, i) => c.channel === this.last[i]!.channel && c.received === this.last[i]!.received && progressOf(c) <= progressOf(this.last[i]!));
      if (!still) {
        this.last = again;
        this.idleSince = performance.now();
        return;
      }
      const idle = performance.now() - this.idleSince;
      this.stop();
      this.onStall(idle);
    });
  }
}

interface Sample {
  channel: Channel;
  received: number;
  sent: number;
  /** Bytes in user space (our queue and the socket's buffer). */
  queued: number;
  unacked: number | undefined;
}

/**
 * What the peer has taken so far: bytes acknowledged (written minus still
 * unacknowledged; over TLS written counts plaintext, so a write alone even
 * lowers it a little) or, where the kernel does not tell, bytes written.
 */
function progressOf(s: Sample): number {
  return s.unacked === undefined ? s.sent : s.sent - s.unacked;
}

function sampleOf(channel: Channel): Sample {
  const s = channel.stats;
  return { channel, received: s.bytesReceived, sent: s.bytesSent, queued: s.queuedBytes, unacked: channel.unackedBytes };
}
