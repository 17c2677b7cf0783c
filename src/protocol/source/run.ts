import type { EventEmitter } from 'node:events';
import { performance } from 'node:perf_hooks';
import { PreemptEncoder, StreamEncoder } from '../../stream/encoder.js';
import type { StreamRecord } from '../../stream/records.js';
import { MigrationError } from '../errors.js';
import { LatencyHistogram } from '../latency.js';
import { Pacer } from '../pacer.js';
import { isNetworkFailure } from '../recovery.js';
import { StallWatch } from '../stall-watch.js';
import { XbzrleCache } from '../xbzrle-cache.js';
import type { Link } from './link.js';
import { MultifdPacketCounter } from './multifd.js';
import type { SourceOptions } from './options.js';
import { isThreaded, type ThreadShared, type ThreadStat } from './threads/connection.js';
import { planSourceThreads, type ThreadPlan } from './threads/plan.js';
import { InMemorySource } from '../memory-source.js';
import { RamPages } from './pages.js';
import { Requests } from './requests.js';
import { isOver, isPostcopy, phaseOf, statusOf, type SourceState } from './state.js';
import type { SourceEvents } from './events.js';
import { SourceCounters, SourceTimes, buildStats, type SourceStats } from './stats.js';

/** The RAM section's header fields (one section id for the whole migration). */
export interface RamSection {
  readonly sectionId: number;
}

/**
 * What the steps of a source migration share (setup, precopy, switchover,
 * postcopy, recovery, completion): the options, the one state, the stream's
 * encoders, RAM's page sets, the current link and the counters. Internal:
 * the public SourceSession holds one and derives its API from it.
 */
export class SourceRun {
  state: SourceState = { kind: 'setup', connected: false };
  link: Link | undefined;
  readonly enc = new StreamEncoder();
  readonly preemptEnc = new PreemptEncoder();
  readonly c = new SourceCounters();
  readonly t = new SourceTimes();
  readonly latency = new LatencyHistogram();
  readonly ram: RamPages;
  readonly xbzrle: XbzrleCache | undefined;
  readonly ramSection: RamSection;
  readonly pacer = new Pacer();
  readonly requests: Requests;
  /** Postcopy: a link whose bytes stop moving is a partition (see replyTimeoutMs). */
  readonly stallWatch: StallWatch;
  readonly replyTimeoutMs: number;
  /** QEMU's global multifd packet number (one for the migration, every channel drawing from it). */
  readonly multifdPackets = new MultifdPacketCounter(new BigInt64Array(new SharedArrayBuffer(8)));
  /**
   * The END section's multifd barrier is written: every multifd page is out, and the destination
   * may close its multifd channels once it completes — which, with the channels in other threads,
   * can be heard before its SHUT 0 on main.
   */
  multifdFinished = false;
  private wantsPostcopy = false;
  /** Whether the channels run in worker threads, and why (decided once, at construction: 'on' where impossible throws there). */
  readonly threads: ThreadPlan;
  /** Thread stats of links that have ended (their threads are gone; SourceStats.threads keeps them). */
  readonly endedThreads: ThreadStat[] = [];

  /** startPostcopy() was called: a precopy pass ends at its next batch (in a channel's worker too). */
  get postcopyRequested(): boolean {
    return this.wantsPostcopy;
  }

  set postcopyRequested(v: boolean) {
    this.wantsPostcopy = v;
    const conn = this.link?.conn;
    if (v && conn && isThreaded(conn)) conn.requestPostcopy();
  }
  /** A page request we refused (postcopy): the stream is ended at the next record boundary, then the migration fails with it. */
  refusal: MigrationError | undefined;
  /** Where the next recovery attempt connects (resume(uri) sets it). */
  recoverTo: string | undefined;
  /** Wakes a recovery that sleeps between attempts (or holds after a manual pause). */
  wakeRecovery: (() => void) | undefined;
  /** Set once by the session: fail() ends the public promise. */
  onFailed: (e: MigrationError) => void = () => undefined;

  constructor(
    readonly opts: SourceOptions,
    readonly events: EventEmitter<SourceEvents>,
  ) {
    this.replyTimeoutMs = opts.replyTimeoutMs ?? 30_000;
    if (opts.xbzrleCacheBytes) this.xbzrle = new XbzrleCache(opts.xbzrleCacheBytes);
    this.threads = planSourceThreads(opts);
    this.ram = new RamPages(opts.memory, this.c, this.xbzrle, this.threads.used);
    const used = new Set<number>();
    if (typeof opts.devices !== 'function') for (const d of opts.devices) if (d.sectionId !== undefined) used.add(d.sectionId);
    let id = 1;
    while (used.has(id)) id++;
    this.ramSection = { sectionId: id };
    this.requests = new Requests(this);
    this.stallWatch = new StallWatch(() => [this.link?.main, this.link?.preempt], this.replyTimeoutMs, (idleMs) => {
      const what = `nothing moved on the connection for ${Math.round(idleMs)} ms (no return-path message, none of our bytes acknowledged): the link is taken as dead`;
      if (this.link) this.linkLost(this.link, new MigrationError('idle-timeout', this.phase, what));
    });
  }

  get phase() {
    return phaseOf(this.state);
  }

  get status(): SourceStats['status'] {
    return statusOf(this.state);
  }

  get postcopy(): boolean {
    return isPostcopy(this.state);
  }

  get over(): boolean {
    return isOver(this.state);
  }

  get failure(): MigrationError | undefined {
    return this.state.kind === 'failed' ? this.state.error : undefined;
  }

  /** The error that paused postcopy, while paused. */
  get pausedBy(): MigrationError | undefined {
    return this.state.kind === 'paused' ? this.state.error : undefined;
  }

  /** The link, when there is one that works (the steps use it between awaits). */
  get live(): Link {
    this.check();
    const l = this.link;
    if (!l || l.dropped) throw this.pausedBy ?? new MigrationError('peer-disconnected', this.phase, 'the connection was lost');
    return l;
  }

  check(): void {
    const f = this.failure;
    if (f) throw f;
  }

  emit<K extends keyof SourceEvents>(name: K, ...args: SourceEvents[K]): void {
    (this.events.emit as (n: K, ...a: SourceEvents[K]) => boolean)(name, ...args);
  }

  listens(name: keyof SourceEvents): boolean {
    return this.events.listenerCount(name) > 0;
  }

  stats(): SourceStats {
    const l = this.link;
    const channels = l ? l.conn.stats() : {};
    const s = buildStats(this.status, this.c, this.t, this.ram.remainingBytes(), this.latency.summary(), channels);
    const live = l && isThreaded(l.conn) ? l.conn.threadStats() : [];
    return { ...s, threads: { used: this.threads.used, why: this.threads.why, channels: [...this.endedThreads, ...live] } };
  }

  /** What the channel workers share for this migration (memory, page sets, the RAM section). */
  threadShared(): ThreadShared {
    const m = this.opts.memory;
    // Shared memory, or files each worker reads itself (planSourceThreads checked there is one of them).
    const mem = m instanceof InMemorySource ? m.sharedBlocks() : undefined;
    const files = mem ? undefined : m.blockFiles?.();
    return {
      blocks: this.ram.blocks.map((st, i) => ({
        idstr: st.info.idstr,
        length: st.info.length,
        ...(mem ? { memory: mem[i]!.memory } : { file: files![i]! }),
        toSend: st.toSend.buffer,
        sentOnce: st.sentOnce.buffer,
        sentAfterListen: st.sentAfterListen.buffer,
        sentOnPreempt: st.sentOnPreempt.buffer,
      })),
      sectionId: this.ramSection.sectionId,
      sectionBytes: this.opts.sectionBytes ?? 8 << 20,
      packets: this.multifdPackets.cell.buffer as SharedArrayBuffer,
    };
  }

  // ---- writing ----------------------------------------------------------

  write(records: readonly StreamRecord[]): void {
    this.enc.writeAll(records);
  }

  /**
   * Hands what the encoder holds to the main channel and waits until it fits
   * under the channel's bound (`send()`): records other than the bulk
   * stream's pages (setup, commands, device state, the package).
   */
  async flushMain(written?: () => void): Promise<void> {
    const link = this.live;
    const pieces = this.enc.take();
    if (pieces.length === 0) return;
    for (const p of pieces) this.c.transferred += p.length;
    await link.main.send(pieces, 'bulk', written);
    this.check();
  }

  // ---- failure and pause ------------------------------------------------

  fail(e: MigrationError): void {
    if (this.over) return;
    const phase = this.phase;
    this.state = { kind: 'failed', error: e, phase };
    this.t.endedAt = performance.now();
    this.stallWatch.stop();
    this.link?.drop(e);
    this.wakeRecovery?.();
    this.onFailed(e);
  }

  /** After a failure in postcopy: pause if a new connection can cure it, else rethrow. */
  /**
   * The destination said it completed (SHUT 0) on the current link. It may
   * close its end right after — before a flush or write of ours was answered,
   * or its channel's thread has ended: that is its finish, not a loss.
   */
  get destinationCompleted(): boolean {
    return this.link?.shut === 0 && !this.link.dropped;
  }

  pauseOrThrow(e: unknown): void {
    this.check();
    if (this.pausedBy) return;
    const err = MigrationError.from(e, this.phase);
    if (!this.canRecover() || !isNetworkFailure(err)) throw err;
    this.enterPause(err, false);
  }

  canRecover(): boolean {
    return this.postcopy && this.opts.recovery !== false;
  }

  /** A channel of `link` failed: pause (postcopy, network) or fail; a dropped link's news is old. */
  linkLost(link: Link, e: unknown): void {
    if (link.dropped || link !== this.link || this.over) return;
    try {
      this.pauseOrThrow(e);
    } catch (err) {
      this.fail(MigrationError.from(err, this.phase));
    }
  }

  /**
   * Postcopy paused (QEMU's postcopy-paused): the link is dropped whole, every
   * page and request state kept. What was in flight is settled by the
   * destination's received-bitmap on recovery, and it asks again for the
   * pages its guest still waits for.
   */
  enterPause(e: MigrationError, hold: boolean): void {
    if (this.over) return;
    const s = this.state;
    if (s.kind === 'paused') {
      if (hold && !s.hold) this.state = { ...s, hold };
      return;
    }
    const at = performance.now();
    // A recovery connection lost before RESUME_ACK prolongs the same outage:
    // `pausedMs` counts from the failure that ended postcopy-active.
    const since = s.kind === 'recovering' ? s.since : at;
    this.state = { kind: 'paused', error: e, since, hold };
    this.link?.drop(e);
    this.requests.dropAll();
    // Records encoded for the lost link are dropped; the bitmaps say what to resend.
    this.enc.take();
    this.preemptEnc.take();
    this.emit('paused', { error: e, at });
  }
}
