/**
 * The wire format of a resumable hop connection (`qmt tunnel`): what the
 * entry and the exit say to each other on one TCP+TLS connection that carries
 * one QEMU connection. Pure: no sockets here (resumable.ts uses it).
 *
 * Every byte a side forwards gets a sequence number (its offset in that
 * direction, from 0, never reset by a reconnect); the end of a direction (FIN)
 * takes one more number, as in TCP, so that "the peer has everything" is one
 * comparison. All integers are big-endian; 64-bit counters are written as two
 * 32-bit halves and must stay below 2^53.
 *
 * | frame   | bytes                                                                           |
 * |---------|---------------------------------------------------------------------------------|
 * | HELLO   | `QMTH` version:u8 flags:u8 tunnel:16 connection:u32 role:u8 received:u64 (35)    |
 * | WELCOME | `QMTW` version:u8 status:u8 received:u64 (14)                                    |
 * | DATA    | `D` seq:u64 length:u32 payload (13 + length; 1 ≤ length ≤ MAX_DATA_PAYLOAD)      |
 * | ACK     | `A` received:u64 (9): also the keepalive                                        |
 * | FIN     | `F` seq:u64 (9): the direction ends at seq (it takes number seq)                |
 * | RESET   | `R` (1): the sender's QEMU connection failed; the receiver resets its own        |
 *
 * HELLO is the entry's first frame on every hop connection, WELCOME the exit's
 * answer; `received` there is how much of the other direction the sender
 * holds already, so each side replays from the other's `received` on.
 */
import { TransportError } from './errors.js';

export const HOP_VERSION = 1;
/** Largest DATA payload a decoder accepts (a socket read is at most 64 KiB; room to spare). */
export const MAX_DATA_PAYLOAD = 1 << 20;
/** Length of a tunnel id. */
export const TUNNEL_ID_BYTES = 16;

export const HELLO_MAGIC = Buffer.from('QMTH', 'latin1');
export const WELCOME_MAGIC = Buffer.from('QMTW', 'latin1');

export const FrameType = {
  Data: 0x44, // 'D'
  Ack: 0x41, // 'A'
  Fin: 0x46, // 'F'
  Reset: 0x52, // 'R'
  Handshake: 0x51, // 'Q': HELLO or WELCOME, told apart by the magic's last byte
} as const;

/** How a hop connection's QEMU connection is placed: the first of a migration, or one after it (preempt, multifd). */
export type HopRole = 'main' | 'secondary';

export const HELLO_FLAG_RESUME = 0x01;

/** The exit's answer to a HELLO. */
export type WelcomeStatus = 'new' | 'resumed' | 'unknown' | 'refused';
const WELCOME_STATUS: readonly WelcomeStatus[] = ['new', 'resumed', 'unknown', 'refused'];

export type HopFrame =
  | { type: 'hello'; resume: boolean; tunnel: Buffer; connection: number; role: HopRole; received: number }
  | { type: 'welcome'; status: WelcomeStatus; received: number }
  | { type: 'data'; seq: number; payload: Buffer }
  | { type: 'ack'; received: number }
  | { type: 'fin'; seq: number }
  | { type: 'reset' };

export const HELLO_LENGTH = 35;
export const WELCOME_LENGTH = 14;
export const DATA_HEADER_LENGTH = 13;
export const ACK_LENGTH = 9;
export const FIN_LENGTH = 9;
export const RESET_LENGTH = 1;

const TWO_32 = 0x1_0000_0000;
/** 2^53 / 2^32: the high half of a counter must stay below it. */
const MAX_HIGH = 0x20_0000;

function writeU64(b: Buffer, at: number, n: number): void {
  b.writeUInt32BE(Math.floor(n / TWO_32), at);
  b.writeUInt32BE(n >>> 0, at + 4);
}

/** A u64 counter, or -1 when it does not fit in 2^53 (malformed). */
function readU64(b: Buffer, at: number): number {
  const hi = b.readUInt32BE(at);
  if (hi >= MAX_HIGH) return -1;
  return hi * TWO_32 + b.readUInt32BE(at + 4);
}

function checkCounter(n: number, what: string): void {
  if (!Number.isSafeInteger(n) || n < 0) throw new RangeError(`${what} must be a safe non-negative integer, got ${n}`);
}

/** The encoded length of a frame (DATA: header and payload). */
export function frameLength(f: HopFrame): number {
  switch (f.type) {
    case 'hello':
      return HELLO_LENGTH;
    case 'welcome':
      return WELCOME_LENGTH;
    case 'data':
      return DATA_HEADER_LENGTH + f.payload.length;
    case 'ack':
      return ACK_LENGTH;
    case 'fin':
      return FIN_LENGTH;
    case 'reset':
      return RESET_LENGTH;
  }
}

export function encodeHello(f: { resume: boolean; tunnel: Uint8Array; connection: number; role: HopRole; received: number }): Buffer {
  if (f.tunnel.length !== TUNNEL_ID_BYTES) throw new RangeError(`a tunnel id has ${TUNNEL_ID_BYTES} bytes, got ${f.tunnel.length}`);
  checkCounter(f.received, 'received');
  if (!Number.isInteger(f.connection) || f.connection < 0 || f.connection >= TWO_32) throw new RangeError(`connection must be a u32, got ${f.connection}`);
  const b = Buffer.allocUnsafe(HELLO_LENGTH);
  HELLO_MAGIC.copy(b, 0);
  b[4] = HOP_VERSION;
  b[5] = f.resume ? HELLO_FLAG_RESUME : 0;
  b.set(f.tunnel, 6);
  b.writeUInt32BE(f.connection, 22);
  b[26] = f.role === 'main' ? 0 : 1;
  writeU64(b, 27, f.received);
  return b;
}

export function encodeWelcome(f: { status: WelcomeStatus; received: number }): Buffer {
  checkCounter(f.received, 'received');
  const b = Buffer.allocUnsafe(WELCOME_LENGTH);
  WELCOME_MAGIC.copy(b, 0);
  b[4] = HOP_VERSION;
  b[5] = WELCOME_STATUS.indexOf(f.status);
  writeU64(b, 6, f.received);
  return b;
}

/** The header of a DATA frame of `length` payload bytes starting at `seq`; the payload is written after it, uncopied. */
export function encodeDataHeader(seq: number, length: number): Buffer {
  checkCounter(seq, 'seq');
  if (!Number.isInteger(length) || length < 1 || length > MAX_DATA_PAYLOAD) throw new RangeError(`a DATA payload has 1..${MAX_DATA_PAYLOAD} bytes, got ${length}`);
  const b = Buffer.allocUnsafe(DATA_HEADER_LENGTH);
  b[0] = FrameType.Data;
  writeU64(b, 1, seq);
  b.writeUInt32BE(length, 9);
  return b;
}

export function encodeAck(received: number): Buffer {
  return encodeCounterFrame(FrameType.Ack, received, 'received');
}

export function encodeFin(seq: number): Buffer {
  return encodeCounterFrame(FrameType.Fin, seq, 'seq');
}

/** ACK and FIN: a type byte and one 64-bit counter (ACK_LENGTH = FIN_LENGTH = 9). */
function encodeCounterFrame(type: (typeof FrameType)['Ack' | 'Fin'], n: number, name: string): Buffer {
  checkCounter(n, name);
  const b = Buffer.allocUnsafe(9);
  b[0] = type;
  writeU64(b, 1, n);
  return b;
}

const RESET_FRAME = Buffer.from([FrameType.Reset]);

export function encodeReset(): Buffer {
  return RESET_FRAME;
}

/** Any frame as one buffer (tests and handshakes; the data path writes header and payload separately). */
export function encodeFrame(f: HopFrame): Buffer {
  switch (f.type) {
    case 'hello':
      return encodeHello(f);
    case 'welcome':
      return encodeWelcome(f);
    case 'data':
      return Buffer.concat([encodeDataHeader(f.seq, f.payload.length), f.payload]);
    case 'ack':
      return encodeAck(f.received);
    case 'fin':
      return encodeFin(f.seq);
    case 'reset':
      return encodeReset();
  }
}

/**
 * A push parser of hop frames. `push(chunk)` returns the frames the bytes
 * complete. A DATA frame's payload is handed out as it comes, as views into
 * the chunks (never joined, never copied): a frame whose payload spans reads
 * comes as several 'data' frames with consecutive `seq` — the same bytes at
 * the same numbers, which is all a DATA frame says. Only a frame header split
 * between reads (at most 35 bytes) is kept and joined. Malformed bytes throw
 * a TransportError 'hop-protocol' naming the offset; need-more-data is simply
 * no frame yet. After an error the decoder refuses further input.
 */
export class HopFrameDecoder {
  /** The start of a frame (at most a header) that did not complete in the last read. */
  private rest: Buffer = Buffer.alloc(0);
  /** Payload bytes of the current DATA frame still to come, and the sequence number of the next one. */
  private dataLeft = 0;
  private dataSeq = 0;
  /** Bytes consumed so far (the offset errors name). */
  private offset = 0;
  private failed: TransportError | undefined;

  /** Bytes held that do not make a frame yet (a split header). */
  get pending(): number {
    return this.rest.length;
  }

  /** Inside a frame: a split header held, or a DATA payload not all in yet. */
  get midFrame(): boolean {
    return this.rest.length > 0 || this.dataLeft > 0;
  }

  push(chunk: Buffer): HopFrame[] {
    if (this.failed) throw this.failed;
    const out: HopFrame[] = [];
    if (chunk.length === 0) return out;
    let at = 0;
    if (this.rest.length > 0) {
      // A split header: joined with just enough of this chunk to finish it (headers are at most 35 bytes).
      const held = this.rest.length;
      const joined = Buffer.concat([this.rest, chunk.subarray(0, HELLO_LENGTH)]);
      this.rest = Buffer.alloc(0);
      const used = this.parse(joined, out);
      if (used < held) {
        // Still not a whole header: this chunk was shorter than what it lacks.
        this.rest = joined.subarray(used);
        return out;
      }
      at = used - held;
    }
    const used = this.parse(chunk.subarray(at), out);
    if (at + used < chunk.length) this.rest = chunk.subarray(at + used);
    return out;
  }

  /** Parses what it can of `b` into `out`: the bytes used (a frame's start it cannot finish stays unused). */
  private parse(b: Buffer, out: HopFrame[]): number {
    let at = 0;
    while (at < b.length) {
      if (this.dataLeft > 0) {
        const n = Math.min(this.dataLeft, b.length - at);
        out.push({ type: 'data', seq: this.dataSeq, payload: b.subarray(at, at + n) });
        this.dataSeq += n;
        this.dataLeft -= n;
        at += n;
        this.offset += n;
        continue;
      }
      const n = this.frameAt(b, at, out);
      if (n === 0) break;
      at += n;
      this.offset += n;
    }
    return at;
  }

  /** Parses one frame at `at` into `out`: its length, or 0 when more bytes are needed. */
  private frameAt(b: Buffer, at: number, out: HopFrame[]): number {
    const avail = b.length - at;
    const type = b[at]!;
    switch (type) {
      case FrameType.Data: {
        if (avail < DATA_HEADER_LENGTH) return 0;
        const seq = this.counter(b, at + 1, 'DATA seq');
        const length = b.readUInt32BE(at + 9);
        if (length < 1 || length > MAX_DATA_PAYLOAD) this.fail(`a DATA frame of ${length} bytes (1..${MAX_DATA_PAYLOAD})`);
        // The payload as far as it is here; the rest comes as it arrives (parse()).
        const here = Math.min(length, avail - DATA_HEADER_LENGTH);
        if (here > 0) out.push({ type: 'data', seq, payload: b.subarray(at + DATA_HEADER_LENGTH, at + DATA_HEADER_LENGTH + here) });
        this.dataSeq = seq + here;
        this.dataLeft = length - here;
        return DATA_HEADER_LENGTH + here;
      }
      case FrameType.Ack:
        if (avail < ACK_LENGTH) return 0;
        out.push({ type: 'ack', received: this.counter(b, at + 1, 'ACK received') });
        return ACK_LENGTH;
      case FrameType.Fin:
        if (avail < FIN_LENGTH) return 0;
        out.push({ type: 'fin', seq: this.counter(b, at + 1, 'FIN seq') });
        return FIN_LENGTH;
      case FrameType.Reset:
        out.push({ type: 'reset' });
        return RESET_LENGTH;
      case FrameType.Handshake:
        return this.handshakeAt(b, at, avail, out);
      default:
        return this.fail(`unknown frame type 0x${type.toString(16).padStart(2, '0')}`);
    }
  }

  private handshakeAt(b: Buffer, at: number, avail: number, out: HopFrame[]): number {
    // The magic is checked byte by byte as it arrives: a stranger's bytes fail at once.
    const n = Math.min(avail, 4);
    let hello = true;
    let welcome = true;
    for (let i = 0; i < n; i++) {
      if (b[at + i] !== HELLO_MAGIC[i]) hello = false;
      if (b[at + i] !== WELCOME_MAGIC[i]) welcome = false;
    }
    if (!hello && !welcome) return this.fail(`bad magic ${b.subarray(at, at + n).toString('hex')} (expected QMTH or QMTW)`);
    if (avail < 5) return 0;
    if (b[at + 4] !== HOP_VERSION) return this.fail(`hop protocol version ${b[at + 4]} (this end speaks ${HOP_VERSION})`);
    if (hello) {
      if (avail < HELLO_LENGTH) return 0;
      const flags = b[at + 5]!;
      if ((flags & ~HELLO_FLAG_RESUME) !== 0) return this.fail(`unknown HELLO flags 0x${flags.toString(16)}`);
      const role = b[at + 26]!;
      if (role > 1) return this.fail(`unknown HELLO role ${role}`);
      out.push({
        type: 'hello',
        resume: (flags & HELLO_FLAG_RESUME) !== 0,
        tunnel: Buffer.from(b.subarray(at + 6, at + 22)),
        connection: b.readUInt32BE(at + 22),
        role: role === 0 ? 'main' : 'secondary',
        received: this.counter(b, at + 27, 'HELLO received'),
      });
      return HELLO_LENGTH;
    }
    if (avail < WELCOME_LENGTH) return 0;
    const status = WELCOME_STATUS[b[at + 5]!];
    if (!status) return this.fail(`unknown WELCOME status ${b[at + 5]}`);
    out.push({ type: 'welcome', status, received: this.counter(b, at + 6, 'WELCOME received') });
    return WELCOME_LENGTH;
  }

  private counter(b: Buffer, at: number, what: string): number {
    const n = readU64(b, at);
    if (n < 0) this.fail(`${what} beyond 2^53`);
    return n;
  }

  private fail(what: string): never {
    const e = new TransportError('hop-protocol', `hop frame at byte ${this.offset}: ${what}`);
    this.failed = e;
    this.rest = Buffer.alloc(0);
    this.dataLeft = 0;
    throw e;
  }
}
