/**
 * Input side of the decoders: the chunks pushed so far, consumed front to back.
 *
 * Borrowed from ws's receiver and pg-protocol's parser: records are parsed
 * straight out of the chunk they arrived in (page payloads become views into
 * it); only a record that spans chunks is copied, and only its own bytes.
 */
export class ByteQueue {
  private chunks: Uint8Array[] = [];
  /**
   * The first chunk, which nearly every read hits. Multi-byte fields are read
   * byte by byte rather than through a DataView: a DataView per chunk (and
   * per merged record) was an allocation per socket read.
   */
  private head: Uint8Array = EMPTY;
  private headPos = 0;
  private buffered = 0;
  /** Absolute stream offset of the next unconsumed byte. */
  offset = 0;

  get available(): number {
    return this.buffered;
  }

  push(chunk: Uint8Array): void {
    if (chunk.length === 0) return;
    if (this.buffered === 0) {
      this.setHead(chunk);
    } else {
      this.chunks.push(chunk);
    }
    this.buffered += chunk.length;
  }

  /** Puts bytes back in front of everything buffered (they were taken out by a scanner). */
  unshift(bytes: Uint8Array): void {
    if (bytes.length === 0) return;
    if (this.buffered > 0) {
      const rest = this.head.subarray(this.headPos);
      this.chunks.unshift(rest);
    }
    this.setHead(bytes);
    this.buffered += bytes.length;
    this.offset -= bytes.length;
  }

  /**
   * Makes the next `n` bytes contiguous in the head chunk. Returns false when
   * fewer than `n` bytes are buffered. Copies only when they span chunks.
   */
  ensure(n: number): boolean {
    if (this.buffered < n) return false;
    if (this.head.length - this.headPos >= n) return true;
    const merged = carve(n);
    let filled = 0;
    let piece: Uint8Array = this.head.subarray(this.headPos);
    let used = 0;
    for (;;) {
      const take = Math.min(piece.length, n - filled);
      merged.set(piece.subarray(0, take), filled);
      filled += take;
      if (filled === n) {
        // One splice for all the chunks merged: a shift() per chunk is quadratic in
        // their number (a record that arrived in many small pieces).
        // (The usual case, one next chunk, without splice's array of the removed.)
        const leftover = piece.subarray(take);
        if (leftover.length > 0) {
          if (used === 1) this.chunks[0] = leftover;
          else this.chunks.splice(0, used, leftover);
        } else if (used === 1) this.chunks.shift();
        else this.chunks.splice(0, used);
        break;
      }
      piece = this.chunks[used++] as Uint8Array;
    }
    this.setHead(merged);
    return true;
  }

  /** The head chunk and the position of the next byte in it; valid after `ensure`. */
  get buf(): Uint8Array {
    return this.head;
  }
  get pos(): number {
    return this.headPos;
  }

  u8(at: number): number {
    return this.head[this.headPos + at] as number;
  }
  be16(at: number): number {
    const h = this.head;
    const p = this.headPos + at;
    return ((h[p] as number) << 8) | (h[p + 1] as number);
  }
  be32(at: number): number {
    return be32At(this.head, this.headPos + at);
  }
  /** A be64 as a number; exact below 2^53, which covers every offset and length we accept. */
  be64(at: number): number {
    const p = this.headPos + at;
    return be32At(this.head, p) * 0x1_0000_0000 + be32At(this.head, p + 4);
  }
  be64big(at: number): bigint {
    const p = this.headPos + at;
    return (BigInt(be32At(this.head, p)) << 32n) | BigInt(be32At(this.head, p + 4));
  }
  /** A view of `len` bytes at `at` in the head chunk. */
  bytes(at: number, len: number): Uint8Array {
    const p = this.headPos + at;
    return this.head.subarray(p, p + len);
  }

  /** Drops `n` bytes that `ensure` made contiguous. */
  advance(n: number): void {
    this.headPos += n;
    this.buffered -= n;
    this.offset += n;
    if (this.headPos === this.head.length) {
      const next = this.chunks.shift();
      this.setHead(next ?? EMPTY);
    }
  }

  /** Drops `n` bytes (at most `available`), across chunks, without copying. */
  skip(n: number): void {
    let left = n;
    while (left > 0 && this.buffered > 0) {
      const k = Math.min(left, this.head.length - this.headPos);
      this.advance(k);
      left -= k;
    }
  }

  /** Moves the offset forward over bytes never pushed (a positioned reader jumped over them); only with nothing buffered. */
  jumpTo(offset: number): void {
    if (this.buffered > 0 || offset < this.offset) throw new Error(`ByteQueue.jumpTo(${offset}) with ${this.buffered} bytes buffered at ${this.offset}`);
    this.offset = offset;
  }

  /** An independent queue over the same (immutable) chunks. */
  clone(): ByteQueue {
    const c = new ByteQueue();
    c.chunks = [...this.chunks];
    c.setHead(this.head);
    c.headPos = this.headPos;
    c.buffered = this.buffered;
    c.offset = this.offset;
    return c;
  }

  /** Removes and returns everything buffered, as chunks (no copy). */
  drain(): Uint8Array[] {
    const out: Uint8Array[] = [];
    if (this.buffered > 0) out.push(this.head.subarray(this.headPos), ...this.chunks);
    this.offset += this.buffered;
    this.chunks = [];
    this.buffered = 0;
    this.setHead(EMPTY);
    return out;
  }

  private setHead(chunk: Uint8Array): void {
    this.head = chunk;
    this.headPos = 0;
  }
}

/** The be32 at `p` of `b` (p + 4 ≤ b.length). */
export function be32At(b: Uint8Array, p: number): number {
  return (((b[p] as number) << 24) | ((b[p + 1] as number) << 16) | ((b[p + 2] as number) << 8) | (b[p + 3] as number)) >>> 0;
}

const EMPTY = new Uint8Array(0);

/**
 * Room for records that span chunks, carved from 256 KiB slabs: over TLS a
 * quarter of all pages straddle a 16 KiB record boundary, and an ArrayBuffer
 * of their own each would cost an allocation apiece. A slab is never reused
 * (a carved record may be kept by the consumer); the GC frees it with the
 * last view.
 */
const SLAB_BYTES = 256 * 1024;
let slab = new Uint8Array(0);
let slabPos = 0;
function carve(n: number): Uint8Array {
  if (n > SLAB_BYTES / 4) return new Uint8Array(n);
  if (slabPos + n > slab.length) {
    slab = new Uint8Array(SLAB_BYTES);
    slabPos = 0;
  }
  const out = slab.subarray(slabPos, slabPos + n);
  slabPos += n;
  return out;
}

/** idstrs are ASCII in practice; latin1 (ISO-8859-1) keeps any byte round-trippable. */
export function decodeName(bytes: Uint8Array): string {
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString('latin1');
}
