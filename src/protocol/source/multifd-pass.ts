import { TARGET_PAGE_SIZE } from '../../stream/constants.js';
import { RAM_IDSTR, RAM_VERSION } from '../../stream/constants.js';
import { MigrationError } from '../errors.js';
import type { Link } from './link.js';
import type { MultifdChannelSender } from './multifd.js';
import type { PassOptions } from './pass.js';
import type { SourceRun } from './run.js';
import { isThreaded, type ThreadedSourceConnection } from './threads/connection.js';

/**
 * A precopy pass with multifd, as QEMU 10.0's: the dirty pages go in
 * multifd packets (up to 128 pages of one block each, zero pages in the
 * packet's zero list), spread over the channels round-robin and pulled by
 * them — a packet is built only when some channel has room under its bulk
 * window, so nothing piles up in user space. The main channel carries no
 * page: at the pass's end every channel sends a SYNC packet and main gets a
 * RAM section with MULTIFD_FLUSH and EOS (QEMU flushes each time its scan
 * wraps around RAM: once per pass here, and in the END section of the last
 * stage). Returns the pages sent. Ends early when postcopy is requested:
 * the packet under way goes, and the barrier is the postcopy switch's
 * (QEMU 10.1's save_postcopy_prepare; an interrupted scan did not wrap).
 */
export async function sendMultifdPass(run: SourceRun, o: PassOptions): Promise<number> {
  const link = run.live;
  const senders = link.multifd;
  const b = link.multifdPacket;
  const limit = (): number | undefined => (run.t.stoppedAt !== undefined ? undefined : run.opts.bandwidthLimit);
  let sent = 0;
  let interrupted = false;
  /** Sends the packet in `b` on the next channel with room (QEMU's next_channel walk). */
  const emit = async (): Promise<void> => {
    if (b.size === 0) return;
    run.c.normal += b.normalCount;
    run.c.duplicate += b.zeroCount;
    const n = pick(link, senders).sendPacket(b);
    run.c.transferred += n;
    link.multifdSinceYield += n;
    const bw = limit();
    if (bw) await run.pacer.pace(n, bw);
  };

  outer: for (const st of run.ram.blocks) {
    const block = st.info.idstr;
    let page = st.toSend.next(0);
    while (page >= 0) {
      await turn(run, link, senders);
      if (o.kind === 'part' && run.postcopyRequested) {
        interrupted = true;
        break outer;
      }
      if (b.size > 0 && b.block !== block) await emit();
      const n = st.toSend.runLength(page, b.room);
      const offset = page * TARGET_PAGE_SIZE;
      const view = run.ram.readRun(st, page, n, false);
      if (view === undefined) {
        const mem = run.opts.memory;
        for (let i = 0; i < n; i++) b.addRun(block, offset + i * TARGET_PAGE_SIZE, 1, mem.readPage(block, offset + i * TARGET_PAGE_SIZE), 0);
      } else {
        const data = view instanceof Uint8Array ? view : await view;
        run.check();
        if (link.dropped) throw run.failure ?? new MigrationError('peer-disconnected', run.phase, 'the connection was lost');
        b.addRun(block, offset, n, data, 0);
      }
      run.ram.markSent(st, page, n);
      sent += n;
      if (b.room === 0) await emit();
      page = st.toSend.next(page + n);
    }
  }
  await emit();
  if (interrupted) return sent;
  await writeMultifdBarrier(run, link, o.kind === 'end' ? 'end' : 'part');
  await run.flushMain();
  return sent;
}

/**
 * The barrier QEMU puts after every scan of RAM (multifd_ram_flush_and_sync):
 * a SYNC packet on every channel, then MULTIFD_FLUSH on main, in a RAM
 * section of `kind` with its EOS. The destination's channels wait at their
 * SYNC until main's flush, so no page of a later pass can overtake one of
 * this pass on another channel. `kind` 'start' writes only the flush (the
 * setup section is the caller's).
 */
export async function writeMultifdBarrier(run: SourceRun, link: Link, kind: 'start' | 'part' | 'end'): Promise<void> {
  // Threaded: each channel's worker sends its SYNC (and counts its bytes); the flush waits for all of them.
  if (isThreaded(link.conn)) await syncThreaded(run, link);
  else for (const s of link.multifd) run.c.transferred += s.sync();
  const sectionId = run.ramSection.sectionId;
  if (kind === 'start') {
    run.write([{ type: 'ram-multifd-flush' }]);
    return;
  }
  run.write([
    { type: 'section', kind, sectionId, idstr: RAM_IDSTR, instanceId: 0, versionId: RAM_VERSION },
    { type: 'ram-multifd-flush' },
    { type: 'ram-eos' },
    { type: 'footer', sectionId },
  ]);
}

async function syncThreaded(run: SourceRun, link: Link): Promise<void> {
  try {
    await (link.conn as ThreadedSourceConnection).multifdSync();
  } catch (e) {
    run.check();
    if (link.dropped) throw run.failure ?? run.pausedBy ?? new MigrationError('peer-disconnected', run.phase, 'the connection was lost');
    throw e;
  }
  run.check();
}

/**
 * A multifd precopy pass with every multifd channel in its own worker: what
 * this thread encoded goes first, then each worker takes chunks of the
 * shared `toSend` and sends them in packets (their counters arrive batched,
 * before each worker's end); then the barrier as sendMultifdPass's.
 */
export async function sendThreadedMultifdPass(run: SourceRun, link: Link, o: PassOptions): Promise<number> {
  await run.flushMain();
  const conn = link.conn as ThreadedSourceConnection;
  const bandwidthLimit = run.t.stoppedAt !== undefined ? undefined : run.opts.bandwidthLimit;
  let r: { sent: number; interrupted: boolean };
  try {
    r = await conn.multifdPass({ precopy: true, kind: o.kind, postcopy: false, bandwidthLimit });
  } catch (e) {
    run.check();
    if (link.dropped) throw run.failure ?? run.pausedBy ?? new MigrationError('peer-disconnected', run.phase, 'the connection was lost');
    throw e;
  }
  run.check();
  if (link.dropped) throw run.failure ?? new MigrationError('peer-disconnected', run.phase, 'the connection was lost');
  if (r.interrupted) return r.sent;
  await writeMultifdBarrier(run, link, o.kind === 'end' ? 'end' : 'part');
  await run.flushMain();
  return r.sent;
}

/** The first channel with room from the link's round-robin position on (or the next in turn, when none has: one packet over). */
function pick(link: Link, senders: readonly MultifdChannelSender[]): MultifdChannelSender {
  const n = senders.length;
  for (let k = 0; k < n; k++) {
    const i = (link.multifdNext + k) % n;
    if (senders[i]!.bulkRoom > 0) {
      link.multifdNext = (i + 1) % n;
      return senders[i]!;
    }
  }
  const s = senders[link.multifdNext]!;
  link.multifdNext = (link.multifdNext + 1) % n;
  return s;
}

/** Bulk bytes the producer hands over, all channels together, before it lets the event loop run I/O (a return-path message, timers). */
const YIELD_BYTES = 1 << 20;

/**
 * Waits until some channel has room for a packet (then the next in turn's
 * wait: QEMU's channels_ready), and every YIELD_BYTES lets I/O run — the
 * channels' own yield quantum is off (see Link.connectMultifd): per channel
 * it would starve the others' turns. Rethrows what ended the link.
 */
async function turn(run: SourceRun, link: Link, senders: readonly MultifdChannelSender[]): Promise<void> {
  let any = false;
  for (const s of senders) {
    if (s.bulkRoom > 0) {
      any = true;
      break;
    }
  }
  if (!any) {
    // Room comes back with the sockets' write callbacks: I/O has run.
    await senders[link.multifdNext]!.whenBulkRoom();
    link.multifdSinceYield = 0;
  } else if (link.multifdSinceYield >= YIELD_BYTES) {
    await new Promise<void>((resolve) => setImmediate(resolve));
    link.multifdSinceYield = 0;
  }
  if (link.dropped) throw run.failure ?? run.pausedBy ?? new MigrationError('peer-disconnected', run.phase, 'the connection was lost');
  run.check();
}
