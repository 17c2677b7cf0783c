/**
 * Header words of an AtomicRing (Int32 at the start of its buffer). `head`
 * and `tail` count entries popped and pushed, wrapping at 2^32 (the slot is
 * the count masked by the capacity, a power of two).
 */
const HEAD = 0;
const TAIL = 1;
const CLOSED = 2;
const ENTRIES = 3;
const ENTRY_WORDS = 4;
/** Bumped by every push, pop and close: what a sleeper waits on, so that no change slips between its check and its wait. */
const SEQ = 5;
const HEADER_BYTES = 64;

/** Atomics.waitAsync (ES2024; Node 16+), not in this project's lib. */
const waitAsync = (Atomics as unknown as {
  waitAsync(a: Int32Array, index: number, value: number): { async: false; value: 'not-equal' | 'timed-out' } | { async: true; value: Promise<'ok' | 'timed-out'> };
}).waitAsync;

/**
 * A single-producer single-consumer ring of fixed-size entries (numbers,
 * stored as float64: page numbers, byte offsets and times alike) in a
 * SharedArrayBuffer, for what crosses threads per page (page requests,
 * answers): no MessagePort message and no object per entry. The producer
 * writes the slot, then publishes it by storing `tail` (Atomics: the slot's
 * bytes are visible to the consumer before the new tail is) and notifies;
 * the consumer sleeps in `wait()` on Atomics.waitAsync, off the event loop.
 * `close()` (either side) wakes both and makes `push` refuse; what was
 * pushed before can still be popped.
 */
export class AtomicRing {
  private readonly header: Int32Array;
  private readonly data: Float64Array;
  private readonly mask: number;
  private readonly entryWords: number;

  private constructor(readonly sab: SharedArrayBuffer) {
    this.header = new Int32Array(sab, 0, HEADER_BYTES / 4);
    const entries = this.header[ENTRIES]!;
    this.entryWords = this.header[ENTRY_WORDS]!;
    this.mask = entries - 1;
    this.data = new Float64Array(sab, HEADER_BYTES, entries * this.entryWords);
  }

  /** A ring of at least `entries` entries (rounded up to a power of two) of `entryWords` numbers each. */
  static create(entries: number, entryWords: number): AtomicRing {
    if (!Number.isInteger(entries) || entries < 1 || entries > 1 << 24) throw new RangeError(`ring of ${entries} entries (1 to 2^24)`);
    if (!Number.isInteger(entryWords) || entryWords < 1 || entryWords > 64) throw new RangeError(`ring entries of ${entryWords} words (1 to 64)`);
    const n = 2 ** Math.ceil(Math.log2(entries));
    const sab = new SharedArrayBuffer(HEADER_BYTES + n * entryWords * 8);
    const h = new Int32Array(sab, 0, HEADER_BYTES / 4);
    h[ENTRIES] = n;
    h[ENTRY_WORDS] = entryWords;
    return new AtomicRing(sab);
  }

  /** The same ring seen from another thread (its `sab`, posted there). */
  static attach(sab: SharedArrayBuffer): AtomicRing {
    return new AtomicRing(sab);
  }

  get capacity(): number {
    return this.mask + 1;
  }

  /** Entries waiting to be popped. */
  get length(): number {
    return (Atomics.load(this.header, TAIL) - Atomics.load(this.header, HEAD)) >>> 0;
  }

  get closed(): boolean {
    return Atomics.load(this.header, CLOSED) !== 0;
  }

  /** Producer: appends `entry` (its first `entryWords` numbers); false when the ring is full or closed. */
  push(entry: ArrayLike<number>): boolean {
    const h = this.header;
    if (Atomics.load(h, CLOSED) !== 0) return false;
    const tail = Atomics.load(h, TAIL);
    if (((tail - Atomics.load(h, HEAD)) >>> 0) > this.mask) return false;
    const at = (tail & this.mask) * this.entryWords;
    const n = this.entryWords;
    for (let i = 0; i < n; i++) this.data[at + i] = entry[i] ?? 0;
    Atomics.store(h, TAIL, (tail + 1) | 0);
    this.bump();
    return true;
  }

  /** Consumer: takes the oldest entry into `out`; false when the ring is empty. */
  pop(out: Float64Array | Int32Array): boolean {
    const h = this.header;
    const head = Atomics.load(h, HEAD);
    if (head === Atomics.load(h, TAIL)) return false;
    const at = (head & this.mask) * this.entryWords;
    const n = Math.min(this.entryWords, out.length);
    for (let i = 0; i < n; i++) out[i] = this.data[at + i]!;
    Atomics.store(h, HEAD, (head + 1) | 0);
    this.bump();
    return true;
  }

  /** Consumer: resolves once an entry is there or the ring is closed (at once if so already). */
  wait(): Promise<void> {
    return this.sleep(() => Atomics.load(this.header, HEAD) !== Atomics.load(this.header, TAIL));
  }

  /** Producer: resolves once there is room for an entry or the ring is closed. */
  room(): Promise<void> {
    return this.sleep(() => ((Atomics.load(this.header, TAIL) - Atomics.load(this.header, HEAD)) >>> 0) <= this.mask);
  }

  /** No more entries: `push` refuses, waiters wake (what is in the ring can still be popped). */
  close(): void {
    Atomics.store(this.header, CLOSED, 1);
    this.bump();
  }

  private bump(): void {
    Atomics.add(this.header, SEQ, 1);
    Atomics.notify(this.header, SEQ);
  }

  private async sleep(ready: () => boolean): Promise<void> {
    for (;;) {
      // `seen` first: a change after the check bumps SEQ, and the wait then returns 'not-equal' at once.
      const seen = Atomics.load(this.header, SEQ);
      if (ready() || this.closed) return;
      const r = waitAsync(this.header, SEQ, seen);
      if (r.async) await r.value;
    }
  }
}
