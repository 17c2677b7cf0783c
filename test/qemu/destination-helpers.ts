/**
 * Helpers for test/qemu/destination.test.ts: a QEMU 10.0 source migrating to
 * our DestinationSession (precopy, postcopy, postcopy-preempt, plain or TLS),
 * with demand paging during postcopy and reads of every source RAM block.
 */
import { open } from 'node:fs/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import type { DestinationSession } from '../../src/protocol/destination.js';
import type { PageRequestResult } from '../../src/protocol/page-tracker.js';
import { startQemu, type MigrationInfo, type QemuProcess } from './harness.js';

export const MiB = 1024 * 1024;
export const PAGE = 4096;

export type Mode = 'precopy' | 'postcopy' | 'preempt';

/** Source QEMU for these tests: q35, 64 MiB, the test guest, optional TLS client credentials. */
export async function startSource(
  name: string,
  opts: { memoryMiB: number; guest: { startMiB: number; endMiB: number; direction: 'up' | 'down' }; tlsDir?: string },
): Promise<QemuProcess> {
  const q = await startQemu({
    name,
    machine: 'q35',
    memoryMiB: opts.memoryMiB,
    guest: opts.guest,
    extraArgs: opts.tlsDir ? ['-object', `tls-creds-x509,id=tls0,dir=${opts.tlsDir},endpoint=client`] : [],
  });
  if (opts.tlsDir) await q.setParameters({ 'tls-creds': 'tls0', 'tls-hostname': 'localhost' });
  return q;
}

/**
 * Source capabilities for a mode (the destination is ours: it needs no QMP).
 * `events` only makes QEMU emit MIGRATION events (state changes); it changes
 * nothing on the wire.
 */
export function capabilitiesFor(mode: Mode, extra: Record<string, boolean> = {}): Record<string, boolean> {
  const caps: Record<string, boolean> = { events: true, ...extra };
  if (mode === 'precopy') return caps;
  return { ...caps, 'postcopy-ram': true, ...(mode === 'preempt' ? { 'postcopy-preempt': true } : {}) };
}

/** Polls `query-migrate` until `pred` holds; rejects on failed/cancelled/completed-too-early or timeout. */
export async function pollMigration(
  q: QemuProcess,
  pred: (m: MigrationInfo) => boolean,
  what: string,
  timeoutMs: number,
  pollMs = 10,
): Promise<MigrationInfo> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const m = await q.queryMigrate();
    if (pred(m)) return m;
    const st = m.status ?? 'none';
    if (st === 'failed' || st === 'cancelled' || st === 'completed') {
      throw new Error(`${q.name}: migration ${st} while waiting for ${what}: ${m['error-desc'] ?? ''} ${q.stderrTail(500)}`);
    }
    if (Date.now() > deadline) throw new Error(`${q.name}: ${what} not reached after ${timeoutMs} ms (status ${st}, ram ${JSON.stringify(m.ram ?? {})})`);
    await sleep(pollMs);
  }
}

/** Resolves with the event's payload, rejects after `timeoutMs` or when the session fails first. */
export function nextEvent<K extends 'postcopy-listen' | 'postcopy-run' | 'pass'>(
  session: DestinationSession,
  name: K,
  timeoutMs: number,
): Promise<unknown> {
  const p = new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      session.off(name, on as never);
      reject(new Error(`no '${name}' from the destination session within ${timeoutMs} ms`));
    }, timeoutMs);
    const on = (...args: unknown[]): void => {
      clearTimeout(timer);
      resolve(args[0]);
    };
    session.once(name, on as never);
    session.done.catch((e: unknown) => {
      clearTimeout(timer);
      reject(e instanceof Error ? e : new Error(String(e)));
    });
  });
  // Not awaited when an earlier step throws: never an unhandled rejection.
  p.catch(() => undefined);
  return p;
}

export interface DemandResult {
  /** Requests that were sent (REQ_PAGES) and answered. */
  answered: PageRequestResult[];
  /** Pages found already present when asked (not requested). */
  alreadyThere: number;
  /** Pages of the range the walk did not ask for (it stopped early). */
  notWalked: number;
  /** Why the walk ended. */
  ended: 'walked' | 'met-bulk-stream' | 'session-ended';
}

/**
 * Demand paging like a guest faulting top-down: walks [start, end) of `block`
 * from the highest page down and, for each page, asks for it and waits for it
 * (one request outstanding at a time, like one vCPU).
 *
 * The background stream fills the range upward from low addresses. Where the
 * walk meets it, a requested page may already be on its way on the main
 * channel (sent, not yet parsed); QEMU then does not send it again on the
 * preempt channel (wire doc §5.3), so the answer comes on 'main' even with
 * preempt. To ask only for pages the source must send on demand, the walk
 * stops once any page within `marginBytes` below the next one has arrived
 * (the bulk stream is near; more than the data in flight on the link).
 *
 * `gapMs` is a pause after each answered page: a slower guest, so that a test
 * which must act during postcopy (cut it, say) is not racing a walk that,
 * with preempt, fetches the whole range in well under a second.
 */
export async function demandTopDown(
  session: DestinationSession,
  block: string,
  start: number,
  end: number,
  marginBytes = 4 * MiB,
  gapMs = 0,
): Promise<DemandResult> {
  const out: DemandResult = { answered: [], alreadyThere: 0, notWalked: 0, ended: 'walked' };
  const bulkNear = (off: number): boolean => {
    for (let o = off; o >= Math.max(start, off - marginBytes); o -= PAGE) if (session.hasPage(block, o)) return true;
    return false;
  };
  for (let off = end - PAGE; off >= start; off -= PAGE) {
    if (bulkNear(off)) {
      out.ended = 'met-bulk-stream';
      out.notWalked = (off - start) / PAGE + 1;
      break;
    }
    try {
      const r = await session.requestPage(block, off);
      if (r.requested) out.answered.push(r);
      else out.alreadyThere++;
      if (gapMs > 0) await sleep(gapMs);
    } catch {
      // The migration completed (or failed) while the request was outstanding.
      out.ended = 'session-ended';
      out.notWalked = (off - start) / PAGE;
      break;
    }
  }
  return out;
}

export interface SourceBlock {
  name: string;
  usedLength: number;
  data: Buffer;
}

/**
 * Every RAM block of a (stopped) QEMU, read from /proc/PID/mem at the host
 * address `info ramblock` reports, `usedLength` bytes each.
 */
export async function readAllRamBlocks(q: QemuProcess): Promise<SourceBlock[]> {
  const blocks = await q.ramBlocks();
  const fh = await open(`/proc/${q.pid}/mem`, 'r');
  try {
    const out: SourceBlock[] = [];
    for (const b of blocks) {
      const data = Buffer.alloc(b.usedLength);
      let done = 0;
      while (done < data.length) {
        const { bytesRead } = await fh.read(data, done, Math.min(data.length - done, 16 * MiB), b.hva + done);
        if (bytesRead <= 0) throw new Error(`${q.name}: short read of block ${b.name} at +${done}`);
        done += bytesRead;
      }
      out.push({ name: b.name, usedLength: b.usedLength, data });
    }
    return out;
  } finally {
    await fh.close();
  }
}

/** Offset of the first differing page of two buffers, or -1 (lengths must match). */
export function firstDifferentPage(a: Buffer, b: Buffer): number {
  if (a.length !== b.length) return 0;
  for (let off = 0; off < a.length; off += PAGE) {
    const end = Math.min(off + PAGE, a.length);
    if (a.compare(b, off, end, off, end) !== 0) return off;
  }
  return -1;
}

/** Statuses QEMU announced through MIGRATION events (needs capability `events`). */
export function migrationStatusesSeen(q: QemuProcess): string[] {
  return q.qmp.events
    .filter((e) => e.event === 'MIGRATION')
    .map((e) => String((e.data as { status?: unknown } | undefined)?.status ?? ''));
}

/** Races `p` against a timeout with a message. */
export async function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([
      p,
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error(`${what}: no result within ${ms} ms`)), ms);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}
