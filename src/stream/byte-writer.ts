/**
 * Output side of the encoder. Small fields go into a reusable slab; large
 * payloads (pages, device state) are appended as the caller's own views, never
 * copied. `take()` hands back the list of pieces for one corked write/writev.
 *
 * The slab only moves forward: a region handed out in `take()` is never
 * written again, so the caller may keep the pieces until the socket is done.
 */
export class ByteWriter {
  private slab: Buffer;
  /** Over `slab`, for the page headers of writePages. */
  private slabView: DataView;
  private slabStart = 0; // start of the part of the slab not yet cut into a piece
  private pos = 0;
  private pieces: Uint8Array[] = [];
  private piecesBytes = 0;

  constructor(private readonly slabSize = 64 * 1024) {
    this.slab = Buffer.allocUnsafe(slabSize);
    this.slabView = new DataView(this.slab.buffer, this.slab.byteOffset, this.slab.length);
  }

  /** Bytes written since the last `take()`. */
  get length(): number {
    return this.piecesBytes + (this.pos - this.slabStart);
  }

  private reserve(n: number): void {
    if (this.pos + n <= this.slab.length) return;
    this.cut();
    this.slab = Buffer.allocUnsafe(Math.max(this.slabSize, n));
    this.slabView = new DataView(this.slab.buffer, this.slab.byteOffset, this.slab.length);
    this.slabStart = 0;
    this.pos = 0;
  }

  private cut(): void {
    if (this.pos > this.slabStart) {
      this.pieces.push(this.slab.subarray(this.slabStart, this.pos));
      this.piecesBytes += this.pos - this.slabStart;
      this.slabStart = this.pos;
    }
  }

  u8(v: number): this {
    this.reserve(1);
    this.slab[this.pos++] = v;
    return this;
  }
  be16(v: number): this {
    this.reserve(2);
    this.slab.writeUInt16BE(v, this.pos);
    this.pos += 2;
    return this;
  }
  be32(v: number): this {
    this.reserve(4);
    this.slab.writeUInt32BE(v >>> 0, this.pos);
    this.pos += 4;
    return this;
  }
  /** `v` must be a non-negative integer below 2^53 (or a bigint). */
  be64(v: number | bigint): this {
    this.reserve(8);
    if (typeof v === 'bigint') {
      this.slab.writeBigUInt64BE(v, this.pos);
    } else {
      this.slab.writeUInt32BE(Math.floor(v / 0x1_0000_0000), this.pos);
      this.slab.writeUInt32BE(v >>> 0, this.pos + 4);
    }
    this.pos += 8;
    return this;
  }
  /**
   * The header of a page record sent with CONTINUE: `v` (offset | flags, below
   * 2^53) as a be64, and for a ZERO record its fill byte. The per-page step of
   * writePages, in one bounds check.
   */
  pageHead(v: number, zero: boolean): void {
    const n = zero ? 9 : 8;
    if (this.pos + n > this.slab.length) this.reserve(n);
    const at = this.pos;
    this.slabView.setUint32(at, Math.floor(v / 0x1_0000_0000));
    this.slabView.setUint32(at + 4, v >>> 0);
    if (zero) this.slab[at + 8] = 0;
    this.pos = at + n;
  }
  /** Copies small byte strings (names, short payloads) into the slab. */
  raw(bytes: Uint8Array): this {
    this.reserve(bytes.length);
    this.slab.set(bytes, this.pos);
    this.pos += bytes.length;
    return this;
  }
  /** QEMU's counted string: u8 length, then the bytes, no NUL. */
  str8(name: string): this {
    const len = Buffer.byteLength(name, 'latin1');
    if (len === 0 || len > 255) throw new RangeError(`name must be 1..255 bytes: "${name}"`);
    this.reserve(1 + len);
    this.slab[this.pos++] = len;
    this.pos += this.slab.write(name, this.pos, 'latin1');
    return this;
  }
  /** Appends a large payload as its own piece, by reference. */
  view(bytes: Uint8Array): this {
    if (bytes.length === 0) return this;
    if (bytes.length < 64) return this.raw(bytes); // not worth an iovec of its own
    this.cut();
    this.pieces.push(bytes);
    this.piecesBytes += bytes.length;
    return this;
  }

  /** The pieces written since the last call, in order. */
  take(): Uint8Array[] {
    this.cut();
    const out = this.pieces;
    this.pieces = [];
    this.piecesBytes = 0;
    return out;
  }
}

/** Joins pieces into one buffer (for files and tests; sockets take the pieces as they are). */
export function concatPieces(pieces: readonly Uint8Array[]): Buffer {
  return Buffer.concat(pieces as Uint8Array[]);
}
