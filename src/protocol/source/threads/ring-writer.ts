import { AtomicRing } from '../../../transport/worker/ring.js';

/**
 * The producer side of a ring that must not drop an entry: what does not
 * fit (the consumer is behind) waits in a queue, pushed as soon as the
 * consumer makes room. The queue only grows while the consumer stalls.
 */
export class RingWriter {
  private readonly backlog: number[][] = [];
  private waiting = false;

  constructor(readonly ring: AtomicRing) {}

  push(entry: number[]): void {
    if (this.backlog.length === 0 && this.ring.push(entry)) return;
    this.backlog.push(entry);
    this.drain();
  }

  private drain(): void {
    while (this.backlog.length > 0 && this.ring.push(this.backlog[0]!)) this.backlog.shift();
    if (this.backlog.length === 0 || this.waiting || this.ring.closed) return;
    this.waiting = true;
    void this.ring.room().then(() => {
      this.waiting = false;
      this.drain();
    });
  }
}
