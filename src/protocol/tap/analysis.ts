/**
 * What the tap learns from the bytes it forwards: one {@link MigrationAnalysis}
 * per migration session (one main connection and its preempt connection).
 *
 * It is fed the very chunks the relay has just written, with the time each
 * chunk arrived, and never touches a socket: the relay stays byte-for-byte
 * and a parse error only ends the parsing of that direction. Every record in
 * a chunk is dated by the chunk's arrival: a record completes in the chunk
 * that holds its last byte, so that time is when its last byte reached the
 * tap.
 */
import { PageBitmap } from '../../stream/bitmap.js';
import { performance } from 'node:perf_hooks';
import { BlockTime } from '../blocktime.js';
import { LatencyHistogram, type LatencySummary } from '../latency.js';
import { RAM_IDSTR, RecordType, TARGET_PAGE_SIZE } from '../../stream/constants.js';
import { PreemptDecoder, StreamDecoder } from '../../stream/decoder.js';
import { StreamError } from '../../stream/errors.js';
import type { MigrationCommand, PreemptRecord, ReturnPathMessage, StreamRecord } from '../../stream/records.js';
import { ReturnPathDecoder } from '../../stream/return-path.js';
import { MultifdChannelCounter, multifdTotals, type MultifdChannelCounts, type MultifdTotals } from './multifd.js';

/**
 * The directions of a session: `main` (source → destination on the first
 * connection), `return-path` (destination → source on it), `preempt` (source →
 * destination on the preempt connection), `preempt-reverse` (destination →
 * source on it; QEMU never writes there), and per multifd connection
 * `multifd` (source → destination) and `multifd-reverse` (QEMU never writes
 * there either).
 */
export type TapDirection = 'main' | 'return-path' | 'preempt' | 'preempt-reverse' | 'multifd' | 'multifd-reverse';

/** The channel a page arrived on. */
export type PageChannel = 'main' | 'preempt';

/** Page records by kind (QEMU: `ram.normal`, `ram.duplicate`, `xbzrle-cache.pages`). */
export interface PageCounts {
  normal: number;
  zero: number;
  xbzrle: number;
}

/**
 * One pass over RAM on the main channel, inferred as `qmt inspect` does
 * (StreamSummary): a page at or before the previous page's position opens a
 * new pass. In postcopy a page that answers a pending request is a jump of the
 * scan, not a wrap; postcopy's background stream always starts a new pass.
 */
export interface TapPass extends PageCounts {
  pass: number;
  phase: 'precopy' | 'postcopy';
}

/** Bytes of one direction. */
export interface DirectionReport {
  bytes: number;
  chunks: number;
  /** Arrival of the first and last chunk, ms after the session started; null before any. */
  firstByteMs: number | null;
  lastByteMs: number | null;
  /** bytes / (last − first arrival); 0 with fewer than two chunks. */
  bytesPerSecond: number;
}

export interface MainChannelReport extends DirectionReport {
  /** Every page record on the main channel. */
  pages: PageCounts;
  /** Those after POSTCOPY_LISTEN. */
  postcopyPages: PageCounts;
  sections: { start: number; part: number; end: number; full: number };
  /** RAM PART sections (QEMU's iterations), before and after POSTCOPY_LISTEN. */
  ramParts: { precopy: number; postcopy: number };
  /** Commands by name, e.g. `{ ping: 4, 'postcopy-ram-discard': 1 }`. */
  commands: Record<string, number>;
  devices: { count: number; bytes: number };
  /**
   * MULTIFD_FLUSH records: the source wrote one after every channel sent a
   * SYNC packet (at setup and after each pass), so in a whole multifd
   * migration every channel's `syncs` equals this.
   */
  multifdFlushes: number;
  eof: boolean;
}

export interface ReturnPathReport extends DirectionReport {
  /** Messages by type, e.g. `{ pong: 4, 'req-pages-id': 3, 'req-pages': 40, shut: 1 }`. */
  messages: Record<string, number>;
  /** SHUT's value (0 = the destination loaded everything), once seen. */
  shut: number | null;
}

export interface PreemptChannelReport extends DirectionReport {
  pages: PageCounts;
}

/** One multifd connection: its bytes (source → destination) and what they carried. */
export interface MultifdChannelReport extends DirectionReport, MultifdChannelCounts {
  /** 0, 1, … in the order the tap took the connections (the capture file's number); `id` is the channel's own. */
  connection: number;
  /** Bytes the destination wrote back (QEMU writes none). */
  reverseBytes: number;
  /** The parse error that ended the analysis of this channel (also in `parseErrors`). */
  parseError: { code: string; offset: number; message: string } | null;
}

/** The multifd channels of a session and their sum (compare with the source's `ram.normal`, `ram.duplicate`, `ram.multifd-bytes`). */
export interface MultifdReport {
  channels: MultifdChannelReport[];
  total: MultifdTotals;
}

/** When the moments of a migration went past the tap, in ms after the session started (null: not seen). */
export interface SwitchoverReport {
  switchoverStartMs: number | null;
  /** The PACKAGED command's header (the package follows it). */
  packagedMs: number | null;
  packageEndMs: number | null;
  postcopyListenMs: number | null;
  postcopyRunMs: number | null;
  eofMs: number | null;
  shutMs: number | null;
  /**
   * SWITCHOVER_START to POSTCOPY_RUN (postcopy) or to EOF (precopy) on the
   * wire: the part of the downtime the stream shows.
   */
  wireMs: number | null;
}

/** Postcopy page requests (REQ_PAGES / REQ_PAGES_ID on the return path) and their answers. */
export interface RequestReport {
  /** Every request seen; equals the source's `ram.postcopy-requests`. */
  count: number;
  /** Completed by a page on that channel (the channel of the request's last page). */
  answered: { main: number; preempt: number };
  /**
   * Requests whose pages had all gone through the tap before the request did
   * (request and page crossed): not timed.
   */
  alreadyForwarded: number;
  /** Still waiting for a page (at the end: never answered). */
  unanswered: number;
  /** Request (last byte at the tap) → page (last byte at the tap), µs. */
  latency: { all: LatencySummary; main: LatencySummary; preempt: LatencySummary };
  /**
   * ms during which at least one request waited (request → its last page, at
   * the tap): the network's part of a one-vCPU guest's postcopy-blocktime.
   * QEMU's own figure adds what the tap cannot see: the fault's handling before
   * REQ_PAGES and after the page, and waits on pages already on the way
   * (`alreadyForwarded`). With more vCPUs, REQ_PAGES does not say which faulted.
   */
  blocktimeMs: number;
}

export interface ParseErrorReport {
  direction: TapDirection;
  /** The multifd connection (its `connection` number) for `multifd` errors. */
  channel?: number;
  code: string;
  /** Byte offset in that direction's stream. */
  offset: number;
  message: string;
  atMs: number;
}

/** What the analysis of one session knows. */
export interface AnalysisReport {
  /** 'resume': the new main channel of a postcopy recovery (no header). */
  kind: 'migration' | 'resume';
  machineType: string | null;
  /** POSTCOPY_LISTEN seen (or a page request). */
  postcopy: boolean;
  /** EOF on the main channel, and SHUT 0 if a return path was opened. */
  complete: boolean;
  main: MainChannelReport;
  returnPath: ReturnPathReport;
  preempt: PreemptChannelReport | null;
  /** Null without multifd connections. */
  multifd: MultifdReport | null;
  passes: TapPass[];
  switchover: SwitchoverReport;
  requests: RequestReport;
  /** Forwarding delay (chunk arrival → write callback), µs, per direction and overall. */
  forwardDelay: { all: LatencySummary; main: LatencySummary; returnPath: LatencySummary; preempt: LatencySummary; multifd: LatencySummary };
  /**
   * The same for the chunks the kernel took at once (nothing left in user
   * space after the write): the tap's own cost, without waiting for the
   * receiver.
   */
  forwardDelayUnqueued: LatencySummary;
  /** Times a direction was paused because its outgoing socket was full, and for how long in total. */
  backpressure: { pauses: number; pausedMs: number };
  /** Time spent analysing one chunk (off the forwarding path, but on the same thread), µs. */
  analysisPerChunk: LatencySummary;
  parseErrors: ParseErrorReport[];
}

/** A page request as the tap saw it. */
export interface PageRequestEvent {
  block: string;
  offset: number;
  length: number;
  atMs: number;
}

/** A request whose last page went through the tap. */
export interface PageAnsweredEvent extends PageRequestEvent {
  channel: PageChannel;
  latencyUs: number;
}

/** Moments reported as they pass (see {@link SwitchoverReport}). */
export type Milestone = 'switchover-start' | 'packaged' | 'postcopy-listen' | 'postcopy-run' | 'eof' | 'shut';

/** Callbacks of {@link MigrationAnalysis}; none may throw. */
export interface AnalysisHooks {
  /** `channel`: the multifd connection, for `multifd`. */
  parseError?(direction: TapDirection, error: StreamError, channel?: number): void;
  milestone?(name: Milestone, atMs: number): void;
  pageRequest?(r: PageRequestEvent): void;
  pageAnswered?(a: PageAnsweredEvent): void;
}

export interface MigrationAnalysisOptions {
  /** performance.now() of the session's start; every time in the report is relative to it. */
  t0: number;
  /**
   * The analysis of the previous session. When that one was interrupted in
   * postcopy and this session's main channel starts with a command instead of
   * the file header, this is its recovery: the stream is decoded as the
   * continuation of the previous one (QEMU's resume, no header).
   */
  previous?: MigrationAnalysis;
  hooks?: AnalysisHooks;
}

interface Pending {
  readonly block: string;
  readonly offset: number;
  readonly length: number;
  readonly t: number;
  remaining: number;
}

const emptyPages = (): PageCounts => ({ normal: 0, zero: 0, xbzrle: 0 });

class DirectionStats {
  bytes = 0;
  chunks = 0;
  first = -1;
  last = -1;
  add(n: number, t: number): void {
    this.bytes += n;
    this.chunks++;
    if (this.first < 0) this.first = t;
    this.last = t;
  }
  report(t0: number): DirectionReport {
    const span = (this.last - this.first) / 1000;
    return {
      bytes: this.bytes,
      chunks: this.chunks,
      firstByteMs: this.first < 0 ? null : round3(this.first - t0),
      lastByteMs: this.last < 0 ? null : round3(this.last - t0),
      bytesPerSecond: this.chunks > 1 && span > 0 ? Math.round(this.bytes / span) : 0,
    };
  }
}

function round3(x: number): number {
  return Math.round(x * 1000) / 1000;
}

/** One multifd connection of a session. */
class MultifdChannel {
  readonly counter = new MultifdChannelCounter();
  readonly dir = new DirectionStats();
  readonly reverse = new DirectionStats();
  failed = false;
  constructor(readonly connection: number) {}
}

function bump(rec: Record<string, number>, key: string): void {
  rec[key] = (rec[key] ?? 0) + 1;
}

/**
 * Decodes the directions of one session and folds them into an
 * {@link AnalysisReport}. `push()` never throws: a StreamError ends the
 * parsing of that direction only (reported once); other directions go on.
 */
export class MigrationAnalysis {
  readonly t0: number;
  private resumed = false;
  private readonly hooks: AnalysisHooks;
  private previous: MigrationAnalysis | undefined;
  private released = false;
  /** Created at the first main byte: a recovery stream starts with a command, not the header. */
  private mainDecoder: StreamDecoder | undefined;
  private preemptDecoder: PreemptDecoder | undefined;
  private readonly rpDecoder = new ReturnPathDecoder();
  private readonly failed = new Set<TapDirection>();
  private readonly parseErrors: ParseErrorReport[] = [];

  private readonly dirs: Record<Exclude<TapDirection, 'multifd' | 'multifd-reverse'>, DirectionStats> = {
    main: new DirectionStats(),
    'return-path': new DirectionStats(),
    preempt: new DirectionStats(),
    'preempt-reverse': new DirectionStats(),
  };
  private preemptOpened = false;
  private readonly multifd: MultifdChannel[] = [];
  private multifdBlocksGiven = false;

  // main channel
  private machineType: string | null = null;
  private readonly mainPages = emptyPages();
  private readonly postcopyPages = emptyPages();
  private readonly sections = { start: 0, part: 0, end: 0, full: 0 };
  private readonly ramParts = { precopy: 0, postcopy: 0 };
  private readonly commands: Record<string, number> = {};
  private readonly devices = { count: 0, bytes: 0 };
  private eof = false;
  private multifdFlushes = 0;
  private returnPathOpened = false;
  private inPostcopy = false;

  // passes
  private blockBase = new Map<string, number>();
  private lastPos = -1;
  private readonly passes: TapPass[] = [];

  // return path
  private readonly rpMessages: Record<string, number> = {};
  private shut: number | null = null;
  private lastRequestBlock: string | undefined;

  // preempt
  private readonly preemptPages = emptyPages();

  // milestones (performance.now() values)
  private readonly at: Partial<Record<Milestone | 'package-end', number>> = {};

  // postcopy requests
  private requests = 0;
  private readonly answered = { main: 0, preempt: 0 };
  private alreadyForwarded = 0;
  private readonly open = new Set<Pending>();
  /** block → target page index → requests waiting for it. */
  private readonly pending = new Map<string, Map<number, Pending[]>>();
  /** block → bitmap of target pages that went through the tap since POSTCOPY_LISTEN. */
  private readonly seen = new Map<string, PageBitmap>();
  private readonly latency = { all: new LatencyHistogram(), main: new LatencyHistogram(), preempt: new LatencyHistogram() };
  /** The requests as one faulting context: blocked while any waits. */
  private readonly blocktime = new BlockTime(1);
  private lastRequestEvent = 0;

  private readonly pauses = { pauses: 0, pausedMs: 0 };
  private readonly analysisTime = new LatencyHistogram();
  private readonly delay = {
    unqueued: new LatencyHistogram(),
    all: new LatencyHistogram(),
    main: new LatencyHistogram(),
    returnPath: new LatencyHistogram(),
    preempt: new LatencyHistogram(),
    multifd: new LatencyHistogram(),
  };

  constructor(opts: MigrationAnalysisOptions) {
    this.t0 = opts.t0;
    this.hooks = opts.hooks ?? {};
    this.previous = opts.previous;
  }

  /** 'resume' once the main channel turned out to continue an interrupted postcopy. */
  get kind(): 'migration' | 'resume' {
    return this.resumed ? 'resume' : 'migration';
  }

  /** EOF on the main channel, and SHUT 0 if a return path was opened. */
  get complete(): boolean {
    return this.eof && (!this.returnPathOpened || this.shut === 0);
  }

  /** True while the session is in postcopy and its stream has not ended (a recovery may follow). */
  get resumable(): boolean {
    return !this.released && this.inPostcopy && !this.eof && this.mainDecoder !== undefined && !this.failed.has('main');
  }

  /**
   * Drops the decoders and the per-page state (a bitmap of every RAM page)
   * once nothing more will be pushed and no recovery can continue this
   * stream; the report stays as it is. Called by the tap when a session ends.
   */
  release(): void {
    this.released = true;
    this.mainDecoder = undefined;
    this.preemptDecoder = undefined;
    this.seen.clear();
    this.pending.clear();
    this.previous = undefined;
  }

  /**
   * Feeds one chunk of `direction`, which arrived at `t` (performance.now())
   * and has been forwarded; `channel` names the multifd connection (see
   * multifdConnected) for `multifd` and `multifd-reverse`.
   */
  push(direction: TapDirection, chunk: Uint8Array, t: number, channel = 0): void {
    if (this.released) return;
    const started = performance.now();
    if (direction === 'multifd' || direction === 'multifd-reverse') this.pushMultifd(direction, channel, chunk, t);
    else this.pushChunk(direction, chunk, t);
    this.analysisTime.record((performance.now() - started) * 1000);
  }

  /** A multifd connection was taken: returns its number for push() (0, 1, … in order). */
  multifdConnected(): number {
    const n = this.multifd.length;
    const ch = new MultifdChannel(n);
    this.multifd.push(ch);
    if (this.multifdBlocksGiven) ch.counter.setBlocks([...this.main().ramBlocks.values()]);
    return n;
  }

  /** The id a multifd connection's init message gave (null before it). */
  multifdChannelId(channel: number): number | null {
    return this.multifd[channel]?.counter.id ?? null;
  }

  /** A multifd connection ended (its source side): a channel cut inside a packet is a parse error. */
  multifdEnded(channel: number, t: number): void {
    const ch = this.multifd[channel];
    if (this.released || !ch || ch.failed) return;
    const e = ch.counter.end();
    if (e) this.failMultifd(ch, e, t);
  }

  private pushMultifd(direction: 'multifd' | 'multifd-reverse', channel: number, chunk: Uint8Array, t: number): void {
    const ch = this.multifd[channel];
    if (!ch) return;
    if (direction === 'multifd-reverse') {
      ch.reverse.add(chunk.length, t);
      return;
    }
    ch.dir.add(chunk.length, t);
    if (ch.failed) return;
    // Pages are checked against the block list once main has given it (before any page: QEMU sends
    // the RAM section's block list on main, flushed, before it queues a page on a channel).
    if (!this.multifdBlocksGiven) this.giveMultifdBlocks();
    const e = ch.counter.push(chunk);
    if (e) this.failMultifd(ch, e, t);
  }

  private giveMultifdBlocks(): void {
    const blocks = [...(this.mainDecoder?.ramBlocks.values() ?? [])];
    if (blocks.length === 0) return;
    this.multifdBlocksGiven = true;
    for (const c of this.multifd) c.counter.setBlocks(blocks);
  }

  private failMultifd(ch: MultifdChannel, e: StreamError, t: number): void {
    ch.failed = true;
    this.parseErrors.push({ direction: 'multifd', channel: ch.connection, code: e.code, offset: e.offset, message: e.message, atMs: round3(t - this.t0) });
    this.hooks.parseError?.('multifd', e, ch.connection);
  }

  private pushChunk(direction: Exclude<TapDirection, 'multifd' | 'multifd-reverse'>, chunk: Uint8Array, t: number): void {
    this.dirs[direction].add(chunk.length, t);
    if (direction === 'preempt' || direction === 'preempt-reverse') this.preemptOpened = true;
    if (this.failed.has(direction) || direction === 'preempt-reverse') return;
    try {
      switch (direction) {
        case 'main':
          if (!this.mainDecoder && chunk.length > 0) this.mainDecoder = this.createMainDecoder(chunk[0]!);
          for (const r of this.main().push(chunk)) this.onMain(r, t);
          break;
        case 'return-path':
          for (const m of this.rpDecoder.push(chunk)) this.onReturnPath(m, t);
          break;
        case 'preempt':
          this.preemptDecoder ??= new PreemptDecoder(this.main().ramBlocks);
          for (const r of this.preemptDecoder.push(chunk)) this.onPreempt(r, t);
          break;
      }
    } catch (e) {
      if (!(e instanceof StreamError)) throw e;
      this.fail(direction, e, t);
    }
    // Each decoder returns the records before an error and keeps the error for later.
    const decoder = direction === 'main' ? this.mainDecoder : direction === 'return-path' ? this.rpDecoder : this.preemptDecoder;
    if (decoder?.error && !this.failed.has(direction)) this.fail(direction, decoder.error, t);
  }

  /** Declares that the preempt connection exists (even before it carries a byte). */
  preemptConnected(): void {
    this.preemptOpened = true;
  }

  /**
   * Records one forwarding delay of `direction` (chunk arrival → write
   * callback), µs; `queuedBehind`: written behind earlier bytes still queued.
   */
  forwarded(direction: TapDirection, micros: number, queuedBehind = false): void {
    if (!queuedBehind) this.delay.unqueued.record(micros);
    this.delay.all.record(micros);
    if (direction === 'main') this.delay.main.record(micros);
    else if (direction === 'return-path') this.delay.returnPath.record(micros);
    else if (direction === 'multifd' || direction === 'multifd-reverse') this.delay.multifd.record(micros);
    else this.delay.preempt.record(micros);
  }

  /** A direction waited `ms` for its outgoing socket to drain. */
  paused(ms: number): void {
    this.pauses.pauses++;
    this.pauses.pausedMs += ms;
  }

  private main(): StreamDecoder {
    this.mainDecoder ??= new StreamDecoder();
    return this.mainDecoder;
  }

  /** A recovery's main channel starts with RECV_BITMAP commands (0x08), a migration with "QEVM". */
  private createMainDecoder(firstByte: number): StreamDecoder {
    const prev = this.previous;
    this.previous = undefined;
    if (firstByte !== RecordType.COMMAND || !prev?.resumable || !prev.mainDecoder) {
      prev?.release();
      return new StreamDecoder();
    }
    this.resumed = true;
    this.blockBase = new Map(prev.blockBase);
    this.machineType = prev.machineType;
    this.inPostcopy = true;
    this.returnPathOpened = true;
    const d = new StreamDecoder({ channel: 'resume', resumeFrom: prev.mainDecoder });
    prev.release();
    return d;
  }

  private fail(direction: TapDirection, e: StreamError, t: number): void {
    if (this.failed.has(direction)) return;
    this.failed.add(direction);
    this.parseErrors.push({ direction, code: e.code, offset: e.offset, message: e.message, atMs: round3(t - this.t0) });
    this.hooks.parseError?.(direction, e);
  }

  private milestone(name: Milestone | 'package-end', t: number): void {
    if (this.at[name] !== undefined) return;
    this.at[name] = t;
    if (name !== 'package-end') this.hooks.milestone?.(name, round3(t - this.t0));
  }

  // ---- main channel --------------------------------------------------------

  private onMain(r: StreamRecord, t: number): void {
    switch (r.type) {
      case 'configuration':
        this.machineType = r.machineType;
        return;
      case 'section':
        this.sections[r.kind]++;
        if (r.kind === 'part' && r.idstr === RAM_IDSTR) this.ramParts[this.inPostcopy ? 'postcopy' : 'precopy']++;
        return;
      case 'ram-blocks': {
        let base = 0;
        this.blockBase = new Map();
        for (const b of r.blocks) {
          this.blockBase.set(b.idstr, base);
          base += b.length;
        }
        this.lastPos = -1;
        return;
      }
      case 'ram-page':
        this.onMainPage('normal', r.block, r.offset, t);
        return;
      case 'ram-zero':
        this.onMainPage('zero', r.block, r.offset, t);
        return;
      case 'ram-xbzrle':
        this.onMainPage('xbzrle', r.block, r.offset, t);
        return;
      case 'device-state':
        this.devices.count++;
        this.devices.bytes += r.data.length;
        return;
      case 'command':
        this.onCommand(r.command, t);
        return;
      case 'package-end':
        this.milestone('package-end', t);
        return;
      case 'ram-multifd-flush':
        this.multifdFlushes++;
        return;
      case 'eof':
        this.eof = true;
        this.milestone('eof', t);
        return;
      default:
        return;
    }
  }

  private onCommand(c: MigrationCommand, t: number): void {
    bump(this.commands, c.cmd);
    switch (c.cmd) {
      case 'open-return-path':
        this.returnPathOpened = true;
        return;
      case 'switchover-start':
        this.milestone('switchover-start', t);
        return;
      case 'packaged':
        this.milestone('packaged', t);
        return;
      case 'postcopy-listen':
        this.milestone('postcopy-listen', t);
        this.startPostcopy();
        return;
      case 'postcopy-run':
        this.milestone('postcopy-run', t);
        return;
      default:
        return;
    }
  }

  private onMainPage(kind: keyof PageCounts, block: string, offset: number, t: number): void {
    this.mainPages[kind]++;
    let jumped = false;
    if (this.inPostcopy) {
      this.postcopyPages[kind]++;
      jumped = this.pageArrived('main', block, offset, t);
    }
    const base = this.blockBase.get(block);
    const pos = base === undefined ? -1 : base + offset;
    const phase = this.inPostcopy ? 'postcopy' : 'precopy';
    let p = this.passes[this.passes.length - 1];
    if (!p || p.phase !== phase || (pos >= 0 && pos <= this.lastPos && !jumped)) {
      p = { pass: (p?.pass ?? 0) + 1, phase, normal: 0, zero: 0, xbzrle: 0 };
      this.passes.push(p);
    }
    this.lastPos = pos;
    p[kind]++;
  }

  // ---- preempt channel -----------------------------------------------------

  private onPreempt(r: PreemptRecord, t: number): void {
    if (r.type === 'ram-eos') return;
    this.preemptPages[r.type === 'ram-page' ? 'normal' : 'zero']++;
    // Preempt pages exist only in postcopy, even if LISTEN was not parsed.
    if (!this.inPostcopy) this.startPostcopy();
    this.pageArrived('preempt', r.block, r.offset, t);
  }

  // ---- return path ---------------------------------------------------------

  private onReturnPath(m: ReturnPathMessage, t: number): void {
    bump(this.rpMessages, m.type);
    switch (m.type) {
      case 'shut':
        this.shut ??= m.value;
        this.milestone('shut', t);
        return;
      case 'req-pages-id':
        this.lastRequestBlock = m.block;
        this.request(m.block, m.offset, m.length, t);
        return;
      case 'req-pages':
        // REQ_PAGES names no block: the last REQ_PAGES_ID's (QEMU's rule).
        this.request(this.lastRequestBlock ?? '', m.offset, m.length, t);
        return;
      default:
        return;
    }
  }

  // ---- postcopy requests ---------------------------------------------------

  private startPostcopy(): void {
    if (this.inPostcopy && this.seen.size > 0) return;
    this.inPostcopy = true;
    // From LISTEN on every host page arrives exactly once: remember which did.
    for (const [idstr, b] of this.main().ramBlocks) {
      if (!this.seen.has(idstr)) this.seen.set(idstr, PageBitmap.forBlockLength(b.length));
    }
  }

  private seenMap(block: string): PageBitmap | undefined {
    let m = this.seen.get(block);
    if (!m) {
      const b = this.mainDecoder?.ramBlocks.get(block);
      if (!b) return undefined;
      m = PageBitmap.forBlockLength(b.length);
      this.seen.set(block, m);
    }
    return m;
  }

  private request(block: string, offset: number, length: number, t: number): void {
    this.requests++;
    if (!this.inPostcopy) this.startPostcopy();
    const ev: PageRequestEvent = { block, offset, length, atMs: round3(t - this.t0) };
    this.hooks.pageRequest?.(ev);
    const req: Pending = { block, offset, length, t, remaining: 0 };
    const seen = this.seenMap(block);
    const first = Math.floor(offset / TARGET_PAGE_SIZE);
    const n = Math.max(1, Math.ceil(length / TARGET_PAGE_SIZE));
    let waiting = this.pending.get(block);
    for (let i = first; i < first + n; i++) {
      if (seen?.has(i)) continue;
      if (!waiting) {
        waiting = new Map();
        this.pending.set(block, waiting);
      }
      const list = waiting.get(i);
      if (list) list.push(req);
      else waiting.set(i, [req]);
      req.remaining++;
    }
    if (req.remaining === 0) this.alreadyForwarded++;
    else {
      this.open.add(req);
      this.blocktime.begin(0, t);
      this.lastRequestEvent = t;
    }
  }

  /** A page went through in postcopy; returns true when it answered a request. */
  private pageArrived(channel: PageChannel, block: string, offset: number, t: number): boolean {
    const idx = Math.floor(offset / TARGET_PAGE_SIZE);
    const seen = this.seenMap(block);
    seen?.set(idx);
    const waiting = this.pending.get(block);
    const list = waiting?.get(idx);
    if (!list) return false;
    waiting!.delete(idx);
    for (const req of list) {
      if (--req.remaining > 0) continue;
      this.open.delete(req);
      this.blocktime.end(0, t);
      this.lastRequestEvent = t;
      const us = (t - req.t) * 1000;
      this.answered[channel]++;
      this.latency.all.record(us);
      this.latency[channel].record(us);
      this.hooks.pageAnswered?.({
        block: req.block,
        offset: req.offset,
        length: req.length,
        atMs: round3(req.t - this.t0),
        channel,
        latencyUs: Math.round(us * 1000) / 1000,
      });
    }
    return true;
  }

  // ---- report --------------------------------------------------------------

  private multifdReport(): MultifdReport | null {
    if (this.multifd.length === 0) return null;
    const channels = this.multifd.map((ch): MultifdChannelReport => {
      const e = ch.counter.error;
      return {
        connection: ch.connection,
        ...ch.dir.report(this.t0),
        ...ch.counter.counts(),
        reverseBytes: ch.reverse.bytes,
        parseError: e ? { code: e.code, offset: e.offset, message: e.message } : null,
      };
    });
    return { channels, total: multifdTotals(channels) };
  }

  report(): AnalysisReport {
    const t0 = this.t0;
    const rel = (t: number | undefined): number | null => (t === undefined ? null : round3(t - t0));
    const a = this.at;
    const end = a['postcopy-run'] ?? a.eof;
    return {
      kind: this.kind,
      machineType: this.machineType,
      postcopy: this.inPostcopy,
      complete: this.complete,
      main: {
        ...this.dirs.main.report(t0),
        pages: { ...this.mainPages },
        postcopyPages: { ...this.postcopyPages },
        sections: { ...this.sections },
        ramParts: { ...this.ramParts },
        commands: { ...this.commands },
        devices: { ...this.devices },
        multifdFlushes: this.multifdFlushes,
        eof: this.eof,
      },
      returnPath: { ...this.dirs['return-path'].report(t0), messages: { ...this.rpMessages }, shut: this.shut },
      preempt: this.preemptOpened ? { ...this.dirs.preempt.report(t0), pages: { ...this.preemptPages } } : null,
      multifd: this.multifdReport(),
      passes: this.passes.map((p) => ({ ...p })),
      switchover: {
        switchoverStartMs: rel(a['switchover-start']),
        packagedMs: rel(a.packaged),
        packageEndMs: rel(a['package-end']),
        postcopyListenMs: rel(a['postcopy-listen']),
        postcopyRunMs: rel(a['postcopy-run']),
        eofMs: rel(a.eof),
        shutMs: rel(a.shut),
        wireMs: a['switchover-start'] !== undefined && end !== undefined ? round3(end - a['switchover-start']) : null,
      },
      requests: {
        count: this.requests,
        answered: { ...this.answered },
        alreadyForwarded: this.alreadyForwarded,
        unanswered: this.open.size,
        latency: { all: this.latency.all.summary(), main: this.latency.main.summary(), preempt: this.latency.preempt.summary() },
        blocktimeMs: this.blocktime.summary(this.lastRequestEvent).total,
      },
      forwardDelay: {
        all: this.delay.all.summary(),
        main: this.delay.main.summary(),
        returnPath: this.delay.returnPath.summary(),
        preempt: this.delay.preempt.summary(),
        multifd: this.delay.multifd.summary(),
      },
      forwardDelayUnqueued: this.delay.unqueued.summary(),
      backpressure: { pauses: this.pauses.pauses, pausedMs: round3(this.pauses.pausedMs) },
      analysisPerChunk: this.analysisTime.summary(),
      parseErrors: this.parseErrors.map((e) => ({ ...e })),
    };
  }
}
