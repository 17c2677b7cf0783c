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
import { Notice, REASONS, REQUEST_WORDS } from './protocol.js';
import { RingWriter } from './ring-writer.js';
import { attachBlocks, counts, data, nowEpoch, post, runChannelWorker } from './worker-channel.js';

const { blocks, memory } = attachBlocks();
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

/**
 * The rule of requests.ts, decided here where the page is sent: a page
 * still in `toSend` is claimed (the producer will not take it) and goes on
 * preempt; one already claimed by the producer is `main-in-flight` (the
 * producer marks a page sent-after-LISTEN before it claims it); one we sent
 * already is a repeat (counted by the main worker, not an answer); one in
 * no set at all (clean since precopy) goes on preempt.
 */
async function serve(ch: Channel, st: BlockState, first: number, end: number, arrived: number): Promise<void> {
  const block = st.info.idstr;
  const mem = memory[st.index]!;
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
    const offset = p * TARGET_PAGE_SIZE;
    const r = enc.writePages(block, offset, 1, mem, offset);
    counts.normal += r.normal;
    counts.duplicate += r.zero;
    const pieces = enc.take();
    for (const x of pieces) counts.transferred += x.length;
    const page = p;
    await ch.send(pieces, 'urgent', () => notices.push([Notice.ANSWERED, st.index, page, PREEMPT, (nowEpoch() - arrived) * 1000]));
  }
}

async function loop(ch: Channel): Promise<void> {
  const e = new Float64Array(REQUEST_WORDS);
  while (!stopped) {
    idle = false;
    while (!stopped && requests.pop(e)) await serve(ch, blocks[e[0]!]!, e[1]!, e[2]!, e[3]!);
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
