import { PageBitmap } from './bitmap.js';
import { RECV_BITMAP_ENDING, RESUME_ACK_VALUE, RP_MAX_LENGTH, RP_MESSAGE_MAX, RpMessage } from './constants.js';
import { StreamError } from './errors.js';
import { ByteQueue, decodeName } from './byte-queue.js';
import { ByteWriter } from './byte-writer.js';
import { PushDecoder } from './push-decoder.js';
import type { ReturnPathMessage } from './records.js';

/**
 * Return-path messages (destination → source, the reverse direction of the
 * main socket): be16 type, be16 len, payload. No leading record byte.
 */

const FIXED_LENGTH: Record<number, number> = {
  [RpMessage.SHUT]: 4,
  [RpMessage.PONG]: 4,
  [RpMessage.REQ_PAGES_ID]: -1,
  [RpMessage.REQ_PAGES]: 12,
  [RpMessage.RECV_BITMAP]: -1,
  [RpMessage.RESUME_ACK]: 4,
  [RpMessage.SWITCHOVER_ACK]: 0,
};

export interface ReturnPathDecoderOptions {
  /** Largest received-bitmap accepted, in bytes (default 64 MiB: a 2 TiB block of 4 KiB pages). */
  maxBitmapBytes?: number;
}

/** Push parser for the return path; same contract as StreamDecoder (PushDecoder). */
export class ReturnPathDecoder extends PushDecoder<ReturnPathMessage> {
  private readonly q = new ByteQueue();
  private readonly maxBitmap: number;

  constructor(opts: ReturnPathDecoderOptions = {}) {
    super();
    this.maxBitmap = opts.maxBitmapBytes ?? 64 * 1024 * 1024;
  }

  /** Offset of the next byte to parse. */
  get offset(): number {
    return this.q.offset;
  }

  push(chunk: Uint8Array): ReturnPathMessage[] {
    this.throwIfFailed();
    this.q.push(chunk);
    return this.parseAvailable();
  }

  /** Throws 'truncated' when the input ended inside a message. */
  end(): void {
    this.throwIfFailed();
    if (this.q.available > 0) {
      this.fail(new StreamError('truncated', this.q.offset, `return path ended inside a message (${this.q.available} bytes left)`));
    }
  }

  protected step(out: ReturnPathMessage[]): boolean {
    const m = this.next();
    if (!m) return false;
    out.push(m);
    return true;
  }

  private next(): ReturnPathMessage | undefined {
    const q = this.q;
    if (!q.ensure(4)) return undefined;
    const at = q.offset;
    const type = q.be16(0);
    const len = q.be16(2);
    if (type === RpMessage.INVALID || type >= RP_MESSAGE_MAX) {
      throw new StreamError('bad-return-path-message', at, `unknown return-path message type ${type}`);
    }
    const fixed = FIXED_LENGTH[type] as number;
    if (len > RP_MAX_LENGTH || (fixed >= 0 && len !== fixed) || (type === RpMessage.REQ_PAGES_ID && len < 14) || (type === RpMessage.RECV_BITMAP && len < 2)) {
      throw new StreamError('bad-return-path-message', at, `return-path message type ${type} with bad length ${len}`);
    }
    if (!q.ensure(4 + len)) return undefined;
    let msg: ReturnPathMessage;
    switch (type) {
      case RpMessage.SHUT:
        msg = { type: 'shut', value: q.be32(4) };
        break;
      case RpMessage.PONG:
        msg = { type: 'pong', value: q.be32(4) };
        break;
      case RpMessage.REQ_PAGES:
        msg = { type: 'req-pages', offset: q.be64(4), length: q.be32(12) };
        break;
      case RpMessage.REQ_PAGES_ID: {
        const n = q.u8(16);
        if (n === 0 || 13 + n !== len) {
          throw new StreamError('bad-return-path-message', at, `REQ_PAGES_ID name length ${n} does not match message length ${len}`);
        }
        msg = { type: 'req-pages-id', offset: q.be64(4), length: q.be32(12), block: decodeName(q.bytes(17, n)) };
        break;
      }
      case RpMessage.RESUME_ACK:
        msg = { type: 'resume-ack', value: q.be32(4) };
        break;
      case RpMessage.SWITCHOVER_ACK:
        msg = { type: 'switchover-ack' };
        break;
      case RpMessage.RECV_BITMAP: {
        const n = q.u8(4);
        if (n === 0 || 1 + n !== len) {
          throw new StreamError('bad-return-path-message', at, `RECV_BITMAP name length ${n} does not match message length ${len}`);
        }
        // The bitmap travels after the message, outside its length: be64 size, bitmap, be64 end mark.
        if (!q.ensure(4 + len + 8)) return undefined;
        const size = q.be64(4 + len);
        if (size % 8 !== 0 || size > this.maxBitmap) {
          throw new StreamError(size > this.maxBitmap ? 'length-too-large' : 'bad-bitmap', at, `received bitmap of ${size} bytes`);
        }
        const total = 4 + len + 8 + size + 8;
        if (!q.ensure(total)) return undefined;
        if (q.be64big(total - 8) !== RECV_BITMAP_ENDING) {
          throw new StreamError('bad-bitmap', q.offset + total - 8, 'received bitmap without its end mark');
        }
        msg = { type: 'recv-bitmap', block: decodeName(q.bytes(5, n)), bitmap: q.bytes(4 + len + 8, size) };
        q.advance(total);
        return msg;
      }
      default:
        throw new StreamError('bad-return-path-message', at, `unknown return-path message type ${type}`);
    }
    q.advance(4 + len);
    return msg;
  }
}

/** Writes one return-path message. */
export function writeReturnPathMessage(w: ByteWriter, m: ReturnPathMessage): void {
  switch (m.type) {
    case 'shut':
      w.be16(RpMessage.SHUT).be16(4).be32(m.value);
      return;
    case 'pong':
      w.be16(RpMessage.PONG).be16(4).be32(m.value);
      return;
    case 'req-pages':
      w.be16(RpMessage.REQ_PAGES).be16(12).be64(m.offset).be32(m.length);
      return;
    case 'req-pages-id':
      w.be16(RpMessage.REQ_PAGES_ID).be16(13 + Buffer.byteLength(m.block, 'latin1')).be64(m.offset).be32(m.length).str8(m.block);
      return;
    case 'resume-ack':
      w.be16(RpMessage.RESUME_ACK).be16(4).be32(m.value);
      return;
    case 'switchover-ack':
      w.be16(RpMessage.SWITCHOVER_ACK).be16(0);
      return;
    case 'recv-bitmap':
      if (m.bitmap.length % 8 !== 0) throw new RangeError('a received bitmap is a whole number of 64-bit words');
      w.be16(RpMessage.RECV_BITMAP).be16(1 + Buffer.byteLength(m.block, 'latin1')).str8(m.block);
      w.be64(m.bitmap.length).view(m.bitmap).be64(RECV_BITMAP_ENDING);
      return;
  }
}

/** Encodes one return-path message into a single buffer (RP traffic is small). */
export function encodeReturnPathMessage(m: ReturnPathMessage): Buffer {
  const w = new ByteWriter(64);
  writeReturnPathMessage(w, m);
  return Buffer.concat(w.take());
}

export const RESUME_ACK: ReturnPathMessage = { type: 'resume-ack', value: RESUME_ACK_VALUE };

/**
 * The received-bitmap of one RAM block as it travels in postcopy recovery:
 * bit i = target page i received, LSB first, little-endian 64-bit words,
 * size rounded up to a multiple of 8 bytes.
 */
/**
 * The destination's received pages (QEMU's receivedmap), as RECV_BITMAP carries
 * them: the library's one bitmap, whose bytes are the wire layout.
 * @deprecated use PageBitmap (the same class).
 */
export const ReceivedBitmap = PageBitmap;
/** @deprecated use PageBitmap. */
export type ReceivedBitmap = PageBitmap;
