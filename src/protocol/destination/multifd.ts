import { TARGET_PAGE_SIZE } from '../../stream/constants.js';
import { MultifdDecoder, forEachOffsetRun, type MultifdPacketRecord, type MultifdRecord } from '../../stream/multifd.js';
import type { KnownBlock } from '../../stream/ram.js';
import { MigrationError, type MigrationPhase } from '../errors.js';
import type { GuestMemorySink } from '../memory.js';

const PAGE = TARGET_PAGE_SIZE;

/**
 * The destination's side of QEMU's multifd (migration/multifd.c,
 * multifd-nocomp.c): per channel, a MultifdChannelReceiver that decodes the
 * channel's packets and lands their pages; for all of them, a MultifdBarrier
 * that is QEMU's `multifd_recv_sync_main`.
 *
 * The receiver knows nothing of sessions, sockets or threads: bytes in,
 * pages out through a sink and a "received" hook, and a sync hook that holds
 * it at every SYNC packet. The single-thread destination feeds it from the
 * channel's socket; a worker can host it as it is (threads-dest).
 */

/** Where a multifd channel's pages go. */
export interface MultifdLandingTarget {
  /** The guest memory (writePages/zeroPages when it has them: one call per run of pages). */
  readonly sink: Pick<GuestMemorySink, 'writePage' | 'zeroPage' | 'writePages' | 'zeroPages'>;
  /**
   * `count` consecutive pages of block `index` (its position in the block
   * list) from page `first` have landed: mark them in the received set (a
   * PageBitmap; the session's also resolves requests waiting for them).
   */
  received(index: number, first: number, count: number): void;
}

export interface MultifdReceiverOptions {
  /** multifd-channels: an init message with an id ≥ this is refused. */
  readonly channels: number;
  /** The UUID the source must announce (16 bytes; default zeros, QEMU without -uuid). */
  readonly uuid?: Uint8Array;
  /** Pages per packet at most (default 128, QEMU's; bounds the memory held per packet). */
  readonly maxPagesAlloc?: number;
  readonly target: MultifdLandingTarget;
  /**
   * The channel read a SYNC packet (after landing its pages): it reads on only
   * once the promise settles — the main stream's MULTIFD_FLUSH, QEMU's
   * `multifd_recv_sync_main`. A rejection fails the channel.
   */
  onSync(): Promise<void> | void;
  /**
   * Called before a packet's pages land; throw to refuse them (pages on a
   * multifd channel once postcopy listens: its channels are idle then).
   */
  beforePages?(): void;
  /** Called after every pushed chunk: a promise pauses the channel until the sink has room again. */
  backpressure?(): Promise<void> | undefined;
}

/** What one channel has received. */
export interface MultifdChannelCounters {
  /** Bytes pushed. */
  bytes: number;
  packets: number;
  syncs: number;
  /** Pages with data (QEMU's `normal`). */
  normal: number;
  /** Pages of the zero lists (QEMU's `duplicate`). */
  zero: number;
  /** Sink calls that took a run of pages, and the pages in them. */
  runs: number;
  runPages: number;
}

/**
 * One multifd channel: its init message, then packets whose pages it lands
 * by runs of consecutive offsets (one writePages/zeroPages and one
 * `received` call per run, never per page). At a SYNC packet it stops until
 * `onSync` settles. Errors are typed and name the channel: a StreamError of
 * the decoder becomes a MigrationError with its code, `multifd-N: …`.
 */
export class MultifdChannelReceiver {
  private readonly decoder: MultifdDecoder;
  private readonly runs: boolean;
  private readonly landNormal: (first: number, offset: number, n: number) => void;
  private readonly landZero: (first: number, offset: number, n: number) => void;
  /** The packet being landed (the run callbacks read it). */
  private packet: MultifdPacketRecord | undefined;
  private index = 0;
  /** Held at a SYNC packet until the main stream's MULTIFD_FLUSH. */
  private atSync = false;
  /** The channel's id, once its init message is read (the listener knows it before: `expectedId`). */
  id: number | undefined;
  readonly counters: MultifdChannelCounters = { bytes: 0, packets: 0, syncs: 0, normal: 0, zero: 0, runs: 0, runPages: 0 };

  constructor(
    private readonly opts: MultifdReceiverOptions,
    /** The id the listener identified the channel by (its init message must agree), for messages before it is read. */
    private readonly expectedId?: number,
  ) {
    // splitPackets: a packet's pages land as they come, in views of the received chunks, never copied whole.
    this.decoder = new MultifdDecoder({ channels: opts.channels, splitPackets: true, ...(opts.uuid ? { uuid: opts.uuid } : {}), ...(opts.maxPagesAlloc ? { maxPagesAlloc: opts.maxPagesAlloc } : {}) });
    const sink = opts.target.sink;
    this.runs = typeof sink.writePages === 'function' && typeof sink.zeroPages === 'function';
    this.landNormal = (first, offset, n) => {
      const p = this.packet!;
      const start = p.start + first * PAGE;
      if (this.runs) sink.writePages!(p.block, offset, n, p.data, start, PAGE);
      else for (let i = 0; i < n; i++) sink.writePage(p.block, offset + i * PAGE, p.data.subarray(start + i * PAGE, start + (i + 1) * PAGE));
      this.landed(offset, n);
    };
    this.landZero = (_first, offset, n) => {
      const p = this.packet!;
      if (this.runs) sink.zeroPages!(p.block, offset, n);
      else for (let i = 0; i < n; i++) sink.zeroPage(p.block, offset + i * PAGE);
      this.landed(offset, n);
    };
  }

  /** `multifd-N` (the id as identified until the init message is read). */
  get name(): string {
    const id = this.id ?? this.expectedId;
    return id === undefined ? 'multifd' : `multifd-${id}`;
  }

  /** The RAM block list (from the main channel): packets name their blocks in it. */
  setBlocks(blocks: readonly KnownBlock[]): void {
    this.decoder.setBlocks(blocks);
  }

  /** Held at a SYNC packet: it reads on only after the main stream's MULTIFD_FLUSH. */
  get heldAtSync(): boolean {
    return this.atSync;
  }

  /**
   * Decodes and lands `chunk`. Returns a promise while the channel must not
   * read on (held at a SYNC packet, or the sink's backpressure); it rejects,
   * and a synchronous call throws, a MigrationError naming the channel.
   */
  push(chunk: Uint8Array, phase: () => MigrationPhase): Promise<void> | undefined {
    this.counters.bytes += chunk.length;
    let recs: MultifdRecord[];
    try {
      recs = this.decoder.push(chunk);
    } catch (e) {
      throw this.wrap(e, phase());
    }
    return this.run(recs, 0, phase);
  }

  /** The source ended the channel (FIN). */
  ended = false;

  /** The source ended the channel: it must be at a packet boundary (else 'truncated'). */
  end(phase: MigrationPhase): void {
    this.ended = true;
    try {
      this.decoder.end();
    } catch (e) {
      throw this.wrap(e, phase);
    }
  }

  private run(recs: MultifdRecord[], from: number, phase: () => MigrationPhase): Promise<void> | undefined {
    try {
      for (let i = from; i < recs.length; i++) {
        const r = recs[i]!;
        if (r.type === 'multifd-init') {
          if (this.expectedId !== undefined && r.id !== this.expectedId) throw new MigrationError('protocol', phase(), `multifd-${this.expectedId}: its init message names channel ${r.id}`);
          this.id = r.id;
          continue;
        }
        this.land(r, phase);
        if (!r.sync) continue;
        this.counters.syncs++;
        const held = this.opts.onSync();
        if (held) {
          this.atSync = true;
          return held.then(
            () => {
              this.atSync = false;
              return this.run(recs, i + 1, phase);
            },
            (e: unknown) => {
              this.atSync = false;
              throw this.wrap(e, phase());
            },
          );
        }
      }
      // Records before a malformed one were landed; now the error.
      if (this.decoder.error) throw this.decoder.error;
    } catch (e) {
      throw this.wrap(e, phase());
    }
    return this.opts.backpressure?.();
  }

  private land(p: MultifdPacketRecord, phase: () => MigrationPhase): void {
    if (p.last) this.counters.packets++;
    const normal = p.normal.length;
    const zero = p.zero.length;
    if (normal + zero === 0) return;
    const h = p.handle;
    if (!h) throw new MigrationError('protocol', phase(), `${this.name}: a packet with pages of block "${p.block}" before the RAM block list (the main channel's RAM setup section)`);
    this.opts.beforePages?.();
    this.packet = p;
    this.index = h.index;
    // QEMU 10.0 lands normal pages, then zero pages (multifd_recv_zero_page_process), as here.
    if (normal > 0) forEachOffsetRun(p.normal, normal, this.landNormal);
    if (zero > 0) forEachOffsetRun(p.zero, zero, this.landZero);
    this.packet = undefined;
    this.counters.normal += normal;
    this.counters.zero += zero;
  }

  private landed(offset: number, n: number): void {
    this.counters.runs++;
    this.counters.runPages += n;
    this.opts.target.received(this.index, offset / PAGE, n);
  }

  private wrap(e: unknown, phase: MigrationPhase): MigrationError {
    if (e instanceof MigrationError) return e.reason.startsWith(this.name) ? e : new MigrationError(e.code, e.phase, `${this.name}: ${e.reason}`, { cause: e, kind: e.kind });
    const m = MigrationError.from(e, phase);
    return new MigrationError(m.code, phase, `${this.name}: ${m.reason}`, { cause: e, kind: m.kind, ...(m.offset !== undefined ? { offset: m.offset } : {}) });
  }
}

/** A connection's multifd channels on the destination: a receiver per channel (by id), one barrier. */
export interface MultifdReception {
  readonly receivers: readonly MultifdChannelReceiver[];
  readonly barrier: MultifdBarrier;
}

/**
 * QEMU's `multifd_recv_sync_main`: every channel that read a SYNC packet
 * waits; the main stream's MULTIFD_FLUSH waits until all `channels` have,
 * then releases them together. So every page a channel received before its
 * SYNC has landed before the main stream goes on (the next pass's copy of a
 * page on another channel cannot be overtaken by this pass's; device state
 * comes after all RAM).
 */
export class MultifdBarrier {
  private arrived = 0;
  private release: (() => void)[] = [];
  private flushWaiter: (() => void) | undefined;
  private failure: Error | undefined;
  private rejects: ((e: Error) => void)[] = [];
  /** MULTIFD_FLUSH barriers passed. */
  syncs = 0;

  constructor(readonly channels: number) {}

  /** A channel read a SYNC packet: resolves when the main stream's MULTIFD_FLUSH releases it. */
  arrive(): Promise<void> {
    if (this.failure) return Promise.reject(this.failure);
    this.arrived++;
    const p = new Promise<void>((resolve, reject) => {
      this.release.push(resolve);
      this.rejects.push(reject);
    });
    if (this.arrived === this.channels) this.flushWaiter?.();
    return p;
  }

  /** Channels waiting at their SYNC now. */
  get waiting(): number {
    return this.arrived;
  }

  /** The main stream waits at a MULTIFD_FLUSH for channels still short of their SYNC. */
  get flushing(): boolean {
    return this.flushWaiter !== undefined;
  }

  /**
   * MULTIFD_FLUSH on the main stream: resolves once every channel has read its
   * SYNC, and releases them. Undefined when they all already have (no wait).
   */
  flush(): Promise<void> | undefined {
    if (this.failure) return Promise.reject(this.failure);
    if (this.arrived === this.channels) {
      this.pass();
      return undefined;
    }
    return new Promise<void>((resolve, reject) => {
      this.rejects.push(reject);
      this.flushWaiter = () => {
        this.flushWaiter = undefined;
        this.pass();
        resolve();
      };
    });
  }

  private pass(): void {
    this.syncs++;
    this.arrived = 0;
    const r = this.release;
    this.release = [];
    this.rejects = [];
    for (const f of r) f();
  }

  /** The migration failed: nobody waits any more (their promises reject). */
  fail(e: Error): void {
    if (this.failure) return;
    this.failure = e;
    this.flushWaiter = undefined;
    const r = this.rejects;
    this.rejects = [];
    this.release = [];
    for (const f of r) f(e);
  }
}

/** One receiver per channel (by id) and their barrier: each SYNC waits at it. */
export function createMultifdReception(count: number, opts: Omit<MultifdReceiverOptions, 'onSync'>): MultifdReception {
  const barrier = new MultifdBarrier(count);
  const receivers = Array.from({ length: count }, (_, id) => new MultifdChannelReceiver({ ...opts, onSync: () => barrier.arrive() }, id));
  return { receivers, barrier };
}

/** The block list arrived on main: the packets name their blocks in it. */
export function setMultifdBlocks(m: MultifdReception, blocks: ReadonlyMap<string, KnownBlock>): void {
  const list = [...blocks.values()];
  for (const rx of m.receivers) rx.setBlocks(list);
}

/**
 * At completion every channel has passed the last barrier: one still held at
 * a SYNC that no MULTIFD_FLUSH released means the source's channels and main
 * stream disagree (QEMU's source flushes before it completes).
 */
export function checkMultifdDrained(m: MultifdReception | undefined): void {
  if (!m) return;
  for (const rx of m.receivers) {
    if (rx.heldAtSync) throw new MigrationError('protocol', 'completion', `${rx.name} is held at a SYNC packet that no MULTIFD_FLUSH on the main channel released before the stream ended`);
  }
}

/** `stats().multifd`: the channels' counters, summed and per channel. */
export interface MultifdStats {
  /** multifd-channels. */
  channels: number;
  /** MULTIFD_FLUSH barriers passed (QEMU's multifd_recv_sync_main). */
  syncs: number;
  packets: number;
  /** Pages with data received on the multifd channels. */
  normal: number;
  /** Zero pages (the packets' zero lists). */
  zero: number;
  /** Sink calls by runs and the pages in them. */
  runs: { count: number; pages: number };
  /** Per channel, by id (empty until every channel is in). */
  perChannel: MultifdChannelCounters[];
}

export function summarizeMultifd(channels: number, m: MultifdReception | undefined): MultifdStats {
  const out: MultifdStats = { channels, syncs: m?.barrier.syncs ?? 0, packets: 0, normal: 0, zero: 0, runs: { count: 0, pages: 0 }, perChannel: [] };
  for (const rx of m?.receivers ?? []) {
    const c = rx.counters;
    out.packets += c.packets;
    out.normal += c.normal;
    out.zero += c.zero;
    out.runs.count += c.runs;
    out.runs.pages += c.runPages;
    out.perChannel.push({ ...c });
  }
  return out;
}
