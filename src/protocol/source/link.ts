import { performance } from 'node:perf_hooks';
import { ReturnPathDecoder } from '../../stream/return-path.js';
import type { Channel } from '../../transport/channel.js';
import type { SourceConnection } from '../../transport/connection.js';
import { TransportError } from '../../transport/errors.js';
import { MigrationError, type MigrationPhase } from '../errors.js';
import { lossClock } from './loss-clock.js';
import type { ReturnPathMessage } from '../../stream/records.js';
import { isThreaded, type ThreadedSourceConnection } from './threads/connection.js';
import { MultifdChannelSender, MultifdPacketBuilder, type MultifdPacketCounter } from './multifd.js';

/** What a link reports to its session. */
export interface LinkHooks {
  /** A page request (REQ_PAGES / REQ_PAGES_ID), block resolved. */
  onRequest(link: Link, block: string, offset: number, length: number, arrived: number): void;
  /** A channel of this link failed or closed: pause (postcopy) or fail. */
  onLost(link: Link, e: unknown): void;
  /** Malformed return path, SHUT ≠ 0: the migration fails. */
  onFatal(e: MigrationError): void;
  /** Ends every wait of the link: the session failed or refused a request. */
  abortReason(): MigrationError | undefined;
  phase(): MigrationPhase;
  /** From completion's last step on, the destination may close first. */
  over(): boolean;
  /**
   * The multifd channels' loss no longer matters: from LISTEN on they are
   * idle (QEMU 10.1), and once everything is sent the destination closes them
   * while finishing (QEMU does before its SHUT).
   */
  multifdIdle(): boolean;
}

/** How long a link with multifd channels in precopy gathers channel losses before it names the first (lostSeen). */
const LOSS_WINDOW_MS = 100;

/** When a channel's loss was seen: its worker's stamp for a threaded channel, else now (this thread saw it). */
function seenAt(ch: Channel): number {
  return (ch as unknown as { lostAt?: number }).lostAt ?? lossClock();
}

/**
 * One connection of a source migration: its channels, the return-path
 * decoder and what the destination has said on it (PONGs, SHUT, received
 * bitmaps, RESUME_ACK), and the handlers bound to them. A link that fails is
 * dropped whole: `dropped` is set, its sockets destroyed, its waits rejected,
 * and every handler of it checks `dropped` first — a recovery builds a new
 * link rather than resetting this one. The encoders are not here: their state
 * (the block list, postcopy-advised) belongs to the migration's stream, which
 * a new link continues (only CONTINUE restarts).
 */
export class Link {
  readonly main: Channel;
  preempt: Channel | undefined;
  dropped = false;
  private dropReason: MigrationError | undefined;
  private readonly rp = new ReturnPathDecoder();
  readonly pongs = new Set<number>();
  shut: number | undefined;
  readonly recvBitmaps = new Map<string, Uint8Array>();
  resumeAcked = false;
  /**
   * The migration's end (EOF) went to main on this link. From then on the
   * preempt channel's loss is the destination finishing, not a failure:
   * QEMU shuts its preempt channel down once the pages its guest asked for
   * are in and before it sends SHUT (postcopy_ram_incoming_cleanup runs
   * before migration_incoming_state_destroy). Main's SHUT or loss decides;
   * a destination that sends neither within replyTimeoutMs of the loss (its
   * guest may wait for a page that was on the lost channel, and with all our
   * bytes acknowledged nothing else ends waitForShut) pauses as any loss.
   */
  endSent = false;
  private endGrace: NodeJS.Timeout | undefined;
  private lastReqBlock: string | undefined;
  private readonly waiters = new Set<() => void>();
  private writeWatch: NodeJS.Timeout | undefined;
  /** The multifd channels' senders, by id (empty without multifd). */
  multifd: readonly MultifdChannelSender[] = [];
  /** The packet being filled (one producer per link). */
  readonly multifdPacket = new MultifdPacketBuilder();
  /** Round-robin position: the channel the next packet tries first (QEMU's next_channel). */
  multifdNext = 0;
  /** Multifd bytes handed over since the producer last let I/O run. */
  multifdSinceYield = 0;

  constructor(
    readonly conn: SourceConnection | ThreadedSourceConnection,
    private readonly hooks: LinkHooks,
    private readonly replyTimeoutMs: number,
  ) {
    // A threaded link's main is a RemoteChannel: the members the session uses on such a link
    // (send, flush, close, stats, events); the byte-level ones (push, bulkRoom, read) run in its worker.
    this.main = conn.main as unknown as Channel;
    this.main.on('error', (e) => {
      if (this.shut !== 0) this.lostSeen(e, seenAt(this.main));
    });
    this.main.on('close', () => {
      // After SHUT 0 the destination has everything and may close before we do.
      if (!this.hooks.over() && this.shut !== 0) this.lostSeen(new MigrationError('peer-disconnected', this.hooks.phase(), 'the destination closed the main channel'), seenAt(this.main));
    });
    // A threaded link's main worker decodes the return path and keeps page requests to itself (ThreadedLinkHooks).
    if (!isThreaded(conn)) this.main.read((chunk) => this.onReturnPath(chunk));
    this.watchWrites();
  }

  /** Connects the preempt channel of this link (the caller checks `dropped` after). */
  async connectPreempt(): Promise<Channel> {
    const ch = (await this.conn.connectPreempt()) as unknown as Channel;
    if (this.dropped) {
      ch.destroy();
      throw this.dropReason ?? new MigrationError('peer-disconnected', 'postcopy', 'the connection was lost');
    }
    this.preempt = ch;
    ch.on('error', (e) => this.preemptLost(e));
    return ch;
  }

  /** The preempt channel failed or closed: a loss, or after the end the destination finishing (endSent). */
  preemptLost(e: unknown): void {
    if (this.shut === 0 || this.dropped) return;
    if (!this.endSent) {
      this.lost(e);
      return;
    }
    this.endGrace ??= setTimeout(() => {
      if (this.shut !== 0 && !this.hooks.over()) this.lost(e);
    }, this.replyTimeoutMs);
    this.endGrace.unref();
  }

  /**
   * Connects the multifd channels (after main, before anything is written on
   * it) and writes each one's init message. A channel that fails or closes
   * before the migration's end fails it, named (`multifd-N`); in postcopy
   * they are idle and their loss is ignored.
   */
  async connectMultifd(count: number, packetNumbers: MultifdPacketCounter, uuid: Uint8Array | undefined): Promise<void> {
    const senders: MultifdChannelSender[] = [];
    const conn = this.conn;
    // Threaded: each channel's worker owns its sender (init message, packets, SYNCs); `multifd` stays empty here.
    const channels = isThreaded(conn)
      ? ((await conn.connectMultifd(count, uuid)) as unknown as readonly Channel[])
      : await conn.connectMultifd(count, (ch) => {
          // The init message at once, as each channel connects (see connectMultifd).
          const sender = new MultifdChannelSender(ch.id!, ch, packetNumbers, uuid ? { uuid } : {});
          sender.start();
          senders[ch.id!] = sender;
        });
    if (this.dropped) {
      for (const ch of channels) ch.destroy();
      throw this.dropReason ?? new MigrationError('peer-disconnected', this.hooks.phase(), 'the connection was lost');
    }
    this.multifd = senders;
    for (const ch of channels) {
      // The producer yields for all channels together (multifd-pass.ts): a quantum per channel would skew the round-robin.
      ch.setBulkYield(Number.POSITIVE_INFINITY);
      // Idle in postcopy: their loss is ignored then. The destination shuts the other channels down when
      // it loses one, and any of those losses can reach us first (each channel's worker runs on its own):
      // the link names the one seen first (lostSeen).
      const lost = (e: unknown): void => {
        if (this.shut !== 0 && !this.hooks.multifdIdle()) this.lostSeen(e, seenAt(ch));
      };
      ch.on('error', lost);
      ch.on('close', () => {
        if (this.hooks.over()) return;
        const what = `the destination closed the ${ch.name} channel`;
        lost(new MigrationError('peer-disconnected', this.hooks.phase(), what, { cause: new TransportError('closed', what, { channel: ch.name }) }));
      });
      // A destination sends nothing on a multifd channel; reading finds its FIN (a worker reads its own).
      if (!isThreaded(conn)) ch.read(() => undefined);
    }
  }

  /** Multifd channels on this link (threaded or not): multifd precopy passes and barriers. */
  get multifdChannels(): number {
    return this.conn.multifd.length;
  }

  /** Drops the link: sockets destroyed, waits rejected with `reason`, handlers silenced. */
  drop(reason: MigrationError): void {
    if (this.dropped) return;
    this.dropped = true;
    this.dropReason = reason;
    clearInterval(this.writeWatch);
    clearTimeout(this.endGrace);
    this.conn.destroy();
    this.wake();
  }

  /** Stops the write watchdog (the migration is over; the link closes normally). */
  quiet(): void {
    clearInterval(this.writeWatch);
    clearTimeout(this.endGrace);
  }

  close(): Promise<void> {
    clearInterval(this.writeWatch);
    clearTimeout(this.endGrace);
    return this.conn.close();
  }

  private lost(e: unknown): void {
    if (this.dropped) return;
    this.hooks.onLost(this, e);
  }

  /** Losses seen while multifd channels carry precopy, held for LOSS_WINDOW_MS (see lostSeen). */
  private losses: { e: unknown; at: number }[] | undefined;

  /**
   * A channel's loss, seen at `at` (lossClock). While multifd channels carry
   * precopy, the destination's reaction to one lost channel (it shuts the
   * others down) can be reported before the loss itself, from another
   * thread: the losses of LOSS_WINDOW_MS are gathered and the one seen first
   * fails the link. Otherwise at once. Failure path only.
   */
  private lostSeen(e: unknown, at: number): void {
    if (this.dropped) return;
    if (this.multifdChannels === 0 || this.hooks.multifdIdle()) {
      this.lost(e);
      return;
    }
    if (!this.losses) {
      const losses: { e: unknown; at: number }[] = [];
      this.losses = losses;
      setTimeout(() => {
        this.losses = undefined;
        if (this.hooks.over()) return;
        let first = losses[0]!;
        for (const l of losses) if (l.at < first.at) first = l;
        this.lost(first.e);
      }, LOSS_WINDOW_MS);
    }
    this.losses.push({ e, at });
  }

  private onReturnPath(chunk: Buffer): void {
    if (this.dropped) return;
    let msgs;
    try {
      msgs = this.rp.push(chunk);
    } catch (e) {
      this.hooks.onFatal(MigrationError.from(e, this.hooks.phase()));
      return;
    }
    if (!this.handle(msgs)) return;
    // Messages before a malformed one were handled above; the error itself ends the migration now.
    if (this.rp.error) {
      this.hooks.onFatal(MigrationError.from(this.rp.error, this.hooks.phase()));
      return;
    }
    this.wake();
  }

  /** Return-path messages decoded by a threaded link's main worker (page requests stay there). */
  returnPath(msgs: readonly ReturnPathMessage[]): void {
    if (this.dropped) return;
    if (this.handle(msgs)) this.wake();
  }

  /** Handles decoded messages; false once the link failed on one. */
  private handle(msgs: readonly ReturnPathMessage[]): boolean {
    const now = performance.now();
    for (const m of msgs) {
      if (this.dropped) return false;
      switch (m.type) {
        case 'pong':
          this.pongs.add(m.value);
          break;
        case 'shut':
          this.shut = m.value;
          if (m.value !== 0) {
            this.hooks.onFatal(new MigrationError('protocol', this.hooks.phase(), `the destination reported a failure (SHUT ${m.value})`));
            return false;
          }
          break;
        case 'req-pages-id':
          this.lastReqBlock = m.block;
          this.hooks.onRequest(this, m.block, m.offset, m.length, now);
          break;
        case 'req-pages':
          if (this.lastReqBlock === undefined) {
            this.hooks.onFatal(new MigrationError('protocol', this.hooks.phase(), 'REQ_PAGES before any REQ_PAGES_ID'));
            return false;
          }
          this.hooks.onRequest(this, this.lastReqBlock, m.offset, m.length, now);
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
    return true;
  }

  /** Re-runs every wait's check (a return-path message, a refusal, the session's end). */
  wake(): void {
    for (const w of [...this.waiters]) w();
  }

  /**
   * Waits until `ready()` holds, re-checked on every return-path message. Gives
   * up only after `replyTimeoutMs` in which nothing moved: no message from the
   * destination and no byte of ours newly acknowledged by its kernel. The
   * stream may still be crossing a slow link when we start waiting (megabytes
   * sit in socket buffers once our last write returned), so a fixed deadline
   * would fail a healthy migration. Rejects when the link is dropped (with
   * what dropped it) or the session aborts.
   */
  waitFor(what: string, ready: () => boolean, opts: { deliveredIsProgress?: boolean } = {}): Promise<void> {
    const ms = this.replyTimeoutMs;
    return new Promise<void>((resolve, reject) => {
      let idleSince = performance.now();
      let unacked = this.main.unackedBytes;
      let done = false;
      const finish = (e?: MigrationError) => {
        if (done) return;
        done = true;
        clearInterval(poll);
        this.waiters.delete(waiter);
        if (e) reject(e);
        else resolve();
      };
      const waiter = () => {
        idleSince = performance.now();
        const abort = this.hooks.abortReason();
        if (abort) finish(abort);
        else if (this.dropped) finish(this.dropReason);
        else if (ready()) finish();
      };
      const poll = setInterval(
        () => {
          const now = performance.now();
          const q = this.main.unackedBytes;
          if (q !== undefined && unacked !== undefined && q < unacked) idleSince = now;
          // Everything we sent is acknowledged: the destination has the whole stream and is
          // finishing (a large flush may take long); only the connection's end ends this wait.
          if (opts.deliveredIsProgress && q === 0) idleSince = now;
          unacked = q;
          if (now - idleSince < ms) return;
          // After a long stall of our own event loop this timer may run before the socket's
          // pending bytes are read: decide after the next poll phase.
          setImmediate(() => {
            if (!done && performance.now() - idleSince >= ms) finish(new MigrationError('idle-timeout', this.hooks.phase(), `no ${what} from the destination, and nothing moved, for ${ms} ms`));
          });
        },
        Math.max(10, Math.min(250, ms / 4)),
      );
      this.waiters.add(waiter);
      waiter();
    });
  }

  /**
   * A peer that accepts and never reads fills our queues, and every send()
   * then waits for room forever: with bytes waiting and none of them taken
   * by the kernel for `replyTimeoutMs`, the channel counts as dead
   * ('idle-timeout': a network failure, which pauses in postcopy). A slow
   * link still takes bytes; only a stopped one trips this.
   */
  private watchWrites(): void {
    const ms = this.replyTimeoutMs;
    const progress = new Map<Channel, { mark: string; since: number }>();
    this.writeWatch = setInterval(
      () => {
        if (this.dropped || this.hooks.over()) return;
        const now = performance.now();
        for (const ch of this.hooks.multifdIdle() ? [this.main, this.preempt] : [this.main, this.preempt, ...(this.conn.multifd as readonly Channel[])]) {
          if (!ch || ch.isClosed) continue;
          const waiting = ch.queuedBytes;
          const mark = `${ch.stats.bytesSent}/${ch.socket.writableLength}`;
          const p = progress.get(ch);
          if (waiting === 0 || !p || p.mark !== mark) {
            progress.set(ch, { mark, since: now });
            continue;
          }
          if (now - p.since < ms) continue;
          this.lost(new MigrationError('idle-timeout', this.hooks.phase(), `the destination has not read from the ${ch.role} channel for ${ms} ms (${waiting} bytes waiting)`));
          return;
        }
      },
      Math.max(10, Math.min(1000, ms / 4)),
    );
    // The sockets keep the process alive while they are open; this timer never should.
    this.writeWatch.unref();
  }
}
