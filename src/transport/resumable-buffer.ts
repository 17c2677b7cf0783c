/**
 * The replay buffer of one direction of a resumable hop connection: every
 * byte this side forwarded that the peer has not acknowledged yet, so that
 * after a reconnect it can be sent again from wherever the peer got to.
 * Bytes are kept as the chunks they were read in (views, never copied); the
 * end of the direction (FIN) takes one sequence number after the last byte
 * (see resumable-frames.ts).
 *
 * Bounded by its owner: `full` once `capacity` bytes wait for an
 * acknowledgement, and the owner stops reading its QEMU connection then.
 */
import { TransportError } from './errors.js';

export class ReplayBuffer {
  private chunks: Buffer[] = [];
  /** Index of the first live chunk in `chunks` (a head pointer, compacted now and then: no shift per ack). */
  private head = 0;
  /** Sequence number of the first byte of chunks[head]. */
  private headSeq = 0;
  /** Everything below this is acknowledged. */
  private acked = 0;
  /** Sequence number after the last byte appended. */
  private endSeq = 0;
  private finished = false;

  constructor(readonly capacity: number) {
    if (!Number.isSafeInteger(capacity) || capacity < 1) throw new RangeError(`a replay buffer capacity is a positive integer, got ${capacity}`);
  }

  /** Sequence number after the last byte (the FIN's number once ended). */
  get end(): number {
    return this.endSeq;
  }

  /** Whether the direction has ended (FIN appended). */
  get ended(): boolean {
    return this.finished;
  }

  /** How far the peer has acknowledged (including the FIN's number once it has it). */
  get acknowledged(): number {
    return this.acked;
  }

  /** The sequence number after everything, FIN included: the peer has it all once `acknowledged` reaches it. */
  get total(): number {
    return this.endSeq + (this.finished ? 1 : 0);
  }

  /** Bytes waiting for an acknowledgement (the FIN counts as none). */
  get unacknowledged(): number {
    return this.endSeq - Math.min(this.acked, this.endSeq);
  }

  get full(): boolean {
    return this.unacknowledged >= this.capacity;
  }

  /** The peer has everything, the FIN included. */
  get drained(): boolean {
    return this.finished && this.acked >= this.total;
  }

  /** Keeps `chunk` (not copied: the caller must not reuse it) as the next bytes; returns its first sequence number. */
  append(chunk: Buffer): number {
    if (this.finished) throw new TransportError('write-after-close', 'a hop direction got bytes after its end');
    const seq = this.endSeq;
    if (chunk.length === 0) return seq;
    if (this.head === this.chunks.length) this.headSeq = seq;
    this.chunks.push(chunk);
    this.endSeq += chunk.length;
    return seq;
  }

  /** Ends the direction: the FIN takes number `end`. */
  finish(): void {
    this.finished = true;
  }

  /**
   * The peer has everything below `received`. Acknowledgements never go back;
   * one beyond what was sent is a protocol error ('hop-protocol').
   */
  ack(received: number): void {
    if (received > this.total) throw new TransportError('hop-protocol', `the peer acknowledged byte ${received} of ${this.total} sent`);
    if (received <= this.acked) return;
    this.acked = received;
    while (this.head < this.chunks.length) {
      const c = this.chunks[this.head]!;
      const after = this.headSeq + c.length;
      if (after > received) {
        if (received > this.headSeq) {
          this.chunks[this.head] = c.subarray(received - this.headSeq);
          this.headSeq = received;
        }
        break;
      }
      this.chunks[this.head] = EMPTY; // let the chunk go now, not at the next compaction
      this.head++;
      this.headSeq = after;
    }
    if (this.head > 64 && this.head * 2 > this.chunks.length) {
      this.chunks = this.chunks.slice(this.head);
      this.head = 0;
    }
  }

  /**
   * The bytes from `seq` to the end, as views (what a reconnect sends again,
   * then the FIN if `ended`). `seq` must lie between the acknowledged point
   * and `total`: the peer cannot have less than it acknowledged, nor more than
   * was sent ('hop-protocol').
   */
  from(seq: number): Buffer[] {
    if (seq < this.acked || seq > this.total) {
      throw new TransportError('hop-protocol', `the peer resumes at byte ${seq}, outside what this side holds (${this.acked}..${this.total})`);
    }
    const out: Buffer[] = [];
    let pos = this.headSeq;
    for (let i = this.head; i < this.chunks.length; i++) {
      const c = this.chunks[i]!;
      const after = pos + c.length;
      if (after > seq) out.push(seq > pos ? c.subarray(seq - pos) : c);
      pos = after;
    }
    return out;
  }
}

const EMPTY = Buffer.alloc(0);
