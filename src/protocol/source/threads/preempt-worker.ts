/**
 * The preempt channel of a threaded SourceSession, in its own thread: it
 * sleeps on the request ring (Atomics.waitAsync, no message per request),
 * claims each requested page against the bulk producer of the main worker
 * and sends the ones it won, each exactly once. The caller's thread hears of
 * every answer through a notice ring.
 */
import { TARGET_PAGE_SIZE } from '../../../stream/constants.js';
import { PreemptEncoder } from '../../../stream/encoder.js';
import type { Channel } from '../../../transport/channel.js';
import { AtomicRing } from '../../../transport/worker/ring.js';
import type { BlockState } from '../pages.js';
import type { PageBatch } from './page-batches.js';
import { Notice, REASONS, REQUEST_WORDS } from './protocol.js';
import { RingWriter } from './ring-writer.js';
import { attachBlocks, counts, data, nowEpoch, post, runChannelWorker, whenRead } from './worker-channel.js';

/** Pages of one request read at once (a larger request goes in several batches), and batches in flight (files). */
const BATCH_PAGES = 32;
const BATCHES = 8;

const { blocks, pages } = attachBlocks(BATCH_PAGES, BATCHES);
const requests = AtomicRing.attach(data.requests);
const notices = new RingWriter(AtomicRing.attach(data.notices));
const enc = new PreemptEncoder({ blocks: blocks.map((b) => b.info) });
const PREEMPT = REASONS.indexOf('preempt');
const IN_FLIGHT = REASONS.indexOf('main-in-flight');
let stopped = false;
let idle = true;
let drains: number[] = [];

function answerDrains(): void {
  if (!idle || requests.length > 0) return;
  for (const id of drains) post({ t: 'done', id });
  drains = [];
}

/** A batch claimed for one request, with when the request arrived. */
interface Claimed {
  readonly b: PageBatch;
  readonly arrived: number;
}

/**
 * The rule of requests.ts, decided here where the page is sent: a page
 * still in `toSend` is claimed (the producer will not take it) and goes on
 * preempt; one already claimed by the producer is `main-in-flight` (the
 * producer marks a page sent-after-LISTEN before it claims it); one we sent
 * already is a repeat (counted by the main worker, not an answer); one in
 * no set at all (clean since precopy) goes on preempt. What this worker
 * takes goes into batches (`out`), loaded at once (memory) or read (files).
 */
async function claim(ch: Channel, st: BlockState, first: number, end: number, arrived: number, out: Claimed[]): Promise<void> {
  let b: PageBatch | undefined;
  const close = (): void => {
    if (!b) return;
    if (b.pages === 0) pages.release(b);
    else {
      pages.load(b);
      out.push({ b, arrived });
    }
    b = undefined;
  };
  for (let p = first; p < end && !stopped; p++) {
    const mine = st.toSend.claim(p);
    if (!mine) {
      if (st.sentOnPreempt.has(p)) continue;
      if (st.sentAfterListen.has(p)) {
        notices.push([Notice.ANSWERED, st.index, p, IN_FLIGHT, (nowEpoch() - arrived) * 1000]);
        continue;
      }
    }
    st.sentAfterListen.set(p);
    st.sentOnce.set(p);
    st.sentOnPreempt.set(p);
    if (b && b.room === 0) close();
    while (!b) {
      b = pages.take(st);
      if (b) break;
      // Every batch is out (a burst of requests, a large one): the first claimed is sent, or a written one comes back.
      if (out.length > 0) await send(ch, out.shift()!);
      else await pages.whenFree();
    }
    b.add(p, 1);
  }
  close();
}

/** Sends a claimed batch once its pages are there: one group on the channel, each page's answer timed when it is written. */
async function send(ch: Channel, c: Claimed): Promise<void> {
  const b = c.b;
  try {
    const reading = whenRead(b);
    if (reading) await reading;
  } catch (e) {
    stopped = true;
    throw e;
  }
  const st = b.st;
  const block = st.info.idstr;
  for (let i = 0; i < b.runs; i++) {
    const r = enc.writePages(block, b.first[i]! * TARGET_PAGE_SIZE, b.count[i]!, b.data, b.at[i]!);
    counts.normal += r.normal;
    counts.duplicate += r.zero;
  }
  const pieces = enc.take();
  for (const x of pieces) counts.transferred += x.length;
  const answered = (): void => {
    const us = (nowEpoch() - c.arrived) * 1000;
    for (let i = 0; i < b.runs; i++) for (let p = b.first[i]!, e = p + b.count[i]!; p < e; p++) notices.push([Notice.ANSWERED, st.index, p, PREEMPT, us]);
    pages.release(b);
  };
  await ch.send(pieces, 'urgent', answered);
}

/**
 * Serves the ring: every request waiting is claimed (over files, the reads
 * of all of them start at once), then their batches are sent in order.
 */
async function loop(ch: Channel): Promise<void> {
  const e = new Float64Array(REQUEST_WORDS);
  const claimed: Claimed[] = [];
  while (!stopped) {
    idle = false;
    while (!stopped && requests.pop(e)) {
      await claim(ch, blocks[e[0]!]!, e[1]!, e[2]!, e[3]!, claimed);
      // Over memory nothing is gained by waiting: each request goes at once, as before.
      if (!pages.files || claimed.length >= BATCHES) while (claimed.length > 0) await send(ch, claimed.shift()!);
    }
    while (claimed.length > 0) await send(ch, claimed.shift()!);
    idle = true;
    answerDrains();
    if (requests.closed) return;
    await requests.wait();
  }
}

runChannelWorker({
  onReady(ch) {
    loop(ch).catch((err: unknown) => {
      // A send that failed: the channel's own 'error' reports it to the caller's thread.
      stopped = true;
      void err;
    });
  },
  onMessage(m) {
    if (m.t !== 'drain') return false;
    drains.push(m.id);
    answerDrains();
    return true;
  },
  onEnd() {
    stopped = true;
    requests.close();
  },
});
