import type { Channel } from './channel.js';
import type { TransportError } from './errors.js';

/**
 * The multifd channels of one migration on the destination, by id, as they
 * qualify (see qualify.ts): before or after the main channel, in any order.
 * QEMU starts processing only once main and every multifd channel are in
 * (migration.c `migration_has_all_channels`); `whenComplete()` is that wait.
 */
export class MultifdChannels {
  private readonly slots: (Channel | undefined)[];
  private present = 0;
  private waiters: { resolve: (c: readonly Channel[]) => void; reject: (e: TransportError) => void }[] = [];
  private abandoned: TransportError | undefined;

  constructor(
    /** multifd-channels: ids 0 … expected − 1. */
    readonly expected: number,
    /** The UUID their init messages must carry (16 bytes). */
    readonly uuid: Uint8Array,
  ) {
    this.slots = new Array<Channel | undefined>(expected).fill(undefined);
  }

  /** Whether channel `id` has qualified. */
  has(id: number): boolean {
    return this.slots[id] !== undefined;
  }

  get(id: number): Channel | undefined {
    return this.slots[id];
  }

  /** Channels in so far. */
  get count(): number {
    return this.present;
  }

  /** Every channel is in. */
  get complete(): boolean {
    return this.present === this.expected;
  }

  /** The channels in so far, by id (holes skipped). */
  list(): Channel[] {
    return this.slots.filter((c): c is Channel => c !== undefined);
  }

  /** @internal the listener hands over a qualified channel; false when its id is taken. */
  add(id: number, ch: Channel): boolean {
    if (id < 0 || id >= this.expected || this.slots[id] !== undefined) return false;
    this.slots[id] = ch;
    this.present++;
    if (this.complete) {
      const all = this.slots as Channel[];
      for (const w of this.waiters.splice(0)) w.resolve(all);
    }
    return true;
  }

  /** Resolves with the channels by id once all are in; rejects when the listener closed first. */
  whenComplete(): Promise<readonly Channel[]> {
    if (this.complete) return Promise.resolve(this.slots as Channel[]);
    if (this.abandoned) return Promise.reject(this.abandoned);
    return new Promise((resolve, reject) => this.waiters.push({ resolve, reject }));
  }

  /** @internal the listener closed before every channel came. */
  abandon(e: TransportError): void {
    if (this.complete) return;
    this.abandoned = e;
    for (const w of this.waiters.splice(0)) w.reject(e);
  }

  destroy(reason?: unknown): void {
    for (const c of this.slots) c?.destroy(reason);
  }
}
