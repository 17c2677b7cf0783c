import { EventEmitter } from 'node:events';
import { performance } from 'node:perf_hooks';
import { PreemptDecoder, StreamDecoder } from '../stream/decoder.js';
import { RecordType, TARGET_PAGE_SIZE } from '../stream/constants.js';
import { encodeReturnPathMessage } from '../stream/return-path.js';
import { applyXbzrle } from '../stream/xbzrle.js';
import type { ConfigurationRecord, RamBlockInfo, ReturnPathMessage, StreamRecord, PreemptRecord } from '../stream/records.js';
import type { Channel, ChannelStats } from '../transport/channel.js';
import { MigrationListener, type DestinationConnection, type TransportOptions } from '../transport/connection.js';
import type { StrangerEvent } from '../transport/qualify.js';
import { MigrationError, type MigrationPhase } from './errors.js';
import type { LatencySummary } from './latency.js';
import type { GuestMemorySink } from './memory.js';
import { PageTracker, type PageRequestResult } from './page-tracker.js';
import { isNetworkFailure, type DestinationRecoveryOptions, type PausedEvent, type ResumedEvent } from './recovery.js';

/** One device (non-RAM) section as received, delimited exactly. */
export interface ReceivedDeviceSection {
  sectionId: number;
  idstr: string;
  instanceId: number;
  versionId: number;
  kind: 'start' | 'part' | 'end' | 'full';
  /** Whether it came inside the postcopy package. */
  packaged: boolean;
  data: Buffer;
}

/** Counters named as QEMU's `query-migrate` names them where one exists. */
export interface DestinationStats {
  status: 'setup' | 'active' | 'postcopy-active' | 'postcopy-paused' | 'postcopy-recover' | 'completed' | 'failed';
  /** Postcopy recoveries completed. */
  recoveries: number;
  /** Pages that arrived after POSTCOPY_LISTEN although already here (QEMU would refuse to place them twice); 0 in a correct migration. */
  'placed-twice': number;
  /** Bytes received on every channel. */
  transferred: number;
  /** PAGE records (QEMU's `normal`). */
  normal: number;
  /** ZERO records (QEMU's `duplicate`). */
  duplicate: number;
  xbzrle: number;
  /** Pages that came on the preempt channel. */
  'preempt-pages': number;
  /** Demand requests sent (QEMU's source counts them as `postcopy-requests`). */
  'postcopy-requests': number;
  /** RAM PART sections seen (QEMU's iterations). */
  'precopy-iterations': number;
  'total-time': number;
  /** Latency of demand requests (request sent → page arrived), µs. */
  'postcopy-latency': LatencySummary;
  channels: { main?: ChannelStats; preempt?: ChannelStats };
}

/** What a completed (or, on failure, partial) migration left behind. */
export interface DestinationResult {
  complete: boolean;
  machineType: string | undefined;
  configuration: ConfigurationRecord | undefined;
  blocks: RamBlockInfo[];
  devices: ReceivedDeviceSection[];
  /** The VM description JSON (precopy only). */
  vmdesc: Buffer | undefined;
  postcopy: boolean;
  stats: DestinationStats;
  error?: MigrationError;
}

export interface DestinationOptions {
  /** `tcp:HOST:PORT` or `unix:PATH`. */
  listen: string;
  /** Where RAM goes. */
  sink: GuestMemorySink;
  /** TLS, tuning and buffering of the two channels. */
  transport?: TransportOptions;
  /**
   * Accept postcopy (a 16-byte POSTCOPY_ADVISE), as QEMU's `postcopy-ram`
   * capability on a destination. Default false: such a stream is refused.
   */
  postcopy?: boolean;
  /**
   * Fail when no byte arrives for this long once connected (default 60 s;
   * 0 = never). Once the VM runs here (the postcopy package is in) such
   * silence is a network failure instead — a pulled cable or a frozen
   * middlebox sends no FIN and no RST — and pauses the migration like a reset
   * (see `recovery`); with `recovery: false` it fails.
   */
  idleTimeoutMs?: number;
  /**
   * Postcopy recovery: once the VM runs here (the postcopy package is in), a
   * network failure pauses the migration ('paused'), keeps every page and
   * request, and listens for the source's new connection ('resumed' after
   * POSTCOPY_RESUME). Default: on when `postcopy` is; `false` makes such a
   * failure final.
   */
  recovery?: DestinationRecoveryOptions | false;
}

export interface DestinationEvents {
  /**
   * A connection qualified as a channel (after its TLS handshake; see
   * MigrationListener): the main channel when its first bytes came, a
   * plain-TCP preempt channel only with its first page.
   */
  channel: [{ role: 'main' | 'preempt'; stats: ChannelStats }];
  /**
   * A connection was dropped before it became a channel (it closed, sent
   * something else than a migration stream, failed TLS, was too slow or one
   * too many): the migration is unaffected and the listener keeps waiting.
   */
  stranger: [StrangerEvent];
  configuration: [ConfigurationRecord];
  'ram-blocks': [RamBlockInfo[]];
  /** A RAM PART section ended: one precopy iteration. */
  pass: [{ iteration: number; pages: number; transferred: number }];
  'postcopy-advise': [];
  'postcopy-listen': [];
  /** POSTCOPY_RUN: the source VM is stopped and the destination may run. `at` is performance.now(). */
  'postcopy-run': [{ at: number }];
  /** A demand request was answered. */
  'page-request': [PageRequestResult];
  /** Postcopy: a channel failed; requests wait, the source's new connection is awaited at `uri`. */
  paused: [PausedEvent & { uri: string }];
  /** POSTCOPY_RESUME on a new connection: postcopy goes on, waiting requests were sent again. */
  resumed: [ResumedEvent];
  completed: [DestinationResult];
  failed: [MigrationError];
}

/**
 * The receiving half of a migration (QEMU's destination), fed by a QEMU 10.0
 * source or our own SourceSession: listens, takes the first connection that
 * qualifies as the main channel and the next as the preempt channel (others
 * on the port are dropped and reported as 'stranger' events), follows the protocol
 * (PING→PONG, OPEN_RETURN_PATH, ADVISE, DISCARD, LISTEN, PACKAGED, RUN, EOF,
 * SHUT), writes RAM into a GuestMemorySink, keeps device state, and serves
 * demand page requests during postcopy.
 */
export class DestinationSession extends EventEmitter<DestinationEvents> {
  /** Resolves with the result when the migration completed; rejects with a MigrationError. */
  readonly done: Promise<DestinationResult>;
  private resolveDone!: (r: DestinationResult) => void;
  private rejectDone!: (e: MigrationError) => void;
  private conn: DestinationConnection | undefined;
  private decoder = new StreamDecoder();
  private preemptDecoder: PreemptDecoder | undefined;
  private readonly pages: PageTracker;
  private phase: MigrationPhase = 'setup';
  private rpOpen = false;
  private advised = false;
  private listening = false;
  private eofSeen = false;
  private inPackage = false;
  private finished = false;
  /** finish() is waiting for the last pages; the preempt channel is still read. */
  private finishing = false;
  private configuration: ConfigurationRecord | undefined;
  private blocks: RamBlockInfo[] = [];
  private readonly devices: ReceivedDeviceSection[] = [];
  private vmdesc: Buffer | undefined;
  private idleTimer: NodeJS.Timeout | undefined;
  private readonly startedAt = performance.now();
  private endedAt: number | undefined;
  private readonly counts = { transferred: 0, normal: 0, duplicate: 0, xbzrle: 0, preempt: 0, iterations: 0, iterationPages: 0 };
  private status: DestinationStats['status'] = 'setup';
  private section: { idstr: string; kind: string } | undefined;
  /** The postcopy package has been read whole: the VM may run here, and a failure can pause. */
  private packageDone = false;
  /** Connection generation: handlers of a connection replaced by a recovery ignore what they see. */
  private generation = 0;
  private pausedBy: MigrationError | undefined;
  private pausedAt = 0;
  private recoveryTimer: NodeJS.Timeout | undefined;
  private recoveries = 0;
  private placedTwice = 0;

  private constructor(
    private listener: MigrationListener,
    private readonly opts: DestinationOptions,
  ) {
    super();
    this.done = new Promise((resolve, reject) => {
      this.resolveDone = resolve;
      this.rejectDone = reject;
    });
    // A caller that only listens to events must not get an unhandled rejection.
    this.done.catch(() => undefined);
    this.pages = new PageTracker((m) => this.sendRp(m));
  }

  /** Starts listening; the migration proceeds as the source connects. */
  static async listen(opts: DestinationOptions): Promise<DestinationSession> {
    const listener = await MigrationListener.listen(opts.listen, opts.transport ?? {});
    const s = new DestinationSession(listener, opts);
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

  private start(): void {
    this.listener.on('stranger', (ev) => this.onStranger(ev));
    // Rejects only when the listener is closed, i.e. when the session is over.
    this.listener.accept().then(
      (conn) => this.onConnection(conn),
      (e: unknown) => this.fail(MigrationError.from(e, 'setup')),
    );
  }

  private onConnection(conn: DestinationConnection): void {
    const gen = ++this.generation;
    this.conn = conn;
    if (this.status === 'setup') this.status = 'active';
    this.emit('channel', { role: 'main', stats: conn.main.stats });
    this.armIdle(gen);
    conn.main.on('error', (e) => this.channelLost(e, gen));
    conn.main.on('close', () => {
      if (!this.finished && gen === this.generation) this.onMainEnded(gen);
    });
    conn.main.read((chunk) => {
      if (gen === this.generation) this.onMainData(chunk);
    });
    conn.waitPreempt().then(
      (ch) => this.onPreempt(ch, gen),
      () => undefined,
    );
  }

  private onPreempt(ch: Channel, gen: number): void {
    // While finishing, a plain-TCP preempt channel may qualify only now, with its first (late) page.
    if ((this.finished && !this.finishing) || gen !== this.generation) {
      ch.destroy();
      return;
    }
    this.emit('channel', { role: 'preempt', stats: ch.stats });
    const decoder = new PreemptDecoder(this.decoder.ramBlocks);
    this.preemptDecoder = decoder;
    const lost = () => new MigrationError('peer-disconnected', this.phase, 'the source closed the preempt channel before the migration completed');
    ch.on('error', (e) => this.channelLost(e, gen));
    ch.on('end', () => {
      if (gen !== this.generation) return;
      // While the VM runs here the source never ends this channel first: a cut.
      if (this.canRecover() && !this.eofSeen) {
        this.channelLost(lost(), gen);
        return;
      }
      try {
        decoder.end();
      } catch (e) {
        this.fail(MigrationError.from(e, this.phase));
      }
    });
    let first = true;
    ch.read((chunk) => {
      if (gen !== this.generation) return;
      // Still read while finishing: a requested page may arrive after the main channel's EOF.
      if (this.finished && !this.finishing) return;
      if (first && chunk.length > 0) {
        first = false;
        if (chunk[0] === RecordType.COMMAND && this.canRecover()) {
          this.recoveryArrivedEarly(ch, gen);
          return;
        }
      }
      this.counts.transferred += chunk.length;
      this.idleTimer?.refresh();
      try {
        const recs = decoder.push(chunk);
        const now = performance.now();
        for (const r of recs) this.onPreemptRecord(r, now);
        if (decoder.error) throw decoder.error;
      } catch (e) {
        this.fail(MigrationError.from(e, this.phase));
      }
    });
  }

  /**
   * Silence from the source on connection `gen`. Before the VM runs here it
   * ends the migration; once it does, silence is a network failure like a
   * reset (a pulled cable, a frozen middlebox send neither FIN nor RST), so
   * channelLost pauses instead: QEMU's source may still resume.
   */
  private armIdle(gen: number): void {
    const ms = this.opts.idleTimeoutMs ?? 60_000;
    if (ms <= 0) return;
    clearTimeout(this.idleTimer);
    this.idleTimer = setTimeout(() => {
      this.channelLost(new MigrationError('idle-timeout', this.phase, `no data from the source for ${ms} ms`), gen);
    }, ms);
  }

  private onMainData(chunk: Buffer): void {
    if (this.finished) return;
    this.counts.transferred += chunk.length;
    this.idleTimer?.refresh();
    try {
      const recs = this.decoder.push(chunk);
      const now = performance.now();
      for (const r of recs) this.onRecord(r, now);
      if (this.decoder.error) throw this.decoder.error;
    } catch (e) {
      this.fail(MigrationError.from(e, this.phase));
    }
  }

  private onMainEnded(gen: number): void {
    if (this.finished || gen !== this.generation) return;
    if (this.eofSeen) {
      // A stream that ends after EOF without a VM description is complete.
      try {
        for (const r of this.decoder.end()) this.onRecord(r, performance.now());
        void this.finish();
      } catch (e) {
        this.fail(MigrationError.from(e, this.phase));
      }
      return;
    }
    this.channelLost(new MigrationError('peer-disconnected', this.phase, 'the source closed the main channel before the migration completed'), gen);
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
  private recoveryArrivedEarly(ch: Channel | undefined, gen: number): void {
    ch?.destroy();
    this.channelLost(new MigrationError('peer-disconnected', this.phase, 'the source opened a recovery connection: it lost the current one'), gen);
  }

  /** A dropped connection; a plain-TCP recovery connection in the preempt slot is the same proof as above. */
  private onStranger(ev: StrangerEvent): void {
    this.emit('stranger', ev);
    if (ev.reason === 'recovery' && this.status === 'postcopy-active' && this.canRecover()) this.recoveryArrivedEarly(undefined, this.generation);
  }

  /** The VM runs here (package read whole), so its memory is split: a network failure must pause. */
  private canRecover(): boolean {
    return this.opts.recovery !== false && this.listening && this.packageDone && !this.finished;
  }

  /** A channel of connection `gen` failed: pause (VM running here, network) or fail. */
  private channelLost(e: unknown, gen: number): void {
    if (gen !== this.generation || this.finished) return;
    // Paused with no connection: nothing to lose. A recovery connection that fails before
    // POSTCOPY_RESUME sends us back to paused (QEMU: postcopy-recover → postcopy-paused).
    if (this.pausedBy && this.status !== 'postcopy-recover') return;
    const err = MigrationError.from(e, this.phase);
    if (this.canRecover() && isNetworkFailure(err)) void this.enterPause(err);
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
      const why = this.finished ? 'the migration is over' : this.opts.recovery === false ? 'postcopy recovery is off (recovery: false)' : 'the VM does not run here yet (no postcopy package received)';
      throw new MigrationError('invalid-state', this.phase, `pause() needs a running postcopy migration: ${why}`);
    }
    if (this.status === 'postcopy-paused') return;
    void this.enterPause(new MigrationError('paused', this.phase, 'paused by the operator (pause())'));
  }

  /**
   * Postcopy paused (QEMU's postcopy-paused): the connection is dropped, pages
   * and waiting requests are kept, and a listener waits for the source's new
   * connection — at `recovery.listen`, else where the migration came in.
   */
  private async enterPause(e: MigrationError): Promise<void> {
    // Paused again before a recovery completed: the outage (and its timeout) goes on.
    const again = this.pausedBy !== undefined;
    this.pausedBy = e;
    if (!again) this.pausedAt = performance.now();
    this.status = 'postcopy-paused';
    clearTimeout(this.idleTimer);
    this.generation++; // the lost connection's handlers go quiet
    this.pages.suspendRequests();
    this.conn?.destroy();
    this.conn = undefined;
    this.preemptDecoder = undefined;
    const opts = this.opts.recovery || {};
    if (opts.timeoutMs !== undefined && !again) {
      // A manual pause that nobody resumes ends as a timeout, not as 'paused'.
      const code = e.code === 'paused' ? 'idle-timeout' : e.code;
      this.recoveryTimer = setTimeout(() => this.fail(new MigrationError(code, this.phase, `no postcopy recovery within ${opts.timeoutMs} ms of the pause (${e.reason})`, { cause: e })), opts.timeoutMs);
    }
    const uri = opts.listen ?? this.listener.uri;
    this.listener.close();
    try {
      await this.listenForRecovery(uri);
    } catch (err) {
      this.fail(MigrationError.from(err, this.phase));
      return;
    }
    this.emit('paused', { error: e, at: this.pausedAt, uri: this.listener.uri });
  }

  /**
   * Postcopy recovery: wait for the source's new connection at `uri` instead
   * (QEMU's `migrate-recover`). Resolves with the address listened on.
   */
  async recover(uri: string): Promise<string> {
    if (!this.pausedBy || this.finished) throw new MigrationError('protocol', this.phase, 'recover() needs a paused postcopy migration');
    this.listener.close();
    await this.listenForRecovery(uri);
    return this.listener.uri;
  }

  private async listenForRecovery(uri: string): Promise<void> {
    // The old listener has just closed: its port may take a moment to be free.
    let listener: MigrationListener | undefined;
    for (let i = 0; !listener; i++) {
      try {
        listener = await MigrationListener.listen(uri, this.opts.transport ?? {}, { start: 'resume' });
      } catch (e) {
        if (i >= 20 || (e as { cause?: { code?: string } }).cause?.code !== 'EADDRINUSE') throw e;
        await new Promise((r) => setTimeout(r, 50));
      }
    }
    if (this.finished) {
      listener.close();
      return;
    }
    this.listener = listener;
    // Strangers (a wrong certificate, a port scanner) are dropped by the listener, which keeps waiting.
    listener.on('stranger', (ev) => this.onStranger(ev));
    listener.accept().then(
      (conn) => {
        if (this.finished || this.listener !== listener) {
          conn.destroy();
          return;
        }
        this.status = 'postcopy-recover';
        // The new main channel has no header: it continues the old stream's sections and blocks.
        this.decoder = new StreamDecoder({ channel: 'resume', resumeFrom: this.decoder });
        this.onConnection(conn);
      },
      () => undefined, // closed: replaced by recover(), or the session is over
    );
  }

  /** RECV_BITMAP: which pages of `block` are here, so that the source resends exactly the others. */
  private answerRecvBitmap(block: string): void {
    if (this.status !== 'postcopy-recover') throw new MigrationError('protocol', this.phase, 'RECV_BITMAP outside a postcopy recovery');
    const bitmap = this.pages.bitmap(block);
    if (!bitmap) throw new MigrationError('protocol', this.phase, `RECV_BITMAP for unknown RAM block "${block}"`);
    this.sendRp({ type: 'recv-bitmap', block, bitmap: bitmap.bytes });
  }

  /** POSTCOPY_RESUME: acknowledge, then ask again for every page the guest still waits for. */
  private resumed(now: number): void {
    if (this.status !== 'postcopy-recover') throw new MigrationError('protocol', this.phase, 'POSTCOPY_RESUME outside a postcopy recovery');
    this.sendRp({ type: 'resume-ack', value: 1 });
    this.pages.resumeRequests(now);
    clearTimeout(this.recoveryTimer);
    this.pausedBy = undefined;
    this.status = 'postcopy-active';
    this.recoveries++;
    this.emit('resumed', { recoveries: this.recoveries, pausedMs: now - this.pausedAt });
  }

  private sendRp(m: ReturnPathMessage): void {
    if (!this.rpOpen) throw new MigrationError('protocol', this.phase, `${m.type} needs a return path, but the source did not open one`);
    if (!this.conn) return; // paused: waiting requests are sent again after the resume
    const gen = this.generation;
    this.conn.main.send([encodeReturnPathMessage(m)], 'urgent').catch((e: unknown) => this.channelLost(e, gen));
  }

  private landPage(r: PreemptRecord | StreamRecord, channel: 'main' | 'preempt', now: number): void {
    const sink = this.opts.sink;
    switch (r.type) {
      case 'ram-page':
        sink.writePage(r.block, r.offset, r.data);
        this.counts.normal++;
        break;
      case 'ram-zero':
        sink.zeroPage(r.block, r.offset);
        this.counts.duplicate++;
        break;
      case 'ram-xbzrle': {
        const page = Buffer.from(sink.readPage(r.block, r.offset));
        applyXbzrle(page, r.encoded);
        sink.writePage(r.block, r.offset, page);
        this.counts.xbzrle++;
        break;
      }
      default:
        return;
    }
    if (this.listening && this.pages.has(r.block, r.offset)) this.placedTwice++;
    if (channel === 'preempt') this.counts.preempt++;
    this.counts.iterationPages++;
    this.pages.received(r.block, r.offset, channel, now);
  }

  private onPreemptRecord(r: PreemptRecord, now: number): void {
    if (!this.listening) throw new MigrationError('protocol', this.phase, 'a page on the preempt channel before POSTCOPY_LISTEN');
    this.landPage(r, 'preempt', now);
  }

  private onRecord(r: StreamRecord, now: number): void {
    switch (r.type) {
      case 'configuration':
        this.configuration = r;
        this.emit('configuration', r);
        return;
      case 'ram-blocks':
        this.blocks = [...r.blocks];
        for (const b of r.blocks) {
          if (b.pageSize !== undefined && b.pageSize !== TARGET_PAGE_SIZE) {
            throw new MigrationError('protocol', this.phase, `RAM block "${b.idstr}" uses ${b.pageSize}-byte pages; only ${TARGET_PAGE_SIZE} is supported`);
          }
        }
        this.opts.sink.setBlocks(r.blocks);
        this.pages.setBlocks(r.blocks);
        this.emit('ram-blocks', this.blocks);
        return;
      case 'ram-page':
      case 'ram-zero':
      case 'ram-xbzrle':
        this.landPage(r, 'main', now);
        return;
      case 'section':
        this.section = { idstr: r.idstr, kind: r.kind };
        if (r.idstr === 'ram' && r.kind === 'part' && !this.listening) this.phase = 'precopy';
        if (r.kind === 'full' && !this.listening) this.phase = 'device-state';
        return;
      case 'footer':
        // One RAM PART section is one precopy iteration of QEMU's RAM handler.
        if (this.section?.idstr === 'ram' && this.section.kind === 'part' && !this.listening) {
          this.counts.iterations++;
          this.emit('pass', { iteration: this.counts.iterations, pages: this.counts.iterationPages, transferred: this.counts.transferred });
        }
        if (this.section?.idstr === 'ram') this.counts.iterationPages = 0;
        this.section = undefined;
        return;
      case 'device-state':
        this.devices.push({ sectionId: r.sectionId, idstr: r.idstr, instanceId: r.instanceId, versionId: r.versionId, kind: r.kind, packaged: this.inPackage, data: Buffer.from(r.data) });
        return;
      case 'command':
        this.onCommand(r.command, now);
        return;
      case 'package-end':
        this.inPackage = false;
        if (this.listening) this.packageDone = true;
        return;
      case 'eof':
        this.eofSeen = true;
        this.phase = 'completion';
        // Postcopy streams end at EOF; precopy streams add the VM description, which QEMU always sends.
        if (this.listening) void this.finish();
        return;
      case 'vmdesc':
        this.vmdesc = Buffer.from(r.json);
        void this.finish();
        return;
      default:
        return;
    }
  }

  private onCommand(c: Extract<StreamRecord, { type: 'command' }>['command'], now: number): void {
    switch (c.cmd) {
      case 'open-return-path':
        this.rpOpen = true;
        return;
      case 'ping':
        // Answered at once, in arrival order (QEMU may answer PING 4 before PING 3; both are valid).
        this.sendRp({ type: 'pong', value: c.value });
        return;
      case 'postcopy-advise':
        if (!this.opts.postcopy) throw new MigrationError('protocol', this.phase, 'the source advises postcopy, but postcopy is not enabled on this destination');
        if (c.targetPageSize !== BigInt(TARGET_PAGE_SIZE) || c.pageSizeSummary !== BigInt(TARGET_PAGE_SIZE)) {
          throw new MigrationError('protocol', this.phase, `postcopy page sizes 0x${c.pageSizeSummary.toString(16)}/0x${c.targetPageSize.toString(16)} differ from ours (0x1000)`);
        }
        this.advised = true;
        this.emit('postcopy-advise');
        return;
      case 'postcopy-advise-bitmap-only':
        return;
      case 'postcopy-ram-discard':
        if (!this.advised) throw new MigrationError('protocol', this.phase, 'POSTCOPY_RAM_DISCARD without POSTCOPY_ADVISE');
        for (const range of c.ranges) this.pages.discard(c.block, range.start, range.length);
        return;
      case 'packaged':
        this.inPackage = true;
        this.phase = 'device-state';
        return;
      case 'postcopy-listen':
        if (!this.advised) throw new MigrationError('protocol', this.phase, 'POSTCOPY_LISTEN without POSTCOPY_ADVISE');
        this.listening = true;
        this.status = 'postcopy-active';
        this.pages.enableRequests(now);
        this.emit('postcopy-listen');
        return;
      case 'postcopy-run':
        this.phase = 'postcopy';
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

  /**
   * Demand paging: resolves at once when the page is already here; otherwise
   * sends REQ_PAGES(_ID) (during postcopy; before it, waits for LISTEN or for
   * the bulk stream) and resolves when the page arrives on either channel.
   * Concurrent requests for one page share one request.
   */
  async requestPage(block: string, offset: number): Promise<PageRequestResult> {
    if (this.finished) throw new MigrationError('protocol', this.phase, 'the migration is over');
    const r = await this.pages.request(block, offset, performance.now());
    if (r.requested) this.emit('page-request', r);
    return r;
  }

  /** True when the page has arrived. */
  hasPage(block: string, offset: number): boolean {
    return this.pages.has(block, offset - (offset % TARGET_PAGE_SIZE));
  }

  stats(): DestinationStats {
    const c = this.counts;
    return {
      status: this.status,
      recoveries: this.recoveries,
      'placed-twice': this.placedTwice,
      transferred: c.transferred,
      normal: c.normal,
      duplicate: c.duplicate,
      xbzrle: c.xbzrle,
      'preempt-pages': c.preempt,
      'postcopy-requests': this.pages.requestsSent,
      'precopy-iterations': c.iterations,
      'total-time': Math.round((this.endedAt ?? performance.now()) - this.startedAt),
      'postcopy-latency': this.pages.latency.summary(),
      channels: { ...(this.conn ? { main: this.conn.main.stats } : {}), ...(this.conn?.preempt ? { preempt: this.conn.preempt.stats } : {}) },
    };
  }

  /** Everything received so far (complete or not). */
  snapshot(error?: MigrationError): DestinationResult {
    return {
      complete: this.status === 'completed',
      machineType: this.configuration?.machineType,
      configuration: this.configuration,
      blocks: this.blocks,
      devices: this.devices,
      vmdesc: this.vmdesc,
      postcopy: this.listening,
      stats: this.stats(),
      ...(error ? { error } : {}),
    };
  }

  private async finish(): Promise<void> {
    if (this.finished) return;
    this.finished = true;
    this.finishing = true;
    clearTimeout(this.idleTimer);
    try {
      // Pages requested late may still be in flight on the preempt channel.
      const deadline = performance.now() + 5000;
      while (this.listening && this.pages.missing() > 0 && this.conn?.preemptExpected && performance.now() < deadline) {
        await new Promise((r) => setTimeout(r, 5));
      }
      this.finishing = false;
      // After LISTEN every page must have come (QEMU's source discards and resends
      // whatever it had not sent cleanly); in precopy a page never sent stays zero.
      const missing = this.listening ? this.pages.missing() : 0;
      if (missing > 0) throw new MigrationError('protocol', 'completion', `the postcopy stream ended with ${missing} pages never received`);
      await this.opts.sink.flush();
      this.status = 'completed';
      this.endedAt = performance.now();
      if (this.rpOpen && this.conn) {
        // SHUT 0: without it a QEMU source reports the migration failed. Everything is here and
        // flushed by now, so a source that is gone meanwhile does not undo the migration.
        const main = this.conn.main;
        await main
          .send([encodeReturnPathMessage({ type: 'shut', value: 0 })], 'urgent')
          .then(() => main.flush())
          .catch(() => undefined);
      }
    } catch (e) {
      this.finished = false;
      this.finishing = false;
      this.fail(MigrationError.from(e, 'completion'));
      return;
    }
    this.pages.failAll(new MigrationError('protocol', 'completion', 'the migration completed'));
    const result = this.snapshot();
    this.emit('completed', result);
    this.resolveDone(result);
    await this.shutdown(false);
  }

  private fail(e: MigrationError): void {
    if (this.finished) return;
    this.finished = true;
    clearTimeout(this.idleTimer);
    clearTimeout(this.recoveryTimer);
    this.status = 'failed';
    this.endedAt = performance.now();
    this.pages.failAll(e);
    if (this.conn && this.rpOpen && !this.conn.main.isClosed) {
      // SHUT 1 tells a QEMU source that our side failed.
      this.conn.main.send([encodeReturnPathMessage({ type: 'shut', value: 1 })], 'urgent').catch(() => undefined);
    }
    if (this.listenerCount('failed') > 0) this.emit('failed', e);
    this.rejectDone(e);
    void this.shutdown(true);
  }

  private async shutdown(abort: boolean): Promise<void> {
    this.listener.close();
    if (!this.conn) return;
    if (abort) {
      setTimeout(() => this.conn?.destroy(), 50).unref();
      return;
    }
    // Let the source close first (it waits for SHUT), then make sure nothing stays open.
    await Promise.race([
      new Promise<void>((r) => (this.conn!.main.isClosed ? r() : this.conn!.main.once('close', () => r()))),
      new Promise<void>((r) => setTimeout(r, 3000).unref()),
    ]);
    this.conn.destroy();
  }

  /** Stops listening and tears everything down; a running migration fails as cancelled. */
  close(): void {
    if (!this.finished) this.fail(new MigrationError('cancelled', this.phase, 'the destination was closed'));
    else this.listener.close();
  }
}
