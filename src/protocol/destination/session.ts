import { BlockTime } from '../blocktime.js';
import { EventEmitter } from 'node:events';
import { constants } from 'node:os';
import { performance } from 'node:perf_hooks';
import { StreamDecoder } from '../../stream/decoder.js';
import { RecordType, TARGET_PAGE_SIZE } from '../../stream/constants.js';
import type { PreemptRecordWithRuns, ReturnPathMessage, StreamRecordWithRuns } from '../../stream/records.js';
import type { Channel, ChannelStats } from '../../transport/channel.js';
import { MigrationListener, type DestinationConnection } from '../../transport/connection.js';
import type { StrangerEvent } from '../../transport/qualify.js';
import { TransportError } from '../../transport/errors.js';
import { pendingSocketError } from '../../transport/tuning.js';
import { usageError } from '../../errors.js';
import { MigrationError, abortError, type MigrationPhase } from '../errors.js';
import { PageTracker, type PageRequestResult } from '../page-tracker.js';
import { isNetworkFailure } from '../recovery.js';
import { ANSWER_COMPLETED_MS, ShutNews, answerCompleted, checkRamComplete, waitLatePages } from './completion.js';
import { PageLanding } from './landing.js';
import { Link as ChannelLink, type LinkEvents } from './link.js';
import { checkAdvise, checkPageRequest, discard, requireAdvised } from './postcopy.js';
import { SectionWatch } from './precopy.js';
import { Outage, listenForRecovery, requireRecovering } from './recovery.js';
import { checkMultifdDrained, createMultifdReception, setMultifdBlocks, summarizeMultifd, type MultifdReception, type MultifdStats } from './multifd.js';
import { acceptBlockList, validateDestinationOptions } from './setup.js';
import { isListening, isOver, linkOf, phaseOf, statusOf, type DestinationState, type Link } from './state.js';
import { DestinationCounters } from './stats.js';
import type { ConfigurationRecord } from '../../stream/records.js';
import type { InMemorySink } from '../memory.js';
import { ThreadLink, sharedBlocks, type ThreadLinkEvents } from './threads/link.js';
import { ThreadConnection, ThreadedListener } from './threads/listener.js';
import { decideThreads, type ThreadDecision } from './threads/support.js';
import { Count, type ControlRecord, type SharedBlock, type WorkerBitmaps } from './threads/wire.js';
import type { DestinationEvents, DestinationOptions, DestinationResult, DestinationStats, ThreadStats } from './types.js';

/** What the session uses of its listener: MigrationListener, or ThreadedListener with threads. */
interface SessionListener {
  readonly uri: string;
  on(event: 'stranger', listener: (ev: StrangerEvent) => void): unknown;
  accept(): Promise<DestinationConnection | ThreadConnection>;
  close(): void;
  /** ThreadedListener: settles once the threads it started and still held have ended (after close()). */
  readonly ended?: Promise<void>;
}

type Command = Extract<StreamRecordWithRuns, { type: 'command' }>['command'];

/** A multifd channel the source closed while the main stream still needs its SYNC. */
function closedBeforeBarrier(name: string, phase: MigrationPhase): MigrationError {
  return new MigrationError('peer-disconnected', phase, `the source closed ${name} before the MULTIFD_FLUSH barrier it is needed at`);
}

/**
 * The receiving half of a migration (QEMU's destination), fed by a QEMU 10.0
 * source or our own SourceSession: listens, takes the first connection that
 * qualifies as the main channel and the next as the preempt channel (others
 * on the port are dropped and reported as 'stranger' events), follows the protocol
 * (PING→PONG, OPEN_RETURN_PATH, ADVISE, DISCARD, LISTEN, PACKAGED, RUN, EOF,
 * SHUT), writes RAM into a GuestMemorySink, keeps device state, and serves
 * demand page requests during postcopy.
 *
 * The session holds one state (see state.ts); each connection is a Link
 * (link.ts), dropped whole when it fails; the steps of the protocol are in
 * setup.ts, precopy.ts, landing.ts, postcopy.ts, recovery.ts, completion.ts.
 */
export class DestinationSession extends EventEmitter<DestinationEvents> {
  /** Resolves with the result when the migration completed; rejects with a MigrationError. */
  readonly done: Promise<DestinationResult>;
  private resolveDone!: (r: DestinationResult) => void;
  private rejectDone!: (e: MigrationError) => void;
  private state: DestinationState = { kind: 'setup' };
  /** The decoder that read the stream's header (and configuration); later links continue its stream. */
  private header: StreamDecoder<true> | undefined;
  /** The main stream's decoder as of the last link: a recovery link continues from it. */
  private stream: StreamDecoder<true> | undefined;
  private readonly pages: PageTracker;
  private readonly counts = new DestinationCounters();
  /** Waits of faulting contexts on missing pages: postcopy-blocktime. */
  private readonly blocktime: BlockTime;
  private readonly landing: PageLanding;
  private readonly sections = new SectionWatch();
  /** The multifd channels' receivers and barrier, once they are all in. */
  private multifd: MultifdReception | undefined;
  /** OPEN_RETURN_PATH came: the source reads our messages (it stays open across recoveries). */
  private rpOpen = false;
  private vmdesc: Buffer | undefined;
  private acceptTimer: NodeJS.Timeout | undefined;
  private started = false;
  /** Settles once the link has let go of the sockets (close() waits for it). */
  private shutDown: Promise<void> | undefined;
  private readonly linkEvents: LinkEvents;
  private readonly threadEvents: ThreadLinkEvents;
  /** With threads: every link so far (their counters add up), the blocks' shared memory, the written sets. */
  private readonly threadLinks: ThreadLink[] = [];
  private shared: SharedBlock[] | undefined;
  private readonly written = new Map<string, WorkerBitmaps>();
  /** The configuration record (with threads the header is decoded in the main channel's worker). */
  private configRecord: ConfigurationRecord | undefined;
  private readonly onAbort = () => this.fail(abortError(this.opts.signal!, this.phase));
  /** Whether the source can know that we completed (postcopy: else a completed destination answers its recovery). */
  private shutNews = new ShutNews();
  /** close() was called: a completed destination stops answering recovery connections. */
  private closing = false;

  private constructor(
    private listener: SessionListener,
    private readonly opts: DestinationOptions,
    private readonly threads: ThreadDecision,
  ) {
    super();
    this.done = new Promise((resolve, reject) => {
      this.resolveDone = resolve;
      this.rejectDone = reject;
    });
    // A caller that only listens to events must not get an unhandled rejection.
    this.done.catch(() => undefined);
    this.pages = new PageTracker((m) => this.sendRp(m), false, threads.used);
    this.blocktime = new BlockTime(opts.vcpus);
    this.landing = new PageLanding(opts.sink, this.pages, this.counts);
    this.linkEvents = {
      main: (link, chunk) => this.onMainData(link, chunk),
      mainClosed: (link) => this.onMainClosed(link),
      preemptArrived: (link, ch) => this.onPreemptArrived(link, ch.stats),
      preempt: (link, chunk, first) => this.onPreemptData(link, chunk, first),
      preemptEnded: (link) => this.onPreemptEnded(link),
      multifdReady: (link, chs) => this.onMultifdReady(link, chs),
      multifd: (link, id, chunk) => this.onMultifdData(link, id, chunk),
      multifdEnded: (link, id) => this.onMultifdEnded(link, id),
      lost: (link, e) => this.linkLost(link, e),
    };
    this.threadEvents = {
      records: (link, recs, pages) => this.onThreadRecords(link, recs, pages),
      blocks: (_link, rec) => this.onThreadBlocks(rec),
      mainClosed: (link, recs, error) => this.onThreadMainClosed(link, recs, error),
      preemptArrived: (link, stats) => this.onPreemptArrived(link, stats),
      preemptCommand: (link) => {
        if (this.canRecover()) this.recoveryArrivedEarly(link, link.conn.preempt);
      },
      preemptEnded: (link, error) => this.onThreadPreemptEnded(link, error),
      // After main's 'channel' event, which waits for main's first stats report (startLink).
      multifdArrived: (link, stats) => {
        void link.firstStats.then(() => {
          if (link === this.link) for (const st of stats) this.emit('channel', { role: 'multifd', stats: st });
        });
      },
      malformed: (link, e) => {
        if (link === this.link) this.fail(MigrationError.from(e, this.phase));
      },
      lost: (link, e) => this.linkLost(link, e),
    };
  }

  /**
   * Starts listening; the migration proceeds as the source connects. Bad
   * options throw at once (TypeError/RangeError with a `code`); a failure to
   * listen (`address-in-use`, `tls-bad-credentials`, …) rejects.
   */
  static listen(opts: DestinationOptions): Promise<DestinationSession> {
    validateDestinationOptions(opts);
    const threads = decideThreads(opts.threads, opts.sink);
    return DestinationSession.open(opts, threads);
  }

  private static async open(opts: DestinationOptions, threads: ThreadDecision): Promise<DestinationSession> {
    const signal = opts.signal;
    if (signal?.aborted) throw abortError(signal, 'setup');
    const transport = opts.transport ?? {};
    const listener: SessionListener = threads.used ? await ThreadedListener.listen(opts.listen, transport, {}, opts.multifd) : await MigrationListener.listen(opts.listen, transport, opts.multifd ? { multifd: opts.multifd } : {});
    if (signal?.aborted) {
      listener.close();
      throw abortError(signal, 'setup');
    }
    const s = new DestinationSession(listener, opts, threads);
    s.start();
    return s;
  }

  /** The address listened on (with the real port when 0 was asked). */
  get uri(): string {
    return this.listener.uri;
  }

  /** The current phase. */
  get currentPhase(): MigrationPhase {
    return this.phase;
  }

  private get phase(): MigrationPhase {
    return phaseOf(this.state);
  }

  private get link(): Link | undefined {
    return linkOf(this.state);
  }

  // ---- setup ------------------------------------------------------------------

  private start(): void {
    if (this.started) throw usageError('state', 'already-started', 'start', 'this DestinationSession is already listening');
    this.started = true;
    this.opts.signal?.addEventListener('abort', this.onAbort, { once: true });
    const acceptMs = this.opts.acceptTimeoutMs;
    if (acceptMs !== undefined) {
      this.acceptTimer = setTimeout(() => {
        if (this.state.kind === 'setup') this.fail(new MigrationError('accept-timeout', 'setup', `no source connected to ${this.listener.uri} within ${acceptMs} ms`));
      }, acceptMs);
    }
    this.listener.on('stranger', (ev) => this.onStranger(ev));
    // Rejects only when the listener is closed, i.e. when the session is over.
    this.listener.accept().then(
      (conn) => {
        if (this.state.kind !== 'setup') {
          conn.destroy(); // ended meanwhile (accept timeout, signal, close)
          return;
        }
        clearTimeout(this.acceptTimer);
        let link: Link;
        if (conn instanceof ThreadConnection) {
          link = this.newThreadLink(conn, undefined);
        } else {
          const decoder = new StreamDecoder({ pageRuns: true });
          this.header = decoder;
          link = this.newLink(conn, decoder);
        }
        this.state = { kind: 'precopy', link, phase: 'setup', advised: false, inPackage: false };
        this.startLink(link);
      },
      (e: unknown) => this.fail(MigrationError.from(e, 'setup')),
    );
  }

  private newLink(conn: DestinationConnection, decoder: StreamDecoder<true>): ChannelLink {
    const ms = this.opts.idleTimeoutMs ?? 60_000;
    this.stream = decoder;
    return new ChannelLink(conn, decoder, this.linkEvents, {
      idleTimeoutMs: ms,
      idleError: () => {
        // The main channel is not read before every multifd channel is in: say which are missing.
        const m = conn.multifd;
        if (m && !m.complete) return new MigrationError('idle-timeout', this.phase, `only ${m.count} of ${m.expected} multifd channels connected within ${ms} ms of the main channel`);
        return new MigrationError('idle-timeout', this.phase, `no data from the source for ${ms} ms`);
      },
    });
  }

  /** A connection whose channels run in workers; `resume`: a recovery continues the last link's stream. */
  private newThreadLink(conn: ThreadConnection, resume: ThreadLink | undefined): ThreadLink {
    const ms = this.opts.idleTimeoutMs ?? 60_000;
    const link = new ThreadLink(conn, this.threadEvents, {
      idleTimeoutMs: ms,
      idleError: () => new MigrationError('idle-timeout', this.phase, `no data from the source for ${ms} ms`),
      ...(resume ? { resume: resume.resumeState ?? Promise.resolve(undefined) } : {}),
      blocks: () => this.shared,
      pages: this.pages,
    });
    this.threadLinks.push(link);
    return link;
  }

  private startLink(link: Link): void {
    // A worker's channel: its stats (TLS version and cipher) come with its first report.
    if (link instanceof ThreadLink) void link.firstStats.then(() => link.alive && this.emit('channel', { role: 'main', stats: link.conn.main.stats }));
    else this.emit('channel', { role: 'main', stats: link.conn.main.stats });
    link.start();
  }

  // ---- the main channel ---------------------------------------------------------

  private onMainData(link: ChannelLink, chunk: Buffer): void | Promise<void> {
    if (isOver(this.state)) return;
    this.counts.transferred += chunk.length;
    let recs: StreamRecordWithRuns[];
    try {
      recs = link.decoder.push(chunk);
    } catch (e) {
      this.fail(MigrationError.from(e, this.phase));
      return;
    }
    return this.onMainRecords(link, recs, 0);
  }

  /**
   * Acts on `recs[from…]`. At a MULTIFD_FLUSH the main stream waits until
   * every multifd channel has read its SYNC packet (QEMU's
   * `multifd_recv_sync_main`): the records after it, and the channel, wait.
   */
  private onMainRecords(link: ChannelLink, recs: StreamRecordWithRuns[], from: number): void | Promise<void> {
    try {
      const now = performance.now();
      for (let i = from; i < recs.length; i++) {
        const r = recs[i]!;
        if (r.type === 'ram-multifd-flush') {
          const wait = this.multifdFlush(link);
          if (wait) return wait.then(() => (link.alive && !isOver(this.state) ? this.onMainRecords(link, recs, i + 1) : undefined));
          continue;
        }
        this.onRecord(r, now);
      }
      if (link.decoder.error) throw link.decoder.error;
    } catch (e) {
      this.fail(MigrationError.from(e, this.phase));
      return;
    }
    return this.sinkBackpressure();
  }

  /**
   * After a chunk: when the sink is over its bound of bytes in flight, the
   * channel waits (pauses reading) until it is back under it. Its rejection is
   * a storage failure and fails the migration — in postcopy too: the memory
   * that cannot be stored is lost, and no new connection would bring it back.
   * The promise handed to the channel never rejects (the failure is ours to
   * report, typed, not the channel's).
   */
  private sinkBackpressure(): Promise<void> | undefined {
    const bp = this.opts.sink.backpressure?.();
    if (!bp) return undefined;
    this.counts.sinkWaits++;
    return bp.then(undefined, (e: unknown) => {
      const err = MigrationError.from(e, this.phase);
      // By contract the rejection is the storage error; whatever it is, it is the sink's.
      this.fail(err.kind === 'storage' ? err : new MigrationError('storage', this.phase, `the memory sink failed: ${err.reason}`, { cause: e }));
    });
  }

  private onMainClosed(link: ChannelLink): void {
    if (this.completes(link)) this.shutNews.mainClosed(false);
    if (isOver(this.state)) return;
    if (this.state.kind === 'completing') {
      // A stream that ends after EOF without a VM description is complete.
      try {
        for (const r of link.decoder.end()) this.onRecord(r, performance.now());
        void this.finish();
      } catch (e) {
        this.fail(MigrationError.from(e, this.phase));
      }
      return;
    }
    this.linkLost(link, this.brokenMultifd(link) ?? new MigrationError('peer-disconnected', this.phase, 'the source closed the main channel before the migration completed'));
  }

  /**
   * A source closes its main channel when one of its multifd channels failed:
   * the cause, if such a channel was reset while it waited at its barrier
   * (not read, so it has not seen the reset yet: the kernel holds it).
   */
  private brokenMultifd(link: ChannelLink): MigrationError | undefined {
    for (const ch of link.conn.multifd?.list() ?? []) {
      const errno = pendingSocketError(ch.socket);
      if (!errno) continue;
      const name = ch.stats.id !== undefined ? (`multifd-${ch.stats.id}` as const) : ('multifd' as const);
      const reset = errno === constants.errno.ECONNRESET;
      const what = reset ? 'reset (ECONNRESET)' : `failed (errno ${errno})`;
      return MigrationError.from(new TransportError(reset ? 'reset' : 'closed', `${name}: the connection was ${what}, before the source closed its main channel`, { channel: name }), this.phase);
    }
    return undefined;
  }

  // ---- the main channel in a worker (threads) --------------------------------------

  /** The main worker's non-page records, in order (its pages are landed already). */
  private onThreadRecords(link: ThreadLink, recs: ControlRecord[], iterationPages: number[]): void {
    if (link !== this.link || isOver(this.state)) return;
    let footer = 0;
    try {
      const now = performance.now();
      for (const r of recs) {
        if (r.type === 'footer') this.counts.iterationPages = iterationPages[footer++] ?? 0;
        this.onRecord(r, now);
      }
    } catch (e) {
      this.fail(MigrationError.from(e, this.phase));
    }
  }

  /** The block list, decoded in the main worker: size the sink and the tracker, hand their memory over. */
  private onThreadBlocks(rec: ControlRecord): SharedBlock[] {
    if (rec.type !== 'ram-blocks') throw new MigrationError('protocol', this.phase, `a ${rec.type} record where the block list was expected`);
    this.onRecord(rec, performance.now());
    const sink = this.opts.sink;
    // Shared memory, or (a sink of files) the open files each worker writes itself.
    const files = sink.blockFiles ? new Map(sink.blockFiles().map((f) => [f.idstr, f])) : undefined;
    this.shared = sharedBlocks(this.pages.blocks, (id) => files?.get(id) ?? (sink as InMemorySink).blocks.get(id), (id) => this.pages.bitmap(id)?.buffer, this.written);
    return this.shared;
  }

  private onThreadMainClosed(link: ThreadLink, recs: ControlRecord[], error: Error | undefined): void {
    if (this.completes(link)) this.shutNews.mainClosed(error !== undefined);
    if (link !== this.link || isOver(this.state)) return;
    if (this.state.kind === 'completing') {
      if (error) {
        this.fail(MigrationError.from(error, this.phase));
        return;
      }
      try {
        for (const r of recs) this.onRecord(r, performance.now());
        void this.finish();
      } catch (e) {
        this.fail(MigrationError.from(e, this.phase));
      }
      return;
    }
    this.linkLost(link, new MigrationError('peer-disconnected', this.phase, 'the source closed the main channel before the migration completed'));
  }

  private onThreadPreemptEnded(link: ThreadLink, error: Error | undefined): void {
    // Completing with every page here, the channel's end is the source's: nothing to recover.
    if (this.canRecover()) {
      this.linkLost(link, new MigrationError('peer-disconnected', this.phase, 'the source closed the preempt channel before the migration completed'));
      return;
    }
    if (error && link === this.link) this.fail(MigrationError.from(error, this.phase));
  }

  /** The counters of this thread plus every channel worker's. */
  private totals(): DestinationCounters {
    const t = Object.assign(Object.create(DestinationCounters.prototype) as DestinationCounters, this.counts);
    for (const l of this.threadLinks) {
      t.transferred += l.count(Count.transferred);
      t.normal += l.count(Count.normal);
      t.duplicate += l.count(Count.duplicate);
      t.xbzrle += l.count(Count.xbzrle);
      t.preempt += l.count(Count.preempt);
      t.runs += l.count(Count.runs);
      t.runPages += l.count(Count.runPages);
      t.placedTwice += l.count(Count.placedTwice);
    }
    return t;
  }

  private onRecord(r: StreamRecordWithRuns, now: number): void {
    const s = this.state;
    if (s.kind === 'completing' && s.step !== 'vmdesc') return;
    switch (r.type) {
      case 'configuration':
        this.configRecord = r;
        this.emit('configuration', r);
        return;
      case 'ram-blocks':
        acceptBlockList(r.blocks, this.opts.sink, this.pages, this.phase);
        {
          const l = this.link;
          if (l instanceof ChannelLink && l.multifd) setMultifdBlocks(l.multifd, l.decoder.ramBlocks);
        }
        this.emit('ram-blocks', this.pages.blocks);
        return;
      case 'ram-pages':
      case 'ram-zeros':
      case 'ram-xbzrle':
        this.landing.land(r, 'main', isListening(s), now);
        return;
      case 'section': {
        const phase = this.sections.opened(r, isListening(s));
        if (phase && s.kind === 'precopy') s.phase = phase;
        return;
      }
      case 'footer': {
        const pass = this.sections.closed(isListening(s), this.counts);
        if (pass && this.threads.used) pass.transferred = this.totals().transferred;
        if (pass) this.emit('pass', pass);
        return;
      }
      case 'device-state':
        this.sections.device(r, (s.kind === 'precopy' || s.kind === 'postcopy') && s.inPackage);
        return;
      case 'command':
        this.onCommand(r.command, now);
        return;
      case 'package-end':
        if (s.kind === 'precopy') s.inPackage = false;
        if (s.kind === 'postcopy') {
          s.inPackage = false;
          s.vmHere = true;
        }
        return;
      case 'eof':
        this.onEof();
        return;
      case 'vmdesc':
        this.vmdesc = Buffer.from(r.json);
        void this.finish();
        return;
      default:
        return;
    }
  }

  private onCommand(c: Command, now: number): void {
    const s = this.state;
    switch (c.cmd) {
      case 'open-return-path':
        this.rpOpen = true;
        return;
      case 'ping':
        // Answered at once, in arrival order (QEMU may answer PING 4 before PING 3; both are valid).
        this.sendRp({ type: 'pong', value: c.value });
        return;
      case 'postcopy-advise':
        checkAdvise(c, this.opts.postcopy === true, this.phase);
        if (s.kind === 'precopy') s.advised = true;
        this.emit('postcopy-advise');
        return;
      case 'postcopy-advise-bitmap-only':
        return;
      case 'postcopy-ram-discard':
        requireAdvised(this.advised, 'POSTCOPY_RAM_DISCARD', this.phase);
        // With threads the main worker cleared them, in stream order (pages after it may be here already).
        if (!this.threads.used) discard(c, this.pages);
        return;
      case 'packaged':
        if (s.kind === 'precopy' || s.kind === 'postcopy') {
          s.inPackage = true;
          s.phase = 'device-state';
        }
        return;
      case 'postcopy-listen':
        requireAdvised(this.advised, 'POSTCOPY_LISTEN', this.phase);
        if (s.kind === 'precopy') {
          this.state = { kind: 'postcopy', link: s.link, phase: s.phase, inPackage: s.inPackage, vmHere: false };
          this.pages.enableRequests(now);
          this.emit('postcopy-listen');
        }
        return;
      case 'postcopy-run':
        if (s.kind === 'precopy' || s.kind === 'postcopy') s.phase = 'postcopy';
        this.emit('postcopy-run', { at: now });
        return;
      case 'switchover-start':
      case 'enable-colo':
        return;
      case 'recv-bitmap':
        this.answerRecvBitmap(c.block);
        return;
      case 'postcopy-resume':
        this.resumed(now);
        return;
    }
  }

  /** ADVISE came (it is the first of postcopy: a state after LISTEN has had it). */
  private get advised(): boolean {
    const s = this.state;
    return s.kind === 'precopy' ? s.advised : s.kind !== 'setup';
  }

  private onEof(): void {
    const s = this.state;
    const link = this.link;
    if (!link) return;
    const postcopy = isListening(s);
    this.state = { kind: 'completing', link, postcopy, step: 'vmdesc' };
    // Postcopy streams end at EOF; precopy streams add the VM description, which QEMU always sends.
    if (postcopy) void this.finish();
  }

  // ---- the preempt channel ------------------------------------------------------

  private onPreemptArrived(link: Link, stats: ChannelStats): boolean {
    // While finishing, a plain-TCP preempt channel may qualify only now, with its first (late) page.
    const s = this.state;
    if (s.kind === 'completed' || s.kind === 'failed' || (s.kind === 'completing' && s.step === 'flushing')) return false;
    this.emit('channel', { role: 'preempt', stats });
    return link.alive;
  }

  private onPreemptData(link: ChannelLink, chunk: Buffer, first: boolean): void | Promise<void> {
    const s = this.state;
    // Still read while finishing: a requested page may arrive after the main channel's EOF.
    if (s.kind === 'completed' || s.kind === 'failed' || (s.kind === 'completing' && s.step === 'flushing')) return;
    if (first && chunk[0] === RecordType.COMMAND && this.canRecover()) {
      this.recoveryArrivedEarly(link, link.conn.preempt);
      return;
    }
    this.counts.transferred += chunk.length;
    const decoder = link.preemptDecoder;
    if (!decoder) return;
    try {
      const recs = decoder.push(chunk);
      const now = performance.now();
      for (const r of recs) this.onPreemptRecord(r, now);
      if (decoder.error) throw decoder.error;
    } catch (e) {
      this.fail(MigrationError.from(e, this.phase));
      return;
    }
    return this.sinkBackpressure();
  }

  private onPreemptRecord(r: PreemptRecordWithRuns, now: number): void {
    if (!isListening(this.state)) throw new MigrationError('protocol', this.phase, 'a page on the preempt channel before POSTCOPY_LISTEN');
    this.landing.land(r, 'preempt', true, now);
  }

  private onPreemptEnded(link: ChannelLink): void {
    // While the VM runs here the source never ends this channel first: a cut (completing: only while pages are missing).
    if (this.canRecover()) {
      this.linkLost(link, new MigrationError('peer-disconnected', this.phase, 'the source closed the preempt channel before the migration completed'));
      return;
    }
    try {
      link.preemptDecoder?.end();
    } catch (e) {
      this.fail(MigrationError.from(e, this.phase));
    }
  }

  // ---- multifd -------------------------------------------------------------------

  /** Every multifd channel is in: a receiver for each, landing into the sink and the received bitmap. */
  private onMultifdReady(link: ChannelLink, chs: readonly Channel[]): MultifdReception {
    const m = this.opts.multifd!;
    const reception = createMultifdReception(chs.length, {
      channels: m.channels,
      ...(m.uuid ? { uuid: m.uuid } : {}),
      target: {
        sink: this.opts.sink,
        received: (index, first, count) => {
          // Pages flow: precopy, whether or not main's PART section header is out of QEMU's buffer yet.
          const st = this.state;
          if (st.kind === 'precopy' && st.phase === 'setup') st.phase = 'precopy';
          this.counts.iterationPages += count;
          this.pages.receivedRun(index, first, count, 'main', performance.now());
        },
      },
      beforePages: () => {
        // QEMU 10.1: multifd carries pages in precopy only; its channels are idle once postcopy listens.
        if (isListening(this.state)) throw new MigrationError('protocol', this.phase, 'a multifd packet with pages after POSTCOPY_LISTEN (multifd is idle in postcopy)');
      },
      backpressure: () => this.sinkBackpressure(),
    });
    if (link.decoder.ramBlocks.size > 0) setMultifdBlocks(reception, link.decoder.ramBlocks);
    // Kept past the link: its counters are the migration's (a recovery link has no multifd).
    this.multifd = reception;
    for (const ch of chs) this.emit('channel', { role: 'multifd', stats: ch.stats });
    return reception;
  }

  private onMultifdData(link: ChannelLink, id: number, chunk: Buffer): void | Promise<void> {
    const rx = link.multifd?.receivers[id];
    if (!rx || isOver(this.state)) return;
    this.counts.transferred += chunk.length;
    try {
      const held = rx.push(chunk, () => this.phase);
      // The promise handed to the channel never rejects: the failure is the session's to report.
      return held?.then(undefined, (e: unknown) => this.fail(MigrationError.from(e, this.phase)));
    } catch (e) {
      this.fail(MigrationError.from(e, this.phase));
    }
  }

  /**
   * The source ended a multifd channel (FIN). Inside a packet that is a cut.
   * Between packets it is what a source does once it is done with its channels
   * — QEMU closes them at the end, possibly before we have read the rest of
   * main, and 10.1 may at the postcopy switch — so it is fine until the main
   * stream needs that channel at a MULTIFD_FLUSH barrier (QEMU's destination
   * would hang there; we fail, naming it).
   */
  private onMultifdEnded(link: ChannelLink, id: number): void {
    const m = link.multifd;
    const rx = m?.receivers[id];
    if (!m || !rx || isOver(this.state)) return;
    try {
      rx.end(this.phase);
      if (m.barrier.flushing && !rx.heldAtSync) throw closedBeforeBarrier(rx.name, this.phase);
    } catch (e) {
      // Closed inside a packet: the connection went, as a cut main channel (the truncation is the cause).
      const cut = e instanceof MigrationError && e.code === 'truncated';
      this.linkLost(link, cut ? new MigrationError('peer-disconnected', this.phase, `the source closed ${rx.name} inside a packet`, { cause: e }) : e);
    }
  }

  /**
   * MULTIFD_FLUSH on main: undefined when every channel already waits at its
   * SYNC (released now), else the wait. A stream with MULTIFD_FLUSH comes from
   * a multifd source: without multifd here its pages would never land.
   */
  private multifdFlush(link: ChannelLink): Promise<void> | undefined {
    if (!this.opts.multifd) throw new MigrationError('protocol', this.phase, 'the source uses multifd (MULTIFD_FLUSH on the main channel), but this destination was not given multifd: { channels }');
    const m = link.multifd;
    if (!m) throw new MigrationError('protocol', this.phase, 'MULTIFD_FLUSH before the multifd channels connected');
    for (const rx of m.receivers) if (rx.ended && !rx.heldAtSync) throw closedBeforeBarrier(rx.name, this.phase);
    const wait = m.barrier.flush();
    if (!wait) return undefined;
    this.counts.multifdWaits++;
    return wait.catch(() => undefined); // rejected only when the session failed meanwhile
  }

  // ---- postcopy recovery ----------------------------------------------------

  /**
   * A "preempt" connection that starts with a command is a recovery main
   * channel (a page record's first byte is its offset's top byte, 0; over
   * TLS the preempt channel qualifies by order, so this is where it shows;
   * over plain TCP the listener drops it as a 'recovery' stranger): the
   * source took this connection for dead — a partition it saw first (its
   * stall window is shorter than our idle timeout), or its pause() — and came
   * back before we noticed. It is the proof we lacked: pause now, so that the
   * source's next attempt finds us listening; this connection goes (QEMU's
   * destination would not even accept it before migrate-recover).
   */
  private recoveryArrivedEarly(link: Link, ch: { destroy(): void } | undefined): void {
    ch?.destroy();
    this.linkLost(link, new MigrationError('peer-disconnected', this.phase, 'the source opened a recovery connection: it lost the current one'));
  }

  /** A dropped connection; a plain-TCP recovery connection in the preempt slot is the same proof as above. */
  private onStranger(ev: StrangerEvent): void {
    this.emit('stranger', ev);
    const s = this.state;
    if (ev.reason === 'recovery' && s.kind === 'postcopy' && this.canRecover()) this.recoveryArrivedEarly(s.link, undefined);
  }

  /**
   * The VM runs here (package read whole), so its memory is split: a network
   * failure must pause. After a postcopy EOF too, while requested pages are
   * still missing (in flight on the preempt channel): lost with the link, only
   * a recovery brings them (the source resends what RECV_BITMAP lacks).
   */
  private canRecover(): boolean {
    if (this.opts.recovery === false) return false;
    const s = this.state;
    if (s.kind === 'completing') return s.postcopy && s.step !== 'flushing' && this.pages.missing() > 0;
    return (s.kind === 'postcopy' && s.vmHere) || s.kind === 'paused' || s.kind === 'recovering';
  }

  /** A channel of `link` failed: pause (VM running here, network) or fail. */
  private linkLost(link: Link, e: unknown): void {
    if (this.completes(link)) this.shutNews.lost();
    // Over, unless completing still waits for requested pages (canRecover): then the loss pauses.
    if (link !== this.link || (isOver(this.state) && !this.canRecover())) return;
    const err = MigrationError.from(e, this.phase);
    if (this.canRecover() && isNetworkFailure(err)) this.enterPause(err);
    else this.fail(err);
  }

  /**
   * Forces the paused state now, as QEMU's `migrate-pause` on a destination:
   * for an operator who knows the link is dead and will not wait for the idle
   * timeout. The connection is dropped; every page and waiting request is
   * kept; the source's recovery connection is awaited as after a network
   * failure ('paused' follows once listening). A no-op when already paused.
   *
   * @throws MigrationError `invalid-state` (synchronously) unless the VM runs
   *   here — postcopy, package received, recovery not disabled — and the
   *   migration has not ended.
   */
  pause(): void {
    if (!this.canRecover()) {
      const why = isOver(this.state) ? 'the migration is over' : this.opts.recovery === false ? 'postcopy recovery is off (recovery: false)' : 'the VM does not run here yet (no postcopy package received)';
      throw new MigrationError('invalid-state', this.phase, `pause() needs a running postcopy migration: ${why}`);
    }
    if (this.state.kind === 'paused') return;
    this.enterPause(new MigrationError('paused', this.phase, 'paused by the operator (pause())'));
  }

  /**
   * Postcopy paused (QEMU's postcopy-paused): the link is dropped, pages
   * and waiting requests are kept, and a listener waits for the source's new
   * connection — at `recovery.listen`, else where the migration came in.
   * Paused again before a recovery completed (a recovery connection that fails
   * before POSTCOPY_RESUME; QEMU: postcopy-recover → postcopy-paused), the
   * outage and its timeout go on.
   */
  private enterPause(e: MigrationError): void {
    const s = this.state;
    if (s.kind !== 'postcopy' && s.kind !== 'recovering' && !(s.kind === 'completing' && s.postcopy)) return;
    // Paused after EOF: the recovery goes on with postcopy (the source sends what is missing, then EOF again).
    const phase = s.kind === 'completing' ? 'postcopy' : s.phase;
    // That link no longer completes (it never queued SHUT 0): the link that resumes will.
    if (s.kind === 'completing') this.shutNews = new ShutNews();
    const outage = s.kind === 'recovering' ? s.outage : new Outage(e, performance.now(), (this.opts.recovery || {}).timeoutMs, (err) => this.fail(err));
    s.link.drop();
    this.state = { kind: 'paused', outage, phase };
    this.pages.suspendRequests();
    const uri = (this.opts.recovery || {}).listen ?? this.listener.uri;
    this.listener.close();
    this.awaitRecovery(uri).then(
      () => this.emit('paused', { error: e, at: outage.since, uri: this.listener.uri }),
      (err: unknown) => this.fail(MigrationError.from(err, this.phase)),
    );
  }

  /**
   * Postcopy recovery: wait for the source's new connection at `uri` instead
   * (QEMU's `migrate-recover`). Resolves with the address listened on.
   */
  async recover(uri: string): Promise<string> {
    if (this.state.kind !== 'paused' && this.state.kind !== 'recovering') throw new MigrationError('protocol', this.phase, 'recover() needs a paused postcopy migration');
    this.listener.close();
    await this.awaitRecovery(uri);
    return this.listener.uri;
  }

  private async awaitRecovery(uri: string): Promise<void> {
    const transport = this.opts.transport ?? {};
    const listener: SessionListener = this.threads.used
      ? await listenForRecovery(uri, transport, (u, t, o) => ThreadedListener.listen(u, t, o))
      : await listenForRecovery(uri, transport, (u, t, o) => MigrationListener.listen(u, t, o));
    if (isOver(this.state)) {
      listener.close();
      return;
    }
    this.listener = listener;
    // Strangers (a wrong certificate, a port scanner) are dropped by the listener, which keeps waiting.
    listener.on('stranger', (ev) => this.onStranger(ev));
    listener.accept().then(
      (conn) => {
        const s = this.state;
        if ((s.kind !== 'paused' && s.kind !== 'recovering') || this.listener !== listener) {
          conn.destroy();
          return;
        }
        // A recovery connection that recover() moved away from: the new one replaces it.
        if (s.kind === 'recovering') s.link.drop();
        // The new main channel has no header: it continues the old stream's sections and blocks.
        const link =
          conn instanceof ThreadConnection
            ? this.newThreadLink(conn, this.threadLinks[this.threadLinks.length - 1])
            : this.newLink(conn, new StreamDecoder({ channel: 'resume', resumeFrom: this.stream, pageRuns: true }));
        this.state = { kind: 'recovering', link, outage: s.outage, phase: s.phase };
        this.startLink(link);
      },
      () => undefined, // closed: replaced by recover(), or the session is over
    );
  }

  /** RECV_BITMAP: which pages of `block` are here, so that the source resends exactly the others. */
  private answerRecvBitmap(block: string): void {
    requireRecovering(this.state.kind === 'recovering', 'RECV_BITMAP', this.phase);
    const bitmap = this.pages.bitmap(block);
    if (!bitmap) throw new MigrationError('protocol', this.phase, `RECV_BITMAP for unknown RAM block "${block}"`);
    this.sendRp({ type: 'recv-bitmap', block, bitmap: bitmap.bytes });
  }

  /** POSTCOPY_RESUME: acknowledge, then ask again for every page the guest still waits for. */
  private resumed(now: number): void {
    const s = this.state;
    requireRecovering(s.kind === 'recovering', 'POSTCOPY_RESUME', this.phase);
    if (s.kind !== 'recovering') return;
    this.sendRp({ type: 'resume-ack', value: 1 });
    this.state = { kind: 'postcopy', link: s.link, phase: s.phase, inPackage: false, vmHere: true };
    this.pages.resumeRequests(now);
    s.outage.end();
    this.counts.recoveries++;
    this.emit('resumed', { recoveries: this.counts.recoveries, pausedMs: now - s.outage.since });
  }

  private sendRp(m: ReturnPathMessage): void {
    if (!this.rpOpen) throw new MigrationError('protocol', this.phase, `${m.type} needs a return path, but the source did not open one`);
    // Paused: waiting requests are sent again after the resume.
    this.link?.send(m);
  }

  // ---- demand paging ------------------------------------------------------------

  /**
   * Demand paging: resolves at once when the page is already here; otherwise
   * sends REQ_PAGES(_ID) (during postcopy; before it, waits for LISTEN or for
   * the bulk stream) and resolves when the page arrives on either channel.
   * Concurrent requests for one page share one request. `vcpu` names the
   * faulting context (default 0) whose wait counts in `postcopy-blocktime`.
   */
  async requestPage(block: string, offset: number, opts: { vcpu?: number } = {}): Promise<PageRequestResult> {
    const over = isOver(this.state) ? new MigrationError('protocol', this.phase, 'the migration is over') : undefined;
    checkPageRequest(block, offset, this.pages, over);
    const vcpu = opts.vcpu ?? 0;
    this.blocktime.check(vcpu);
    const asked = performance.now();
    const waits = !this.pages.has(block, offset);
    if (waits) this.blocktime.begin(vcpu, asked);
    const request = this.pages.request(block, offset, asked);
    // With threads a worker lands the page: watch for it while requests wait.
    const link = this.link;
    if (link instanceof ThreadLink) link.watchPages();
    try {
      const r = await request;
      if (r.requested) this.emit('page-request', r);
      return r;
    } finally {
      if (waits) this.blocktime.end(vcpu, performance.now());
    }
  }

  /** True when the page has arrived. */
  hasPage(block: string, offset: number): boolean {
    return this.pages.has(block, offset - (offset % TARGET_PAGE_SIZE));
  }

  // ---- stats ----------------------------------------------------------------------

  stats(): DestinationStats {
    const conn = this.link?.conn;
    const channels = conn?.stats() ?? {};
    const m = this.opts.multifd ? this.multifdStats() : undefined;
    const counts = this.threads.used ? this.totals() : this.counts;
    const blocktime = this.blocktime.summary(this.counts.endedAt ?? performance.now());
    return counts.stats(statusOf(this.state), this.pages, blocktime, channels, this.threadStats(), m);
  }

  /** stats().multifd: from the receivers here, or (threads) from the counters the channel workers keep. */
  private multifdStats(): MultifdStats {
    const channels = this.opts.multifd!.channels;
    const c = this.threadLinks[0]?.multifdCounters();
    if (!c) return summarizeMultifd(channels, this.multifd);
    const out: MultifdStats = { channels, syncs: c.syncs, packets: 0, normal: 0, zero: 0, runs: { count: 0, pages: 0 }, perChannel: c.perChannel };
    for (const x of c.perChannel) {
      out.packets += x.packets;
      out.normal += x.normal;
      out.zero += x.zero;
      out.runs.count += x.runs;
      out.runs.pages += x.runPages;
    }
    return out;
  }

  private threadStats(): ThreadStats {
    const link = this.link;
    const channels = link instanceof ThreadLink ? link.threadsInfo() : [];
    return { used: this.threads.used, why: this.threads.why, channels };
  }

  /** Everything received so far (complete or not). */
  snapshot(error?: MigrationError): DestinationResult {
    return {
      complete: this.state.kind === 'completed',
      machineType: (this.header?.config ?? this.configRecord)?.machineType,
      configuration: this.header?.config ?? this.configRecord,
      blocks: this.pages.blocks,
      devices: this.sections.devices,
      vmdesc: this.vmdesc,
      postcopy: isListening(this.state),
      stats: this.stats(),
      ...(error ? { error } : {}),
    };
  }

  // ---- completion -----------------------------------------------------------------

  private async finish(): Promise<void> {
    const s = this.state;
    if (s.kind !== 'completing' || s.step !== 'vmdesc') return;
    const link = s.link;
    s.step = 'late-pages';
    link.stopIdle();
    try {
      // Pages requested late may still be in flight on the preempt channel.
      await waitLatePages(link, this.pages, s.postcopy, this.sections.ramEnded, () => this.state === s);
      if (this.state !== s) return;
      // The wait ended with the link lost before its loss was told (pages missing): a network failure, a pause.
      if (s.postcopy && (link.preemptEnded || !link.alive) && this.canRecover()) {
        this.enterPause(new MigrationError('peer-disconnected', 'completion', `the link was lost while ${this.pages.missing()} requested pages were still in flight`));
        return;
      }
      s.step = 'flushing';
      checkMultifdDrained(link instanceof ChannelLink ? link.multifd : undefined);
      checkRamComplete(this.pages, s.postcopy, this.sections.ramEnded);
      // A sink of files with threads: every worker's writes done before the sink fsyncs its files.
      if (link instanceof ThreadLink && this.opts.sink.blockFiles) await link.drainWriters();
      await this.opts.sink.flush();
      if (this.state !== s) return;
      this.state = { kind: 'completed', link, postcopy: s.postcopy };
      this.counts.endedAt = performance.now();
      // SHUT 0: without it a QEMU source reports the migration failed. Everything is here and
      // flushed by now, so a source that is gone meanwhile does not undo the migration.
      if (this.rpOpen) {
        this.shutNews.shutQueued();
        await link.shut(0);
      }
    } catch (e) {
      if (this.state === s) s.step = 'vmdesc'; // let fail() act: the migration is not over yet
      this.fail(MigrationError.from(e, 'completion'));
      return;
    }
    // With threads, pages landed by a worker resolve their waiters when the session next looks at the shared
    // "landed" word; completion can come first: those requests were answered, not failed.
    this.pages.sweep('main', performance.now());
    this.pages.failAll(new MigrationError('protocol', 'completion', 'the migration completed'));
    const result = this.snapshot();
    this.release();
    this.shutDown = this.shutdown(link, false).then(() => this.answerIfInDoubt(s.postcopy));
    // With threads, done settles once every channel's thread has ended: nothing of the session is alive then.
    if (this.threads.used) await holdWhile(this.shutDown);
    this.emit('completed', result);
    this.resolveDone(result);
    await this.shutDown;
  }

  /**
   * Completed in postcopy, but nothing says the source read our SHUT 0 (its
   * link was lost around it): a source that paused then reconnects to resume.
   * Its recovery connections are answered with SHUT 0 at the recovery address
   * until one source has read it, for `recovery.timeoutMs` at most (default
   * ANSWER_COMPLETED_MS), or until close().
   */
  private async answerIfInDoubt(postcopy: boolean): Promise<void> {
    if (!postcopy || !this.rpOpen || this.opts.recovery === false || !this.shutNews.inDoubt || this.closing) return;
    const uri = (this.opts.recovery || {}).listen ?? this.listener.uri;
    const transport = this.opts.transport ?? {};
    await answerCompleted(
      () => listenForRecovery(uri, transport),
      (this.opts.recovery || {}).timeoutMs ?? ANSWER_COMPLETED_MS,
      () => this.closing,
      (l) => (this.listener = l as MigrationListener),
    ).catch(() => undefined); // the address is taken meanwhile: nobody can reach us there
  }

  /** `link` is the one that completes (EOF read): what happens to it says whether the source got SHUT 0. */
  private completes(link: Link): boolean {
    const s = this.state;
    return (s.kind === 'completing' || s.kind === 'completed') && s.link === link;
  }

  private fail(e: MigrationError): void {
    const s = this.state;
    if (isOver(s)) return;
    const link = this.link;
    const phase = this.phase;
    this.state = { kind: 'failed', link, error: e, phase, postcopy: isListening(s) };
    if (s.kind === 'paused' || s.kind === 'recovering') s.outage.end();
    this.release();
    link?.stopIdle();
    this.counts.endedAt = performance.now();
    this.pages.failAll(e);
    this.multifd?.barrier.fail(e);
    // SHUT 1 tells a QEMU source that our side failed.
    if (link && this.rpOpen) void link.shut(1);
    if (this.listenerCount('failed') > 0) this.emit('failed', e);
    this.shutDown = this.shutdown(link, true);
    if (this.threads.used) void holdWhile(this.shutDown).then(() => this.rejectDone(e));
    else this.rejectDone(e);
  }

  /** Drops what only a running migration needs: the signal listener, the accept timer. */
  private release(): void {
    this.opts.signal?.removeEventListener('abort', this.onAbort);
    clearTimeout(this.acceptTimer);
  }

  private async shutdown(link: Link | undefined, abort: boolean): Promise<void> {
    this.listener.close();
    await link?.release(abort);
    if (this.threads.used) await Promise.all([this.listener.ended, ...this.threadLinks.map((l) => l.ended())]);
  }

  /**
   * Stops listening and tears everything down; a running migration fails as
   * cancelled. Resolves once the listener and every socket are closed. The
   * same as `cancel()`.
   */
  async close(): Promise<void> {
    this.closing = true;
    const s = this.state;
    // EOF is read, but until SHUT 0 (late pages, the flush) the migration has not completed: cancelled too.
    if (s.kind === 'completing') s.step = 'vmdesc';
    if (!isOver(this.state)) this.fail(new MigrationError('cancelled', this.phase, 'the destination was closed'));
    else this.listener.close();
    // The teardown's own timers and sockets are unreferenced (they must not hold a process
    // whose migration is over); one who awaits close() is owed the end of it.
    const hold = setInterval(() => undefined, 1000);
    try {
      await this.shutDown;
    } finally {
      clearInterval(hold);
    }
    this.link?.conn.destroy();
    this.release();
  }

  /** The same as `cancel()`. */
  cancel(): Promise<void> {
    return this.close();
  }

  /** `await using dst = await DestinationSession.listen(…)`: closed when the scope ends. */
  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}

/**
 * Keeps the process alive until `p` settles: a threaded session's `done`
 * waits for its threads to end, and the teardown's own timers and workers
 * are unreferenced — without this a script awaiting `done` after a failure
 * would exit with the promise unsettled (Node's exit code 13).
 */
function holdWhile<T>(p: Promise<T>): Promise<T> {
  const hold = setInterval(() => undefined, 1000);
  return p.finally(() => clearInterval(hold));
}
