/**
 * The main channel of a threaded SourceSession, in its own thread: the
 * socket and TLS, the bulk producer (passes over the shared `toSend`
 * bitmaps, claiming pages a word at a time against the preempt worker),
 * the return path (page requests go straight to the preempt worker through
 * a ring; the caller's thread gets notices and the other messages) and the
 * records the caller's thread encodes (setup, commands, device state).
 */
import { RAM_IDSTR, RAM_VERSION, TARGET_PAGE_SIZE } from '../../../stream/constants.js';
import { StreamEncoder } from '../../../stream/encoder.js';
import type { ReturnPathMessage } from '../../../stream/records.js';
import { ReturnPathDecoder } from '../../../stream/return-path.js';
import type { Channel } from '../../../transport/channel.js';
import { AtomicRing } from '../../../transport/worker/ring.js';
import { Pacer } from '../../pacer.js';
import type { BlockState } from '../pages.js';
import type { PageBatch } from './page-batches.js';
import { Control, Notice, REASONS, type PassCommand, type ToWorker } from './protocol.js';
import { RingWriter } from './ring-writer.js';
import { attachBlocks, counts, data, nowEpoch, post, runChannelWorker, whenRead, wireError } from './worker-channel.js';

/** Pages per batch, as pass.ts: precopy favours throughput, postcopy hands over less at a time. */
const BATCH_PAGES_PRECOPY = 64;
const BATCH_PAGES_POSTCOPY = 16;
/** Requested pages answered on main per turn (no preempt channel), as requests.ts. */
const REQUEST_PAGES_PER_TURN = 64;
/** Batches a file-backed source reads ahead (each BATCH_PAGES_PRECOPY pages: 2 MiB in all, whatever the guest). */
const FILE_BATCHES = 8;

const { blocks, pages } = attachBlocks(BATCH_PAGES_PRECOPY, FILE_BATCHES);
/** Bulk batches claimed and not yet handed to the channel (over files: being read). */
const pipeline: PageBatch[] = [];
const byName = new Map(blocks.map((b) => [b.info.idstr, b]));
const control = new Int32Array(data.control);
const toPreempt = new RingWriter(AtomicRing.attach(data.requests));
const notices = new RingWriter(AtomicRing.attach(data.notices));
const enc = new StreamEncoder({ blocks: blocks.map((b) => b.info) });
const rp = new ReturnPathDecoder();
const pacer = new Pacer();
let main: Channel | undefined;
let lastReqBlock: string | undefined;
/** A request we cannot answer came: the pass stops at its next boundary (the caller's thread ends the stream). */
let refused = false;
/** No preempt channel: requests answered inside the main stream, at the producer's next turn. */
const onMain: { st: BlockState; page: number; end: number; arrived: number }[] = [];

const listened = (): boolean => Atomics.load(control, Control.LISTENED) !== 0;
const preemptUp = (): boolean => Atomics.load(control, Control.PREEMPT_UP) !== 0;

function onReturnPath(chunk: Buffer): void {
  let msgs: ReturnPathMessage[];
  try {
    msgs = rp.push(chunk);
  } catch (e) {
    post({ t: 'rp-error', reason: wireError(e).message });
    return;
  }
  const arrived = nowEpoch();
  const other: ReturnPathMessage[] = [];
  for (const m of msgs) {
    if (m.type === 'req-pages-id') {
      lastReqBlock = m.block;
      onRequest(m.block, m.offset, m.length, arrived);
    } else if (m.type === 'req-pages') {
      if (lastReqBlock === undefined) {
        post({ t: 'rp-error', reason: 'REQ_PAGES before any REQ_PAGES_ID' });
        return;
      }
      onRequest(lastReqBlock, m.offset, m.length, arrived);
    } else other.push(m);
  }
  if (other.length > 0) post({ t: 'rp', msgs: other });
  if (rp.error) post({ t: 'rp-error', reason: rp.error.message });
}

/**
 * The answering rule of requests.ts, split across threads: a requested
 * page already handed to main since LISTEN is `main-in-flight` (timed once
 * the bulk ahead of the request reached the kernel); every other one goes
 * to the preempt worker, which claims it against the producer (or, with no
 * preempt channel, into the main stream at the next turn).
 */
function onRequest(block: string, offset: number, length: number, arrived: number): void {
  const st = byName.get(block);
  if (!st || offset % TARGET_PAGE_SIZE !== 0 || offset + length > st.info.length || length === 0) {
    const what = st ? `${block}+0x${offset.toString(16)} len ${length} (the block has 0x${st.info.length.toString(16)} bytes)` : `of unknown RAM block "${block}"`;
    refused = true;
    post({ t: 'bad-request', reason: `the destination asked for a page we do not have: ${what}` });
    return;
  }
  notices.push([Notice.REQUEST, st.index, length / TARGET_PAGE_SIZE, 0, 0]);
  if (!listened() || refused) return;
  const first = offset / TARGET_PAGE_SIZE;
  const end = (offset + length) / TARGET_PAGE_SIZE;
  const preempt = preemptUp();
  let inFlight: number[] | undefined;
  let runStart = -1;
  const queue = (from: number, to: number): void => {
    if (preempt) toPreempt.push([st.index, from, to, arrived]);
    else onMain.push({ st, page: from, end: to, arrived });
  };
  for (let p = first; p < end; p++) {
    if (!st.sentAfterListen.has(p)) {
      if (runStart < 0) runStart = p;
      continue;
    }
    if (runStart >= 0) queue(runStart, p);
    runStart = -1;
    notices.push([Notice.ALREADY_SENT, st.index, p, 0, 0]);
    if (!st.sentOnPreempt.has(p)) (inFlight ??= []).push(p);
  }
  if (runStart >= 0) queue(runStart, end);
  if (inFlight && main) {
    const waiting = inFlight;
    const reason = REASONS.indexOf(preempt ? 'main-in-flight' : 'main-no-preempt');
    const answer = (): void => {
      const us = (nowEpoch() - arrived) * 1000;
      for (const p of waiting) notices.push([Notice.ANSWERED, st.index, p, reason, us]);
    };
    // A page claimed into a batch still being read is not in the channel yet: timed once that batch is written.
    const tail = pipeline[pipeline.length - 1];
    if (tail) tail.after.push(answer);
    else main.afterBulkWritten(answer);
  }
}

// ---- the bulk producer ------------------------------------------------

/**
 * Claims the pages of `st` marked in `toSend` within [from, end), a word
 * (32 pages) per atomic step, into batch `b` by runs. After LISTEN a page is
 * marked sent-after-LISTEN before it is claimed: a preempt worker that finds
 * it already claimed then knows main has it (main-in-flight).
 */
function claimRange(st: BlockState, from: number, end: number, after: boolean, b: PageBatch): void {
  const toSend = st.toSend.words;
  for (let i = from; i < end; ) {
    const w = i >>> 5;
    const lo = i & 31;
    const hi = Math.min(32, end - (w << 5));
    const range = (hi === 32 ? 0xffffffff : (1 << hi) - 1) & (0xffffffff << lo);
    i = (w + 1) << 5;
    const bits = toSend[w]! & range;
    if (bits === 0) continue;
    if (after) Atomics.or(st.sentAfterListen.words, w, bits);
    let taken = st.toSend.claimWord(w, bits);
    if (taken === 0) continue;
    Atomics.or(st.sentOnce.words, w, taken);
    // Runs of consecutive set bits.
    while (taken !== 0) {
      const s = 31 - Math.clz32(taken & -taken);
      let n = 0;
      while (s + n < 32 && (taken & (1 << (s + n))) !== 0) n++;
      taken &= ~((n === 32 ? -1 : (1 << n) - 1) << s);
      b.add((w << 5) + s, n);
    }
  }
}

/** Encodes a loaded batch by runs (one writePages per run); returns its page-data bytes (the section budget). */
function encodeBatch(b: PageBatch): number {
  const block = b.st.info.idstr;
  let bytes = 0;
  for (let i = 0; i < b.runs; i++) {
    const r = enc.writePages(block, b.first[i]! * TARGET_PAGE_SIZE, b.count[i]!, b.data, b.at[i]!);
    counts.normal += r.normal;
    counts.duplicate += r.zero;
    bytes += r.normal * TARGET_PAGE_SIZE + r.zero * 16;
  }
  return bytes;
}

async function runPass(cmd: PassCommand): Promise<{ sent: number; refused: boolean }> {
  try {
    return await producePass(cmd);
  } finally {
    pipeline.length = 0;
  }
}

/**
 * One pass of the bulk producer. Pages are claimed a batch at a time; over
 * shared memory a batch is encoded in the turn it is claimed (as ever), over
 * files as many batches as there are buffers are claimed and read ahead, and
 * encoded in order as their reads complete. Requests with no preempt channel
 * go first, in batches of their own. A batch's buffer comes back once the
 * channel has written its bytes.
 */
async function producePass(cmd: PassCommand): Promise<{ sent: number; refused: boolean }> {
  const ch = main!;
  const sectionId = data.sectionId;
  const budget = data.sectionBytes;
  const limit = cmd.postcopy ? BATCH_PAGES_POSTCOPY : BATCH_PAGES_PRECOPY;
  let sent = 0;
  let inSection = false;
  let sectionBytes = 0;
  const openSection = (): void => {
    if (inSection) return;
    enc.write({ type: 'section', kind: cmd.kind, sectionId, idstr: RAM_IDSTR, instanceId: 0, versionId: RAM_VERSION });
    inSection = true;
    sectionBytes = 0;
  };
  const closeSection = (): void => {
    if (!inSection) return;
    enc.write({ type: 'ram-eos' });
    enc.write({ type: 'footer', sectionId });
    inSection = false;
  };
  const handOver = (done?: () => void): number => {
    const pieces = enc.take();
    if (pieces.length === 0) {
      done?.();
      return 0;
    }
    let n = 0;
    for (const p of pieces) n += p.length;
    counts.transferred += n;
    ch.push(pieces, 'bulk', done);
    return n;
  };
  const turn = async (): Promise<void> => {
    if (ch.bulkRoom <= 0) await ch.whenBulkRoom();
  };
  /** What runs once the batch is written: its answers' notices, then (files) its buffer back. */
  const afterWrite = (b: PageBatch): (() => void) | undefined => {
    if (!pages.files) {
      const after = b.after.length > 0 ? b.after.splice(0) : undefined;
      pages.release(b);
      return after && (() => after.forEach((f) => f()));
    }
    return () => {
      for (const f of b.after) f();
      pages.release(b);
    };
  };
  /** Requests answered on main (no preempt channel): up to REQUEST_PAGES_PER_TURN pages of one block in a batch, read like the bulk. */
  const urgent: PageBatch[] = [];
  const claimRequested = (): void => {
    let b: PageBatch | undefined;
    const answers: number[] = [];
    for (let left = REQUEST_PAGES_PER_TURN; left > 0 && onMain.length > 0; ) {
      const r = onMain[0]!;
      const st = r.st;
      if (b && (b.st !== st || b.room === 0)) break;
      const p = r.page;
      if (!st.sentAfterListen.has(p)) {
        b ??= pages.take(st);
        if (!b) break;
        st.toSend.clear(p);
        st.sentOnce.set(p);
        st.sentAfterListen.set(p);
        b.add(p, 1);
        answers.push(st.index, p, r.arrived);
        left--;
      }
      if (++r.page >= r.end) onMain.shift();
    }
    if (!b) return;
    if (b.pages === 0) return pages.release(b);
    const reason = REASONS.indexOf('main-no-preempt');
    b.after.push(() => {
      const now = nowEpoch();
      for (let i = 0; i < answers.length; i += 3) notices.push([Notice.ANSWERED, answers[i]!, answers[i + 1]!, reason, (now - answers[i + 2]!) * 1000]);
    });
    pages.load(b);
    urgent.push(b);
  };
  // The scan: block `bi`, from page `from` on.
  let bi = 0;
  let from = 0;
  /** Claims the next batch of the scan and starts loading it; false when the scan is over or no batch is free. */
  const claimNext = (): boolean => {
    while (bi < blocks.length) {
      const st = blocks[bi]!;
      let p = from < st.pages ? st.toSend.next(from) : -1;
      if (p < 0) {
        bi++;
        from = 0;
        continue;
      }
      const b = pages.take(st);
      if (!b) return false;
      while (b.pages < limit && p >= 0) {
        const end = Math.min(st.pages, p + (limit - b.pages));
        claimRange(st, p, end, cmd.postcopy, b);
        from = end;
        p = from < st.pages ? st.toSend.next(from) : -1;
      }
      if (b.pages === 0) {
        pages.release(b);
        continue;
      }
      pages.load(b);
      pipeline.push(b);
      return true;
    }
    return false;
  };
  const scanOver = (): boolean => bi >= blocks.length;
  /** Encodes and hands over the first batch of `q` once it is read; a failed read fails the pass (and the migration: storage). */
  const sendHead = async (q: PageBatch[], bulk: boolean): Promise<number> => {
    const b = q[0]!;
    const reading = whenRead(b);
    if (reading) await reading;
    q.shift();
    openSection();
    sectionBytes += encodeBatch(b);
    if (bulk) sent += b.pages;
    return handOver(afterWrite(b));
  };
  const stop = (): boolean => refused || (cmd.precopy && Atomics.load(control, Control.POSTCOPY_REQUESTED) !== 0);

  for (;;) {
    await turn();
    if (stop()) {
      // What is claimed goes out: its pages are no longer in toSend.
      while (urgent.length > 0) await sendHead(urgent, false);
      while (pipeline.length > 0) await sendHead(pipeline, true);
      closeSection();
      handOver();
      return { sent, refused };
    }
    if (onMain.length > 0) claimRequested();
    // Over files, read ahead with every free buffer; over memory, one batch, encoded in this turn.
    if (pages.files) while (claimNext());
    else if (pipeline.length === 0) claimNext();
    const q = urgent.length > 0 ? urgent : pipeline;
    if (q.length === 0) {
      if (scanOver() && onMain.length === 0) break;
      // Every buffer is still held by bytes the channel has not written: one comes back with them.
      await pages.whenFree();
      continue;
    }
    const n = await sendHead(q, q === pipeline);
    if (q === pipeline && cmd.kind === 'part' && sectionBytes >= budget) {
      closeSection();
      handOver();
    }
    if (cmd.bandwidthLimit && q === pipeline) await pacer.pace(n, cmd.bandwidthLimit);
  }
  if (cmd.kind === 'end' && !refused) openSection();
  closeSection();
  handOver();
  return { sent, refused };
}

runChannelWorker({
  onReady(ch) {
    main = ch;
    ch.read(onReturnPath);
  },
  onMessage(m: ToWorker) {
    switch (m.t) {
      case 'pass':
        runPass(m.pass).then(
          (r) => post({ t: 'done', id: m.id, sent: r.sent, refused: r.refused }),
          (e: unknown) => post({ t: 'done', id: m.id, error: wireError(e) }),
        );
        return true;
      case 'postcopy':
        // QEMU forgets the last block at the postcopy switch (as StreamEncoder does at PACKAGED on the caller's side).
        enc.resetContinue();
        pacer.reset();
        if (m.notSentLowat > 0) main?.setNotSentLowat(m.notSentLowat);
        main?.setBulkYield(m.bulkYield);
        return true;
      default:
        return false;
    }
  },
});
