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
import { Control, Notice, REASONS, type PassCommand, type ToWorker } from './protocol.js';
import { RingWriter } from './ring-writer.js';
import { attachBlocks, counts, data, nowEpoch, post, runChannelWorker, wireError } from './worker-channel.js';

/** Pages per batch, as pass.ts: precopy favours throughput, postcopy hands over less at a time. */
const BATCH_PAGES_PRECOPY = 64;
const BATCH_PAGES_POSTCOPY = 16;
/** Requested pages answered on main per turn (no preempt channel), as requests.ts. */
const REQUEST_PAGES_PER_TURN = 64;

const { blocks, memory } = attachBlocks();
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
/** Pages answered on main in the batch being handed over: [block, page, arrived]. */
let written: number[] = [];

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
    const pages = inFlight;
    const reason = REASONS.indexOf(preempt ? 'main-in-flight' : 'main-no-preempt');
    main.afterBulkWritten(() => {
      const us = (nowEpoch() - arrived) * 1000;
      for (const p of pages) notices.push([Notice.ANSWERED, st.index, p, reason, us]);
    });
  }
}

// ---- the bulk producer ------------------------------------------------

/**
 * Claims the pages of `st` marked in `toSend` within [from, end), a word
 * (32 pages) per atomic step, and encodes what it took by runs. After LISTEN
 * a page is marked sent-after-LISTEN before it is claimed: a preempt worker
 * that finds it already claimed then knows main has it (main-in-flight).
 */
function claimRange(st: BlockState, from: number, end: number, after: boolean): { pages: number; bytes: number } {
  const mem = memory[st.index]!;
  const block = st.info.idstr;
  const toSend = st.toSend.words;
  let pages = 0;
  let bytes = 0;
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
    // Runs of consecutive set bits, each one writePages call.
    while (taken !== 0) {
      const s = 31 - Math.clz32(taken & -taken);
      let n = 0;
      while (s + n < 32 && (taken & (1 << (s + n))) !== 0) n++;
      taken &= ~((n === 32 ? -1 : (1 << n) - 1) << s);
      const offset = ((w << 5) + s) * TARGET_PAGE_SIZE;
      const r = enc.writePages(block, offset, n, mem, offset);
      counts.normal += r.normal;
      counts.duplicate += r.zero;
      bytes += r.normal * TARGET_PAGE_SIZE + r.zero * 16;
      pages += n;
    }
  }
  return { pages, bytes };
}

async function runPass(cmd: PassCommand): Promise<{ sent: number; refused: boolean }> {
  const ch = main!;
  const sectionId = data.sectionId;
  const budget = data.sectionBytes;
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
    if (pieces.length === 0) return 0;
    let n = 0;
    for (const p of pieces) n += p.length;
    counts.transferred += n;
    ch.push(pieces, 'bulk', done);
    return n;
  };
  const turn = async (): Promise<void> => {
    if (ch.bulkRoom <= 0) await ch.whenBulkRoom();
  };
  const serveOnMain = (): void => {
    for (let budgetLeft = REQUEST_PAGES_PER_TURN; budgetLeft > 0 && onMain.length > 0; ) {
      const r = onMain[0]!;
      const p = r.page++;
      if (r.page >= r.end) onMain.shift();
      const st = r.st;
      if (st.sentAfterListen.has(p)) continue;
      openSection();
      const offset = p * TARGET_PAGE_SIZE;
      const res = enc.writePages(st.info.idstr, offset, 1, memory[st.index]!, offset);
      counts.normal += res.normal;
      counts.duplicate += res.zero;
      sectionBytes += res.normal * TARGET_PAGE_SIZE + res.zero * 16;
      st.toSend.clear(p);
      st.sentOnce.set(p);
      st.sentAfterListen.set(p);
      written.push(st.index, p, r.arrived);
      budgetLeft--;
    }
  };
  const takeWritten = (): (() => void) | undefined => {
    if (written.length === 0) return undefined;
    const w = written;
    written = [];
    const reason = REASONS.indexOf('main-no-preempt');
    return () => {
      const now = nowEpoch();
      for (let i = 0; i < w.length; i += 3) notices.push([Notice.ANSWERED, w[i]!, w[i + 1]!, reason, (now - w[i + 2]!) * 1000]);
    };
  };
  const stop = (): boolean => refused || (cmd.precopy && Atomics.load(control, Control.POSTCOPY_REQUESTED) !== 0);

  for (const st of blocks) {
    let page = st.toSend.next(0);
    while (page >= 0) {
      await turn();
      if (stop()) {
        closeSection();
        handOver();
        return { sent, refused };
      }
      if (onMain.length > 0) {
        serveOnMain();
        handOver(takeWritten());
      }
      page = st.toSend.next(page);
      if (page < 0) break;
      let left = cmd.postcopy ? BATCH_PAGES_POSTCOPY : BATCH_PAGES_PRECOPY;
      while (left > 0 && page >= 0) {
        const end = Math.min(st.pages, page + left);
        openSection();
        const r = claimRange(st, page, end, cmd.postcopy);
        sent += r.pages;
        sectionBytes += r.bytes;
        left -= r.pages;
        page = st.toSend.next(end);
      }
      if (cmd.kind === 'part' && sectionBytes >= budget) closeSection();
      const n = handOver();
      if (cmd.bandwidthLimit) await pacer.pace(n, cmd.bandwidthLimit);
    }
  }
  for (;;) {
    await turn();
    if (onMain.length === 0 || refused) break;
    serveOnMain();
    handOver(takeWritten());
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
