/**
 * The worker side of one source channel: the transferred socket, TLS on it
 * (the handshake runs here, in this thread), the Channel, and the messages
 * every channel worker answers (write, flush, close, destroy, stats). The
 * main and preempt workers add their own work on top.
 */
import type net from 'node:net';
import { performance } from 'node:perf_hooks';
import { parentPort, threadId, workerData } from 'node:worker_threads';
import { PageBitmap } from '../../../stream/bitmap.js';
import { TARGET_PAGE_SIZE } from '../../../stream/constants.js';
import { Channel, channelName } from '../../../transport/channel.js';
import { TlsSessionCache, connectTls } from '../../../transport/sockets.js';
import type { StorageError } from '../../errors.js';
import type { BlockState } from '../pages.js';
import { FilePages, MemoryPages, type PageBatch, type WorkerPages } from './page-batches.js';
import type { ChannelWorkerData, CountDelta, FromWorker, ToWorker, WireError } from './protocol.js';
import { lossClock } from '../loss-clock.js';

/** A session cache that starts from the main channel's latest ticket (posted from the caller's thread). */
class GivenTicket extends TlsSessionCache {
  constructor(private readonly given: Buffer | undefined) {
    super();
  }

  override get ticket(): Buffer | undefined {
    return super.ticket ?? this.given;
  }
}

export function wireError(e: unknown): WireError {
  const x = e as { code?: unknown; message?: unknown; channel?: unknown; name?: unknown };
  return {
    code: typeof x?.code === 'string' ? x.code : 'closed',
    message: typeof x?.message === 'string' ? x.message : String(e),
    ...(typeof x?.channel === 'string' ? { channel: x.channel } : {}),
    ...(x?.name === 'MigrationError' ? { migration: true } : {}),
  };
}

/** process.threadCpuUsage (Node 23.9+): this thread's CPU time; absent on older Node (then 0). */
const threadCpu = (process as unknown as { threadCpuUsage?: (prev?: NodeJS.CpuUsage) => NodeJS.CpuUsage }).threadCpuUsage?.bind(process);

export const data = workerData as ChannelWorkerData;
const port = parentPort!;

export function post(m: FromWorker): void {
  port.postMessage(m);
}

/**
 * The blocks as page sets over the session's shared bitmaps (the same
 * BlockState the caller's RamPages holds), and where this worker finds
 * their bytes: the shared memory, or the block files it reads itself in
 * `batches` batches of up to `batchPages` pages.
 */
export function attachBlocks(batchPages: number, batches: number): { blocks: BlockState[]; pages: WorkerPages } {
  const blocks: BlockState[] = [];
  const memory: Buffer[] = [];
  data.blocks.forEach((b, index) => {
    const pages = b.length / TARGET_PAGE_SIZE;
    blocks.push({
      info: { idstr: b.idstr, length: b.length },
      index,
      pages,
      toSend: PageBitmap.attach(pages, b.toSend),
      sentOnce: PageBitmap.attach(pages, b.sentOnce),
      sentAfterListen: PageBitmap.attach(pages, b.sentAfterListen),
      sentOnPreempt: PageBitmap.attach(pages, b.sentOnPreempt),
    });
    if (b.memory) memory.push(Buffer.from(b.memory));
  });
  const files = data.blocks.every((b) => b.file !== undefined) && data.blocks.length > 0;
  const pages = files ? new FilePages(data.blocks.map((b) => b.file!), batchPages, batches) : new MemoryPages(memory, batchPages, batches);
  workerPages = pages;
  return { blocks, pages };
}

let workerPages: WorkerPages | undefined;

/** A read of the pages to send failed: the caller's thread fails the migration with it (storage, in postcopy too). */
function postStorageError(e: StorageError): void {
  const cause = e.cause as Error | undefined;
  post({ t: 'storage-error', error: { operation: e.operation, file: e.file, position: e.position, errno: e.errno, message: cause?.message ?? e.message } });
}

function checkRead(b: PageBatch): void {
  if (!b.error) return;
  postStorageError(b.error);
  throw b.error;
}

/**
 * Undefined when batch `b`'s pages are there (always over memory: no
 * promise), else a promise that settles once they are read. A failed read
 * is posted to the caller's thread and thrown (rejected).
 */
export function whenRead(b: PageBatch): Promise<void> | undefined {
  if (!b.loading) {
    checkRead(b);
    return undefined;
  }
  workerPages!.counts!.waits++;
  return b.loading.then(() => checkRead(b));
}

export interface WorkerHooks {
  /** A message this worker handles itself (pass, drain, postcopy): true if handled. */
  onMessage?(m: ToWorker): boolean;
  /** The channel is up (TLS done): start reading, serving. */
  onReady?(ch: Channel): void;
  /** The session is over for this thread: stop timers and loops. */
  onEnd?(): void;
}

/** Counters since the last report. */
export const counts: CountDelta = { normal: 0, duplicate: 0, transferred: 0 };

let reportNow: () => void = () => undefined;

/** Posts the stats and counters now (before a pass's 'done', so that its counts arrive first). */
export function report(): void {
  reportNow();
}

/**
 * Runs the channel of this worker: TLS when configured, then the messages
 * until close or destroy; the thread then has nothing left (no timer, no
 * handle, the port closed) and exits by itself.
 */
export function runChannelWorker(hooks: WorkerHooks): void {
  let ch: Channel | undefined;
  let ended = false;
  let statsTimer: NodeJS.Timeout | undefined;
  const cpuStart = threadCpu?.() ?? { user: 0, system: 0 };
  const end = (): void => {
    if (ended) return;
    ended = true;
    clearInterval(statsTimer);
    hooks.onEnd?.();
    port.close();
  };
  const report = (): void => {
    if (!ch) return;
    const cpu = threadCpu?.(cpuStart) ?? { user: 0, system: 0 };
    const reads = workerPages?.counts;
    post({ t: 'stats', stats: ch.stats, unacked: ch.unackedBytes, writable: ch.socket.writableLength, counts: { ...counts }, cpuSeconds: (cpu.user + cpu.system) / 1e6, ...(reads ? { reads: { ...reads } } : {}) });
    counts.normal = counts.duplicate = counts.transferred = 0;
  };
  reportNow = report;
  port.on('message', (m: ToWorker) => {
    if (ended) return;
    if (hooks.onMessage?.(m)) return;
    switch (m.t) {
      case 'write': {
        const c = ch!;
        for (const p of m.pieces) counts.transferred += p.length;
        c.send(m.pieces, m.urgent ? 'urgent' : 'bulk', () => post({ t: 'written', id: m.id })).then(
          () => post({ t: 'done', id: m.id }),
          (e: unknown) => post({ t: 'done', id: m.id, error: wireError(e) }),
        );
        return;
      }
      case 'flush':
        ch!.flush().then(
          () => post({ t: 'done', id: m.id }),
          (e: unknown) => post({ t: 'done', id: m.id, error: wireError(e) }),
        );
        return;
      case 'close':
        void ch!.close().finally(() => {
          // Under TLS the raw socket outlives the TLS one until the peer closes its side (QEMU keeps
          // the preempt channel open a while): our FIN is out, nothing more will come that matters.
          sock.destroy();
          report();
          post({ t: 'done', id: m.id });
          end();
        });
        return;
      case 'destroy':
        ch?.destroy();
        sock.destroy();
        end();
        return;
      default:
        return;
    }
  });
  const sock = data.socket as net.Socket;
  void (async () => {
    try {
      let s: net.Socket = sock;
      if (data.tls) {
        const sessions = new GivenTicket(data.tls.ticket ? Buffer.from(data.tls.ticket) : undefined);
        const tlsSock = await connectTls(sock, data.endpoint, channelName(data.role, data.multifd?.id), { material: data.tls.material, settings: data.tls.settings, sessions }, data.connectTimeoutMs);
        // TLS 1.3 tickets come after the handshake: the caller keeps the latest for the next channel.
        tlsSock.on('session', (t: Buffer) => post({ t: 'ticket', ticket: new Uint8Array(t) }));
        s = tlsSock;
      }
      if (ended) {
        s.destroy();
        return;
      }
      const c = new Channel(s, data.role, data.tuning, data.limits, data.multifd?.id);
      ch = c;
      c.on('error', (e) => post({ t: 'error', error: wireError(e), at: lossClock() }));
      c.on('close', () => {
        report();
        post({ t: 'close', at: lossClock() });
        // Closed by the peer (QEMU closes the preempt channel at the end, its multifd channels too): the caller's
        // thread sends nothing more to a closed channel, so the thread ends now rather than wait to be terminated.
        // After the answers this close settles (a flush that waited on the socket resolves on its
        // 'close', as on one thread): they are posted first, then the port closes.
        setImmediate(() => {
          sock.destroy();
          end();
        });
      });
      statsTimer = setInterval(report, 100);
      // Only while the channel is open: the channel's socket keeps the thread alive, never this timer.
      statsTimer.unref();
      post({ t: 'ready', stats: c.stats, threadId });
      hooks.onReady?.(c);
    } catch (e) {
      post({ t: 'connect-failed', error: wireError(e) });
      end();
    }
  })();
}

/** Absolute time in ms, comparable across threads. */
export function nowEpoch(): number {
  return performance.timeOrigin + performance.now();
}
