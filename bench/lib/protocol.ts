/**
 * What the latency benchmark's two peers say to each other on the migration
 * channels, and what the orchestrator says to the peers (JSON lines on
 * stdin/stdout).
 *
 * Channel framing (source → destination, main and preempt): a 12-byte header
 * `type u32 | length u32 | seq u32` and `length` payload bytes. Type 0 is a
 * bulk chunk, type 1 the 4 KiB answer to request `seq`. Requests (destination
 * → source) are fixed 16-byte records `type=2 u32 | seq u32 | 8 bytes zero`.
 */

export const FRAME_HEADER = 12;
export const FRAME_BULK = 0;
export const FRAME_REPLY = 1;
export const REQUEST_TYPE = 2;
export const REQUEST_BYTES = 16;
export const PAGE_BYTES = 4096;
/** Payload of one bulk group on the main channel. */
export const BULK_CHUNK = 256 * 1024;

/** The three ways of carrying urgent answers (the benchmark's modes). */
export type Mode = 'shared' | 'two-default' | 'two-tuned';
export const MODES: readonly Mode[] = ['shared', 'two-default', 'two-tuned'];
export const MODE_LABEL: Record<Mode, string> = {
  shared: '(a) one shared socket',
  'two-default': '(b) two sockets, kernel defaults',
  'two-tuned': '(c) two sockets, tuned',
};

export const MODE_SHORT: Record<Mode, string> = { shared: 'a shared socket', 'two-default': 'b two sockets, defaults', 'two-tuned': 'c two sockets, tuned' };

/** Plain bulk-throughput variants measured on loopback (our Channel next to a raw socket pair). */
export type ThroughputVariant = 'channel-tcp' | 'raw-tcp' | 'channel-tls' | 'raw-tls';

export function frameHeader(type: number, length: number, seq: number): Buffer {
  const b = Buffer.allocUnsafe(FRAME_HEADER);
  b.writeUInt32LE(type, 0);
  b.writeUInt32LE(length, 4);
  b.writeUInt32LE(seq, 8);
  return b;
}

export function request(seq: number): Buffer {
  const b = Buffer.alloc(REQUEST_BYTES);
  b.writeUInt32LE(REQUEST_TYPE, 0);
  b.writeUInt32LE(seq, 4);
  return b;
}

/**
 * Destination side: splits the source's byte stream into frames without
 * copying payloads. Counts bulk payload bytes as they arrive and reports an
 * answer once its last byte is in.
 */
export class FrameParser {
  private readonly hdr = Buffer.alloc(FRAME_HEADER);
  private hdrFill = 0;
  private inBody = false;
  private remaining = 0;
  private type = 0;
  private seq = 0;

  constructor(
    private readonly onBulkBytes: (n: number) => void,
    private readonly onReply: (seq: number) => void,
  ) {}

  push(chunk: Buffer): void {
    let off = 0;
    const len = chunk.length;
    while (off < len) {
      if (!this.inBody) {
        const n = Math.min(FRAME_HEADER - this.hdrFill, len - off);
        chunk.copy(this.hdr, this.hdrFill, off, off + n);
        this.hdrFill += n;
        off += n;
        if (this.hdrFill < FRAME_HEADER) return;
        this.type = this.hdr.readUInt32LE(0);
        this.remaining = this.hdr.readUInt32LE(4);
        this.seq = this.hdr.readUInt32LE(8);
        if (this.type !== FRAME_BULK && this.type !== FRAME_REPLY) throw new Error(`bad frame type ${this.type}`);
        this.hdrFill = 0;
        this.inBody = true;
      }
      const n = Math.min(this.remaining, len - off);
      if (this.type === FRAME_BULK) this.onBulkBytes(n);
      this.remaining -= n;
      off += n;
      if (this.remaining === 0) {
        this.inBody = false;
        if (this.type === FRAME_REPLY) this.onReply(this.seq);
      }
    }
  }
}

/** Source side: cuts 16-byte requests out of the destination's byte stream. */
export class RequestParser {
  private readonly buf = Buffer.alloc(REQUEST_BYTES);
  private fill = 0;

  constructor(private readonly onRequest: (seq: number) => void) {}

  push(chunk: Buffer): void {
    let off = 0;
    while (off < chunk.length) {
      const n = Math.min(REQUEST_BYTES - this.fill, chunk.length - off);
      chunk.copy(this.buf, this.fill, off, off + n);
      this.fill += n;
      off += n;
      if (this.fill === REQUEST_BYTES) {
        this.fill = 0;
        if (this.buf.readUInt32LE(0) !== REQUEST_TYPE) throw new Error('bad request record');
        this.onRequest(this.buf.readUInt32LE(4));
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Orchestrator ↔ peer control messages (one JSON object per line)
// ---------------------------------------------------------------------------

export type PeerCommand =
  | { cmd: 'listen'; host: string; cell: CellKind; tlsDir?: string }
  | { cmd: 'accept'; timeoutMs: number }
  | { cmd: 'wait-preempt'; timeoutMs: number }
  | { cmd: 'connect'; uri: string; cell: CellKind; tlsDir?: string }
  | { cmd: 'preempt'; reassertPriority?: number }
  | { cmd: 'bulk'; on: boolean }
  | { cmd: 'run'; warmupMs: number; durationMs: number; requests: boolean; gapMs: number; maxSamples: number }
  | { cmd: 'close'; timeoutMs: number }
  /** Event-loop delay of this peer since the last reset (perf_hooks.monitorEventLoopDelay), then reset. */
  | { cmd: 'loop-delay' }
  | { cmd: 'exit' };

/** What one peer connection carries: a latency cell in one mode, or a throughput variant. */
export type CellKind = { kind: 'latency'; mode: Mode } | { kind: 'throughput'; variant: ThroughputVariant };

export interface RunResult {
  /** Round-trip times in microseconds, in the order measured. */
  samples: number[];
  /** Bulk payload bytes received in the window, and the window length. */
  bulkBytes: number;
  windowSec: number;
  /** Requests without an answer when the run ended. */
  unanswered: number;
}

/** Event-loop delay in µs (how long ready callbacks such as an arriving request waited). */
export interface LoopDelay {
  p50Us: number;
  p99Us: number;
  maxUs: number;
}

export type PeerRequest = PeerCommand & { id: number };
export type PeerReply = { id: number; ok: true; data?: unknown } | { id: number; ok: false; error: string };
