import { RAM_IDSTR, RAM_VERSION } from '../../stream/constants.js';
import { MigrationError } from '../errors.js';
import type { Link } from './link.js';
import { sendMultifdPass, sendThreadedMultifdPass } from './multifd-pass.js';
import type { BlockState } from './pages.js';
import type { SourceRun } from './run.js';
import { isThreaded } from './threads/connection.js';

/** Pages per batch: precopy favours throughput; postcopy hands over less at a time (a request waits behind at most one batch more). */
const BATCH_PAGES_PRECOPY = 64;
const BATCH_PAGES_POSTCOPY = 16;

export interface PassOptions {
  /** A precopy pass: XBZRLE allowed, ends early when postcopy is requested. */
  readonly precopy: boolean;
  /** RAM PART sections (a pass), or one END section (precopy's last stage). */
  readonly kind: 'part' | 'end';
}

/**
 * The bulk producer: sends every page marked in `toSend`, in block order, as
 * RAM sections, pulled by the main channel: it encodes a batch only when
 * `bulkRoom` is positive, hands it over in the same turn, and otherwise
 * awaits `whenBulkRoom()` — its one wait (which is also how it yields to the
 * event loop; see Channel.bulkRoom). No promise per batch while there is
 * room; `pace()` only with a bandwidth limit. Without a preempt channel,
 * requested pages go first at each turn. Returns the pages sent.
 */
export async function sendPass(run: SourceRun, o: PassOptions): Promise<number> {
  const link = run.live;
  // Threads: the multifd workers (multifd precopy) or the main channel's worker run the pass over the shared page sets.
  if (isThreaded(link.conn)) return o.precopy && link.multifdChannels > 0 ? sendThreadedMultifdPass(run, link, o) : sendThreadedPass(run, link, o);
  // Precopy with multifd: pages in multifd packets, main carries the barriers only.
  if (o.precopy && link.multifd.length > 0) return sendMultifdPass(run, o);
  const main = link.main;
  const budget = run.opts.sectionBytes ?? 8 << 20;
  const sectionId = run.ramSection.sectionId;
  const enc = run.enc;
  let sent = 0;
  let inSection = false;
  let sectionBytes = 0;
  const openSection = () => {
    if (inSection) return;
    enc.write({ type: 'section', kind: o.kind, sectionId, idstr: RAM_IDSTR, instanceId: 0, versionId: RAM_VERSION });
    inSection = true;
    sectionBytes = 0;
  };
  const closeSection = () => {
    if (!inSection) return;
    enc.write({ type: 'ram-eos' });
    enc.write({ type: 'footer', sectionId });
    inSection = false;
  };
  const requested = (st: BlockState, page: number) => {
    openSection();
    run.ram.writeRun(enc, st, page, 1, false, true);
    sectionBytes += run.ram.runBytes;
  };
  /** Hands what the encoder holds to main at once (no promise); throws if the link failed. */
  const handOver = (written?: () => void): number => {
    const pieces = enc.take();
    if (pieces.length === 0) return 0;
    let n = 0;
    for (const p of pieces) n += p.length;
    run.c.transferred += n;
    main.push(pieces, 'bulk', written);
    return n;
  };
  const limit = (): number | undefined => (run.postcopy ? run.opts.postcopyBandwidthLimit : run.t.stoppedAt !== undefined ? undefined : run.opts.bandwidthLimit);

  for (const st of run.ram.blocks) {
    let page = st.toSend.next(0);
    while (page >= 0) {
      await turn(run, link);
      if (run.refusal) await endRefusing(run, link, closeSection);
      if (o.precopy && run.postcopyRequested) {
        closeSection();
        handOver();
        return sent;
      }
      if (run.requests.pendingOnMain) {
        run.requests.serveOnMain(requested);
        handOver(run.requests.takeWritten());
      }
      // The page may have been requested (and taken) while we waited.
      page = st.toSend.next(page);
      if (page < 0) break;
      const batch = run.postcopy ? BATCH_PAGES_POSTCOPY : BATCH_PAGES_PRECOPY;
      let left = batch;
      while (left > 0 && page >= 0) {
        const n = st.toSend.runLength(page, left);
        openSection();
        const view = run.ram.readRun(st, page, n, o.precopy);
        if (view === undefined) {
          sent += run.ram.writeRun(enc, st, page, n, o.precopy, run.postcopy);
        } else if (view instanceof Uint8Array) {
          sent += run.ram.writeRunData(enc, st, page, n, view, run.postcopy);
        } else {
          // The memory reads first: what is encoded goes now (nothing encoded may wait in
          // user space while the event loop runs, see Requests), the run after the read.
          handOver();
          const data = await view;
          run.check();
          if (link.dropped) throw run.pausedBy ?? new MigrationError('peer-disconnected', run.phase, 'the connection was lost');
          sent += run.ram.writeRunData(enc, st, page, n, data, run.postcopy);
        }
        sectionBytes += run.ram.runBytes;
        left -= n;
        page = st.toSend.next(page + n);
      }
      if (o.kind === 'part' && sectionBytes >= budget) closeSection();
      const n = handOver();
      const bw = limit();
      if (bw) await run.pacer.pace(n, bw);
    }
  }
  for (;;) {
    await turn(run, link);
    if (!run.requests.pendingOnMain) break;
    run.requests.serveOnMain(requested);
    handOver(run.requests.takeWritten());
  }
  if (run.refusal) await endRefusing(run, link, closeSection);
  if (o.kind === 'end') openSection();
  closeSection();
  handOver();
  return sent;
}

/** Waits until the main channel has room for a batch (or a request to answer); rethrows what ended the link. */
async function turn(run: SourceRun, link: Link): Promise<void> {
  if (link.main.bulkRoom <= 0) await link.main.whenBulkRoom();
  if (link.dropped) throw run.failure ?? run.pausedBy ?? new MigrationError('peer-disconnected', run.phase, 'the connection was lost');
  run.check();
}

/** Ends the stream after a refused request (see Requests.refuse), then fails with it. */
export async function endRefusing(run: SourceRun, link: Link, closeSection: () => void): Promise<never> {
  const e = run.refusal!;
  closeSection();
  run.write([{ type: 'eof' }]);
  await run.flushMain();
  await link.close();
  throw e;
}

/**
 * A pass run by the main channel's worker: what this thread encoded goes
 * first (records before the pass), then the worker sends every page of
 * `toSend` (claimed atomically against the preempt worker) in RAM sections
 * and answers requests inside the stream when there is no preempt channel.
 * Its counters arrive before its end. A refused request ends the stream.
 */
async function sendThreadedPass(run: SourceRun, link: Link, o: PassOptions): Promise<number> {
  await run.flushMain();
  const conn = link.conn as import('./threads/connection.js').ThreadedSourceConnection;
  const bandwidthLimit = run.postcopy ? run.opts.postcopyBandwidthLimit : run.t.stoppedAt !== undefined ? undefined : run.opts.bandwidthLimit;
  let r: { sent: number; refused: boolean };
  try {
    r = await conn.pass({ precopy: o.precopy, kind: o.kind, postcopy: run.postcopy, bandwidthLimit });
  } catch (e) {
    run.check();
    if (link.dropped) throw run.pausedBy ?? new MigrationError('peer-disconnected', run.phase, 'the connection was lost');
    throw e;
  }
  run.check();
  if (link.dropped) throw run.pausedBy ?? new MigrationError('peer-disconnected', run.phase, 'the connection was lost');
  if (run.refusal) await endRefusing(run, link, () => undefined);
  return r.sent;
}
