/**
 * A fault-injecting TCP relay between a source and a destination (both ours).
 *
 * The source connects to the relay; for every accepted connection the relay
 * opens one to the real destination and forwards both directions: `up` is
 * source → destination (the migration stream), `down` is destination → source
 * (the return path). Faults are set per connection (by accept order: 0 is the
 * main channel, 1 the preempt channel) and per direction, at byte offsets of
 * that direction:
 *
 * - `dropAt`: after N bytes, reset both sockets (RST): a network failure (the
 *   receiver may lose bytes still in flight, or see the reset as an end of stream);
 * - `stall`: after N bytes, forward nothing in that direction for `ms`;
 * - `truncateAt`: after N bytes, end that direction cleanly (FIN) and discard
 *   whatever the sender writes afterwards; the other direction goes on;
 * - `corrupt`: XOR the byte at offset N with `xor` (default 0xff);
 * - `bytesPerSecond`: forward at most R bytes/s (a slow reader: the sender's
 *   buffers fill and its writes wait).
 *
 * and per relay:
 *
 * - `reorder`: hold the first accepted connection (not connected onward)
 *   until a second one arrives, then connect the second to the destination
 *   first; gives up holding after `holdMs` (default 2 s), because a source
 *   that waits for an answer on its first connection never opens a second.
 *
 * and at any moment:
 *
 * - `freeze()`: a silent partition (a pulled cable, a hung middlebox): every
 *   open connection stops forwarding both ways and closes nothing — the relay
 *   stops reading, so the senders' kernels see their windows close, and ends,
 *   resets and closes of either side are not passed on; connections that
 *   arrive meanwhile are refused at once (the retries of a reconnecting
 *   source fail fast). `heal()` ends the partition: the frozen connections
 *   are destroyed (both peers gave up on them, or will see a reset; or, with
 *   `keepFrozen`, stay black holes) and new ones are forwarded again.
 *
 * Bounded: at most `maxConnections` connections (later ones are refused),
 * at most `highWaterBytes` buffered per direction (the reading socket is
 * paused beyond it), every stall and throttle delay is a timer the relay
 * owns, a connection one side of which has closed is destroyed at most 5 s
 * later. `close()` destroys every socket, clears every timer and closes the
 * server; `fired` lists what happened, for failure messages.
 */
import { createRequire } from 'node:module';
import type net from 'node:net';
import type { Endpoint } from '../../src/transport/endpoint.js';
import { dial, listen, type Listening } from '../../src/transport/sockets.js';

export interface DirectionFaults {
  /** Reset both sockets (RST) once this many bytes have been forwarded in this direction (at most these reach the receiver). */
  readonly dropAt?: number;
  /** Forward nothing in this direction for `ms` once `at` bytes have been forwarded. */
  readonly stall?: { readonly at: number; readonly ms: number };
  /** End this direction (FIN) after this many bytes; later bytes of the sender are discarded. */
  readonly truncateAt?: number;
  /** XOR the byte at this offset of the direction with `xor` (default 0xff; 0 is taken as 0xff). */
  readonly corrupt?: { readonly at: number; readonly xor?: number };
  /** Forward at most this many bytes per second (token bucket, burst of 1/20 s). */
  readonly bytesPerSecond?: number;
}

export interface ConnectionFaults {
  readonly up?: DirectionFaults;
  readonly down?: DirectionFaults;
}

export interface FaultRelayOptions {
  /** The destination: `tcp:HOST:PORT` (or host and port). */
  readonly target: string | { readonly host: string; readonly port: number };
  /** Faults of each connection by accept order (index 0: the main channel, 1: the preempt channel). */
  readonly connections?: readonly (ConnectionFaults | undefined)[] | ((index: number) => ConnectionFaults | undefined);
  /** Connect the second accepted connection onward before the first (see the file comment). */
  readonly reorder?: boolean | { readonly holdMs?: number };
  /** Connections accepted in the relay's life (default 4); later ones are destroyed at once. */
  readonly maxConnections?: number;
  /** Bytes buffered per direction before the reading socket is paused (default 256 KiB). */
  readonly highWaterBytes?: number;
}

export type Direction = 'up' | 'down';

/** What one relayed connection did. */
export interface RelayConnectionInfo {
  readonly index: number;
  /** Bytes forwarded per direction. */
  readonly forwarded: Record<Direction, number>;
  /** Bytes received from the sender per direction (forwarded or not). */
  readonly received: Record<Direction, number>;
  /** Which of the relay's two sockets are still open: toward the source and toward the destination. */
  readonly open: { readonly source: boolean; readonly destination: boolean };
  /** True once both sockets are closed. */
  readonly closed: boolean;
}

const DEFAULT_HOLD_MS = 2000;

function parseTarget(t: FaultRelayOptions['target']): Endpoint {
  if (typeof t !== 'string') return { kind: 'tcp', host: t.host, port: t.port };
  const m = /^tcp:(\[[^\]]+\]|[^:]+):(\d+)$/.exec(t);
  if (!m) throw new Error(`fault relay: target must be tcp:HOST:PORT, got ${t}`);
  return { kind: 'tcp', host: m[1]!.replace(/^\[|\]$/g, ''), port: Number(m[2]) };
}

/** One direction of one connection: reads `from`, applies the faults, writes `to`. */
class Pipe {
  /** Bytes received from the sender. */
  received = 0;
  /** Bytes forwarded to the receiver (the offset faults refer to). */
  forwarded = 0;
  private readonly queue: Buffer[] = [];
  private queued = 0;
  private blocked: 'stall' | 'throttle' | 'drain' | undefined;
  private stalled = false;
  private ended = false; // truncated or dropped: nothing more is forwarded
  private fromEnded = false;
  private tokens: number;
  private lastRefill = performance.now();

  constructor(
    private readonly conn: RelayConnection,
    readonly dir: Direction,
    private readonly from: net.Socket,
    private readonly to: net.Socket,
    private readonly faults: DirectionFaults,
    private readonly highWater: number,
  ) {
    this.tokens = this.burst;
    from.on('data', (chunk: Buffer) => {
      this.received += chunk.length;
      if (this.ended) return; // truncated: the sender's bytes go nowhere
      this.queue.push(chunk);
      this.queued += chunk.length;
      if (this.queued > this.highWater) from.pause();
      this.pump();
    });
    from.on('end', () => this.senderGone());
    to.on('drain', () => {
      if (this.blocked === 'drain') {
        this.blocked = undefined;
        this.pump();
      }
    });
  }

  /** The receiver went away: drop what is queued and read the sender to its end (so that its close is seen). */
  receiverGone(): void {
    this.ended = true;
    this.queue.length = 0;
    this.queued = 0;
    this.from.resume();
  }

  /** The sender finished (FIN or close): end the receiver once the queue is written. */
  senderGone(): void {
    this.fromEnded = true;
    this.pump();
  }

  private get burst(): number {
    const r = this.faults.bytesPerSecond;
    return r === undefined ? Infinity : Math.max(1, Math.floor(r / 20));
  }

  /** The next offset at which something must happen, beyond the current one. */
  private nextBoundary(): number {
    const f = this.faults;
    let b = Infinity;
    for (const at of [f.dropAt, f.truncateAt, this.stalled ? undefined : f.stall?.at, f.corrupt?.at]) {
      if (at !== undefined && at >= this.forwarded && at < b) b = at;
    }
    return b;
  }

  pump(): void {
    const f = this.faults;
    while (!this.blocked && !this.ended && !this.conn.isClosing) {
      if (this.to.destroyed || this.to.writableEnded) {
        this.receiverGone();
        return;
      }
      // Faults that fire at the current offset, before anything more is written.
      if (f.dropAt !== undefined && this.forwarded >= f.dropAt) {
        this.conn.fire(`${this.dir} dropped (reset) at byte ${this.forwarded}`);
        this.ended = true;
        this.conn.reset();
        return;
      }
      if (f.truncateAt !== undefined && this.forwarded >= f.truncateAt) {
        this.conn.fire(`${this.dir} truncated (FIN) at byte ${this.forwarded}`);
        this.ended = true;
        this.queue.length = 0;
        this.queued = 0;
        this.from.resume();
        this.to.end();
        return;
      }
      if (f.stall && !this.stalled && this.forwarded >= f.stall.at) {
        this.stalled = true;
        this.blocked = 'stall';
        this.conn.fire(`${this.dir} stalled for ${f.stall.ms} ms at byte ${this.forwarded}`);
        this.conn.timer(f.stall.ms, () => {
          this.blocked = undefined;
          this.pump();
        });
        return;
      }
      const head = this.queue[0];
      if (!head) {
        if (this.fromEnded && !this.to.writableEnded) this.to.end();
        return;
      }
      let n = Math.min(head.length, this.nextBoundary() === this.forwarded ? 1 : this.nextBoundary() - this.forwarded);
      if (f.bytesPerSecond !== undefined) {
        const now = performance.now();
        this.tokens = Math.min(this.burst, this.tokens + ((now - this.lastRefill) * f.bytesPerSecond) / 1000);
        this.lastRefill = now;
        if (this.tokens < 1) {
          this.blocked = 'throttle';
          this.conn.timer(Math.max(1, Math.ceil(((1 - this.tokens) * 1000) / f.bytesPerSecond)), () => {
            this.blocked = undefined;
            this.pump();
          });
          return;
        }
        n = Math.min(n, Math.floor(this.tokens));
        this.tokens -= n;
        if (this.forwarded === 0) this.conn.fire(`${this.dir} throttled to ${f.bytesPerSecond} B/s`);
      }
      let piece = head.subarray(0, n);
      if (n === head.length) this.queue.shift();
      else this.queue[0] = head.subarray(n);
      this.queued -= n;
      if (f.corrupt && f.corrupt.at >= this.forwarded && f.corrupt.at < this.forwarded + n) {
        piece = Buffer.from(piece);
        const i = f.corrupt.at - this.forwarded;
        piece[i]! ^= f.corrupt.xor || 0xff;
        this.conn.fire(`${this.dir} byte ${f.corrupt.at} corrupted (xor 0x${(f.corrupt.xor || 0xff).toString(16)})`);
      }
      this.forwarded += n;
      if (this.queued <= this.highWater / 2 && this.from.isPaused()) this.from.resume();
      if (!this.to.write(piece)) this.blocked = 'drain';
    }
  }
}

/** One accepted connection and its onward connection. */
class RelayConnection {
  readonly up: Pipe | undefined;
  private downPipe: Pipe | undefined;
  private closing = false;
  private frozen = false;
  private readonly timers = new Set<NodeJS.Timeout>();
  upstream: net.Socket | undefined;

  constructor(
    private readonly relay: FaultRelay,
    readonly index: number,
    readonly client: net.Socket,
    readonly faults: ConnectionFaults,
  ) {
    client.on('error', () => this.onSocketGone(client, true));
    client.on('close', (hadError) => this.onSocketGone(client, hadError));
    // Until connected onward, the client's bytes wait in the kernel (no reading).
    client.pause();
  }

  get isClosing(): boolean {
    return this.closing || this.frozen;
  }

  /** Forwards nothing more either way and passes on no end, reset or close (see the file comment). */
  freeze(): void {
    if (this.closing || this.frozen) return;
    this.frozen = true;
    this.clearTimers();
    this.client.pause();
    this.upstream?.pause();
  }

  /** Opens the onward connection and starts forwarding. */
  connect(target: Endpoint, highWater: number): Promise<void> {
    if (this.closing) return Promise.resolve();
    // The socket factory's connect; no time limit of ours beyond the destination's own (30 s).
    const { socket: up, connected } = dial(target, { timeoutMs: 30_000 });
    this.upstream = up;
    up.setNoDelay(true);
    this.client.setNoDelay(true);
    up.on('error', () => this.onSocketGone(up, true));
    up.on('close', (hadError) => this.onSocketGone(up, hadError));
    return connected.then(
      () => {
        if (this.closing) return;
        (this as { up: Pipe | undefined }).up = new Pipe(this, 'up', this.client, up, this.faults.up ?? {}, linkBuffer(this.client, this.faults.up, highWater));
        this.downPipe = new Pipe(this, 'down', up, this.client, this.faults.down ?? {}, linkBuffer(up, this.faults.down, highWater));
        this.client.resume();
      },
      () => undefined,
    );
  }

  info(): RelayConnectionInfo {
    return {
      index: this.index,
      forwarded: { up: this.up?.forwarded ?? 0, down: this.downPipe?.forwarded ?? 0 },
      received: { up: this.up?.received ?? 0, down: this.downPipe?.received ?? 0 },
      open: { source: !this.client.destroyed, destination: this.upstream !== undefined && !this.upstream.destroyed },
      closed: this.client.destroyed && (this.upstream?.destroyed ?? true),
    };
  }

  fire(what: string): void {
    this.relay.fired.push(`conn ${this.index}: ${what}`);
  }

  timer(ms: number, fn: () => void): void {
    const t = setTimeout(() => {
      this.timers.delete(t);
      if (!this.closing) fn();
    }, ms);
    this.timers.add(t);
  }

  /** A network failure: both ends see a reset. */
  reset(): void {
    if (this.closing) return;
    this.closing = true;
    this.clearTimers();
    for (const s of [this.client, this.upstream]) {
      if (!s || s.destroyed) continue;
      // After end() (a FIN already on its way) libuv refuses the reset, and Node then never closes the handle.
      if (s.writableEnded) s.destroy();
      else s.resetAndDestroy();
    }
  }

  /**
   * One side went away. An error is passed on as a reset. A clean close is
   * passed on as a FIN by the pipe toward the other side, once it has written
   * what it holds (a stall or a throttle still delays it).
   */
  private onSocketGone(s: net.Socket, hadError: boolean): void {
    if (this.closing || this.frozen) return;
    const other = s === this.client ? this.upstream : this.client;
    if (hadError || !other || !this.up) {
      this.reset();
      return;
    }
    const toOther = s === this.client ? this.up : this.downPipe;
    const fromOther = s === this.client ? this.downPipe : this.up;
    toOther?.senderGone();
    fromOther?.receiverGone();
    if (this.client.destroyed && this.upstream?.destroyed) {
      this.closing = true;
      this.clearTimers();
      return;
    }
    // A peer that never closes its side must not keep the relay's socket for long.
    this.timer(5000, () => this.destroy());
  }

  private clearTimers(): void {
    for (const t of this.timers) clearTimeout(t);
    this.timers.clear();
  }

  destroy(): void {
    this.closing = true;
    this.clearTimers();
    this.client.destroy();
    this.upstream?.destroy();
  }

  destroyIfFrozen(): void {
    if (this.frozen) this.destroy();
  }
}

export class FaultRelay {
  /** Every fault that fired, in order ("conn 0: up dropped (reset) at byte 1234"). */
  readonly fired: string[] = [];
  private readonly conns: RelayConnection[] = [];
  private accepted = 0;
  private held: RelayConnection | undefined;
  private holdTimer: NodeJS.Timeout | undefined;
  private closed = false;
  private frozenAt: number | undefined;

  private constructor(
    private readonly listening: Listening,
    private readonly target: Endpoint,
    private readonly opts: FaultRelayOptions,
  ) {
    this.uri = `tcp:127.0.0.1:${(listening.endpoint as { port: number }).port}`;
    listening.server.on('connection', (s: net.Socket) => this.onConnection(s));
  }

  /** Listens on 127.0.0.1 (ephemeral port), through the socket factory. */
  static async start(opts: FaultRelayOptions): Promise<FaultRelay> {
    const target = parseTarget(opts.target);
    const listening = await listen({ kind: 'tcp', host: '127.0.0.1', port: 0 }, { pauseOnConnect: true });
    return new FaultRelay(listening, target, opts);
  }

  /** `tcp:127.0.0.1:PORT`: give it to the source as its destination (still readable after `close()`). */
  readonly uri: string;

  /**
   * A network failure now: every open connection (or those `which` picks, by
   * accept index) is reset at both ends. Returns how many were cut.
   */
  cut(which: (index: number) => boolean = () => true): number {
    let n = 0;
    for (const c of this.conns) {
      if (c.isClosing || !which(c.index)) continue;
      c.reset();
      this.fired.push(`conn ${c.index}: cut (reset) by the test`);
      n++;
    }
    return n;
  }

  /**
   * A silent partition from now on (see the file comment). Returns
   * performance.now() of the freeze and how many open connections it froze.
   */
  freeze(): { at: number; frozen: number } {
    let frozen = 0;
    for (const c of this.conns) {
      if (c.isClosing) continue;
      c.freeze();
      frozen++;
    }
    this.frozenAt = performance.now();
    this.fired.push(`freeze: ${frozen} connection(s) frozen by the test`);
    return { at: this.frozenAt, frozen };
  }

  /**
   * Ends the partition: new connections are forwarded again, and the frozen
   * ones are destroyed — unless `keepFrozen`, then they stay black holes (a
   * new route for new connections; nothing of the old ones ever arrives)
   * until close().
   */
  heal(opts: { keepFrozen?: boolean } = {}): void {
    if (this.frozenAt === undefined) return;
    this.frozenAt = undefined;
    if (!opts.keepFrozen) for (const c of this.conns) c.destroyIfFrozen();
    this.fired.push(`healed by the test${opts.keepFrozen ? ' (the frozen connections stay frozen)' : ''}`);
  }

  /** Whether a partition is on (between freeze() and heal()). */
  get isFrozen(): boolean {
    return this.frozenAt !== undefined;
  }

  /** Per-connection counters. */
  get connections(): RelayConnectionInfo[] {
    return this.conns.map((c) => c.info());
  }

  private faultsFor(i: number): ConnectionFaults {
    const c = this.opts.connections;
    if (!c) return {};
    return (typeof c === 'function' ? c(i) : c[i]) ?? {};
  }

  private onConnection(s: net.Socket): void {
    const index = this.accepted++;
    if (this.closed || index >= (this.opts.maxConnections ?? 4)) {
      s.destroy();
      return;
    }
    if (this.frozenAt !== undefined) {
      this.fired.push(`conn ${index}: refused (frozen)`);
      s.destroy();
      return;
    }
    const conn = new RelayConnection(this, index, s, this.faultsFor(index));
    this.conns.push(conn);
    const hw = this.opts.highWaterBytes ?? 256 << 10;
    const reorder = this.opts.reorder;
    if (reorder && index === 0) {
      this.held = conn;
      const holdMs = typeof reorder === 'object' ? (reorder.holdMs ?? DEFAULT_HOLD_MS) : DEFAULT_HOLD_MS;
      this.holdTimer = setTimeout(() => {
        this.holdTimer = undefined;
        const h = this.held;
        this.held = undefined;
        if (h) {
          this.fired.push(`conn 0: held ${holdMs} ms, no second connection came; connected in order`);
          void h.connect(this.target, hw);
        }
      }, holdMs);
      return;
    }
    if (reorder && index === 1 && this.held) {
      const first = this.held;
      this.held = undefined;
      clearTimeout(this.holdTimer);
      this.holdTimer = undefined;
      this.fired.push('conn 1 connected onward before conn 0 (reordered)');
      void conn.connect(this.target, hw).then(() => first.connect(this.target, hw));
      return;
    }
    void conn.connect(this.target, hw);
  }

  /** Destroys every socket, clears every timer, closes the server. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    clearTimeout(this.holdTimer);
    for (const c of this.conns) c.destroy();
    await new Promise<void>((resolve) => this.listening.server.close(() => resolve()));
  }
}

const SOL_SOCKET = 1;
const SO_RCVBUF = 8;
const sockopt = createRequire(import.meta.url)('sockopt') as { setsockopt(s: net.Socket, level: number, name: number, value: number): void };

/**
 * A throttled direction behaves like a slow link: what it cannot carry yet
 * stays with the sender (its kernel send queue), not in megabytes of relay
 * buffers — a real bottleneck queues a fraction of a second. So the relay
 * holds at most a quarter second of data and reads through a small receive
 * buffer; an unthrottled direction keeps `highWater`.
 */
function linkBuffer(from: net.Socket, faults: DirectionFaults | undefined, highWater: number): number {
  const rate = faults?.bytesPerSecond;
  if (rate === undefined) return highWater;
  const bytes = Math.max(16 << 10, Math.floor(rate / 4));
  try {
    sockopt.setsockopt(from, SOL_SOCKET, SO_RCVBUF, bytes);
  } catch {
    // Without the addon the relay buffers more: a slow-link test then measures less of the sender.
  }
  return Math.min(highWater, bytes);
}
