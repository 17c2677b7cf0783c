/**
 * The user-space write queue of one channel: two FIFOs, urgent before bulk.
 *
 * Why not p-queue: p-queue schedules async *tasks* with a concurrency limit and
 * allocates a promise per task; what we queue are byte groups that must leave
 * in order within a priority and strictly urgent-first across priorities.
 * Two arrays with head indexes do that in O(1) per group with no allocation
 * beyond the group itself.
 */
export interface SendGroup {
  readonly pieces: readonly Uint8Array[];
  readonly bytes: number;
  /** Called once the group's last byte has been handed to the kernel. */
  readonly written?: () => void;
}

class Fifo {
  private items: SendGroup[] = [];
  private head = 0;
  get length(): number {
    return this.items.length - this.head;
  }
  push(g: SendGroup): void {
    this.items.push(g);
  }
  shift(): SendGroup | undefined {
    if (this.head >= this.items.length) return undefined;
    const g = this.items[this.head++];
    if (this.head > 1024 && this.head * 2 > this.items.length) {
      this.items = this.items.slice(this.head);
      this.head = 0;
    }
    return g;
  }
}

export class SendQueue {
  private readonly urgent = new Fifo();
  private readonly bulk = new Fifo();
  /** Bytes queued here (not yet handed to the socket). */
  bytes = 0;

  push(g: SendGroup, priority: 'urgent' | 'bulk'): void {
    (priority === 'urgent' ? this.urgent : this.bulk).push(g);
    this.bytes += g.bytes;
  }

  /** The next group: any urgent one first. */
  shift(): SendGroup | undefined {
    const g = this.urgent.shift() ?? this.bulk.shift();
    if (g) this.bytes -= g.bytes;
    return g;
  }

  get empty(): boolean {
    return this.urgent.length === 0 && this.bulk.length === 0;
  }
}
