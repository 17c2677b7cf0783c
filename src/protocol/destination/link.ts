import { PreemptDecoder, type StreamDecoder } from '../../stream/decoder.js';
import { encodeReturnPathMessage } from '../../stream/return-path.js';
import type { ReturnPathMessage } from '../../stream/records.js';
import type { Channel } from '../../transport/channel.js';
import type { DestinationConnection } from '../../transport/connection.js';
import type { MigrationError } from '../errors.js';
import type { MultifdReception } from './multifd.js';

/** What a Link reports to its session. Never called once the link is dropped. */
export interface LinkEvents {
  /** Bytes of the main channel; a promise pauses reading until it settles (it must not reject). */
  main(link: Link, chunk: Buffer): void | Promise<void>;
  /** The main channel closed. */
  mainClosed(link: Link): void;
  /** The preempt channel qualified: false refuses it (it is destroyed). */
  preemptArrived(link: Link, ch: Channel): boolean;
  /** Bytes of the preempt channel (`first`: its first chunk); a promise pauses reading. */
  preempt(link: Link, chunk: Buffer, first: boolean): void | Promise<void>;
  /** The source ended the preempt channel (FIN). */
  preemptEnded(link: Link): void;
  /**
   * Every multifd channel is in (by id): make their receivers. Until then the
   * main channel is not read (QEMU starts only once all channels are connected).
   */
  multifdReady(link: Link, channels: readonly Channel[]): MultifdReception;
  /** Bytes of multifd channel `id`; a promise pauses reading until it settles (it must not reject). */
  multifd(link: Link, id: number, chunk: Buffer): void | Promise<void>;
  /** The source ended multifd channel `id` (FIN). */
  multifdEnded(link: Link, id: number): void;
  /** A channel failed, a return-path write failed, or the source went silent. */
  lost(link: Link, e: unknown): void;
}

/**
 * One connection of the source: its main channel with the stream decoder
 * and the return-path writer, its preempt channel (when it comes) with its
 * decoder, and the idle timer. A failure drops the whole Link — sockets,
 * decoders, timer — and a recovery makes a new one, so that nothing of a
 * dead connection can reach the session: its handlers are this object's,
 * and a dropped Link calls none.
 */
export class Link {
  private dropped = false;
  private idle: NodeJS.Timeout | undefined;
  /** The preempt channel's decoder, once it has qualified. */
  preemptDecoder: PreemptDecoder<true> | undefined;
  /** The source ended the preempt channel: no late page can come on it any more. */
  preemptEnded = false;
  /** The multifd channels' receivers (by id) and their barrier, once every channel is in. */
  multifd: MultifdReception | undefined;
  /** Resolves once every multifd channel is in (undefined without multifd, or once they are). */
  private bulkReady: Promise<void> | undefined;

  constructor(
    readonly conn: DestinationConnection,
    /** The main channel's decoder: a new stream, or the old stream continued after a recovery. */
    readonly decoder: StreamDecoder<true>,
    private readonly events: LinkEvents,
    private readonly opts: { idleTimeoutMs: number; idleError: () => MigrationError },
  ) {}

  get alive(): boolean {
    return !this.dropped;
  }

  /** Starts reading the main channel and waiting for the preempt channel. */
  start(): void {
    const main = this.conn.main;
    this.armIdle();
    main.on('error', (e) => {
      if (!this.dropped) this.events.lost(this, e);
    });
    main.on('close', () => {
      if (!this.dropped) this.events.mainClosed(this);
    });
    const mfd = this.conn.multifd;
    if (mfd) {
      this.bulkReady = mfd.whenComplete().then(
        (chs) => {
          this.bulkReady = undefined;
          if (!this.dropped) this.startMultifd(chs);
        },
        () => undefined, // the listener closed: the session is over
      );
    }
    main.read((chunk) => {
      if (this.dropped) return;
      this.idle?.refresh();
      const ready = this.bulkReady;
      if (ready) return ready.then(() => (this.dropped ? undefined : this.events.main(this, chunk)));
      return this.events.main(this, chunk);
    });
    this.conn.waitPreempt().then(
      (ch) => this.onPreempt(ch),
      () => undefined,
    );
  }

  private startMultifd(chs: readonly Channel[]): void {
    this.multifd = this.events.multifdReady(this, chs);
    chs.forEach((ch, id) => {
      ch.on('error', (e) => {
        if (!this.dropped) this.events.lost(this, e);
      });
      ch.on('end', () => {
        if (!this.dropped) this.events.multifdEnded(this, id);
      });
      ch.read((chunk) => {
        if (this.dropped) return;
        this.idle?.refresh();
        return this.events.multifd(this, id, chunk);
      });
    });
  }

  private onPreempt(ch: Channel): void {
    if (this.dropped || !this.events.preemptArrived(this, ch)) {
      ch.destroy();
      return;
    }
    // Runs on preempt too: a requested page often comes with its neighbours (QEMU sends a host page whole).
    this.preemptDecoder = new PreemptDecoder(this.decoder.ramBlocks, { pageRuns: true });
    ch.on('error', (e) => {
      if (!this.dropped) this.events.lost(this, e);
    });
    ch.on('end', () => {
      if (this.dropped) return;
      this.preemptEnded = true;
      this.events.preemptEnded(this);
    });
    let first = true;
    ch.read((chunk) => {
      if (this.dropped) return;
      this.idle?.refresh();
      const wasFirst = first && chunk.length > 0;
      if (wasFirst) first = false;
      return this.events.preempt(this, chunk, wasFirst);
    });
  }

  /**
   * Silence from the source. Before the VM runs here it ends the migration;
   * once it does, silence is a network failure like a reset (a pulled cable,
   * a frozen middlebox send neither FIN nor RST): the session pauses.
   */
  private armIdle(): void {
    const ms = this.opts.idleTimeoutMs;
    if (ms <= 0) return;
    this.idle = setTimeout(() => {
      if (!this.dropped) this.events.lost(this, this.opts.idleError());
    }, ms);
  }

  /** The migration is over on this link: silence no longer matters. */
  stopIdle(): void {
    clearTimeout(this.idle);
    this.idle = undefined;
  }

  /** Writes a return-path message (urgent); a failed write is a lost link. */
  send(m: ReturnPathMessage): void {
    this.conn.main.send([encodeReturnPathMessage(m)], 'urgent').catch((e: unknown) => {
      if (!this.dropped) this.events.lost(this, e);
    });
  }

  /** SHUT `value` and wait until it has left (never rejects: the source may be gone). */
  async shut(value: number): Promise<void> {
    const main = this.conn.main;
    if (main.isClosed) return;
    await main
      .send([encodeReturnPathMessage({ type: 'shut', value })], 'urgent')
      .then(() => (value === 0 ? main.flush() : undefined))
      .catch(() => undefined);
  }

  /** The connection failed: everything of it goes, and none of its handlers runs again. */
  drop(): void {
    this.dropped = true;
    this.stopIdle();
    this.preemptDecoder = undefined;
    this.conn.destroy();
  }

  /**
   * The migration ended on this link: let the source close first (it waits
   * for SHUT; after SHUT 1 give it a moment), then destroy. Nothing of ours may
   * keep the process alive meanwhile: the sockets and timers are unreferenced.
   */
  async release(abort: boolean): Promise<void> {
    this.stopIdle();
    const { main, preempt } = this.conn;
    main.socket.unref();
    preempt?.socket.unref();
    for (const c of this.conn.multifd?.list() ?? []) c.socket.unref();
    if (abort) {
      await new Promise<void>((r) => setTimeout(r, 50).unref());
    } else {
      await Promise.race([
        new Promise<void>((r) => (main.isClosed ? r() : main.once('close', () => r()))),
        new Promise<void>((r) => setTimeout(r, 3000).unref()),
      ]);
    }
    this.conn.destroy();
  }
}
