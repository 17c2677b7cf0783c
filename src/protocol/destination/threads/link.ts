/**
 * The session's side of a connection whose channels run in worker threads
 * (channel-worker.ts): what Link is for the single-thread path. The workers
 * decode and land pages themselves; this object gets the other records (in
 * order, one message per chunk at most), puts page requests in a shared ring
 * for the main worker, and resolves waiting requests when a worker says it
 * landed pages (one shared word bumped per chunk, watched only while requests
 * wait). A dropped ThreadLink ends its workers and calls none of its handlers.
 */
import type { BlockFile } from '../../block-files.js';
import { performance } from 'node:perf_hooks';
import type { DecoderResumeState } from '../../../stream/decoder.js';
import type { RamBlockInfo, ReturnPathMessage } from '../../../stream/records.js';
import type { ChannelStats } from '../../../transport/channel.js';
import { StorageError, type MigrationError } from '../../errors.js';
import type { PageTracker } from '../../page-tracker.js';
import { AtomicRing } from '../../../transport/worker/ring.js';
import type { ChannelWorker, ThreadConnection } from './listener.js';
import { PageBitmap } from '../../../stream/bitmap.js';
import { TARGET_PAGE_SIZE } from '../../../stream/constants.js';
import { COUNT_WORDS, Count, LANDED_WORDS, MFD_COUNT_WORDS, MfdCount, REQUEST_WORDS, errorFromData, syncWords, type ControlRecord, type FromWorker, type SharedBlock, type WorkerBitmaps } from './wire.js';

export interface ThreadLinkEvents {
  /** Non-page records of the main channel, in order; `iterationPages[i]`: pages landed in the RAM section the i-th footer closes. */
  records(link: ThreadLink, recs: ControlRecord[], iterationPages: number[]): void;
  /** The block list: size the sink and the tracker, and give their shared memory (a throw fails the migration). */
  blocks(link: ThreadLink, rec: ControlRecord): SharedBlock[];
  /** The main channel closed: the records its end completed, or the decoder's error. */
  mainClosed(link: ThreadLink, recs: ControlRecord[], error: Error | undefined): void;
  /** The preempt channel qualified: false refuses it. */
  preemptArrived(link: ThreadLink, stats: ChannelStats): boolean;
  /** The preempt channel's first byte is a command: a recovery main channel in its slot. */
  preemptCommand(link: ThreadLink): void;
  /** The source ended the preempt channel; `error`: a partial record was left. */
  preemptEnded(link: ThreadLink, error: Error | undefined): void;
  /** Every multifd channel is in (their stats, by id). */
  multifdArrived(link: ThreadLink, stats: readonly ChannelStats[]): void;
  /** A record could not be decoded or landed. */
  malformed(link: ThreadLink, e: Error): void;
  /** A channel failed, or the source went silent. */
  lost(link: ThreadLink, e: unknown): void;
}

export interface ThreadLinkOptions {
  readonly idleTimeoutMs: number;
  readonly idleError: () => MigrationError;
  /** A recovery connection: the old stream's decoder state. */
  readonly resume?: Promise<DecoderResumeState | undefined>;
  /** The blocks' shared memory, once the block list came (a recovery link has them from the start). */
  readonly blocks: () => SharedBlock[] | undefined;
  readonly pages: PageTracker;
}

/** Atomics.waitAsync (ES2024, not in this project's lib). */
const waitAsync = (Atomics as unknown as {
  waitAsync(a: Int32Array, index: number, value: number): { async: false; value: string } | { async: true; value: Promise<string> };
}).waitAsync;

/** Resolves once `a[index]` is no longer `value`. */
function whenChanged(a: Int32Array, index: number, value: number): Promise<void> {
  const w = waitAsync(a, index, value);
  return w.async ? w.value.then(() => undefined) : Promise.resolve();
}

/** The stats a worker last reported, updated in place (holders of the object see it change). */
function emptyStats(role: 'main' | 'preempt' | 'multifd'): ChannelStats {
  return { role, bytesSent: 0, bytesReceived: 0, queuedBytes: 0, peakQueuedBytes: 0, maxQueuedBytes: 0, bulkWindowBytes: 0, writeWaits: 0, bulkWaits: 0, readPauses: 0, tuning: { warnings: [] } as unknown as ChannelStats['tuning'] };
}

export class ThreadLink {
  private dropped = false;
  private idle: NodeJS.Timeout | undefined;
  private idleSeen = -1;
  preemptEnded = false;
  private mainClosedSeen = false;
  private readonly mainCounts = new Float64Array(new SharedArrayBuffer(COUNT_WORDS * 8));
  private readonly preemptCounts = new Float64Array(new SharedArrayBuffer(COUNT_WORDS * 8));
  /** Word 0: bumped by either worker after a chunk that landed pages; 1, 2: by main, by preempt (who it was). */
  private readonly landed = new Int32Array(new SharedArrayBuffer(LANDED_WORDS * 4));
  private readonly ring = AtomicRing.create(1024, REQUEST_WORDS);
  private readonly entry = new Float64Array(REQUEST_WORDS);
  private ringPushes = 0;
  private messagesPosted = 0;
  private watching = false;
  private blockIndex = new Map<string, number>();
  /** Per block, the pages the preempt worker brought first (SharedBlock.byPreempt). */
  private readonly byPreempt = new Map<string, PageBitmap>();
  /** The channel that brought a page (looked up once per resolved request, not per page). */
  private readonly broughtBy = (block: string, page: number): 'main' | 'preempt' => (this.byPreempt.get(block)?.has(page) ? 'preempt' : 'main');
  private preemptWorker: ChannelWorker | undefined;
  private preemptServed = false;
  private blocksWaiters: (() => void)[] = [];
  private shutWaiters: (() => void)[] = [];
  private closedWaiters: (() => void)[] = [];
  /** The decoder state the main worker gave when dropped: what a recovery connection continues. */
  resumeState: Promise<DecoderResumeState | undefined> | undefined;
  readonly mainStats = emptyStats('main');
  /** The multifd channels (a multifd destination): their workers' counters, stats and CPU, by id, and the barrier's words. */
  private readonly mfd: { readonly counts: Float64Array[]; readonly stats: ChannelStats[]; readonly cpu: number[]; readonly sync: Int32Array } | undefined;
  readonly preemptStats = emptyStats('preempt');
  /** What the session reads of a Link's `conn`. */
  readonly conn: {
    readonly main: { readonly stats: ChannelStats };
    readonly preempt: { readonly stats: ChannelStats; destroy(): void } | undefined;
    readonly preemptExpected: boolean;
    stats(): { main: ChannelStats; preempt?: ChannelStats; multifd?: ChannelStats[] };
    destroy(): void;
  };

  constructor(
    private readonly threads: ThreadConnection,
    private readonly events: ThreadLinkEvents,
    private readonly opts: ThreadLinkOptions,
  ) {
    const n = threads.multifdOptions?.channels;
    this.mfd = n
      ? {
          counts: Array.from({ length: n }, () => new Float64Array(new SharedArrayBuffer(MFD_COUNT_WORDS * 8))),
          stats: Array.from({ length: n }, (_, id) => ({ ...emptyStats('multifd'), id })),
          cpu: new Array<number>(n).fill(0),
          sync: new Int32Array(new SharedArrayBuffer(syncWords(n) * 4)),
        }
      : undefined;
    // eslint-disable-next-line @typescript-eslint/no-this-alias
    const self = this;
    this.conn = {
      main: { stats: this.mainStats },
      get preempt() {
        return self.preemptServed ? { stats: self.preemptStats, destroy: () => void self.preemptWorker?.end() } : undefined;
      },
      get preemptExpected() {
        return self.threads.preemptExpected;
      },
      stats: () => ({ main: this.mainStats, ...(this.preemptServed ? { preempt: this.preemptStats } : {}), ...(this.mfd && this.threads.bulkComplete ? { multifd: this.mfd.stats } : {}) }),
      destroy: () => this.threads.destroy(),
    };
  }

  get alive(): boolean {
    return !this.dropped;
  }

  /** The workers' threads, for stats. */
  get workers(): { role: 'main' | 'preempt' | `multifd-${number}`; worker: ChannelWorker }[] {
    const multifd = (this.threads.multifd ?? []).flatMap((w, id) => (w ? [{ role: `multifd-${id}` as const, worker: w }] : []));
    return [{ role: 'main', worker: this.threads.main }, ...multifd, ...(this.preemptWorker ? [{ role: 'preempt' as const, worker: this.preemptWorker }] : [])];
  }

  /** CPU seconds of each channel's thread, as last reported. */
  private readonly cpu = { main: 0, preempt: 0 };

  /** stats.threads.channels. */
  threadsInfo(): { role: 'main' | 'preempt' | `multifd-${number}`; threadId: number; cpuSeconds: number }[] {
    return this.workers.map(({ role, worker }) => ({ role, threadId: worker.threadId, cpuSeconds: role === 'main' || role === 'preempt' ? this.cpu[role] : (this.mfd?.cpu[Number(role.slice(8))] ?? 0) }));
  }

  /** Counter `i` of every channel (the multifd channels' in their own layout). */
  count(i: number): number {
    let n = this.mainCounts[i]! + this.preemptCounts[i]!;
    const j = MFD_OF_COUNT[i];
    if (this.mfd && j !== undefined) for (const c of this.mfd.counts) n += c[j]!;
    return n;
  }

  /** The multifd channels' counters (MultifdChannelCounters), by id, and the barriers passed. */
  multifdCounters(): { syncs: number; perChannel: { bytes: number; packets: number; syncs: number; normal: number; zero: number; runs: number; runPages: number }[] } | undefined {
    const m = this.mfd;
    if (!m) return undefined;
    return {
      syncs: Atomics.load(m.sync, 1),
      perChannel: m.counts.map((c) => ({ bytes: c[MfdCount.bytes]!, packets: c[MfdCount.packets]!, syncs: c[MfdCount.syncs]!, normal: c[MfdCount.normal]!, zero: c[MfdCount.zero]!, runs: c[MfdCount.runs]!, runPages: c[MfdCount.runPages]! })),
    };
  }

  start(): void {
    const main = this.threads.main;
    main.onMessage = (m) => this.onMain(m);
    void main.exited.then(() => this.onExit());
    this.armIdle();
    const serve = (resume: DecoderResumeState | undefined): void => {
      if (this.dropped) return;
      this.served = true;
      const blocks = this.opts.blocks();
      if (blocks) this.indexBlocks(blocks);
      main.post({
        t: 'serve-main',
        ...(resume ? { resume } : {}),
        ...(blocks ? { blocks } : {}),
        counts: this.mainCounts.buffer as SharedArrayBuffer,
        landed: this.landed.buffer as SharedArrayBuffer,
        requests: this.ring.sab,
        ...(this.mfd ? { multifd: { channels: this.mfd.counts.length, sync: this.mfd.sync.buffer as SharedArrayBuffer } } : {}),
      });
    };
    if (this.mfd) {
      // QEMU reads main only once main and every multifd channel are in (migration_has_all_channels).
      this.threads.waitMultifd().then(
        (ws) => {
          if (this.dropped) return;
          this.onMultifd(ws);
          serve(undefined);
        },
        () => undefined,
      );
    } else if (this.opts.resume) {
      this.opts.resume.then(
        (state) => {
          if (state) serve(state);
          else if (!this.dropped) this.events.malformed(this, new Error('the stream state of the failed connection was lost with its thread: the recovery cannot continue it'));
        },
        // A storage failure of the last link is not the network's: the migration fails, it does not pause again.
        (e: unknown) => (e instanceof StorageError ? this.events.malformed(this, e) : this.events.lost(this, e)),
      );
    } else {
      serve(undefined);
    }
    this.threads.waitPreempt().then(
      (w) => this.onPreempt(w),
      () => undefined,
    );
    if (this.opts.pages.outstanding > 0) this.watchPages();
  }

  private indexBlocks(blocks: SharedBlock[]): void {
    for (const b of blocks) {
      this.blockIndex.set(b.idstr, b.index);
      this.byPreempt.set(b.idstr, PageBitmap.attach(Math.ceil(b.length / TARGET_PAGE_SIZE), b.byPreempt));
    }
    for (const w of this.blocksWaiters.splice(0)) w();
  }

  /** 'drain' answers awaited, per worker. */
  private readonly drainWaiters = new Map<ChannelWorker, ((m: Extract<FromWorker, { t: 'drained' }>) => void)[]>();

  private drainedBy(w: ChannelWorker, m: FromWorker): boolean {
    if (m.t !== 'drained') return false;
    for (const f of this.drainWaiters.get(w)?.splice(0) ?? []) f(m);
    return true;
  }

  /**
   * A sink of files: waits until every page the workers of this link took is
   * written to its file (each worker's writer drained: main's, preempt's and
   * every multifd channel's — each writes its own pages), at most `ms`;
   * throws the StorageError of a write that failed, or one saying whose
   * writes did not finish in time or whose thread exited first: either way
   * pages counted as received may not be in the files. The session fsyncs after this.
   */
  async drainWriters(ms = 30_000): Promise<void> {
    const workers = [this.threads.main, ...this.multifdWorkers, ...(this.preemptWorker ? [this.preemptWorker] : [])];
    const files = (this.opts.blocks() ?? []).flatMap((b) => (b.file ? [b.file.path] : [])).join(', ');
    const unfinished = (w: ChannelWorker, why: string): StorageError => new StorageError('write', files, 0, new Error(`the ${w.role} channel's thread ${why}`));
    const answers = await Promise.all(
      workers.map(
        (w) =>
          new Promise<Extract<FromWorker, { t: 'drained' }> | StorageError>((resolve) => {
            const timer = setTimeout(() => resolve(unfinished(w, `had not written its pages within ${ms} ms`)), ms);
            timer.unref();
            const list = this.drainWaiters.get(w) ?? [];
            list.push((m) => (clearTimeout(timer), resolve(m)));
            this.drainWaiters.set(w, list);
            void w.exited.then(() => (clearTimeout(timer), resolve(unfinished(w, 'exited before its pages were written'))));
            w.post({ t: 'drain' });
          }),
      ),
    );
    for (const a of answers) {
      if (a instanceof StorageError) throw a;
      if (a.error) throw errorFromData(a.error);
    }
  }

  private statsSeen: (() => void) | undefined;
  /** Settles with the main worker's first stats (its TLS session among them): the session's 'channel' event waits for it. */
  readonly firstStats = new Promise<void>((r) => (this.statsSeen = r));

  private onMain(m: FromWorker): void {
    if (this.drainedBy(this.threads.main, m)) return;
    if (this.dropped) {
      if (m.t === 'shut-done') for (const w of this.shutWaiters.splice(0)) w();
      if (m.t === 'closed') this.markClosed();
      return;
    }
    switch (m.t) {
      case 'stats':
        Object.assign(this.mainStats, m.stats);
        this.cpu.main = m.cpuSeconds;
        this.statsSeen?.();
        this.statsSeen = undefined;
        return;
      case 'records':
        this.events.records(this, m.recs, m.iterationPages);
        return;
      case 'ram-blocks': {
        let blocks: SharedBlock[];
        try {
          blocks = this.events.blocks(this, m.rec);
        } catch (e) {
          this.events.malformed(this, e as Error);
          return;
        }
        this.indexBlocks(blocks);
        this.threads.main.post({ t: 'blocks', blocks });
        return;
      }
      case 'decode-error':
        this.events.malformed(this, errorFromData(m.error));
        return;
      case 'lost':
        this.events.lost(this, errorFromData(m.error));
        return;
      case 'closed':
        this.markClosed();
        this.events.mainClosed(this, m.recs, m.error ? errorFromData(m.error) : undefined);
        return;
      case 'shut-done':
        for (const w of this.shutWaiters.splice(0)) w();
        return;
      default:
        return;
    }
  }

  private markClosed(): void {
    this.mainClosedSeen = true;
    for (const w of this.closedWaiters.splice(0)) w();
    for (const w of this.shutWaiters.splice(0)) w();
  }

  /** A worker that exits on its own (it failed): its channel is lost. */
  private onExit(): void {
    this.markClosed();
    if (!this.dropped && !this.released) this.events.lost(this, new Error('the main channel thread exited'));
  }

  /** The multifd channels' workers by id, once all are in and their messages come here (drainWriters asks them too). */
  private multifdWorkers: readonly ChannelWorker[] = [];

  /** Every multifd channel is in: each serves once the block list is here (its packets name blocks of it). */
  private onMultifd(ws: readonly ChannelWorker[]): void {
    const m = this.mfd!;
    const mo = this.threads.multifdOptions!;
    this.multifdWorkers = ws;
    ws.forEach((w, id) => {
      w.onMessage = (msg) => this.onMultifdMessage(id, msg);
      void w.exited.then(() => {
        if (!this.dropped && !this.released) this.events.lost(this, new Error(`the multifd-${id} channel's thread exited`));
      });
    });
    this.events.multifdArrived(this, m.stats);
    const serve = (): void => {
      const blocks = this.opts.blocks();
      if (this.dropped || !blocks) return;
      ws.forEach((w, id) =>
        w.post({
          t: 'serve-multifd',
          id,
          channels: mo.channels,
          ...(mo.uuid ? { uuid: mo.uuid } : {}),
          blocks,
          counts: m.counts[id]!.buffer as SharedArrayBuffer,
          landed: this.landed.buffer as SharedArrayBuffer,
          sync: m.sync.buffer as SharedArrayBuffer,
        }),
      );
    };
    // Unread until then: the socket holds its bytes (backpressure to the source), as QEMU before the RAM setup.
    if (this.opts.blocks()) serve();
    else this.blocksWaiters.push(serve);
  }

  private onMultifdMessage(id: number, m: FromWorker): void {
    const w = this.multifdWorkers[id];
    if (w && this.drainedBy(w, m)) return;
    if (this.dropped) return;
    switch (m.t) {
      case 'stats':
        Object.assign(this.mfd!.stats[id]!, m.stats);
        this.mfd!.cpu[id] = m.cpuSeconds;
        return;
      case 'decode-error':
        this.events.malformed(this, errorFromData(m.error));
        return;
      case 'lost':
        this.events.lost(this, errorFromData(m.error));
        return;
      default:
        return;
    }
  }

  private onPreempt(w: ChannelWorker): void {
    if (this.dropped || !this.events.preemptArrived(this, this.preemptStats)) {
      void w.end();
      return;
    }
    this.preemptWorker = w;
    this.preemptServed = true;
    w.onMessage = (m) => this.onPreemptMessage(m);
    const serve = (): void => {
      const blocks = this.opts.blocks();
      if (this.dropped || !blocks) return;
      w.post({ t: 'serve-preempt', blocks, counts: this.preemptCounts.buffer as SharedArrayBuffer, landed: this.landed.buffer as SharedArrayBuffer });
    };
    // A TLS preempt channel qualifies by order, possibly before the block list came on main.
    if (this.opts.blocks()) serve();
    else this.blocksWaiters.push(serve);
  }

  private onPreemptMessage(m: FromWorker): void {
    if (this.preemptWorker && this.drainedBy(this.preemptWorker, m)) return;
    if (this.dropped) return;
    switch (m.t) {
      case 'stats':
        Object.assign(this.preemptStats, m.stats);
        this.cpu.preempt = m.cpuSeconds;
        return;
      case 'first-command':
        this.events.preemptCommand(this);
        return;
      case 'decode-error':
        this.events.malformed(this, errorFromData(m.error));
        return;
      case 'lost':
        this.events.lost(this, errorFromData(m.error));
        return;
      case 'ended':
        this.preemptEnded = true;
        this.events.preemptEnded(this, m.error ? errorFromData(m.error) : undefined);
        return;
      default:
        return;
    }
  }

  /**
   * Silence from the source (see Link.armIdle). Watched through the workers'
   * byte counters: no message per chunk just to say that bytes came.
   */
  private armIdle(): void {
    const ms = this.opts.idleTimeoutMs;
    if (ms <= 0) return;
    this.idleSeen = this.count(Count.transferred);
    this.idle = setTimeout(() => {
      if (this.dropped) return;
      if (this.count(Count.transferred) !== this.idleSeen) {
        this.armIdle();
        return;
      }
      this.events.lost(this, this.opts.idleError());
    }, ms);
  }

  stopIdle(): void {
    clearTimeout(this.idle);
    this.idle = undefined;
  }

  /**
   * A return-path message. Page requests go through the ring (no message);
   * the others by message, each numbered with the ring entries before it, so
   * that the worker writes them all in the order sent here.
   */
  send(m: ReturnPathMessage): void {
    if (this.dropped) return;
    if (m.type === 'req-pages' || m.type === 'req-pages-id') {
      const e = this.entry;
      e[0] = m.type === 'req-pages-id' ? 1 : 0;
      e[1] = m.type === 'req-pages-id' ? (this.blockIndex.get(m.block) ?? -1) : 0;
      e[2] = m.offset;
      e[3] = m.length;
      e[4] = this.messagesPosted;
      if (this.ring.push(e)) {
        this.ringPushes++;
        // Not from inside the tracker's request(): the watch may resolve requests at once.
        queueMicrotask(() => this.watchPages());
        return;
      }
    }
    this.threads.main.post({ t: 'rp', m, seq: this.ringPushes });
    this.messagesPosted++;
    if (m.type === 'req-pages' || m.type === 'req-pages-id') queueMicrotask(() => this.watchPages());
  }

  /**
   * While requests wait: wake when a worker landed pages, resolve those that
   * are here (few wait at a time: a walk over them, not over the pages).
   */
  watchPages(): void {
    if (this.watching || this.dropped) return;
    this.watching = true;
    const pages = this.opts.pages;
    const loop = async (): Promise<void> => {
      while (!this.dropped && pages.outstanding > 0) {
        const gen = Atomics.load(this.landed, 0);
        pages.sweep(this.broughtBy, performance.now());
        if (pages.outstanding === 0) break;
        await whenChanged(this.landed, 0, gen);
      }
      this.watching = false;
    };
    void loop();
  }

  /** Settles once every worker of this link has exited. */
  ended(): Promise<void> {
    return Promise.all(this.workers.map((w) => w.worker.exited)).then(() => undefined);
  }

  /** SHUT `value`, resolved once written (or the channel is gone). */
  shut(value: number): Promise<void> {
    if (this.mainClosedSeen) return Promise.resolve();
    return new Promise((resolve) => {
      this.shutWaiters.push(resolve);
      this.threads.main.post({ t: 'shut', value });
    });
  }

  private released = false;
  /** serve-main was posted: the main thread decodes, so it has a state to export. */
  private served = false;

  /**
   * The connection failed: its workers end (the main one gives its decoder's
   * state first) and none of its handlers runs again. `resumeState` is what
   * the next link continues: a link never served (a recovery connection lost
   * before its main thread decoded a byte) hands on the state it was given;
   * with a sink of files it rejects (StorageError) when the workers' writes
   * failed or did not finish, since a recovery would then trust received
   * bits for pages missing from the files.
   */
  drop(): void {
    if (this.dropped) return;
    this.dropped = true;
    this.stopIdle();
    this.ring.close();
    Atomics.notify(this.landed, 0);
    const main = this.threads.main;
    const exported = this.served
      ? new Promise<DecoderResumeState | undefined>((resolve) => {
          const timer = setTimeout(() => resolve(undefined), 2000);
          main.onMessage = (m) => {
            if (this.drainedBy(main, m) || m.t !== 'state') return;
            clearTimeout(timer);
            resolve(m.state);
          };
          void main.exited.then(() => resolve(undefined));
          main.post({ t: 'export' });
        })
      : (this.opts.resume ?? Promise.resolve(undefined));
    this.resumeState = exported.then(
      async (state) => {
        // A sink of files: what the workers staged reaches the files before their threads end.
        try {
          if (this.served && this.opts.blocks()?.some((b) => b.file)) await this.drainWriters(10_000);
        } finally {
          this.threads.destroy();
        }
        return state;
      },
      (e: unknown) => {
        this.threads.destroy();
        throw e;
      },
    );
    this.resumeState.catch(() => undefined);
  }

  /**
   * The migration ended on this link: let the source close first (it waits
   * for SHUT), then end the workers. Nothing of ours keeps the process alive meanwhile.
   */
  async release(abort: boolean): Promise<void> {
    this.released = true;
    this.stopIdle();
    this.ring.close();
    for (const { worker } of this.workers) worker.worker.unref();
    if (!abort && !this.mainClosedSeen) {
      await Promise.race([new Promise<void>((r) => this.closedWaiters.push(r)), new Promise<void>((r) => setTimeout(r, 3000).unref())]);
    } else if (abort) {
      await new Promise<void>((r) => setTimeout(r, 50).unref());
    }
    // A sink of files: what the workers staged reaches the files before their threads end (a failed migration keeps what arrived).
    if (this.opts.blocks()?.some((b) => b.file)) await this.drainWriters(10_000).catch(() => undefined);
    this.dropped = true;
    Atomics.notify(this.landed, 0);
    this.threads.destroy();
    await Promise.all(this.workers.map((w) => w.worker.exited));
  }
}

/** Where Count's counters are in a multifd worker's (MfdCount): bytes only — its pages count in stats().multifd, which the stats add to normal, duplicate and runs. */
const MFD_OF_COUNT: (number | undefined)[] = [];
MFD_OF_COUNT[Count.transferred] = MfdCount.bytes;

/**
 * The blocks of a block list as the workers see them: the sink's shared
 * memory (`memory`) or its open files (`file`, each worker writes its pages
 * there itself), and the tracker's bitmaps and the threads' own (`own`, kept across links).
 */
export function sharedBlocks(blocks: readonly RamBlockInfo[], memory: (idstr: string) => Buffer | BlockFile | undefined, received: (idstr: string) => SharedArrayBuffer | undefined, own: Map<string, WorkerBitmaps>): SharedBlock[] {
  return blocks.map((b, index) => {
    const mem = memory(b.idstr);
    const rec = received(b.idstr);
    const file = mem && !Buffer.isBuffer(mem) ? mem : undefined;
    const buf = Buffer.isBuffer(mem) ? mem : undefined;
    if (!rec || (!file && (!buf || !(buf.buffer instanceof SharedArrayBuffer) || buf.byteOffset !== 0))) throw new Error(`RAM block "${b.idstr}" has no shared memory`);
    let w = own.get(b.idstr);
    if (!w) {
      w = { written: new SharedArrayBuffer(rec.byteLength), byPreempt: new SharedArrayBuffer(rec.byteLength) };
      own.set(b.idstr, w);
    }
    return { idstr: b.idstr, length: b.length, index, ...(file ? { file } : { memory: buf!.buffer as SharedArrayBuffer }), received: rec, ...w };
  });
}
