/**
 * A multifd channel of a DestinationSession in its worker: the same
 * MultifdChannelReceiver as the single-thread path, landing by runs straight
 * into the shared guest memory and received set — or, for a sink of files,
 * through this worker's own PageFileWriter into the block files — and the
 * SYNC barrier met through shared words (wire.ts `Sync`): no message per
 * packet or page.
 */
import * as fs from 'node:fs';
import { TARGET_PAGE_SIZE } from '../../../stream/constants.js';
import { PageBitmap } from '../../../stream/bitmap.js';
import type { Channel } from '../../../transport/channel.js';
import { TransportError } from '../../../transport/errors.js';
import { MigrationError } from '../../errors.js';
import { asBuffer } from '../../memory.js';
import { PageFileWriter, type WriterBlock } from '../../page-file-writer.js';
import { MultifdChannelReceiver } from '../multifd.js';
import { zeroWritten } from './worker-landing.js';
import { MfdCount, Sync, endedWord, errorToData, listenDrainedWord, syncedWord, type FromWorker, type SharedBlock, type ToWorker } from './wire.js';

const PAGE = TARGET_PAGE_SIZE;

/** Atomics.waitAsync (ES2024, not in this project's lib). */
const waitAsync = (Atomics as unknown as {
  waitAsync(a: Int32Array, index: number, value: number): { async: false; value: string } | { async: true; value: Promise<string> };
}).waitAsync;

/** Resolves once `a[index]` is no longer `value`. */
export async function whenChanged(a: Int32Array, index: number, value: number): Promise<void> {
  while (Atomics.load(a, index) === value) {
    const w = waitAsync(a, index, value);
    if (w.async) await w.value;
  }
}

interface Target {
  /** Shared guest memory; empty for a sink of files (then `file`). */
  readonly memory: Buffer;
  /** A sink of files: where this worker's writer puts the block's pages. */
  readonly file: WriterBlock | undefined;
  readonly received: PageBitmap;
  readonly written: PageBitmap;
  readonly pages: number;
}

export class MultifdServe {
  private readonly rx: MultifdChannelReceiver;
  private readonly byName = new Map<string, Target>();
  private readonly byIndex: Target[] = [];
  private readonly sync: Int32Array;
  private readonly landed: Int32Array;
  private readonly counts: Float64Array;
  private landedSinceWake = false;
  private failed = false;
  private readonly name: string;
  /** A sink of files: this worker's positioned writes (PageFileWriter: staging, bounded, in order per file). */
  private writer: PageFileWriter | undefined;
  /** A sink of files: POSTCOPY_LISTEN seen and this worker's writes drained for it; a page now is refused. */
  private drainedForListen = false;

  constructor(
    private readonly ch: Channel,
    m: Extract<ToWorker, { t: 'serve-multifd' }>,
    private readonly post: (m: FromWorker) => void,
    /** The bytes the listener's peek read (its judge saw them). */
    first: Buffer,
  ) {
    this.name = `multifd-${m.id}`;
    this.sync = new Int32Array(m.sync);
    this.landed = new Int32Array(m.landed);
    this.counts = new Float64Array(m.counts);
    for (const b of m.blocks) this.addBlock(b);
    this.rx = new MultifdChannelReceiver(
      {
        channels: m.channels,
        ...(m.uuid ? { uuid: m.uuid } : {}),
        target: {
          sink: {
            writePage: (block, offset, data) => this.write(block, offset, 1, data, 0, PAGE),
            zeroPage: (block, offset) => this.zero(block, offset, 1),
            writePages: (block, offset, count, data, start, stride) => this.write(block, offset, count, data, start, stride),
            zeroPages: (block, offset, count) => this.zero(block, offset, count),
          },
          received: (index, first, count) => {
            this.byIndex[index]?.received.setRange(first, count);
            this.landedSinceWake = true;
          },
        },
        onSync: () => this.arrive(m.id),
        beforePages: () => {
          if (Atomics.load(this.sync, Sync.LISTENING) !== 0) throw new MigrationError('protocol', 'postcopy', 'a multifd packet with pages after POSTCOPY_LISTEN (multifd is idle in postcopy)');
        },
        // A sink of files: the socket waits while the writes are above the writer's bound (a failed write rejects: the channel fails, storage).
        backpressure: () => this.writer?.backpressure(),
      },
      m.id,
    );
    this.rx.setBlocks(m.blocks.map((b) => ({ idstr: b.idstr, length: b.length, index: b.index })));
    if (this.writer) void this.drainAtListen(m.id);
    // The channel's error keeps its code (reset, tls…); its message names the channel.
    ch.on('error', (e) => this.lost(TransportError.is(e) ? new TransportError(e.code, `${this.name}: ${e.message}`, { channel: `multifd-${m.id}`, cause: e }) : new MigrationError('peer-disconnected', 'precopy', `${this.name}: ${(e as Error).message}`, { cause: e })));
    ch.on('end', () => this.ended(m.id));
    // A FIN while held at a SYNC may close the socket without our 'end' (it ended while paused): the same.
    ch.on('close', () => {
      if (!this.sawEnd) this.ended(m.id);
      post({ t: 'closed', recs: [] });
    });
    // The bytes the candidate peeked go first; the reader is attached only once they are landed and
    // whatever SYNC they hold the receiver at is released. Not before: a 'data' listener makes the
    // socket flow on its own (Node resumes it on the tick after the candidate's 'readable' listener
    // went, pause() or not), and chunks pushed while the receiver waits at a SYNC would land this
    // channel's next pass before the barrier — over another channel's copy of the same pages.
    // A source may have ended the channel already, while it waited for the others and the block list.
    const gone = ch.socket.readableEnded || ch.socket.destroyed;
    const read = (): void => {
      if (gone) {
        if (!this.sawEnd) this.ended(m.id);
      } else if (!ch.socket.destroyed) ch.read((chunk) => this.chunk(chunk));
    };
    const held = first.length > 0 ? this.chunk(first) : undefined;
    if (held) void held.then(read);
    else read();
  }

  private addBlock(b: SharedBlock): void {
    const pages = Math.ceil(b.length / PAGE);
    if (!b.memory && !b.file) throw new RangeError(`RAM block "${b.idstr}" has neither shared memory nor a file in this thread`);
    const written = PageBitmap.attach(pages, b.written);
    if (b.file) this.writer ??= new PageFileWriter((fd, buf, o, l, p, cb) => fs.write(fd, buf, o, l, p, cb));
    const t: Target = {
      memory: b.memory ? Buffer.from(b.memory, 0, b.length) : Buffer.alloc(0),
      file: b.file ? this.writer!.addBlock(b.file, written) : undefined,
      received: PageBitmap.attach(pages, b.received),
      written,
      pages,
    };
    this.byName.set(b.idstr, t);
    this.byIndex[b.index] = t;
  }

  /** A sink of files: every page this worker took written to its file (answer to 'drain'); the writer's failure, if a write failed. */
  async drain(): Promise<Error | undefined> {
    const w = this.writer;
    if (!w) return undefined;
    await w.drained();
    return w.failed;
  }

  private target(block: string): Target {
    const t = this.byName.get(block);
    if (!t) throw new RangeError(`RAM block "${block}" has no memory in this thread`);
    // The rest of a packet whose first pages came before LISTEN (beforePages let it in): its writes were drained for LISTEN.
    if (this.drainedForListen) throw new MigrationError('protocol', 'postcopy', 'a multifd packet with pages after POSTCOPY_LISTEN (multifd is idle in postcopy)');
    return t;
  }

  /** A run of normal pages (offsets checked by the decoder against the block). */
  private write(block: string, offset: number, n: number, data: Uint8Array, start: number, stride: number): void {
    const t = this.target(block);
    const src = asBuffer(data);
    // The writer copies the pages into its staging (the chunk is free at once) and sets them written.
    if (t.file) this.writer!.writePages(t.file, offset, n, src, start, stride);
    else {
      if (stride === PAGE) src.copy(t.memory, offset, start, start + n * PAGE);
      else for (let i = 0, s = start; i < n; i++, s += stride) src.copy(t.memory, offset + i * PAGE, s, s + PAGE);
      t.written.setRange(offset / PAGE, n);
    }
  }

  private zero(block: string, offset: number, n: number): void {
    const t = this.target(block);
    if (t.file) this.writer!.zeroPages(t.file, offset, n);
    else zeroWritten(t, offset / PAGE, n);
  }

  private chunk(chunk: Buffer): void | Promise<void> {
    if (this.failed) return;
    let held: Promise<void> | undefined;
    try {
      held = this.rx.push(chunk, () => 'precopy');
    } catch (e) {
      this.fail(e);
      return;
    }
    this.publish();
    return held?.then(
      () => this.publish(),
      (e: unknown) => this.fail(e),
    );
  }

  /** The counters and the "pages landed" word, once per chunk (and at a SYNC). */
  private publish(): void {
    const c = this.counts;
    const r = this.rx.counters;
    c[MfdCount.bytes] = r.bytes;
    c[MfdCount.packets] = r.packets;
    c[MfdCount.syncs] = r.syncs;
    c[MfdCount.normal] = r.normal;
    c[MfdCount.zero] = r.zero;
    c[MfdCount.runs] = r.runs;
    c[MfdCount.runPages] = r.runPages;
    if (!this.landedSinceWake) return;
    this.landedSinceWake = false;
    Atomics.add(this.landed, 0, 1);
    Atomics.notify(this.landed, 0);
  }

  /**
   * Its SYNC packet: say so to the main worker, then wait for the MULTIFD_FLUSH that releases it.
   *
   * A sink of files: only once every write this worker took is done. The same
   * page may come in pass N on this channel and in pass N+1 on another; the
   * barrier orders the two only if this channel's copy is in the file when it
   * arrives. Shared memory has it at once (a copy); a positioned write is
   * asynchronous, and staged or in flight it could land after the other
   * worker's newer copy (the writers are per thread: nothing orders one's
   * writes against another's). So the writer is drained first, and a failed
   * write fails the channel here (storage) rather than arriving.
   */
  private arrive(id: number): Promise<void> {
    this.publish();
    const w = this.writer;
    if (!w) return this.signalArrival(id);
    this.drainingForSync = true;
    return w.drained().then(() => {
      this.drainingForSync = false;
      try {
        w.check();
        return this.signalArrival(id);
      } finally {
        // The source's FIN right after this SYNC (QEMU closes its channels once done) came while the writes drained:
        // said only now, after the arrival, or the main worker would take the channel for one that ended before it.
        if (this.endDeferred) {
          this.endDeferred = false;
          this.markEnded(id);
        }
      }
    });
  }

  /** A sink of files: at a SYNC, waiting for this worker's writes before it arrives (see arrive). */
  private drainingForSync = false;
  /** The channel ended meanwhile: its ended word is set once the arrival is. */
  private endDeferred = false;

  private signalArrival(id: number): Promise<void> {
    const gen = Atomics.load(this.sync, Sync.RELEASE);
    Atomics.store(this.sync, syncedWord(id), this.rx.counters.syncs);
    Atomics.add(this.sync, Sync.WAKE, 1);
    Atomics.notify(this.sync, Sync.WAKE);
    return whenChanged(this.sync, Sync.RELEASE, gen);
  }

  /** FIN: between packets it is a source done with its channels; inside one, a cut. */
  private sawEnd = false;

  private ended(id: number): void {
    this.sawEnd = true;
    if (this.drainingForSync) this.endDeferred = true;
    else this.markEnded(id);
    if (this.failed) return;
    try {
      this.rx.end('precopy');
    } catch (e) {
      const cut = e instanceof MigrationError && e.code === 'truncated';
      this.lost(cut ? new MigrationError('peer-disconnected', 'precopy', `the source closed ${this.name} inside a packet`, { cause: e }) : e);
    }
  }

  private markEnded(id: number): void {
    Atomics.store(this.sync, endedWord(id), 1);
    Atomics.add(this.sync, Sync.WAKE, 1);
    Atomics.notify(this.sync, Sync.WAKE);
  }

  private lost(e: unknown): void {
    if (this.failed) return;
    this.failed = true;
    Atomics.store(this.sync, endedWord(this.rx.id ?? 0), 1);
    Atomics.add(this.sync, Sync.WAKE, 1);
    Atomics.notify(this.sync, Sync.WAKE);
    this.post({ t: 'lost', error: errorToData(e) });
  }

  private fail(e: unknown): void {
    if (this.failed) return;
    this.failed = true;
    this.publish();
    // A failed write surfaces wrapped (the receiver names its channel) or as a later error: the StorageError, naming the file, is the cause.
    this.post({ t: 'decode-error', error: errorToData(this.writer?.failed ?? e) });
  }

  /**
   * A sink of files: once the main worker set LISTENING, this worker's writes
   * are drained and it says so (listenDrainedWord). The source's last barrier
   * before LISTEN (QEMU 10.1's save_postcopy_prepare) already drained them at
   * its SYNC; this covers pages after it. After LISTEN main and preempt write
   * pages of the same files, and a multifd write of ours still in flight must
   * not land after their newer copy.
   */
  private async drainAtListen(id: number): Promise<void> {
    await whenChanged(this.sync, Sync.LISTENING, 0);
    this.drainedForListen = true;
    await this.writer!.drained();
    Atomics.store(this.sync, listenDrainedWord(id), 1);
    Atomics.add(this.sync, Sync.WAKE, 1);
    Atomics.notify(this.sync, Sync.WAKE);
  }
}

/** The main worker at POSTCOPY_LISTEN with a sink of files: settles once every multifd worker's writes are drained (drainAtListen). */
export async function multifdDrainedForListen(sync: Int32Array, channels: number): Promise<void> {
  for (;;) {
    const wake = Atomics.load(sync, Sync.WAKE);
    let all = true;
    for (let i = 0; i < channels && all; i++) all = Atomics.load(sync, listenDrainedWord(i)) !== 0;
    if (all) return;
    await whenChanged(sync, Sync.WAKE, wake);
  }
}

/** The main worker at a MULTIFD_FLUSH: wait until every channel has read its SYNC (or fail naming one that ended first), then release them. */
export function multifdFlush(sync: Int32Array, channels: number): Promise<void> | undefined {
  const gen = Atomics.load(sync, Sync.RELEASE);
  const check = (): boolean => {
    for (let i = 0; i < channels; i++) {
      if (Atomics.load(sync, syncedWord(i)) > gen) continue;
      if (Atomics.load(sync, endedWord(i)) !== 0) throw new MigrationError('peer-disconnected', 'precopy', `the source closed multifd-${i} before the MULTIFD_FLUSH barrier it is needed at`);
      return false;
    }
    Atomics.store(sync, Sync.RELEASE, gen + 1);
    Atomics.notify(sync, Sync.RELEASE);
    return true;
  };
  if (check()) return undefined;
  return (async () => {
    for (;;) {
      const wake = Atomics.load(sync, Sync.WAKE);
      if (check()) return;
      await whenChanged(sync, Sync.WAKE, wake);
    }
  })();
}

