import { EventEmitter } from 'node:events';
import type { Socket } from 'node:net';
import type { TLSSocket } from 'node:tls';
import { TransportError, type ChannelName } from './errors.js';
import { unackedBytes } from './kernel-queue.js';
import { SendQueue } from './send-queue.js';
import { classifyTlsError } from './tls.js';
import { setNotSentLowat, type EffectiveTuning } from './tuning.js';

/**
 * What a channel carries: the main stream (and the return path), urgent
 * postcopy pages (preempt), or one of QEMU's multifd channels (bulk pages in
 * packets; several, told apart by their id).
 */
export type ChannelRole = 'main' | 'preempt' | 'multifd';

/** A channel's name in errors and stats: its role, and a multifd channel's id (`multifd-3`). */
export function channelName(role: ChannelRole, id?: number): ChannelName {
  return role === 'multifd' ? `multifd-${id ?? 0}` : role;
}

/** Limits of one channel's user-space buffering. */
export interface ChannelLimits {
  /**
   * Most bytes held in user space for this channel (our queue plus the
   * socket's own write buffer); `send()` waits beyond it. Default: main 8 MiB,
   * preempt 256 KiB, multifd as main.
   */
  readonly maxQueuedBytes?: number;
  /**
   * How much the socket's own (FIFO) write buffer may hold before we wait for
   * 'drain'. Everything in it is ahead of any urgent write, so it stays small;
   * the kernel's send buffer keeps the link busy meanwhile. Default: main
   * 1 MiB, preempt 0 (hand over at once).
   */
  readonly socketBufferBytes?: number;
  /**
   * Pull-based bulk (main): the bulk producer hands over pages only while the
   * channel's user-space bytes (our queue + the socket's write buffer) are
   * under this window (`bulkRoom`, `whenBulkRoom()`); it never holds more than
   * the window plus one batch. Small, so that an urgent page does not wait
   * behind megabytes we buffered ourselves: the kernel's send buffer keeps the
   * link busy. Default 256 KiB. `send()` and `maxQueuedBytes` are unchanged.
   */
  readonly bulkWindowBytes?: number;
  /**
   * TCP_NOTSENT_LOWAT the source sets on its main channel at the postcopy
   * switch (`Channel.setNotSentLowat`): the kernel then holds at most this
   * many unsent bulk bytes, so a page request answered on main (no preempt
   * channel) waits behind little. Default 128 KiB; 0 leaves the kernel's
   * setting. Needs the sockopt addon (no-op without it).
   */
  readonly postcopyNotSentLowat?: number;
}

export interface ChannelStats {
  role: ChannelRole;
  /** A multifd channel's id (QEMU's channel number, 0-based). */
  id?: number;
  bytesSent: number;
  bytesReceived: number;
  /** Bytes in user space right now (our queue + the socket's write buffer). */
  queuedBytes: number;
  peakQueuedBytes: number;
  maxQueuedBytes: number;
  /** The pull-based bulk window (see ChannelLimits.bulkWindowBytes). */
  bulkWindowBytes: number;
  /** Times a `send()` had to wait for room. */
  writeWaits: number;
  /** Times the bulk producer waited for room below the window (`whenBulkRoom()` that did not resolve at once). */
  bulkWaits: number;
  /** Times reading was paused because the consumer was busy. */
  readPauses: number;
  tuning: EffectiveTuning;
  tls?: { protocol: string | null; cipher: string; resumed: boolean };
}

type Consumer = (chunk: Buffer) => void | Promise<void>;

/** How many bytes `send()` may accept in a row before it lets the event loop run I/O. */
const YIELD_EVERY_BYTES = 1 << 20;

const EMPTY = new Uint8Array(0);

interface ChannelEvents {
  error: [TransportError];
  end: [];
  close: [];
}

/**
 * One migration socket (plain or TLS) with bounded buffering both ways:
 * `send()` resolves once the bytes fit under `maxQueuedBytes` (so a producer
 * awaiting it never grows memory past the bound), urgent groups overtake
 * queued bulk groups, and a consumer that returns a promise pauses the socket
 * until it settles. Errors are reported once, as TransportError, via 'error'.
 */
export class Channel extends EventEmitter<ChannelEvents> {
  private readonly queue = new SendQueue();
  private readonly maxQueued: number;
  private readonly socketBudget: number;
  private waiters: (() => void)[] = [];
  private flushWaiters: (() => void)[] = [];
  private closed = false;
  private failure: TransportError | undefined;
  private consumer: Consumer | undefined;
  private readonly s: ChannelStats;
  private sinceYield = 0;
  private readonly bulkWindow: number;
  /** Bulk bytes handed over since the producer last let the event loop run (see bulkRoom). */
  private bulkSinceYield = 0;
  private bulkYieldBytes = YIELD_EVERY_BYTES;
  private roomWaiters: (() => void)[] = [];
  /** How errors name this channel (`main`, `preempt`, `multifd-N`). */
  readonly name: ChannelName;

  constructor(
    readonly socket: Socket | TLSSocket,
    readonly role: ChannelRole,
    tuning: EffectiveTuning,
    limits: ChannelLimits = {},
    /** A multifd channel's id. */
    readonly id?: number,
  ) {
    super();
    const bulk = role !== 'preempt';
    this.name = channelName(role, id);
    this.maxQueued = limits.maxQueuedBytes ?? (bulk ? 8 << 20 : 256 << 10);
    this.socketBudget = limits.socketBufferBytes ?? (bulk ? 1 << 20 : 0);
    this.bulkWindow = limits.bulkWindowBytes ?? 256 << 10;
    const tlsSock = socket as TLSSocket;
    const name = this.name;
    this.s = {
      role,
      ...(id !== undefined ? { id } : {}),
      bytesSent: 0,
      bytesReceived: 0,
      queuedBytes: 0,
      peakQueuedBytes: 0,
      maxQueuedBytes: this.maxQueued,
      bulkWindowBytes: this.bulkWindow,
      writeWaits: 0,
      bulkWaits: 0,
      readPauses: 0,
      tuning,
      ...(typeof tlsSock.getProtocol === 'function'
        ? { tls: { protocol: tlsSock.getProtocol(), cipher: tlsSock.getCipher()?.name ?? '', resumed: tlsSock.isSessionReused() } }
        : {}),
    };
    // A peer host that vanishes without a FIN or RST is found even when we only wait for it.
    socket.setKeepAlive(true, 10_000);
    socket.on('drain', this.afterWrite);
    socket.on('error', (e) => this.fail(classifySocketError(e, name)));
    socket.on('end', () => this.emit('end'));
    socket.on('close', () => {
      this.closed = true;
      if (!this.failure && !this.queue.empty) this.fail(new TransportError('closed', 'socket closed with data still queued', { channel: name }));
      this.releaseAll();
      this.emit('close');
    });
  }

  /** Bytes in user space now: our queue plus the socket's write buffer. */
  get queuedBytes(): number {
    return this.queue.bytes + this.socket.writableLength;
  }

  get stats(): ChannelStats {
    return { ...this.s, queuedBytes: this.queuedBytes, tuning: { ...this.s.tuning } };
  }

  /**
   * Bytes the bulk producer may hand over now (pull-based bulk): the window
   * less what sits in user space; 0 also when it has handed over
   * `bulkYieldBytes` in a row, since then it must let the event loop read
   * (a page request on the return path) before going on. The producer hands
   * over at most one batch beyond it.
   */
  get bulkRoom(): number {
    if (this.bulkSinceYield >= this.bulkYieldBytes) return 0;
    return Math.max(0, this.bulkWindow - this.queuedBytes);
  }

  /**
   * Resolves when `bulkRoom` is positive again: after the socket has taken
   * bytes (its write callbacks, 'drain'), or — when only the yield quantum was
   * used up — after one turn of the event loop's I/O. The producer's only
   * wait: there is no other yield, and no promise while there is room.
   * Rejects once the channel has failed or closed.
   */
  whenBulkRoom(): Promise<void> {
    if (this.failure) return Promise.reject(this.failure);
    if (this.isClosed) return Promise.reject(new TransportError('closed', 'channel closed', { channel: this.name }));
    if (this.bulkSinceYield >= this.bulkYieldBytes && this.queuedBytes < this.bulkWindow) {
      return new Promise((resolve) =>
        setImmediate(() => {
          this.bulkSinceYield = 0;
          resolve();
        }),
      );
    }
    this.bulkSinceYield = 0;
    if (this.queuedBytes < this.bulkWindow) return Promise.resolve();
    this.s.bulkWaits++;
    return new Promise((resolve, reject) => {
      this.roomWaiters.push(() => (this.failure ? reject(this.failure) : this.isClosed ? reject(new TransportError('closed', 'channel closed', { channel: this.name })) : resolve()));
    });
  }

  /**
   * How many bulk bytes the producer may hand over before `bulkRoom` makes
   * it yield to the event loop (default 1 MiB). Smaller in postcopy, where a
   * page request read late is a late page.
   */
  setBulkYield(bytes: number): void {
    this.bulkYieldBytes = Math.max(1, bytes);
  }

  /**
   * Sets TCP_NOTSENT_LOWAT now (undefined: back to the kernel's default) and
   * reads it back into `stats.tuning.notSentLowat`. A no-op (a warning in the
   * stats) without the sockopt addon or on a unix socket.
   */
  setNotSentLowat(bytes: number | undefined): void {
    if (this.isClosed) return;
    setNotSentLowat(this.socket, bytes, this.s.tuning);
  }

  /**
   * Bytes in the kernel not yet acknowledged by the peer (see kernel-queue.ts);
   * undefined where the kernel does not tell (unix sockets, not Linux).
   */
  get unackedBytes(): number | undefined {
    return unackedBytes(this.socket);
  }

  get isClosed(): boolean {
    return this.closed || this.socket.destroyed;
  }

  /**
   * Queues `pieces` as one group (they leave back to back, one corked write on
   * a bulk channel). Resolves when the channel's user-space bytes are back
   * under the bound; rejects once the channel has failed or closed.
   * `written` is called when the group's last byte has reached the kernel.
   */
  send(pieces: readonly Uint8Array[], priority: 'urgent' | 'bulk' = 'bulk', written?: () => void): Promise<void> {
    if (this.failure) return Promise.reject(this.failure);
    if (this.isClosed) return Promise.reject(new TransportError('write-after-close', 'channel is closed', { channel: this.name }));
    const bytes = this.enqueue(pieces, priority, written);
    if (this.queuedBytes <= this.maxQueued) {
      // Resolving as a microtask every time would let a producer that only
      // awaits send() starve the event loop: nothing would be read meanwhile
      // (a page request on the return path, say). Every MiB, resolve after I/O.
      this.sinceYield += bytes;
      if (this.sinceYield < YIELD_EVERY_BYTES) return Promise.resolve();
      this.sinceYield = 0;
      return new Promise((resolve) => setImmediate(resolve));
    }
    this.s.writeWaits++;
    return new Promise((resolve, reject) => {
      this.waiters.push(() => (this.failure ? reject(this.failure) : this.isClosed ? reject(new TransportError('closed', 'channel closed', { channel: this.name })) : resolve()));
    });
  }

  /**
   * Hands `pieces` over as one group without a promise: the pull-based bulk
   * producer's write (it asks `bulkRoom` first) and the urgent answers it
   * interleaves. Throws the channel's TransportError once it has failed or
   * closed. Returns the bytes queued.
   */
  push(pieces: readonly Uint8Array[], priority: 'urgent' | 'bulk' = 'bulk', written?: () => void): number {
    if (this.failure) throw this.failure;
    if (this.isClosed) throw new TransportError('write-after-close', 'channel is closed', { channel: this.name });
    const bytes = this.enqueue(pieces, priority, written);
    if (priority === 'bulk') this.bulkSinceYield += bytes;
    return bytes;
  }

  /**
   * `written` once every bulk byte handed over so far has reached the kernel
   * (at once, on the next tick, when none is left in user space): how a page
   * request for a page already on its way on main is timed.
   */
  afterBulkWritten(written: () => void): void {
    if (this.isClosed) return;
    if (this.queue.empty && this.socket.writableLength === 0) {
      process.nextTick(written);
      return;
    }
    this.enqueue([EMPTY], 'bulk', written);
  }

  private enqueue(pieces: readonly Uint8Array[], priority: 'urgent' | 'bulk', written: (() => void) | undefined): number {
    let bytes = 0;
    for (const p of pieces) bytes += p.length;
    this.queue.push(written ? { pieces, bytes, written } : { pieces, bytes }, priority);
    this.pump();
    const q = this.queuedBytes;
    if (q > this.s.peakQueuedBytes) this.s.peakQueuedBytes = q;
    return bytes;
  }

  /** Runs when the socket took bytes off its own buffer: hand over more, wake writers. */
  private readonly afterWrite = (): void => {
    this.pump();
    if (this.flushWaiters.length > 0 && this.queue.empty && this.socket.writableLength === 0) {
      const w = this.flushWaiters;
      this.flushWaiters = [];
      for (const f of w) f();
    }
  };

  /**
   * Moves groups from our queue into the socket while its own buffer is under
   * budget. Triggers: send(), each group's write callback, 'drain'.
   */
  private pump(): void {
    const sock = this.socket;
    if (sock.destroyed) return;
    // A bulk channel coalesces every group handed over in one go into one
    // writev; any channel writes a group's pieces (a header and its page) as one
    // writev at least: written one by one, the page would wait for the header's
    // ACK under Nagle (a delayed ACK: ~40 ms on Linux).
    const coalesce = this.s.tuning.cork;
    if (coalesce) sock.cork();
    while (!this.queue.empty && sock.writableLength <= this.socketBudget) {
      const g = this.queue.shift()!;
      const last = g.pieces.length - 1;
      const group = !coalesce && last > 0;
      if (group) sock.cork();
      const done = g.written ? () => (g.written!(), this.afterWrite()) : this.afterWrite;
      for (let i = 0; i <= last; i++) sock.write(g.pieces[i]!, i === last ? done : undefined);
      if (group) sock.uncork();
      this.s.bytesSent += g.bytes;
    }
    if (coalesce) sock.uncork();
    if (this.waiters.length > 0 && this.queuedBytes <= this.maxQueued) this.releaseWaiters();
    if (this.roomWaiters.length > 0 && this.queuedBytes < this.bulkWindow) this.releaseRoomWaiters();
  }

  private releaseRoomWaiters(): void {
    const w = this.roomWaiters;
    this.roomWaiters = [];
    for (const f of w) f();
  }

  private releaseWaiters(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }

  private releaseAll(): void {
    this.releaseWaiters();
    this.releaseRoomWaiters();
    const f = this.flushWaiters;
    this.flushWaiters = [];
    for (const x of f) x();
  }

  /**
   * Starts delivering received bytes to `consumer`. When it returns a promise,
   * the socket is paused until the promise settles (a rejection fails the channel).
   */
  read(consumer: Consumer): void {
    if (this.consumer) throw new Error('a channel has one reader');
    this.consumer = consumer;
    this.socket.on('data', (chunk: Buffer) => {
      this.s.bytesReceived += chunk.length;
      let r: void | Promise<void>;
      try {
        r = consumer(chunk);
      } catch (e) {
        this.destroy(e);
        return;
      }
      if (r && typeof (r as Promise<void>).then === 'function') {
        this.socket.pause();
        this.s.readPauses++;
        (r as Promise<void>).then(
          () => {
            if (!this.socket.destroyed) this.socket.resume();
          },
          (e: unknown) => this.destroy(e),
        );
      }
    });
  }

  /** Resolves once everything queued has been handed to the socket. */
  async flush(): Promise<void> {
    if (this.queue.empty && this.socket.writableLength === 0) return;
    await new Promise<void>((resolve) => this.flushWaiters.push(resolve));
    if (this.failure) throw this.failure;
    if (!this.queue.empty) throw new TransportError('closed', 'channel closed before its data was sent', { channel: this.name });
  }

  /**
   * Sends what is queued (for at most `timeoutMs`: a peer that stopped reading
   * must not hold us), ends our direction and waits for the socket to close.
   */
  async close(timeoutMs = 5000): Promise<void> {
    if (this.isClosed) return;
    try {
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([
        this.flush(),
        new Promise<void>((_, reject) => {
          timer = setTimeout(() => reject(new TransportError('closed', `data still queued after ${timeoutMs} ms`, { channel: this.name })), timeoutMs);
        }),
      ]).finally(() => clearTimeout(timer));
    } catch {
      this.socket.destroy();
    } finally {
      await new Promise<void>((resolve) => {
        if (this.socket.destroyed) return resolve();
        this.socket.once('close', () => resolve());
        this.socket.end();
        // The peer may never close its side; do not hang on it.
        setTimeout(() => this.socket.destroy(), 2000).unref();
      });
    }
  }

  /** Tears the socket down now; `reason` becomes the channel's error (if it is the first). */
  destroy(reason?: unknown): void {
    if (reason !== undefined && !this.failure) {
      this.fail(reason instanceof TransportError ? reason : new TransportError('closed', reason instanceof Error ? reason.message : String(reason), { cause: reason, channel: this.name }));
    }
    this.socket.destroy();
  }

  private fail(e: TransportError): void {
    if (this.failure) return;
    this.failure = e;
    this.releaseAll();
    this.socket.destroy();
    if (this.listenerCount('error') > 0) this.emit('error', e);
  }
}

/** Maps a socket error to a TransportError code. */
export function classifySocketError(e: unknown, channel?: ChannelName): TransportError {
  if (e instanceof TransportError) return e;
  const code = (e as NodeJS.ErrnoException | undefined)?.code;
  const msg = e instanceof Error ? e.message : String(e);
  const opts = { cause: e, ...(channel ? { channel } : {}) };
  // OpenSSL errors on an established TLS channel: with TLS 1.3 the server judges the client
  // certificate after the client's handshake is done, so its refusal (an alert naming the reason)
  // only arrives here.
  if (code?.startsWith('ERR_SSL_')) return classifyTlsError(e, channel, { established: true });
  switch (code) {
    case 'ECONNRESET':
    case 'EPIPE':
      return new TransportError('reset', msg, opts);
    case 'ECONNREFUSED':
    case 'ENOENT':
    case 'EHOSTUNREACH':
    case 'ENETUNREACH':
    case 'EADDRNOTAVAIL':
      return new TransportError('connect-failed', msg, opts);
    case 'ETIMEDOUT':
      return new TransportError('connect-timeout', msg, opts);
    case 'EADDRINUSE':
      return new TransportError('address-in-use', msg, opts);
    default:
      return new TransportError('closed', msg, opts);
  }
}
