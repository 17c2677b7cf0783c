/**
 * A channel of a DestinationSession in its own thread (worker entry). It is
 * given an accepted socket that nothing has read yet, runs the TLS handshake
 * and peeks at the first bytes for the session's admission (which judges
 * them); once the session says what it is, it serves it: decodes the stream,
 * lands pages straight into the shared guest memory and received set, sends
 * every other record to the session in order (one message per chunk at
 * most), and writes the return path (page requests from a shared ring).
 */
import type net from 'node:net';
import type tls from 'node:tls';
import { parentPort, workerData } from 'node:worker_threads';
import { RecordType } from '../../../stream/constants.js';
import { PreemptDecoder, StreamDecoder } from '../../../stream/decoder.js';
import { MULTIFD_INIT_BYTES } from '../../../stream/multifd.js';
import { encodeReturnPathMessage } from '../../../stream/return-path.js';
import type { ReturnPathMessage } from '../../../stream/records.js';
import { Channel } from '../../../transport/channel.js';
import { tuneChannel } from '../../../transport/sockets.js';
import { checkAllowedPeer, secureAccept, serverTlsOptions } from '../../../transport/tls.js';
import { AtomicRing } from '../../../transport/worker/ring.js';
import { WorkerLanding } from './worker-landing.js';
import { MultifdServe, multifdDrainedForListen, multifdFlush } from './multifd-worker.js';
import { MigrationError } from '../../errors.js';
import { REQUEST_WORDS, Sync, errorToData, type ChannelWorkerData, type ControlRecord, type FromWorker, type SharedBlock, type ToWorker } from './wire.js';

const port = parentPort!;
const data = workerData as ChannelWorkerData;
const post = (m: FromWorker): void => port.postMessage(m);
const noop = (): void => undefined;
/** The first bytes the session's judge sees: a multifd init message is the longest thing it reads. */
const JUDGED_BYTES = MULTIFD_INIT_BYTES;

let raw: net.Socket | undefined;
let socket: net.Socket | tls.TLSSocket | undefined;
let seen: Buffer = Buffer.alloc(0);
let unwatch: (() => void) | undefined;
let serving: Main | Preempt | MultifdServe | undefined;
/**
 * What the socket did while it waited for the session's verdict and, once
 * qualified, to be served (a multifd channel waits for every channel and the
 * block list; the session no longer listens for 'closed-early' then). Those
 * events fired before the serving Channel listened, so take() replays them:
 * without that, a reset in the wait left the channel waiting for a close that
 * had already happened, and the session hung until its idle timeout.
 */
const early: { error?: Error; ended: boolean; closed: boolean } = { ended: false, closed: false };
const rememberError = (e: Error): void => {
  early.error ??= e;
};
/** The role offered with the socket (a spare worker is started before any connection comes). */
let role: 'main' | 'preempt' | 'multifd' = 'main';

port.on('message', (m: ToWorker) => {
  switch (m.t) {
    case 'socket':
      role = m.role;
      void begin(m.socket as net.Socket);
      return;
    case 'serve-main':
      serving = new Main(take(), m);
      return;
    case 'serve-preempt':
      serving = new Preempt(take(), m);
      return;
    case 'drain':
      if (serving instanceof MultifdServe) void serving.drain().then((e) => post({ t: 'drained', ...(e ? { error: errorToData(e) } : {}) }));
      else if (serving) void drain(serving.landing);
      else post({ t: 'drained' });
      return;
    case 'serve-multifd': {
      // The bytes peeked go to the receiver first, by hand (not unshifted: see MultifdServe).
      const first = seen;
      seen = Buffer.alloc(0);
      serving = new MultifdServe(channelOf(take(), 'multifd', m.id)[0], m, post, first);
      return;
    }
    default:
      if (serving instanceof Main) serving.onMessage(m);
  }
});

/** A sink of files: every page this worker took written (the session then fsyncs), and whether a write failed. */
async function drain(landing: WorkerLanding): Promise<void> {
  const w = landing.writer;
  if (w) await w.drained();
  post({ t: 'drained', ...(w?.failed ? { error: errorToData(w.failed) } : {}) });
}

/**
 * What a chunk's consumer returns for a sink of files: the writer's
 * backpressure (the channel stops reading until the writes are under the
 * bound); a failed write fails the channel as a storage error, not as a
 * network one (it would pause postcopy).
 */
function writerPressure(landing: WorkerLanding, fail: (e: unknown) => void): Promise<void> | undefined {
  const bp = landing.writer?.backpressure();
  return bp?.then(noop, fail);
}

/** The candidate: handshake (TLS), then every byte seen goes to the session's judge until it decides. */
async function begin(s: net.Socket): Promise<void> {
  raw = s;
  s.on('error', rememberError);
  if (data.tls) {
    try {
      const secure = await secureAccept(s, serverTlsOptions(data.tls.material, data.tls.settings), { channel: role, timeoutMs: 0 });
      const notAllowed = checkAllowedPeer(secure, data.tls.allowedPeers, role);
      if (notAllowed) {
        secure.destroy();
        post({ t: 'tls-failed', error: errorToData(notAllowed), bytesRead: s.bytesRead });
        return;
      }
      socket = secure;
      secure.on('error', rememberError);
      post({ t: 'secured' });
    } catch (e) {
      post({ t: 'tls-failed', error: errorToData(e), bytesRead: s.bytesRead });
      return;
    }
  } else {
    socket = s;
  }
  const sock = socket;
  const onEnd = (): void => {
    early.ended = true;
  };
  const onClose = (): void => {
    early.closed = true;
    post({ t: 'closed-early' });
  };
  // Read only what the judge looks at: the rest waits in the socket (backpressure to the source) while the
  // channel waits to be served — a multifd channel, until every channel and the block list are in.
  const onReadable = (): void => {
    let more = false;
    while (seen.length < JUDGED_BYTES) {
      const chunk = sock.read() as Buffer | null;
      if (chunk === null) break;
      seen = seen.length === 0 ? chunk : Buffer.concat([seen, chunk]);
      more = true;
    }
    if (more) post({ t: 'seen', bytes: new Uint8Array(seen.subarray(0, JUDGED_BYTES)) });
  };
  sock.on('readable', onReadable);
  sock.once('end', onEnd);
  sock.once('close', onClose);
  unwatch = () => {
    sock.off('readable', onReadable);
    sock.off('end', onEnd);
    sock.off('close', onClose);
  };
}

/**
 * The session's verdict: this socket is a channel. The bytes peeked go back
 * in front. Its error, end and close, if they came already, are replayed
 * once the caller's Channel listens (the serving classes attach their
 * listeners in their constructors); after 'end' a stream cannot take bytes
 * back (unshift is an error then), so the peeked ones are replayed as data.
 */
function take(): net.Socket | tls.TLSSocket {
  const s = socket!;
  unwatch?.();
  s.off('error', rememberError);
  raw?.off('error', rememberError);
  const peeked = seen;
  seen = Buffer.alloc(0);
  if (early.ended || early.closed || early.error) process.nextTick(replayEarly, s, peeked);
  else if (peeked.length > 0) s.unshift(peeked);
  return s;
}

function replayEarly(s: net.Socket | tls.TLSSocket, peeked: Buffer): void {
  if (peeked.length > 0 && !early.error) s.emit('data', peeked);
  if (early.error) s.emit('error', early.error);
  if (early.ended) s.emit('end');
  if (early.closed) s.emit('close', early.error !== undefined);
}

function channelOf(s: net.Socket | tls.TLSSocket, role: 'main' | 'preempt' | 'multifd', id?: number): [Channel, () => void] {
  const opts = data[role];
  const tuning = tuneChannel(s, role, 'destination', data.kind, { [role]: { tuning: opts.tuning } });
  const ch = new Channel(s, role, tuning, opts.limits, id);
  const report = (): void => post({ t: 'stats', stats: ch.stats, cpuSeconds: threadCpuSeconds() });
  const stats = setInterval(report, 250);
  stats.unref();
  ch.on('close', () => {
    clearInterval(stats);
    report();
  });
  report();
  return [ch, report];
}

/** CPU time of this thread (Node ≥ 23.9 has process.threadCpuUsage; this path needs Node 26 anyway). */
function threadCpuSeconds(): number {
  const u = (process as unknown as { threadCpuUsage?: () => { user: number; system: number } }).threadCpuUsage?.();
  return u ? (u.user + u.system) / 1e6 : 0;
}

function blockMap(blocks: readonly SharedBlock[]): Map<string, { idstr: string; length: number; index: number }> {
  return new Map(blocks.map((b) => [b.idstr, { idstr: b.idstr, length: b.length, index: b.index }]));
}

/** Wakes the session's waiting requests once per chunk that landed pages. */
function wake(landing: WorkerLanding, landed: Int32Array): void {
  if (!landing.landedSinceWake) return;
  landing.landedSinceWake = false;
  Atomics.add(landed, 0, 1);
  Atomics.notify(landed, 0);
}

/** The main channel: the stream and the return path. */
class Main {
  private readonly ch: Channel;
  private readonly decoder: StreamDecoder<true>;
  readonly landing: WorkerLanding;
  private readonly landed: Int32Array;
  private readonly ring: AtomicRing;
  private failed = false;
  private blocksArrived: ((b: SharedBlock[]) => void) | undefined;
  /** The section open, for 'pass' counts: RAM sections end an iteration. */
  private section: string | undefined;
  /** Ring entries written, messages written, and messages waiting for earlier ring entries. */
  private messagesWritten = 0;
  private held: Float64Array | undefined;
  private readonly entry = new Float64Array(REQUEST_WORDS);
  private readonly names: string[] = [];
  /** The multifd barrier's words (a multifd destination). */
  private readonly multifd: { channels: number; sync: Int32Array } | undefined;

  /** Reports the channel's stats now (they also go every 250 ms). */
  private readonly report: () => void;

  constructor(s: net.Socket | tls.TLSSocket, m: Extract<ToWorker, { t: 'serve-main' }>) {
    [this.ch, this.report] = channelOf(s, 'main');
    this.decoder = m.resume ? new StreamDecoder({ channel: 'resume', resumeFrom: m.resume, pageRuns: true }) : new StreamDecoder({ pageRuns: true });
    this.landing = new WorkerLanding(new Float64Array(m.counts), 'main');
    this.landing.listening = this.decoder.postcopy;
    if (m.blocks) this.setBlocks(m.blocks);
    this.landed = new Int32Array(m.landed);
    this.ring = AtomicRing.attach(m.requests);
    this.multifd = m.multifd ? { channels: m.multifd.channels, sync: new Int32Array(m.multifd.sync) } : undefined;
    this.ch.on('error', (e) => post({ t: 'lost', error: errorToData(e) }));
    this.ch.on('close', () => this.closed());
    this.ch.read((chunk) => this.chunk(chunk));
    void this.serveRequests();
  }

  private setBlocks(blocks: SharedBlock[]): void {
    this.landing.setBlocks(blocks);
    for (const b of blocks) this.names[b.index] = b.idstr;
  }

  onMessage(m: ToWorker): void {
    switch (m.t) {
      case 'blocks':
        this.setBlocks(m.blocks);
        this.blocksArrived?.(m.blocks);
        return;
      case 'rp':
        this.drainRequests(m.seq);
        this.write(m.m);
        this.messagesWritten++;
        this.drainRequests(Infinity);
        this.unblock?.();
        this.unblock = undefined;
        return;
      case 'shut':
        void this.shut(m.value);
        return;
      case 'export':
        this.failed = true; // the link is dropped: nothing more is read
        post({ t: 'state', state: this.decoder.resumeState() });
        return;
      default:
        return;
    }
  }

  private write(m: ReturnPathMessage): void {
    this.ch.send([encodeReturnPathMessage(m)], 'urgent').catch((e: unknown) => post({ t: 'lost', error: errorToData(e) }));
  }

  /** Set while a ring entry waits for a message posted before it (it must be written after it). */
  private unblock: (() => void) | undefined;

  private async serveRequests(): Promise<void> {
    while (!this.ring.closed && !this.failed) {
      this.drainRequests(Infinity);
      // Blocked on a message still on its way: wait for it, not for the ring (which may hold more).
      if (this.held) await new Promise<void>((r) => (this.unblock = r));
      else await this.ring.wait();
    }
  }

  /** Writes ring entries (up to `upTo` of them in all) whose earlier messages are written. */
  private popped = 0;
  private drainRequests(upTo: number): void {
    for (;;) {
      if (this.popped >= upTo) return;
      const e = this.held ?? (this.ring.pop(this.entry) ? this.entry : undefined);
      if (!e) return;
      if (e[4]! > this.messagesWritten) {
        this.held = e === this.entry ? new Float64Array(e) : e;
        return;
      }
      this.held = undefined;
      this.popped++;
      const block = this.names[e[1]!] ?? '';
      this.write(e[0] === 1 ? { type: 'req-pages-id', block, offset: e[2]!, length: e[3]! } : { type: 'req-pages', offset: e[2]!, length: e[3]! });
    }
  }

  private chunk(chunk: Buffer): void | Promise<void> {
    if (this.failed) return;
    this.landing.counts[0]! += chunk.length;
    let recs;
    try {
      recs = this.decoder.push(chunk);
    } catch (e) {
      this.fail(e);
      return;
    }
    const r = this.records(recs, 0, []);
    if (r) return r.then(() => writerPressure(this.landing, (e) => this.fail(e)));
    return writerPressure(this.landing, (e) => this.fail(e));
  }

  /** Lands the pages and sends the rest, in order; waits for the blocks' memory after a block list. */
  private records(recs: ReturnType<StreamDecoder<true>['push']>, from: number, out: ControlRecord[], pages: number[] = []): void | Promise<void> {
    try {
      for (let i = from; i < recs.length; i++) {
        const r = recs[i]!;
        if (this.landing.land(r, (b) => this.decoder.ramBlocks.get(b))) continue;
        const c = r as ControlRecord;
        if (c.type === 'ram-multifd-flush') {
          // QEMU's multifd_recv_sync_main: main reads on once every multifd channel has read its SYNC.
          const wait = this.flush();
          if (!wait) continue;
          wake(this.landing, this.landed);
          if (out.length > 0) post({ t: 'records', recs: out.splice(0), iterationPages: pages.splice(0) });
          return wait.then(
            () => (this.failed ? undefined : this.records(recs, i + 1, out, pages)),
            (e: unknown) => this.fail(e),
          );
        }
        if (c.type === 'ram-blocks') {
          if (out.length > 0) post({ t: 'records', recs: out.splice(0), iterationPages: pages.splice(0) });
          post({ t: 'ram-blocks', rec: c });
          return new Promise<SharedBlock[]>((resolve) => (this.blocksArrived = resolve)).then(() => {
            this.blocksArrived = undefined;
            return this.records(recs, i + 1, out, pages);
          });
        }
        this.control(c, pages);
        out.push(c);
        // A sink of files: every precopy page written before the session hears of LISTEN (after it, the preempt
        // worker may write a newer copy of a page, and a write of ours still in flight must not land after it) —
        // ours, and every multifd worker's (each drains its writer once it sees LISTENING).
        if (c.type === 'command' && c.command.cmd === 'postcopy-listen' && this.landing.writer) {
          post({ t: 'records', recs: out.splice(0), iterationPages: pages.splice(0) });
          const multifd = this.multifd ? multifdDrainedForListen(this.multifd.sync, this.multifd.channels) : undefined;
          return Promise.all([this.landing.writer.drained(), multifd]).then(() => {
            if (this.landing.writer?.failed) return this.fail(this.landing.writer.failed);
            return this.records(recs, i + 1, out, pages);
          });
        }
      }
    } catch (e) {
      this.fail(e);
      return;
    }
    wake(this.landing, this.landed);
    if (out.length > 0) post({ t: 'records', recs: out, iterationPages: pages });
    if (this.decoder.error) this.fail(this.decoder.error);
  }

  private flush(): Promise<void> | undefined {
    const mfd = this.multifd;
    if (!mfd) throw new MigrationError('protocol', 'precopy', 'the source uses multifd (MULTIFD_FLUSH on the main channel), but this destination was not given multifd: { channels }');
    // A sink of files: main's own writes (zero pages, with QEMU's legacy zero-page detection) done before the
    // barrier releases the channels, whose next pass may write the same pages (see MultifdServe.arrive).
    const w = this.landing.writer;
    if (w && w.stats().bufferedBytes > 0) {
      return w.drained().then(() => {
        w.check();
        return multifdFlush(mfd.sync, mfd.channels);
      });
    }
    return multifdFlush(mfd.sync, mfd.channels);
  }

  /** What a record means for the pages here, in stream order. */
  private control(c: ControlRecord, pages: number[]): void {
    switch (c.type) {
      case 'section':
        this.section = c.idstr;
        return;
      case 'footer':
        pages.push(this.landing.iterationPages);
        if (this.section === 'ram') this.landing.iterationPages = 0;
        this.section = undefined;
        return;
      case 'command':
        if (c.command.cmd === 'postcopy-listen') {
          this.landing.listening = true;
          if (this.multifd) {
            Atomics.store(this.multifd.sync, Sync.LISTENING, 1);
            Atomics.notify(this.multifd.sync, Sync.LISTENING); // a sink of files: the multifd workers drain their writers for it
          }
        }
        if (c.command.cmd === 'postcopy-ram-discard') {
          const index = this.decoder.ramBlocks.get(c.command.block)?.index;
          for (const range of c.command.ranges) this.landing.discard(index, range.start, range.length);
        }
        return;
      default:
        return;
    }
  }

  private fail(e: unknown): void {
    if (this.failed) return;
    this.failed = true;
    wake(this.landing, this.landed);
    post({ t: 'decode-error', error: errorToData(e) });
  }

  private closed(): void {
    if (this.failed) {
      post({ t: 'closed', recs: [] });
      return;
    }
    try {
      const recs = this.decoder.end() as ControlRecord[];
      post({ t: 'closed', recs: recs.filter((r) => !this.landing.land(r, (b) => this.decoder.ramBlocks.get(b))) });
    } catch (e) {
      post({ t: 'closed', recs: [], error: errorToData(e) });
    }
  }

  private async shut(value: number): Promise<void> {
    const main = this.ch;
    if (!main.isClosed) {
      await main
        .send([encodeReturnPathMessage({ type: 'shut', value })], 'urgent')
        .then(() => (value === 0 ? main.flush() : undefined))
        .catch(() => undefined);
    }
    this.report();
    post({ t: 'shut-done' });
  }
}

/** The preempt channel: urgent pages only. */
class Preempt {
  private readonly ch: Channel;
  private readonly decoder: PreemptDecoder<true>;
  readonly landing: WorkerLanding;
  private readonly landed: Int32Array;
  private failed = false;
  private first = true;

  constructor(s: net.Socket | tls.TLSSocket, m: Extract<ToWorker, { t: 'serve-preempt' }>) {
    [this.ch] = channelOf(s, 'preempt');
    const blocks = blockMap(m.blocks);
    this.decoder = new PreemptDecoder(blocks, { pageRuns: true });
    this.landing = new WorkerLanding(new Float64Array(m.counts), 'preempt');
    this.landing.listening = true;
    this.landing.setBlocks(m.blocks);
    this.landed = new Int32Array(m.landed);
    this.ch.on('error', (e) => post({ t: 'lost', error: errorToData(e) }));
    this.ch.on('end', () => {
      let error;
      try {
        if (!this.failed) this.decoder.end();
      } catch (e) {
        error = errorToData(e);
      }
      post({ t: 'ended', ...(error ? { error } : {}) });
    });
    this.ch.on('close', () => post({ t: 'closed', recs: [] }));
    this.ch.read((chunk) => this.chunk(chunk));
  }

  private chunk(chunk: Buffer): void | Promise<void> {
    if (this.failed) return;
    if (this.first && chunk.length > 0) {
      this.first = false;
      // A recovery main channel in the preempt slot (see DestinationSession.recoveryArrivedEarly).
      if (chunk[0] === RecordType.COMMAND) post({ t: 'first-command' });
    }
    this.landing.counts[0]! += chunk.length;
    try {
      for (const r of this.decoder.push(chunk)) this.landing.land(r, () => undefined);
      if (this.decoder.error) throw this.decoder.error;
    } catch (e) {
      this.fail(e);
    }
    wake(this.landing, this.landed);
    return writerPressure(this.landing, (e) => this.fail(e));
  }

  private fail(e: unknown): void {
    if (this.failed) return;
    this.failed = true;
    post({ t: 'decode-error', error: errorToData(e) });
  }
}
