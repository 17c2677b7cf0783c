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
import type { PageBatch } from './page-batches.js';
import { Control, MULTIFD_CHUNK_WORDS, type PassCommand, type ToWorker } from './protocol.js';
import { attachBlocks, counts, data, post, report, runChannelWorker, whenRead, wireError } from './worker-channel.js';

/** Chunks a file-backed source reads ahead (of 128 pages: 2 MiB in all per channel, whatever the guest). */
const FILE_BATCHES = 4;

const mf = data.multifd!;
const { blocks, pages } = attachBlocks(MULTIFD_CHUNK_WORDS * 32, FILE_BATCHES);
const control = new Int32Array(data.control);
const cursors = new Int32Array(mf.cursors);
const packetNumbers = new MultifdPacketCounter(new BigInt64Array(mf.packets));
const packet = new MultifdPacketBuilder();
const pacer = new Pacer();
let sender: MultifdChannelSender | undefined;
let channel: Channel | undefined;
/** Batches (files) whose last pages are in the packet being filled: back once that packet is written. */
let held: PageBatch[] = [];

/** Sends the packet being filled, if any; its pages and bytes go into the batched counters. */
function emit(s: MultifdChannelSender): number {
  if (packet.size === 0) return 0;
  counts.normal += packet.normalCount;
  counts.duplicate += packet.zeroCount;
  const n = s.sendPacket(packet);
  counts.transferred += n;
  if (held.length > 0) {
    const h = held;
    held = [];
    channel!.afterBulkWritten(() => {
      for (const b of h) pages.release(b);
    });
  }
  return n;
}

/**
 * Adds the pages of a loaded batch to the packet by runs, sending it each
 * time it fills; returns the bytes sent meanwhile.
 */
function addBatch(s: MultifdChannelSender, b: PageBatch): number {
  const block = b.st.info.idstr;
  let bytes = 0;
  for (let i = 0; i < b.runs; i++) {
    let page = b.first[i]!;
    let at = b.at[i]!;
    let n = b.count[i]!;
    while (n > 0) {
      const k = Math.min(n, packet.room);
      packet.addRun(block, page * TARGET_PAGE_SIZE, k, b.data, at);
      page += k;
      at += k * TARGET_PAGE_SIZE;
      n -= k;
      if (packet.room === 0) bytes += emit(s);
    }
  }
  // Over memory the pages are views of the shared blocks: the batch is free at once.
  if (!pages.files) pages.release(b);
  else if (packet.size > 0) held.push(b);
  else channel!.afterBulkWritten(() => pages.release(b));
  return bytes;
}

/** Claims the set bits of one chunk of `st` into batch `b` by runs. */
function claimChunk(st: BlockState, chunk: number, b: PageBatch): void {
  const words = st.toSend.words;
  const first = chunk * MULTIFD_CHUNK_WORDS;
  const last = Math.min(first + MULTIFD_CHUNK_WORDS, words.length);
  for (let w = first; w < last; w++) {
    if (Atomics.load(words, w) === 0) continue;
    let taken = st.toSend.claimWord(w);
    if (taken === 0) continue;
    Atomics.or(st.sentOnce.words, w, taken);
    while (taken !== 0) {
      const bit = 31 - Math.clz32(taken & -taken);
      let n = 0;
      while (bit + n < 32 && (taken & (1 << (bit + n))) !== 0) n++;
      taken &= ~((n === 32 ? -1 : (1 << n) - 1) << bit);
      const page = (w << 5) + bit;
      // The bitmap's last word may have bits past the block's end: never set, but bound anyway.
      const count = Math.min(n, st.pages - page);
      if (count > 0) b.add(page, count);
    }
  }
}

/**
 * This channel's share of a multifd pass: chunks taken from every block's
 * cursor until none is left (or postcopy is asked for, in a PART pass).
 * Waits for the channel's bulk window before each chunk: at most the window
 * plus one chunk's packets are in user space. Over files, up to
 * FILE_BATCHES chunks are claimed and read ahead, added to packets in order.
 */
async function runPass(cmd: PassCommand): Promise<{ sent: number; interrupted: boolean }> {
  const s = sender!;
  const ch = channel!;
  const bw = cmd.bandwidthLimit ? cmd.bandwidthLimit : undefined;
  const queue: PageBatch[] = [];
  let sent = 0;
  let bi = 0;
  /** Claims the next non-empty chunk of the pass into a free batch and starts loading it; false when none is left or no batch is free. */
  const claimNext = (): boolean => {
    while (bi < blocks.length) {
      const st = blocks[bi]!;
      const b = pages.take(st);
      if (!b) return false;
      const chunk = Atomics.add(cursors, st.index, 1);
      if (chunk >= Math.ceil(st.toSend.words.length / MULTIFD_CHUNK_WORDS)) {
        pages.release(b);
        bi++;
        continue;
      }
      claimChunk(st, chunk, b);
      if (b.pages === 0) {
        pages.release(b);
        continue;
      }
      pages.load(b);
      queue.push(b);
      return true;
    }
    return false;
  };
  /** Adds the first claimed batch to packets once it is read (one block per packet: the previous block's rest goes first). */
  const addHead = async (): Promise<number> => {
    const b = queue[0]!;
    const reading = whenRead(b);
    if (reading) await reading;
    queue.shift();
    let bytes = 0;
    if (packet.size > 0 && packet.block !== b.st.info.idstr) bytes += emit(s);
    bytes += addBatch(s, b);
    sent += b.pages;
    return bytes;
  };
  for (;;) {
    if (ch.bulkRoom <= 0) await ch.whenBulkRoom();
    if (cmd.kind === 'part' && cmd.precopy && Atomics.load(control, Control.POSTCOPY_REQUESTED) !== 0) {
      // What is claimed goes out: its pages are no longer in toSend.
      while (queue.length > 0) await addHead();
      emit(s);
      return { sent, interrupted: true };
    }
    if (pages.files) while (claimNext());
    else if (queue.length === 0) claimNext();
    if (queue.length === 0) {
      if (bi >= blocks.length) break;
      // Every buffer is held: by the packet being filled (sent now, so that they come back) or by bytes not yet written.
      if (held.length > 0) emit(s);
      await pages.whenFree();
      continue;
    }
    const bytes = await addHead();
    if (bw && bytes > 0) await pacer.pace(bytes, bw);
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
