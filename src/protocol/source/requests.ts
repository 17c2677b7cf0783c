import { performance } from 'node:perf_hooks';
import { TARGET_PAGE_SIZE } from '../../stream/constants.js';
import { MigrationError } from '../errors.js';
import type { Link } from './link.js';
import type { BlockState } from './pages.js';
import type { SourceRun } from './run.js';
import type { AnswerReason } from './stats.js';
import { isThreaded } from './threads/connection.js';

/** Pages [page, end) of one page request, still to be answered. */
interface QueuedRequest {
  readonly st: BlockState;
  page: number;
  readonly end: number;
  readonly arrived: number;
}

/** One answered page, timed when its last byte reaches the kernel. */
interface AnsweredPage {
  readonly st: BlockState;
  readonly page: number;
  readonly arrived: number;
}

/** Pages answered on main per turn of the bulk producer before it gets the socket again. */
const REQUEST_PAGES_PER_TURN = 64;

/**
 * Page requests after LISTEN, and the rule that says which channel answers
 * each page (SourceStats['requests-answered']):
 *
 * - A page counts as handed to main from the moment its bytes are given to
 *   the main channel. The bulk producer encodes a batch and hands it over in
 *   the same synchronous turn (the encoder is empty whenever the event loop
 *   runs, so no page sits encoded-but-unsent in user space while a request is
 *   read), and it encodes only when the channel has room below its bulk
 *   window: what is ahead of a request on main is at most the window, one
 *   batch and the kernel's unsent bytes (TCP_NOTSENT_LOWAT in postcopy).
 * - On arrival, every requested page already handed to main is
 *   `main-in-flight` (not sent again; with no preempt channel,
 *   `main-no-preempt`); every other one is taken out of the bulk set at once
 *   (`toSend` cleared: the producer will not hand it to main any more) and
 *   queued for the preempt channel (`preempt`) or, without one, for the next
 *   turn of the producer on main (`main-no-preempt`). So `main-in-flight`
 *   names exactly the pages handed to main before their request.
 * - A page requested again after it was answered on preempt is counted in
 *   `requested-pages-already-sent` only: it is not an answer.
 */
export class Requests {
  /** Requests to answer inside the main stream (no preempt channel). */
  private readonly onMain: QueuedRequest[] = [];
  /** Requests to answer on the preempt channel, by servePreempt (one at a time, waiting for room). */
  private readonly onPreempt: QueuedRequest[] = [];
  private serving: Link | undefined;
  /** Settles when the preempt server of `serving` has stopped. */
  private served: Promise<void> = Promise.resolve();
  /** Requests answered in the batch being written on main: timed when its last byte reaches the kernel. */
  private written: AnsweredPage[] = [];

  constructor(private readonly run: SourceRun) {}

  get pendingOnMain(): boolean {
    return this.onMain.length > 0;
  }

  /** The link was dropped: its requests go with it (the destination asks again). */
  dropAll(): void {
    this.onMain.length = 0;
    this.onPreempt.length = 0;
    this.serving = undefined;
    this.written = [];
  }

  onRequest(link: Link, block: string, offset: number, length: number, arrived: number): void {
    const run = this.run;
    const st = run.ram.get(block);
    if (!st || offset % TARGET_PAGE_SIZE !== 0 || offset + length > st.info.length || length === 0) {
      const what = st ? `${block}+0x${offset.toString(16)} len ${length} (the block has 0x${st.info.length.toString(16)} bytes)` : `of unknown RAM block "${block}"`;
      this.refuse(new MigrationError('bad-page-request', run.phase, `the destination asked for a page we do not have: ${what}`));
      return;
    }
    run.c.requests++;
    if (!run.postcopy) return; // QEMU destinations only ask after LISTEN; earlier asks are served by the passes
    const first = offset / TARGET_PAGE_SIZE;
    const end = (offset + length) / TARGET_PAGE_SIZE;
    const preempt = link.preempt !== undefined;
    const inFlightReason: AnswerReason = preempt ? 'main-in-flight' : 'main-no-preempt';
    let inFlight: number[] | undefined;
    for (let p = first; p < end; p++) {
      if (!st.sentAfterListen.has(p)) {
        st.toSend.clear(p); // ours now: the bulk producer skips it
        continue;
      }
      run.c.alreadySent++;
      if (run.listens('requested-page-already-sent')) run.emit('requested-page-already-sent', { block, offset: p * TARGET_PAGE_SIZE });
      if (st.sentOnPreempt.has(p)) continue;
      (inFlight ??= []).push(p);
    }
    if (inFlight) {
      // Timed when the bulk stream handed over before the request has reached the kernel.
      const pages = inFlight;
      link.main.afterBulkWritten(() => {
        const latencyUs = (performance.now() - arrived) * 1000;
        for (const p of pages) this.answered(st, p, 'main', inFlightReason, latencyUs);
      });
    }
    // Kept as a range: one request may cover a whole block (the page data is read when sent).
    const r: QueuedRequest = { st, page: first, end, arrived };
    if (preempt) {
      this.onPreempt.push(r);
      this.kick(link);
    } else {
      this.onMain.push(r);
    }
  }

  /**
   * Resolves once every page requested so far has been handed to its
   * channel: the end of RAM (END, EOF) must not overtake pages taken out of
   * the bulk set for a request still queued for the preempt channel.
   */
  async drained(link: Link): Promise<void> {
    // Threads: the preempt worker holds the queue (its ring); it says when it has handed everything over.
    if (isThreaded(link.conn)) return link.conn.drained();
    while (!link.dropped && !this.run.over && (this.serving === link || this.onPreempt.length > 0)) {
      this.kick(link);
      await this.served;
    }
  }

  /** Starts the preempt server of `link` unless it runs. */
  private kick(link: Link): void {
    if (this.serving === link) return;
    this.serving = link;
    this.served = this.servePreempt(link).catch((e: unknown) => this.run.linkLost(link, e));
  }

  /** One answered page, once its bytes (or the bulk stream ahead of its request) reached the kernel: counted, timed, reported. */
  answered(st: BlockState, page: number, channel: 'main' | 'preempt', reason: AnswerReason, latencyUs: number): void {
    this.run.c.answered[reason]++;
    this.run.latency.record(latencyUs);
    this.run.emit('page-request', { block: st.info.idstr, offset: page * TARGET_PAGE_SIZE, channel, reason, latencyUs });
  }

  /**
   * A request we cannot answer. QEMU's protocol has no message for "refused",
   * and a destination running the VM treats a dropped connection as a cut
   * and pauses — forever, since we will not come back. So in postcopy we end
   * the stream on purpose: at the next record boundary the RAM section is
   * closed, EOF written (without RAM's END section, which a complete stream
   * always has) and both channels closed with a FIN: a destination seeing
   * that knows the source gave up (ours fails with 'source-refused'). Before
   * LISTEN the destination is not running anything: fail at once.
   */
  refuse(e: MigrationError): void {
    const run = this.run;
    if (!run.postcopy) {
      run.fail(e);
      return;
    }
    run.refusal ??= e;
    this.onMain.length = 0;
    this.onPreempt.length = 0;
    run.link?.wake();
  }

  /**
   * Preempt mode: requested pages go out on their own socket in arrival order,
   * each exactly once. The first leaves in the tick its request arrived; later
   * ones wait for room in the channel, so a request for a whole block holds
   * at most the channel's bound in memory, not the block.
   */
  private async servePreempt(link: Link): Promise<void> {
    const run = this.run;
    try {
      for (;;) {
        if (link.dropped || run.over) return;
        const r = this.next(this.onPreempt);
        if (!r) return;
        const page = r.page - 1;
        const { st, arrived } = r;
        const read = run.ram.readRequested(st, page);
        const data = read instanceof Promise ? await read : read;
        // The link may have gone while the page was read: the next one's server sends it.
        if (link.dropped || run.over) return;
        run.ram.writePreemptPage(run.preemptEnc, st, page, data);
        const pieces = run.preemptEnc.take();
        for (const p of pieces) run.c.transferred += p.length;
        await link.preempt!.send(pieces, 'urgent', () => this.answered(st, page, 'preempt', 'preempt', (performance.now() - arrived) * 1000));
      }
    } finally {
      // Synchronously on the way out (not in a later microtask): a request queued right after must start a new server.
      if (this.serving === link) this.serving = undefined;
    }
  }

  /**
   * Takes the next requested page off `q` that has not gone out since LISTEN
   * (an overlapping request may have answered it): returns its request, whose
   * `page - 1` it is (no object per page).
   */
  private next(q: QueuedRequest[]): QueuedRequest | undefined {
    while (q.length > 0) {
      const r = q[0]!;
      const page = r.page++;
      if (r.page >= r.end) q.shift();
      if (!r.st.sentAfterListen.has(page)) return r;
    }
    return undefined;
  }

  /**
   * No preempt channel: up to REQUEST_PAGES_PER_TURN requested pages into the
   * main stream now (the producer's turn: the encoder is at a record boundary
   * inside an open RAM section). `write` encodes one page. They go out in
   * stream order (bulk priority: an urgent group could overtake a section
   * boundary queued before it), behind at most the window.
   */
  serveOnMain(write: (st: BlockState, page: number) => void): void {
    for (let budget = REQUEST_PAGES_PER_TURN; budget > 0; budget--) {
      const r = this.next(this.onMain);
      if (!r) return;
      const page = r.page - 1;
      write(r.st, page);
      this.written.push({ st: r.st, page, arrived: r.arrived });
    }
  }

  /** The callback that times the pages of serveOnMain once the batch holding them reached the kernel. */
  takeWritten(): (() => void) | undefined {
    if (this.written.length === 0) return undefined;
    const served = this.written;
    this.written = [];
    return () => {
      const now = performance.now();
      for (const r of served) this.answered(r.st, r.page, 'main', 'main-no-preempt', (now - r.arrived) * 1000);
    };
  }
}
