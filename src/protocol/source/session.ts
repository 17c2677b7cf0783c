import { EventEmitter } from 'node:events';
import { performance } from 'node:perf_hooks';
import { MAX_DISCARDS_PER_COMMAND, RAM_IDSTR, RAM_VERSION, TARGET_PAGE_SIZE } from '../stream/constants.js';
import { PreemptEncoder, StreamEncoder } from '../stream/encoder.js';
import { isZeroPage } from '../stream/ram.js';
import { ReturnPathDecoder } from '../stream/return-path.js';
import type { DiscardRange, PreemptRecord, StreamRecord } from '../stream/records.js';
import type { Channel, ChannelStats } from '../transport/channel.js';
import { SourceConnection, type TransportOptions } from '../transport/connection.js';
import { usageError } from '../errors.js';
import { MigrationError, abortError, type MigrationPhase } from './errors.js';
import { checkEndpoint, checkNumber, checkPostcopyPolicy, checkSignal, checkTransport } from './options.js';
import { LatencyHistogram, type LatencySummary } from './latency.js';
import { PageBitmap, type GuestMemorySource, type SourceBlock } from './memory-source.js';
import { autoWantsPostcopy, type PostcopyPolicy } from './postcopy-policy.js';
import { Pacer } from './pacer.js';
import { XbzrleCache } from './xbzrle-cache.js';
import { applyReceivedBitmap, isNetworkFailure, retryDelayMs, type PausedEvent, type ResumedEvent, type SourceRecoveryOptions } from './recovery.js';
import { StallWatch } from './stall-watch.js';

/** One device (non-RAM) section to send: opaque bytes, as captured from a source. */
export interface DeviceStateSection {
  /** Section id to use on the wire (default: assigned in order). */
  readonly sectionId?: number;
  readonly idstr: string;
  readonly instanceId: number;
  readonly versionId: number;
  readonly data: Uint8Array;
}

export interface SourceOptions {
  /** Where the destination listens: `tcp:HOST:PORT` or `unix:PATH`. */
  to: string;
  transport?: TransportOptions;
  memory: GuestMemorySource;
  /** Sent in the configuration record; a QEMU destination must run the same machine type. */
  machineType: string;
  /** Device state, read after the VM stopped (a function) or given up front. */
  devices: readonly DeviceStateSection[] | (() => readonly DeviceStateSection[] | Promise<readonly DeviceStateSection[]>);
  /** When to switch to postcopy (default 'never'). */
  postcopy?: PostcopyPolicy;
  /** Open the preempt channel at the switch and answer page requests on it (needs postcopy). */
  preempt?: boolean;
  /** Stops the caller's VM at the switchover point; the `stopped` event follows at once. */
  stopVm?: () => void | Promise<void>;
  /** Precopy bandwidth cap in bytes/s (QEMU's max-bandwidth; default none). */
  bandwidthLimit?: number;
  /** Background bandwidth cap during postcopy (QEMU's max-postcopy-bandwidth; default none). */
  postcopyBandwidthLimit?: number;
  /** Precopy completes when the dirty set can be sent within this many ms (default 300). */
  downtimeLimitMs?: number;
  /** Complete (stop and send the rest) after this many passes without converging, when postcopy is not used (default unlimited, as QEMU). */
  maxPasses?: number;
  /** XBZRLE for pages resent in later precopy passes, with a cache of this many bytes (default off). */
  xbzrleCacheBytes?: number;
  /** Send SWITCHOVER_START before the final sections (default: when the machine type is 10.0 or newer, as QEMU). */
  switchoverStart?: boolean;
  /** The VM description sent after EOF in precopy; default: one generated from the device sizes. */
  vmdesc?: Uint8Array;
  /** Bytes of page data per RAM PART section (default 8 MiB). */
  sectionBytes?: number;
  /**
   * How long an answer from the destination (PONG 1 before the preempt channel
   * opens, SHUT at the end) may be outstanding with nothing moving: no
   * return-path message and, where the kernel tells, none of our bytes
   * acknowledged (default 30 s). A slow link is not a timeout; a dead peer is.
   * Once the destination's kernel has acknowledged the whole stream, the wait
   * for SHUT goes on until SHUT or the connection's end (a destination may
   * take long to flush its RAM; TCP keepalive finds a dead host).
   *
   * The same window detects a silent partition in postcopy: when our bytes
   * wait to be delivered and nothing moves for this long (no return-path
   * message, no byte newly acknowledged by the destination's kernel, no byte
   * newly written), the link is taken as dead and postcopy pauses and
   * reconnects, as after a reset (see `recovery`).
   */
  replyTimeoutMs?: number;
  /**
   * Postcopy recovery: once the destination runs the VM, a network failure
   * pauses the migration ('paused') and the source reconnects with backoff
   * until the destination takes the new connection ('resumed'). Default: on
   * whenever postcopy is possible; `false` makes such a failure final.
   */
  recovery?: SourceRecoveryOptions | false;
  /**
   * Aborting it cancels the migration, as `cancel()`: `done` rejects with a
   * MigrationError 'cancelled' whose `cause` is the signal's reason.
   */
  signal?: AbortSignal;
}

export interface SourceStats {
  status: 'setup' | 'active' | 'postcopy-active' | 'postcopy-paused' | 'postcopy-recover' | 'completed' | 'failed';
  /** Postcopy recoveries completed. */
  recoveries: number;
  transferred: number;
  /** Bytes of dirty pages still to send. */
  remaining: number;
  /** Source stop → destination running (package sent in postcopy, SHUT received in precopy), ms. */
  downtime: number | undefined;
  'setup-time': number;
  'total-time': number;
  'dirty-sync-count': number;
  'postcopy-requests': number;
  /**
   * Requested pages not sent again because they had already gone out since
   * POSTCOPY_LISTEN — nearly always by the background stream, sitting in the
   * main channel's queue and socket buffers ahead of the request: they arrive
   * on main, which is why the preempt channel may carry no page at all.
   */
  'requested-pages-already-sent': number;
  'pages-per-second': number;
  normal: number;
  duplicate: number;
  xbzrle: number;
  passes: number;
  /** Request arrival → last byte of the page handed to the kernel, µs. */
  'postcopy-latency': LatencySummary;
  channels: { main?: ChannelStats; preempt?: ChannelStats };
}

export interface SourceEvents {
  connected: [{ uri: string }];
  /** A precopy pass over the dirty pages ended. */
  pass: [{ pass: number; pagesSent: number; bytes: number; dirtyPages: number; durationMs: number }];
  /** The VM was stopped (by stopVm) — emitted before any device state is written. */
  stopped: [{ at: number; hrtime: bigint }];
  'postcopy-active': [];
  'page-request': [{ block: string; offset: number; channel: 'main' | 'preempt'; latencyUs: number }];
  /** A requested page had already gone out since LISTEN (see SourceStats['requested-pages-already-sent']): not sent again. */
  'requested-page-already-sent': [{ block: string; offset: number }];
  /** Postcopy: a channel failed; the migration waits for a new connection (state kept). */
  paused: [PausedEvent];
  /** A reconnection attempt starts. */
  recovering: [{ attempt: number; to: string }];
  /** The destination acknowledged the resume (RESUME_ACK); postcopy goes on. */
  resumed: [ResumedEvent];
  completed: [SourceStats];
  failed: [MigrationError];
}

interface BlockState {
  readonly info: SourceBlock;
  readonly pages: number;
  /** Pages to send in the current pass / after LISTEN. */
  readonly toSend: PageBitmap;
  /** Pages sent at least once. */
  readonly sentOnce: PageBitmap;
  /** After LISTEN: pages sent (exactly once). */
  readonly sentAfterListen: PageBitmap;
}

/** Pages [page, end) of one page request, still to be answered. */
interface QueuedRequest {
  block: string;
  page: number;
  end: number;
  arrived: number;
}

/** One answered page, timed when its last byte reaches the kernel. */
interface AnsweredPage {
  block: string;
  page: number;
  arrived: number;
}

/** Pages answered per turn before the background stream gets the socket again. */
const REQUEST_PAGES_PER_TURN = 64;

const EMPTY = new Uint8Array(0);

/**
 * The sending half of a migration (QEMU's source), into a QEMU 10.0
 * destination or our own DestinationSession. Precopy passes over dirty pages,
 * then either completion (stop, last dirty pages, device state, EOF) or the
 * postcopy switch in QEMU 10.0's order (SWITCHOVER_START, discards, PING,
 * PACKAGED with LISTEN + devices + PING + RUN, remaining pages exactly once,
 * END, EOF). Page requests are answered on the preempt channel when there is
 * one, otherwise first thing at the next record boundary on the main channel.
 */
export class SourceSession extends EventEmitter<SourceEvents> {
  readonly done: Promise<SourceStats>;
  private resolveDone!: (s: SourceStats) => void;
  private rejectDone!: (e: MigrationError) => void;
  private conn: SourceConnection | undefined;
  private preempt: Channel | undefined;
  private readonly enc = new StreamEncoder();
  private readonly preemptEnc = new PreemptEncoder();
  private rp = new ReturnPathDecoder();
  private readonly blocks = new Map<string, BlockState>();
  private readonly order: BlockState[] = [];
  private phase: MigrationPhase = 'setup';
  private status: SourceStats['status'] = 'setup';
  private postcopyRequested = false;
  private inPostcopy = false;
  private finished = false;
  private failure: MigrationError | undefined;
  private pongs = new Set<number>();
  /** Re-checked on every return-path message and on failure (see waitForPeer). */
  private readonly peerWaiters = new Set<() => void>();
  private shutValue: number | undefined;
  private lastReqBlock: string | undefined;
  /** Requests to answer inside the main stream (no preempt channel). */
  private readonly requests: QueuedRequest[] = [];
  /** Requests to answer on the preempt channel, by servePreempt (one at a time, waiting for room). */
  private readonly preemptRequests: QueuedRequest[] = [];
  private servingPreempt = false;
  private readonly latency = new LatencyHistogram();
  private readonly xbzrle: XbzrleCache | undefined;
  private readonly ramSectionId: number;
  private readonly t0 = performance.now();
  private setupMs = 0;
  private stoppedAt: number | undefined;
  private downtimeMs: number | undefined;
  private endedAt: number | undefined;
  private readonly c = { transferred: 0, normal: 0, duplicate: 0, xbzrle: 0, passes: 0, syncs: 0, requests: 0, recoveries: 0, alreadySent: 0 };
  /** start() was called: a second call is misuse. */
  private started = false;
  /** Settles when run() has ended (close() waits for it). */
  private ran: Promise<unknown> = Promise.resolve();
  /** A page request we refused (postcopy): the stream is ended at the next record boundary, then the migration fails with it. */
  private refusal: MigrationError | undefined;
  private writeWatch: NodeJS.Timeout | undefined;
  private readonly onAbort = () => this.fail(abortError(this.opts.signal!, this.phase));
  /** Connection generation: handlers of a connection replaced by a recovery ignore what they see. */
  private generation = 0;
  /** Set while postcopy is paused by a network failure (cleared by a new connection). */
  private pausedBy: MigrationError | undefined;
  private pausedAt = 0;
  /** Received-bitmaps of the recovery in progress, by block. */
  private readonly recvBitmaps = new Map<string, Uint8Array>();
  private resumeAcked = false;
  /** Where the next recovery attempt connects (resume(uri) sets it). */
  private recoverTo: string | undefined;
  /** Wakes a recovery that sleeps between attempts (or holds after a manual pause). */
  private wakeRecovery: (() => void) | undefined;
  /** pause() was called: no reconnection attempt until resume() (QEMU's source waits for `migrate resume=true`). */
  private manualHold = false;
  /** Postcopy: a link whose bytes stop moving is a partition (see replyTimeoutMs). */
  private readonly stallWatch: StallWatch;
  private readonly pacer = new Pacer();
  private sinceYield = 0;

  constructor(private readonly opts: SourceOptions) {
    super();
    validateSourceOptions(opts);
    this.done = new Promise((resolve, reject) => {
      this.resolveDone = resolve;
      this.rejectDone = reject;
    });
    this.done.catch(() => undefined);
    this.stallWatch = new StallWatch(() => [this.conn?.main, this.preempt], opts.replyTimeoutMs ?? 30_000, (idleMs) => {
      const what = `nothing moved on the connection for ${Math.round(idleMs)} ms (no return-path message, none of our bytes acknowledged): the link is taken as dead`;
      this.channelLost(new MigrationError('idle-timeout', this.phase, what), this.generation);
    });
    const policy = opts.postcopy ?? 'never';
    if (opts.preempt && policy === 'never') throw new TypeError('preempt needs a postcopy policy other than "never"');
    const used = new Set<number>();
    if (typeof opts.devices !== 'function') for (const d of opts.devices) if (d.sectionId !== undefined) used.add(d.sectionId);
    let id = 1;
    while (used.has(id)) id++;
    this.ramSectionId = id;
    if (opts.xbzrleCacheBytes) this.xbzrle = new XbzrleCache(opts.xbzrleCacheBytes);
    // Pages go out by reference: a source that recycles its buffers must outlast what we may hold unsent.
    const main = opts.transport?.main;
    const unsent = (main?.maxQueuedBytes ?? 8 << 20) + (main?.socketBufferBytes ?? 1 << 20) + (1 << 20); // + an encoder batch, with room
    if (opts.memory.reuseAfterBytes !== undefined && unsent > opts.memory.reuseAfterBytes / 2) {
      throw new TypeError(`the guest-memory source recycles its buffers after ${opts.memory.reuseAfterBytes} bytes; the main channel may hold ${unsent} unsent: lower transport.main.maxQueuedBytes`);
    }
    for (const b of opts.memory.blocks()) {
      const pages = b.length / TARGET_PAGE_SIZE;
      const st: BlockState = { info: b, pages, toSend: new PageBitmap(pages), sentOnce: new PageBitmap(pages), sentAfterListen: new PageBitmap(pages) };
      st.toSend.setAll(); // the first pass sends every page
      this.blocks.set(b.idstr, st);
      this.order.push(st);
    }
  }

  /** Connects and runs the migration; the same as awaiting `done` after `start()`. */
  static async migrate(opts: SourceOptions): Promise<SourceStats> {
    const s = new SourceSession(opts);
    s.start();
    return s.done;
  }

  /**
   * Starts the migration in the background; follow it with events and `done`.
   * Throws (an Error with code 'already-started') when called again or after
   * `cancel()`/`close()`, as `server.listen()` twice does.
   */
  start(): this {
    if (this.started) throw usageError('state', 'already-started', 'start', 'start() was already called on this SourceSession');
    if (this.finished) throw usageError('state', 'already-started', 'start', 'this SourceSession was cancelled before it started');
    this.started = true;
    const signal = this.opts.signal;
    if (signal?.aborted) {
      this.fail(abortError(signal, this.phase));
      return this;
    }
    signal?.addEventListener('abort', this.onAbort, { once: true });
    this.ran = this.run().then(
      (stats) => {
        this.emit('completed', stats);
        this.resolveDone(stats);
      },
      (e: unknown) => this.fail(MigrationError.from(e, this.phase)),
    );
    this.ran.finally(() => this.release()).catch(() => undefined);
    return this;
  }

  /**
   * Switch to postcopy at the next record boundary. Callable at any moment,
   * from any async context; a no-op once postcopy is active.
   */
  startPostcopy(): void {
    if ((this.opts.postcopy ?? 'never') === 'never') throw new MigrationError('protocol', this.phase, 'postcopy is not enabled for this migration (policy "never")');
    this.postcopyRequested = true;
  }

  get currentPhase(): MigrationPhase {
    return this.phase;
  }

  stats(): SourceStats {
    const total = (this.endedAt ?? performance.now()) - this.t0;
    let remaining = 0;
    for (const b of this.order) remaining += b.toSend.count() * TARGET_PAGE_SIZE;
    return {
      status: this.status,
      recoveries: this.c.recoveries,
      transferred: this.c.transferred,
      remaining,
      downtime: this.downtimeMs,
      'setup-time': Math.round(this.setupMs),
      'total-time': Math.round(total),
      'dirty-sync-count': this.c.syncs,
      'postcopy-requests': this.c.requests,
      'requested-pages-already-sent': this.c.alreadySent,
      'pages-per-second': Math.round(((this.c.normal + this.c.duplicate + this.c.xbzrle) * 1000) / Math.max(1, total)),
      normal: this.c.normal,
      duplicate: this.c.duplicate,
      xbzrle: this.c.xbzrle,
      passes: this.c.passes,
      'postcopy-latency': this.latency.summary(),
      channels: { ...(this.conn ? { main: this.conn.main.stats } : {}), ...(this.preempt ? { preempt: this.preempt.stats } : {}) },
    };
  }

  /**
   * Postcopy recovery: connect to `to` from now on (a destination's
   * `migrate-recover` address) and try at once if paused — the end of the
   * hold after `pause()`, or of the backoff wait after a failure. A no-op
   * when not paused.
   */
  resume(to?: string): void {
    if (to !== undefined) this.recoverTo = to;
    this.manualHold = false;
    this.wakeRecovery?.();
  }

  /**
   * Forces the paused state now, as QEMU's `migrate-pause`: for an operator
   * who knows the link is dead (or wants to move the destination). The
   * connection is dropped, every page and request state kept, and — unlike a
   * pause the session detected itself — no reconnection is attempted until
   * `resume(uri?)` (QEMU's `migrate … resume=true`); after that, failed
   * attempts are retried with backoff as usual. Called while already paused,
   * it stops the automatic retries until `resume()`.
   *
   * @throws MigrationError `invalid-state` (synchronously) outside postcopy,
   *   with `recovery: false`, or once the migration has ended.
   */
  pause(): void {
    if (this.finished || !this.canRecover()) {
      const why = this.finished ? 'the migration is over' : this.opts.recovery === false ? 'postcopy recovery is off (recovery: false)' : 'postcopy has not started';
      throw new MigrationError('invalid-state', this.phase, `pause() needs a running postcopy migration: ${why}`);
    }
    this.manualHold = true;
    if (!this.pausedBy) this.enterPause(new MigrationError('paused', this.phase, 'paused by the operator (pause())'));
  }

  /**
   * Aborts the migration (the destination sees the connection drop): `done`
   * rejects with 'cancelled'. Resolves once the session has let go of every
   * socket and timer (while connecting, at most `transport.connectTimeoutMs`
   * later). After completion it only waits for that. The same as `close()`.
   */
  async cancel(): Promise<void> {
    this.fail(new MigrationError('cancelled', this.phase, 'the migration was cancelled'));
    await this.ran.catch(() => undefined);
    this.release();
  }

  /** The same as `cancel()` (one name for both sessions: `close()`, as sockets and servers). */
  close(): Promise<void> {
    return this.cancel();
  }

  /** `await using src = new SourceSession(…)`: cancelled (if still running) when the scope ends. */
  async [Symbol.asyncDispose](): Promise<void> {
    await this.cancel();
  }

  /** Drops the signal listener and the write watchdog: nothing of ours outlives the session. */
  private release(): void {
    this.opts.signal?.removeEventListener('abort', this.onAbort);
    clearInterval(this.writeWatch);
    this.writeWatch = undefined;
  }

  private fail(e: MigrationError): void {
    if (this.finished) return;
    this.finished = true;
    this.release();
    this.failure = e;
    this.status = 'failed';
    this.endedAt = performance.now();
    this.stallWatch.stop();
    this.conn?.destroy();
    this.wakePeerWaiters();
    this.wakeRecovery?.();
    if (this.listenerCount('failed') > 0) this.emit('failed', e);
    this.rejectDone(e);
  }

  private check(): void {
    if (this.failure) throw this.failure;
  }

  // ---- writing -----------------------------------------------------------

  private write(records: readonly StreamRecord[]): void {
    this.enc.writeAll(records);
  }

  /** Hands what the encoder holds to the main channel, waiting for room (backpressure and pacing). */
  private async flushMain(written = this.takeWrittenCallback()): Promise<void> {
    this.check();
    const pieces = this.enc.take();
    if (pieces.length === 0) return;
    let n = 0;
    for (const p of pieces) n += p.length;
    this.c.transferred += n;
    await this.conn!.main.send(pieces, 'bulk', written);
    await this.pace(n);
    // A send that fits the queue resolves as a microtask, which never lets I/O
    // run: yield to the event loop regularly so that return-path messages (page
    // requests above all) are read while the background stream is busy.
    this.sinceYield += n;
    if (this.sinceYield >= (this.inPostcopy ? 64 << 10 : 1 << 20)) {
      this.sinceYield = 0;
      await new Promise<void>((r) => setImmediate(r));
    }
    this.check();
  }

  private async pace(bytes: number): Promise<void> {
    // The VM is stopped for the last precopy stage: QEMU sends it at full speed, so do we.
    if (this.stoppedAt !== undefined && !this.inPostcopy) return;
    await this.pacer.pace(bytes, this.inPostcopy ? this.opts.postcopyBandwidthLimit : this.opts.bandwidthLimit);
  }

  private pageRecord(st: BlockState, page: number, allowXbzrle: boolean): PreemptRecord | StreamRecord | undefined {
    const offset = page * TARGET_PAGE_SIZE;
    const block = st.info.idstr;
    const mem = this.opts.memory;
    const zero = mem.pageIsZero ? mem.pageIsZero(block, offset) : undefined;
    const data = zero ? EMPTY : mem.readPage(block, offset);
    if (zero ?? isZeroPage(data)) {
      this.c.duplicate++;
      this.xbzrle?.forget(block, page);
      return { type: 'ram-zero', block, offset, continued: false };
    }
    if (allowXbzrle && this.xbzrle) {
      const delta = this.xbzrle.encode(block, page, data);
      if (delta && delta.length === 0) return undefined; // unchanged: nothing to send (as QEMU)
      if (delta) {
        this.c.xbzrle++;
        return { type: 'ram-xbzrle', block, offset, continued: false, encoded: delta };
      }
    }
    this.c.normal++;
    return { type: 'ram-page', block, offset, continued: false, data };
  }

  // ---- the return path ------------------------------------------------------

  private onReturnPath(chunk: Buffer, gen: number): void {
    if (gen !== this.generation) return;
    let msgs;
    try {
      msgs = this.rp.push(chunk);
    } catch (e) {
      this.fail(MigrationError.from(e, this.phase));
      return;
    }
    const now = performance.now();
    for (const m of msgs) {
      switch (m.type) {
        case 'pong':
          this.pongs.add(m.value);
          break;
        case 'shut':
          this.shutValue = m.value;
          if (m.value !== 0) {
            this.fail(new MigrationError('protocol', this.phase, `the destination reported a failure (SHUT ${m.value})`));
            return;
          }
          break;
        case 'req-pages-id':
          this.lastReqBlock = m.block;
          this.onRequest(m.block, m.offset, m.length, now);
          break;
        case 'req-pages':
          if (this.lastReqBlock === undefined) {
            this.fail(new MigrationError('protocol', this.phase, 'REQ_PAGES before any REQ_PAGES_ID'));
            return;
          }
          this.onRequest(this.lastReqBlock, m.offset, m.length, now);
          break;
        case 'recv-bitmap':
          this.recvBitmaps.set(m.block, m.bitmap);
          break;
        case 'resume-ack':
          this.resumeAcked = true;
          break;
        default:
          break; // SWITCHOVER_ACK: only with QEMU's switchover-ack capability, which we never ask for
      }
    }
    // Messages before a malformed one were handled above; the error itself ends the migration now.
    if (this.rp.error) {
      this.fail(MigrationError.from(this.rp.error, this.phase));
      return;
    }
    this.wakePeerWaiters();
  }

  private wakePeerWaiters(): void {
    for (const w of [...this.peerWaiters]) w();
  }

  /**
   * Waits until `ready()` holds, re-checked on every return-path message. Gives
   * up only after `replyTimeoutMs` in which nothing moved: no message from the
   * destination and no byte of ours newly acknowledged by its kernel. The
   * stream may still be crossing a slow link when we start waiting (megabytes
   * sit in socket buffers once our last write returned), so a fixed deadline
   * would fail a healthy migration.
   */
  private waitForPeer(what: string, ready: () => boolean, opts: { deliveredIsProgress?: boolean } = {}): Promise<void> {
    const ms = this.opts.replyTimeoutMs ?? 30_000;
    return new Promise<void>((resolve, reject) => {
      let idleSince = performance.now();
      let unacked = this.conn?.main.unackedBytes;
      let done = false;
      const finish = (e?: MigrationError) => {
        if (done) return;
        done = true;
        clearInterval(poll);
        this.peerWaiters.delete(waiter);
        if (e) reject(e);
        else resolve();
      };
      const waiter = () => {
        idleSince = performance.now();
        if (this.failure) finish(this.failure);
        else if (this.refusal) finish(this.refusal);
        else if (this.pausedBy) finish(this.pausedBy);
        else if (ready()) finish();
      };
      const poll = setInterval(
        () => {
          const now = performance.now();
          const q = this.conn?.main.unackedBytes;
          if (q !== undefined && unacked !== undefined && q < unacked) idleSince = now;
          // Everything we sent is acknowledged: the destination has the whole stream and is
          // finishing (a large flush may take long); only the connection's end ends this wait.
          if (opts.deliveredIsProgress && q === 0) idleSince = now;
          unacked = q;
          if (now - idleSince < ms) return;
          // After a long stall of our own event loop this timer may run before the socket's
          // pending bytes are read: decide after the next poll phase.
          setImmediate(() => {
            if (!done && performance.now() - idleSince >= ms) finish(new MigrationError('idle-timeout', this.phase, `no ${what} from the destination, and nothing moved, for ${ms} ms`));
          });
        },
        Math.max(10, Math.min(250, ms / 4)),
      );
      this.peerWaiters.add(waiter);
      waiter();
    });
  }

  private onRequest(block: string, offset: number, length: number, now: number): void {
    const st = this.blocks.get(block);
    if (!st || offset % TARGET_PAGE_SIZE !== 0 || offset + length > st.info.length || length === 0) {
      const what = st ? `${block}+0x${offset.toString(16)} len ${length} (the block has 0x${st.info.length.toString(16)} bytes)` : `of unknown RAM block "${block}"`;
      this.refuseRequest(new MigrationError('bad-page-request', this.phase, `the destination asked for a page we do not have: ${what}`));
      return;
    }
    this.c.requests++;
    if (!this.inPostcopy) return; // QEMU destinations only ask after LISTEN; earlier asks are served by the passes
    // Kept as a range: one request may cover a whole block (the page data is read when sent).
    const r: QueuedRequest = { block, page: offset / TARGET_PAGE_SIZE, end: (offset + length) / TARGET_PAGE_SIZE, arrived: now };
    if (this.preempt) {
      this.preemptRequests.push(r);
      if (!this.servingPreempt) {
        this.servingPreempt = true;
        const gen = this.generation;
        this.servePreempt(gen)
          .catch((e: unknown) => this.channelLost(e, gen))
          .finally(() => {
            if (gen === this.generation) this.servingPreempt = false;
          });
      }
    } else {
      this.requests.push(r);
    }
  }

  /**
   * A request we cannot answer. QEMU's protocol has no message for "refused",
   * and a destination running the VM treats a dropped connection as a cut
   * and pauses — forever, since we will not come back. So in postcopy we end
   * the stream on purpose: at the next record boundary the RAM section is
   * closed, EOF written (without RAM's END section, which a complete stream
   * always has) and both channels closed with a FIN: a destination seeing
   * that knows the source gave up (ours fails with 'source-refused'). Before LISTEN the destination is not
   * running anything: fail at once.
   */
  private refuseRequest(e: MigrationError): void {
    if (!this.inPostcopy) {
      this.fail(e);
      return;
    }
    this.refusal ??= e;
    this.requests.length = 0;
    this.preemptRequests.length = 0;
    this.wakePeerWaiters();
  }

  /** Ends the stream after a refused request (see refuseRequest), then fails with it. */
  private async endRefusing(closeSection: () => void): Promise<never> {
    const e = this.refusal!;
    closeSection();
    this.write([{ type: 'eof' }]);
    await this.flushMain();
    await this.conn!.close();
    throw e;
  }

  /**
   * Preempt mode: requested pages go out on their own socket in arrival order,
   * each exactly once. The first leaves in the tick its request arrived; later
   * ones wait for room in the channel, so a request for a whole block holds
   * at most the channel's bound in memory, not the block.
   */
  private async servePreempt(gen: number): Promise<void> {
    for (;;) {
      if (this.failure || gen !== this.generation) return;
      const r = this.nextRequestedPage(this.preemptRequests);
      if (!r) return;
      const page = r.page - 1;
      const st = this.blocks.get(r.block)!;
      st.sentAfterListen.set(page);
      st.toSend.clear(page);
      this.preemptEnc.write(this.pageRecord(st, page, false) as PreemptRecord);
      const pieces = this.preemptEnc.take();
      for (const p of pieces) this.c.transferred += p.length;
      const { block, arrived } = r;
      await this.preempt!.send(pieces, 'urgent', () => {
        const latencyUs = (performance.now() - arrived) * 1000;
        this.latency.record(latencyUs);
        this.emit('page-request', { block, offset: page * TARGET_PAGE_SIZE, channel: 'preempt', latencyUs });
      });
    }
  }

  // ---- the migration ---------------------------------------------------------

  private async run(): Promise<SourceStats> {
    const o = this.opts;
    const policy = o.postcopy ?? 'never';
    const postcopyCapable = policy !== 'never';
    const conn = await SourceConnection.connect(o.to, o.transport ?? {});
    if (this.failure) {
      // cancelled while connecting
      conn.destroy();
      throw this.failure;
    }
    this.attachMain(conn);
    this.emit('connected', { uri: o.to });
    this.status = 'active';

    // Setup: header, configuration, return path, ADVISE, the RAM block list.
    this.write([
      { type: 'header', version: 3 },
      { type: 'configuration', machineType: o.machineType },
      { type: 'command', command: { cmd: 'open-return-path' } },
      { type: 'command', command: { cmd: 'ping', value: 1 } },
    ]);
    if (postcopyCapable) this.write([{ type: 'command', command: { cmd: 'postcopy-advise', pageSizeSummary: 0x1000n, targetPageSize: 0x1000n } }]);
    const ram = { type: 'section', sectionId: this.ramSectionId, idstr: RAM_IDSTR, instanceId: 0, versionId: RAM_VERSION } as const;
    const total = this.order.reduce((s, b) => s + b.info.length, 0);
    this.write([
      { ...ram, kind: 'start' },
      { type: 'ram-blocks', total, blocks: this.order.map((b) => ({ idstr: b.info.idstr, length: b.info.length })) },
      { type: 'ram-eos' },
      { type: 'footer', sectionId: this.ramSectionId },
    ]);
    await this.flushMain();
    this.setupMs = performance.now() - this.t0;

    // Every page goes in the first pass: what the guest dirtied before now is in it
    // already (QEMU's first bitmap sync at setup), so it must not count as dirty again.
    this.opts.memory.syncDirty(new Map(this.order.map((b) => [b.info.idstr, b.toSend])));

    // Precopy passes.
    this.phase = 'precopy';
    let previousDirty = this.order.reduce((s, b) => s + b.pages, 0);
    // { afterPasses: 0 }: postcopy from the start (a lazy restore: the VM runs at once).
    let switchToPostcopy = typeof policy === 'object' && policy.afterPasses === 0;
    while (!switchToPostcopy) {
      const passStart = performance.now();
      const bytesBefore = this.c.transferred;
      const sent = await this.sendPass(ram, true);
      if (this.postcopyRequested) {
        switchToPostcopy = true;
        break;
      }
      this.c.passes++;
      this.opts.memory.syncDirty(new Map(this.order.map((b) => [b.info.idstr, b.toSend])));
      this.c.syncs++;
      const dirty = this.order.reduce((s, b) => s + b.toSend.count(), 0);
      const durationMs = performance.now() - passStart;
      const bytes = this.c.transferred - bytesBefore;
      this.emit('pass', { pass: this.c.passes, pagesSent: sent, bytes, dirtyPages: dirty, durationMs });
      const bandwidth = bytes / Math.max(1, durationMs); // bytes per ms
      const expectedDowntimeMs = (dirty * TARGET_PAGE_SIZE) / Math.max(1, bandwidth);
      const downtimeLimitMs = o.downtimeLimitMs ?? 300;
      // { afterPasses: N } switches after N passes even when precopy could finish:
      // the caller asked for postcopy at that point (the VM runs sooner at the destination).
      if (typeof policy === 'object' && this.c.passes >= policy.afterPasses) {
        switchToPostcopy = true;
        break;
      }
      if (dirty === 0 || expectedDowntimeMs <= downtimeLimitMs) break;
      if (policy === 'auto' && autoWantsPostcopy({ passes: this.c.passes, dirtyPages: dirty, previousDirtyPages: previousDirty, expectedDowntimeMs, downtimeLimitMs })) {
        switchToPostcopy = true;
        break;
      }
      if (this.postcopyRequested) {
        switchToPostcopy = true;
        break;
      }
      if (o.maxPasses !== undefined && this.c.passes >= o.maxPasses) break;
      previousDirty = dirty;
    }
    if (switchToPostcopy) {
      await this.postcopy(ram);
    } else {
      await this.completePrecopy(ram);
      // Completion: the destination answers SHUT 0 once it has everything.
      this.phase = 'completion';
      await this.waitForPeer('SHUT', () => this.shutValue === 0, { deliveredIsProgress: true });
    }
    // From here on the destination may close first: that is the normal end.
    this.finished = true;
    this.stallWatch.stop();
    this.status = 'completed';
    this.endedAt = performance.now();
    if (this.downtimeMs === undefined && this.stoppedAt !== undefined) this.downtimeMs = Math.round(this.endedAt - this.stoppedAt);
    await this.conn!.close();
    return this.stats();
  }

  /**
   * Sends every page marked in `toSend`, in block order, as RAM PART sections
   * (or one END section when `kind` is 'end'). In precopy, stops early when
   * postcopy is requested. Returns the pages sent.
   */
  private async sendPass(ram: { sectionId: number }, precopy: boolean, kind: 'part' | 'end' = 'part'): Promise<number> {
    const budget = this.opts.sectionBytes ?? 8 << 20;
    let sent = 0;
    let inSection = false;
    let sectionBytes = 0;
    let batch = 0;
    const openSection = () => {
      if (inSection) return;
      this.write([{ type: 'section', kind, sectionId: ram.sectionId, idstr: RAM_IDSTR, instanceId: 0, versionId: RAM_VERSION }]);
      inSection = true;
      sectionBytes = 0;
    };
    const closeSection = () => {
      if (!inSection) return;
      this.write([{ type: 'ram-eos' }, { type: 'footer', sectionId: ram.sectionId }]);
      inSection = false;
    };
    const emitPage = (st: BlockState, page: number) => {
      const rec = this.pageRecord(st, page, precopy);
      st.toSend.clear(page);
      st.sentOnce.set(page);
      if (this.inPostcopy) st.sentAfterListen.set(page);
      if (!rec) return;
      openSection();
      this.write([rec as StreamRecord]);
      sent++;
      batch++;
      sectionBytes += rec.type === 'ram-page' ? TARGET_PAGE_SIZE : 16;
    };
    for (const st of this.order) {
      let page = st.toSend.next(0);
      while (page >= 0) {
        // Without a preempt channel, requested pages go first, inside the current section.
        if (this.requests.length > 0) this.serveQueuedRequests(emitPage);
        if (!(this.inPostcopy && st.sentAfterListen.has(page))) emitPage(st, page);
        else st.toSend.clear(page);
        // In postcopy, smaller batches: the event loop reads page requests between them.
        if (batch >= (this.inPostcopy ? 16 : 64)) {
          batch = 0;
          if (kind === 'part' && sectionBytes >= budget) closeSection();
          await this.flushMain();
          if (this.refusal) await this.endRefusing(closeSection);
          if (precopy && this.postcopyRequested) {
            closeSection();
            await this.flushMain();
            return sent;
          }
        }
        page = st.toSend.next(page + 1);
      }
    }
    while (this.requests.length > 0) {
      this.serveQueuedRequests(emitPage);
      await this.flushMain();
    }
    if (this.refusal) await this.endRefusing(closeSection);
    if (kind === 'end') openSection();
    closeSection();
    await this.flushMain();
    return sent;
  }

  /** Answers up to REQUEST_PAGES_PER_TURN requested pages into the current section. */
  private serveQueuedRequests(emitPage: (st: BlockState, page: number) => void): void {
    for (let budget = REQUEST_PAGES_PER_TURN; budget > 0; budget--) {
      const r = this.nextRequestedPage(this.requests);
      if (!r) return;
      emitPage(this.blocks.get(r.block)!, r.page - 1);
      this.writtenCallbacks.push({ block: r.block, page: r.page - 1, arrived: r.arrived });
    }
  }

  /**
   * Takes the next requested page off `q` that has not gone out since LISTEN
   * (it may be on its way on the other channel): returns its request, whose
   * `page - 1` it is (no object per page).
   */
  private nextRequestedPage(q: QueuedRequest[]): QueuedRequest | undefined {
    while (q.length > 0) {
      const r = q[0]!;
      const page = r.page++;
      if (r.page >= r.end) q.shift();
      if (!this.blocks.get(r.block)!.sentAfterListen.has(page)) return r;
      this.c.alreadySent++;
      if (this.listenerCount('requested-page-already-sent') > 0) this.emit('requested-page-already-sent', { block: r.block, offset: page * TARGET_PAGE_SIZE });
    }
    return undefined;
  }

  /** Requests answered in the batch being written: timed when its last byte reaches the kernel. */
  private writtenCallbacks: AnsweredPage[] = [];

  private takeWrittenCallback(): (() => void) | undefined {
    if (this.writtenCallbacks.length === 0) return undefined;
    const served = this.writtenCallbacks;
    this.writtenCallbacks = [];
    return () => {
      const now = performance.now();
      for (const r of served) {
        const latencyUs = (now - r.arrived) * 1000;
        this.latency.record(latencyUs);
        this.emit('page-request', { block: r.block, offset: r.page * TARGET_PAGE_SIZE, channel: 'main', latencyUs });
      }
    };
  }

  private async stopVm(): Promise<void> {
    await this.drainBeforeStop();
    await this.opts.stopVm?.();
    this.stoppedAt = performance.now();
    this.emit('stopped', { at: this.stoppedAt, hrtime: process.hrtime.bigint() });
  }

  /**
   * Lets the precopy data already queued reach the peer while the VM still
   * runs: whatever sits in our queue and the kernel's send buffer at the stop
   * would otherwise go ahead of the device state, inside the downtime. Bounded
   * (1 s); pages the guest dirties meanwhile are caught by the final sync.
   */
  private async drainBeforeStop(): Promise<void> {
    const main = this.conn?.main;
    if (!main) return;
    const deadline = performance.now() + 1000;
    let timer: NodeJS.Timeout | undefined;
    // The timer is cleared at once: a migration that ends soon after must not keep the process alive.
    await Promise.race([main.flush(), new Promise((r) => (timer = setTimeout(r, 1000)))]).finally(() => clearTimeout(timer));
    for (;;) {
      const q = main.unackedBytes;
      if (q === undefined || q <= 64 * 1024 || performance.now() >= deadline || this.failure) return;
      await new Promise((r) => setTimeout(r, 1));
    }
  }

  private wantSwitchoverStart(): boolean {
    if (this.opts.switchoverStart !== undefined) return this.opts.switchoverStart;
    const m = /-(\d+)\.(\d+)$/.exec(this.opts.machineType);
    return m ? Number(m[1]) >= 10 : true;
  }

  private async devices(): Promise<StreamRecord[]> {
    const list = typeof this.opts.devices === 'function' ? await this.opts.devices() : this.opts.devices;
    const out: StreamRecord[] = [];
    let next = 0;
    const used = new Set(list.map((d) => d.sectionId).filter((x): x is number => x !== undefined));
    used.add(this.ramSectionId);
    for (const d of list) {
      let id = d.sectionId;
      if (id === undefined) {
        while (used.has(next)) next++;
        id = next++;
      }
      const h = { sectionId: id, idstr: d.idstr, instanceId: d.instanceId, versionId: d.versionId };
      out.push({ type: 'section', kind: 'full', ...h }, { type: 'device-state', kind: 'full', ...h, data: d.data }, { type: 'footer', sectionId: id });
    }
    return out;
  }

  private async completePrecopy(ram: { sectionId: number }): Promise<void> {
    await this.stopVm();
    this.phase = 'device-state';
    this.opts.memory.syncDirty(new Map(this.order.map((b) => [b.info.idstr, b.toSend])));
    this.c.syncs++;
    if (this.wantSwitchoverStart()) this.write([{ type: 'command', command: { cmd: 'switchover-start' } }]);
    await this.sendPass(ram, true, 'end');
    const devices = await this.devices();
    this.write(devices);
    this.write([{ type: 'eof' }]);
    // A description after EOF: QEMU reads it, and our destination checks device sizes against it.
    this.write([{ type: 'vmdesc', json: this.opts.vmdesc ?? generatedVmdesc(devices) }]);
    await this.flushMain();
    await this.conn!.main.flush();
  }

  private async postcopy(ram: { sectionId: number }): Promise<void> {
    // QEMU order: the preempt channel is connected once the destination has
    // proved it accepted the main channel (PONG 1), before the VM stops.
    if (this.opts.preempt) {
      await this.waitForPeer('PONG 1', () => this.pongs.has(1));
      const ch = await this.conn!.connectPreempt();
      this.check(); // cancelled meanwhile: fail() already tore the connection down
      this.attachPreempt(ch, this.generation);
    }
    await this.stopVm();
    this.phase = 'device-state';
    if (this.wantSwitchoverStart()) this.write([{ type: 'command', command: { cmd: 'switchover-start' } }]);
    this.opts.memory.syncDirty(new Map(this.order.map((b) => [b.info.idstr, b.toSend])));
    this.c.syncs++;
    this.writeDiscards();
    this.write([{ type: 'command', command: { cmd: 'ping', value: 2 } }]);
    // From LISTEN on, pages are exactly-once: requests are honoured from here.
    this.inPostcopy = true;
    // From here a partition pauses: watch for bytes that stop moving.
    this.stallWatch.start();
    // A new pacing window: the postcopy cap starts now, not in the precopy window.
    this.pacer.reset();
    this.status = 'postcopy-active';
    const devices = await this.devices();
    this.write([
      { type: 'command', command: { cmd: 'packaged', length: 0 } },
      { type: 'command', command: { cmd: 'postcopy-listen' } },
      ...devices,
      { type: 'command', command: { cmd: 'ping', value: 3 } },
      { type: 'command', command: { cmd: 'postcopy-run' } },
      { type: 'package-end' },
      { type: 'command', command: { cmd: 'ping', value: 4 } },
    ]);
    try {
      await this.flushMain();
      await this.conn!.main.flush();
    } catch (e) {
      this.pauseOrThrow(e);
    }
    this.downtimeMs = Math.round(performance.now() - (this.stoppedAt ?? performance.now()));
    this.phase = 'postcopy';
    this.emit('postcopy-active');
    await this.postcopyBackground(ram);
  }

  /**
   * Discards every page that is dirty again or was never sent; those, and only
   * those, are sent after LISTEN, each exactly once.
   *
   * A QEMU 10.0 destination must see at least one discard before LISTEN: its
   * LISTEN handler, finding no discard came (postcopy state ADVISE), runs the
   * first-discard preparation itself, and that preparation sets the state to
   * DISCARD after LISTEN had set LISTENING, so the RUN that follows fails with
   * "CMD_POSTCOPY_RUN in wrong postcopy state (2)". A saved VM that did not
   * change since its first pass has nothing to discard; then one page is
   * discarded (and so sent again after LISTEN, as every discarded page is):
   * the last page of the first block, which a booting guest touches last.
   */
  private writeDiscards(): void {
    let any = false;
    for (const st of this.order) {
      for (let i = 0; i < st.toSend.words.length; i++) st.toSend.words[i]! |= ~(st.sentOnce.words[i] as number);
      const extra = st.toSend.words.length * 32 - st.pages;
      if (extra > 0) st.toSend.words[st.toSend.words.length - 1]! &= 0xffffffff >>> extra;
      any ||= st.toSend.next(0) >= 0;
    }
    const first = this.order.find((st) => st.pages > 0);
    if (!any && first) first.toSend.set(first.pages - 1);
    for (const st of this.order) {
      const ranges = bitmapRanges(st.toSend);
      for (let i = 0; i < ranges.length; i += MAX_DISCARDS_PER_COMMAND) {
        this.write([{ type: 'command', command: { cmd: 'postcopy-ram-discard', block: st.info.idstr, ranges: ranges.slice(i, i + MAX_DISCARDS_PER_COMMAND) } }]);
      }
    }
  }

  /**
   * The rest of RAM in the background (requests overtake it), END, EOF, and
   * the destination's SHUT. A network failure on the way pauses; the loop
   * then recovers and sends again whatever the destination says it lacks.
   */
  private async postcopyBackground(ram: { sectionId: number }): Promise<void> {
    for (;;) {
      try {
        if (this.pausedBy) await this.recover();
        await this.sendPass(ram, false, 'part');
        this.write([{ type: 'section', kind: 'end', sectionId: ram.sectionId, idstr: RAM_IDSTR, instanceId: 0, versionId: RAM_VERSION }, { type: 'ram-eos' }, { type: 'footer', sectionId: ram.sectionId }, { type: 'eof' }]);
        await this.flushMain();
        await Promise.all([this.conn!.main.flush(), this.preempt?.flush()]);
        this.phase = 'completion';
        await this.waitForPeer('SHUT', () => this.shutValue === 0, { deliveredIsProgress: true });
        return;
      } catch (e) {
        this.pauseOrThrow(e);
      }
    }
  }

  /** After a failure in postcopy: pause if a new connection can cure it, else rethrow. */
  private pauseOrThrow(e: unknown): void {
    if (this.failure) throw this.failure;
    if (this.pausedBy) return;
    const err = MigrationError.from(e, this.phase);
    if (!this.canRecover() || !isNetworkFailure(err)) throw err;
    this.enterPause(err);
  }

  private canRecover(): boolean {
    return this.inPostcopy && this.opts.recovery !== false;
  }

  /** Wires a (new) connection: its main channel's errors and close, and the return path on it. */
  private attachMain(conn: SourceConnection): number {
    const gen = ++this.generation;
    this.conn = conn;
    this.rp = new ReturnPathDecoder();
    const main = conn.main;
    main.on('error', (e) => {
      if (this.shutValue !== 0) this.channelLost(e, gen);
    });
    main.on('close', () => {
      // After SHUT 0 the destination has everything and may close before we do.
      if (!this.finished && this.shutValue !== 0) this.channelLost(new MigrationError('peer-disconnected', this.phase, 'the destination closed the main channel'), gen);
    });
    main.read((chunk) => this.onReturnPath(chunk, gen));
    this.watchWrites(gen);
    return gen;
  }

  /**
   * A peer that accepts and never reads fills our queues, and every send()
   * then waits for room forever: with bytes waiting and none of them taken
   * by the kernel for `replyTimeoutMs`, the channel counts as dead
   * ('idle-timeout': a network failure, which pauses in postcopy). A slow
   * link still takes bytes; only a stopped one trips this.
   */
  private watchWrites(gen: number): void {
    clearInterval(this.writeWatch);
    const ms = this.opts.replyTimeoutMs ?? 30_000;
    const progress = new Map<Channel, { mark: string; since: number }>();
    this.writeWatch = setInterval(
      () => {
        if (gen !== this.generation || this.finished) return;
        const now = performance.now();
        for (const ch of [this.conn?.main, this.preempt]) {
          if (!ch || ch.isClosed) continue;
          const waiting = ch.queuedBytes;
          const mark = `${ch.stats.bytesSent}/${ch.socket.writableLength}`;
          const p = progress.get(ch);
          if (waiting === 0 || !p || p.mark !== mark) {
            progress.set(ch, { mark, since: now });
            continue;
          }
          if (now - p.since < ms) continue;
          const e = new MigrationError('idle-timeout', this.phase, `the destination has not read from the ${ch.role} channel for ${ms} ms (${waiting} bytes waiting)`);
          this.channelLost(e, gen);
          return;
        }
      },
      Math.max(10, Math.min(1000, ms / 4)),
    );
    // The sockets keep the process alive while they are open; this timer never should.
    this.writeWatch.unref();
  }

  private attachPreempt(ch: Channel, gen: number): void {
    this.preempt = ch;
    ch.on('error', (e) => {
      if (this.shutValue !== 0) this.channelLost(e, gen);
    });
  }

  /** A channel of connection `gen` failed: pause (postcopy, network) or fail. */
  private channelLost(e: unknown, gen: number): void {
    if (gen !== this.generation || this.finished) return;
    try {
      this.pauseOrThrow(e);
    } catch (err) {
      this.fail(MigrationError.from(err, this.phase));
    }
  }

  /**
   * Postcopy paused (QEMU's postcopy-paused): the connection is dropped, every
   * page and request state kept. What was in flight is settled by the
   * destination's received-bitmap on recovery, and it asks again for the
   * pages its guest still waits for.
   */
  private enterPause(e: MigrationError): void {
    if (this.pausedBy || this.finished) return;
    this.pausedBy = e;
    const at = performance.now();
    // A recovery connection lost before RESUME_ACK prolongs the same outage:
    // `pausedMs` counts from the failure that ended postcopy-active.
    if (this.status === 'postcopy-active') this.pausedAt = at;
    this.status = 'postcopy-paused';
    const conn = this.conn;
    this.preempt = undefined;
    conn?.destroy();
    this.requests.length = 0;
    this.preemptRequests.length = 0;
    // A servePreempt of the lost channel ends on its own (generation check); the next may start.
    this.servingPreempt = false;
    this.writtenCallbacks = [];
    // Records encoded for the lost channel are dropped; the bitmap says what to resend.
    this.enc.take();
    this.preemptEnc.take();
    this.emit('paused', { error: e, at });
    this.wakePeerWaiters();
  }

  /** Reconnects until a recovery exchange completes (or the migration is cancelled, or attempts run out). */
  private async recover(): Promise<void> {
    const opts = this.opts.recovery || {};
    let last: MigrationError = this.pausedBy!;
    for (let attempt = 1; ; attempt++) {
      this.check();
      if (this.manualHold) {
        // Paused by the operator: the first attempt comes with resume().
        await this.holdUntilResume();
        this.check();
        attempt = 1;
      }
      if (attempt > 1) {
        if (opts.maxAttempts !== undefined && attempt > opts.maxAttempts) {
          const e = new MigrationError(last.code, 'postcopy', `postcopy recovery gave up after ${opts.maxAttempts} attempts; the last: ${last.reason}`, { cause: last });
          this.fail(e);
          throw e;
        }
        await this.sleepUnlessWoken(retryDelayMs(attempt, opts));
        this.check();
        if (this.manualHold) {
          attempt = 0; // pause() while waiting: hold from the next turn
          continue;
        }
      }
      const to = this.recoverTo ?? opts.to ?? this.opts.to;
      this.emit('recovering', { attempt, to });
      try {
        await this.reconnect(to);
        return;
      } catch (e) {
        this.check();
        last = MigrationError.from(e, 'postcopy');
        // pause() during the attempt: back to the hold (whatever the attempt ended with).
        if (this.manualHold) {
          this.enterPause(last);
          continue;
        }
        if (!isNetworkFailure(last)) {
          this.fail(last);
          throw last;
        }
        // The new connection failed too: paused again (QEMU: back to postcopy-paused).
        this.enterPause(last);
      }
    }
  }

  /**
   * One recovery exchange on a new connection (QEMU 10.0's order): RECV_BITMAP
   * for every block back to back, their bitmaps back, the new preempt
   * channel, POSTCOPY_RESUME, RESUME_ACK.
   */
  private async reconnect(to: string): Promise<void> {
    const conn = await SourceConnection.connect(to, this.opts.transport ?? {});
    if (this.failure || this.manualHold) {
      conn.destroy();
      throw this.failure ?? this.pausedBy!;
    }
    this.recvBitmaps.clear();
    this.resumeAcked = false;
    const gen = this.attachMain(conn);
    this.pausedBy = undefined;
    this.status = 'postcopy-recover';
    this.phase = 'postcopy';
    this.lastReqBlock = undefined;
    // New channels: the first page on each names its block again.
    this.enc.resetContinue();
    this.preemptEnc.resetContinue();
    this.write(this.order.map((st): StreamRecord => ({ type: 'command', command: { cmd: 'recv-bitmap', block: st.info.idstr } })));
    await this.flushMain();
    await this.waitForPeer('received bitmap', () => this.order.every((st) => this.recvBitmaps.has(st.info.idstr)));
    for (const st of this.order) applyReceivedBitmap(st.info.idstr, st.pages, this.recvBitmaps.get(st.info.idstr)!, st.toSend, st.sentAfterListen);
    if (this.opts.preempt) {
      const ch = await conn.connectPreempt();
      if (gen !== this.generation || this.pausedBy || this.failure) {
        ch.destroy();
        throw this.failure ?? this.pausedBy ?? new MigrationError('peer-disconnected', 'postcopy', 'the recovery connection was lost');
      }
      this.attachPreempt(ch, gen);
    }
    this.write([{ type: 'command', command: { cmd: 'postcopy-resume' } }]);
    await this.flushMain();
    await this.waitForPeer('RESUME_ACK', () => this.resumeAcked);
    this.status = 'postcopy-active';
    this.c.recoveries++;
    this.pacer.reset();
    this.emit('resumed', { recoveries: this.c.recoveries, pausedMs: performance.now() - this.pausedAt });
  }

  /** After pause(): waits for resume() (or the migration's end). */
  private async holdUntilResume(): Promise<void> {
    // A held migration is not over, but no socket or timer is left to say so: without this
    // the process would exit under a caller awaiting `done`.
    const alive = setInterval(() => undefined, 1 << 30);
    try {
      while (this.manualHold && !this.failure) {
        await new Promise<void>((resolve) => {
          this.wakeRecovery = () => {
            this.wakeRecovery = undefined;
            resolve();
          };
        });
      }
    } finally {
      clearInterval(alive);
    }
  }

  private sleepUnlessWoken(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        this.wakeRecovery = undefined;
        resolve();
      };
      const timer = setTimeout(done, ms);
      this.wakeRecovery = done;
    });
  }

}

/** Runs of set bits as byte ranges. */
function bitmapRanges(bm: PageBitmap): DiscardRange[] {
  const out: DiscardRange[] = [];
  let i = bm.next(0);
  while (i >= 0) {
    let j = i;
    while (j + 1 < bm.pages && bm.has(j + 1)) j++;
    out.push({ start: i * TARGET_PAGE_SIZE, length: (j - i + 1) * TARGET_PAGE_SIZE });
    i = bm.next(j + 1);
  }
  return out;
}

/** A VM description of opaque devices (QEMU's form for old-style handlers): exact sizes, nothing else. */
function generatedVmdesc(devices: readonly StreamRecord[]): Uint8Array {
  const list = devices
    .filter((r): r is Extract<StreamRecord, { type: 'device-state' }> => r.type === 'device-state')
    .map((d) => ({ name: d.idstr, instance_id: d.instanceId, size: d.data.length, fields: [{ name: 'data', type: 'buffer', size: d.data.length }] }));
  return new TextEncoder().encode(JSON.stringify({ page_size: TARGET_PAGE_SIZE, devices: list }));
}

function validateSourceOptions(o: SourceOptions): void {
  if (typeof o !== 'object' || o === null) throw usageError('type', 'bad-option', 'options', 'SourceSession needs an options object');
  checkEndpoint(o.to, 'to');
  if (typeof o.memory !== 'object' || o.memory === null || typeof o.memory.blocks !== 'function' || typeof o.memory.readPage !== 'function' || typeof o.memory.syncDirty !== 'function') {
    throw usageError('type', 'bad-option', 'memory', 'memory must be a GuestMemorySource (blocks, readPage, syncDirty)');
  }
  if (typeof o.machineType !== 'string' || o.machineType.length === 0) throw usageError('type', 'bad-option', 'machineType', 'machineType must be a non-empty string');
  if (!Array.isArray(o.devices) && typeof o.devices !== 'function') throw usageError('type', 'bad-option', 'devices', 'devices must be an array of sections or a function returning them');
  checkPostcopyPolicy(o.postcopy);
  checkTransport(o.transport);
  checkSignal(o.signal);
  checkNumber(o.bandwidthLimit, 'bandwidthLimit', { min: 1, fractional: true });
  checkNumber(o.postcopyBandwidthLimit, 'postcopyBandwidthLimit', { min: 1, fractional: true });
  checkNumber(o.downtimeLimitMs, 'downtimeLimitMs', { fractional: true });
  checkNumber(o.maxPasses, 'maxPasses', { min: 1 });
  checkNumber(o.xbzrleCacheBytes, 'xbzrleCacheBytes');
  checkNumber(o.sectionBytes, 'sectionBytes', { min: 1 });
  checkNumber(o.replyTimeoutMs, 'replyTimeoutMs', { min: 1 });
  if (o.recovery) {
    if (o.recovery.to !== undefined) checkEndpoint(o.recovery.to, 'recovery.to');
    checkNumber(o.recovery.initialDelayMs, 'recovery.initialDelayMs');
    checkNumber(o.recovery.maxDelayMs, 'recovery.maxDelayMs');
    checkNumber(o.recovery.maxAttempts, 'recovery.maxAttempts', { min: 1 });
  }
  for (const b of o.memory.blocks()) {
    if (b.length <= 0 || b.length % TARGET_PAGE_SIZE !== 0) throw usageError('range', 'bad-option', 'memory', `RAM block "${b.idstr}" has ${b.length} bytes: a positive multiple of ${TARGET_PAGE_SIZE} is needed`);
  }
}
