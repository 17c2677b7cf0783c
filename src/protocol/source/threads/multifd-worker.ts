/**
 * One multifd channel of a threaded SourceSession, in its own thread: the
 * socket and TLS, the init message as soon as the channel is up (a QEMU
 * destination over TLS waits on it), and in each multifd pass this
 * channel's share of the pages: it takes chunks of the shared `toSend`
 * bitmap (MULTIFD_CHUNK_WORDS words, one atomic add on the block's cursor
 * and one atomic claim per word), reads the pages from the shared memory
 * and sends them in packets of one block (MultifdPacketBuilder,
 * MultifdChannelSender), pulled by its channel's bulk window. The barrier
 * stays the caller's: after every worker's pass it asks each for its SYNC
 * packet, then writes MULTIFD_FLUSH on main (QEMU's order).
 */
import { TARGET_PAGE_SIZE } from '../../../stream/constants.js';
import type { Channel } from '../../../transport/channel.js';
import { Pacer } from '../../pacer.js';
import { MultifdChannelSender, MultifdPacketBuilder, MultifdPacketCounter } from '../multifd.js';
import type { BlockState } from '../pages.js';
import { Control, MULTIFD_CHUNK_WORDS, type PassCommand, type ToWorker } from './protocol.js';
import { attachBlocks, counts, data, post, report, runChannelWorker, wireError } from './worker-channel.js';

const mf = data.multifd!;
const { blocks, memory } = attachBlocks();
const control = new Int32Array(data.control);
const cursors = new Int32Array(mf.cursors);
const packetNumbers = new MultifdPacketCounter(new BigInt64Array(mf.packets));
const packet = new MultifdPacketBuilder();
const pacer = new Pacer();
let sender: MultifdChannelSender | undefined;
let channel: Channel | undefined;

/** Sends the packet being filled, if any; its pages and bytes go into the batched counters. */
function emit(s: MultifdChannelSender): number {
  if (packet.size === 0) return 0;
  counts.normal += packet.normalCount;
  counts.duplicate += packet.zeroCount;
  const n = s.sendPacket(packet);
  counts.transferred += n;
  return n;
}

/**
 * Adds `n` pages of `st` from `page` on to the packet, sending it each time
 * it fills; returns the bytes sent meanwhile.
 */
function addPages(s: MultifdChannelSender, st: BlockState, page: number, n: number): number {
  const mem = memory[st.index]!;
  let bytes = 0;
  while (n > 0) {
    const k = Math.min(n, packet.room);
    const offset = page * TARGET_PAGE_SIZE;
    packet.addRun(st.info.idstr, offset, k, mem, offset);
    page += k;
    n -= k;
    if (packet.room === 0) bytes += emit(s);
  }
  return bytes;
}

/** Claims the set bits of one chunk of `st` and adds their pages by runs; returns the pages taken and the bytes sent. */
function takeChunk(s: MultifdChannelSender, st: BlockState, chunk: number): { pages: number; bytes: number } {
  const words = st.toSend.words;
  const first = chunk * MULTIFD_CHUNK_WORDS;
  const last = Math.min(first + MULTIFD_CHUNK_WORDS, words.length);
  let pages = 0;
  let bytes = 0;
  for (let w = first; w < last; w++) {
    if (Atomics.load(words, w) === 0) continue;
    let taken = st.toSend.claimWord(w);
    if (taken === 0) continue;
    Atomics.or(st.sentOnce.words, w, taken);
    while (taken !== 0) {
      const b = 31 - Math.clz32(taken & -taken);
      let n = 0;
      while (b + n < 32 && (taken & (1 << (b + n))) !== 0) n++;
      taken &= ~((n === 32 ? -1 : (1 << n) - 1) << b);
      const page = (w << 5) + b;
      // The bitmap's last word may have bits past the block's end: never set, but bound anyway.
      const count = Math.min(n, st.pages - page);
      if (count <= 0) continue;
      bytes += addPages(s, st, page, count);
      pages += count;
    }
  }
  return { pages, bytes };
}

/**
 * This channel's share of a multifd pass: chunks taken from every block's
 * cursor until none is left (or postcopy is asked for, in a PART pass).
 * Waits for the channel's bulk window before each chunk: at most the window
 * plus one chunk's packets are in user space.
 */
async function runPass(cmd: PassCommand): Promise<{ sent: number; interrupted: boolean }> {
  const s = sender!;
  const ch = channel!;
  const bw = cmd.bandwidthLimit ? cmd.bandwidthLimit : undefined;
  let sent = 0;
  for (const st of blocks) {
    const chunks = Math.ceil(st.toSend.words.length / MULTIFD_CHUNK_WORDS);
    for (;;) {
      if (ch.bulkRoom <= 0) await ch.whenBulkRoom();
      if (cmd.kind === 'part' && cmd.precopy && Atomics.load(control, Control.POSTCOPY_REQUESTED) !== 0) {
        emit(s);
        return { sent, interrupted: true };
      }
      const chunk = Atomics.add(cursors, st.index, 1);
      if (chunk >= chunks) break;
      // One block per packet: what is left of the previous block goes first.
      if (packet.size > 0 && packet.block !== st.info.idstr) emit(s);
      const r = takeChunk(s, st, chunk);
      sent += r.pages;
      if (bw && r.bytes > 0) await pacer.pace(r.bytes, bw);
    }
  }
  const n = emit(s);
  if (bw && n > 0) await pacer.pace(n, bw);
  return { sent, interrupted: false };
}

runChannelWorker({
  onReady(ch) {
    channel = ch;
    const s = new MultifdChannelSender(mf.id, ch, packetNumbers, mf.uuid ? { uuid: mf.uuid } : {});
    sender = s;
    // The init message first thing (QEMU's multifd_send_thread does too).
    counts.transferred += s.start();
    // A destination sends nothing on a multifd channel; reading finds its FIN (the channel's 'close').
    ch.read(() => undefined);
  },
  onMessage(m: ToWorker) {
    switch (m.t) {
      case 'mpass':
        runPass(m.pass).then(
          (r) => {
            report();
            post({ t: 'done', id: m.id, sent: r.sent, interrupted: r.interrupted });
          },
          (e: unknown) => post({ t: 'done', id: m.id, error: wireError(e) }),
        );
        return true;
      case 'sync':
        try {
          counts.transferred += sender!.sync();
          report();
          post({ t: 'done', id: m.id });
        } catch (e) {
          post({ t: 'done', id: m.id, error: wireError(e) });
        }
        return true;
      default:
        return false;
    }
  },
});
