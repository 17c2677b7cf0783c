/**
 * Postcopy recovery with a real QEMU 10.0 source and our DestinationSession
 * (we play QEMU's `migrate-recover` side).
 *
 * The QEMU source runs the test guest and migrates through a fault relay to
 * our destination; postcopy starts after the first pass and the destination's
 * guest faults pages in from the top down. During postcopy the test cuts every
 * connection (a reset at both ends) several times at random moments: QEMU goes
 * to `postcopy-paused`, our session emits 'paused' and listens again; the test
 * resumes QEMU (`migrate … resume=true`), QEMU sends RECV_BITMAP per block, our
 * bitmaps, (with preempt: a new preempt channel), POSTCOPY_RESUME; we answer
 * RESUME_ACK and ask again for the pages the guest still waits for. Every run
 * must complete on both sides with every RAM block we hold equal, bit for bit,
 * to the stopped source's, no page placed twice, and one recovery per cut.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterAll, expect, it } from 'vitest';
import { DestinationSession } from '../../src/protocol/destination.js';
import { InMemorySink } from '../../src/protocol/memory.js';
import { initPkiDir } from '../../src/transport/pki.js';
import { FaultRelay } from '../faults/relay.js';
import { capabilitiesFor, demandTopDown, firstDifferentPage, MiB, nextEvent, pollMigration, readAllRamBlocks, startSource, within, type Mode } from './destination-helpers.js';
import { checkGuestInvariant, compareGuestRam, dumpSizeFor, guestRangeOf, readGuestRam, stopAll, type QemuProcess } from './harness.js';
import { describeWithQemu } from './require-qemu.js';

const MEMORY_MIB = 64;
const GUEST = { startMiB: 1, endMiB: 24, direction: 'down' as const };
const MAIN_BLOCK = 'pc.ram';

afterAll(async () => {
  await stopAll();
});

interface Case {
  mode: Exclude<Mode, 'precopy'>;
  tls: boolean;
  cuts: number;
}

async function recoverRun(c: Case): Promise<void> {
  const label = `${c.mode}${c.tls ? '-tls' : ''}`;
  const tmp = await mkdtemp(join(tmpdir(), `qmt-recover-dst-${label}-`));
  const tlsDir = c.tls ? join(tmp, 'pki') : undefined;
  if (tlsDir) await initPkiDir(tlsDir);
  const sink = new InMemorySink();
  const session = await DestinationSession.listen({
    listen: 'tcp:127.0.0.1:0',
    sink,
    postcopy: true,
    idleTimeoutMs: 20_000,
    recovery: { timeoutMs: 20_000 },
    ...(tlsDir ? { transport: { tls: { dir: tlsDir } } } : {}),
  });
  const relay = await FaultRelay.start({ target: session.uri, maxConnections: 32 });
  const paused: string[] = [];
  const resumed: number[] = [];
  session.on('paused', (e) => paused.push(e.error.reason));
  session.on('resumed', (e) => resumed.push(e.pausedMs));
  let src: QemuProcess | undefined;
  let demand: ReturnType<typeof demandTopDown> | undefined;
  try {
    src = await startSource(`src-recover-${label}`, { memoryMiB: MEMORY_MIB, guest: GUEST, ...(tlsDir ? { tlsDir } : {}) });
    await src.waitSerialPasses(3, 15_000);
    await src.setCapabilities(capabilitiesFor(c.mode));
    // A slow postcopy: the background stream lasts seconds, long enough for several cuts.
    await src.setParameters({ 'max-bandwidth': 32 * MiB, 'max-postcopy-bandwidth': 4 * MiB, 'downtime-limit': 10 });
    const t0 = performance.now();
    await src.migrate(relay.uri);
    await pollMigration(src, (m) => m.status === 'active' && (m.ram?.['dirty-sync-count'] ?? 0) >= 2, 'dirty-sync-count >= 2', 20_000);
    const run = nextEvent(session, 'postcopy-run', 15_000);
    await src.startPostcopy();
    await run;
    const g = guestRangeOf(src);
    // The guest faults from the top down, through every pause (its requests wait, then go again).
    // With preempt an unpaced walk fetches the range in under a second and postcopy can complete
    // before the last cut (CI saw it once); 1 ms per page keeps postcopy running for seconds.
    demand = demandTopDown(session, MAIN_BLOCK, g.startMiB * MiB, g.endMiB * MiB, 2 * MiB, 1);
    demand.catch(() => undefined);

    let cuts = 0;
    for (let i = 0; i < c.cuts; i++) {
      await sleep(100 + Math.floor(Math.random() * 300));
      if (session.stats().status !== 'postcopy-active') break; // completed meanwhile
      const wasPaused = new Promise<void>((r) => session.once('paused', () => r()));
      relay.cut();
      cuts++;
      await within(wasPaused, 10_000, `our destination pauses after cut ${cuts}`);
      await pollMigration(src, (m) => m.status === 'postcopy-paused', `QEMU source postcopy-paused after cut ${cuts}`, 10_000, 20);
      const wasResumed = new Promise<void>((r) => session.once('resumed', () => r()));
      // QEMU's recovery: the management resumes the source toward the destination's new listener.
      await src.migrate(relay.uri, { resume: true });
      await within(wasResumed, 15_000, `our destination resumes after cut ${cuts}`);
    }

    const info = await src.waitMigration(['completed'], 60_000);
    const result = await within(session.done, 15_000, 'DestinationSession.done');
    const d = await within(demand, 15_000, 'demand paging');
    const ms = Math.round(performance.now() - t0);
    const statuses = src.qmp.events.filter((e) => e.event === 'MIGRATION').map((e) => String((e.data as { status?: unknown }).status));
    const st = result.stats;
    console.log(
      `[recovery qemu→qmt] ${label}: ${cuts} cut(s), recoveries ${st.recoveries}, paused ${resumed.map((x) => x.toFixed(0)).join('/')} ms; ` +
        `answered ${d.answered.length} (${d.ended}), requests sent ${st['postcopy-requests']}, QEMU postcopy-requests ${info.ram?.['postcopy-requests']}, ` +
        `p50 ${st['postcopy-latency'].p50} µs p99 ${st['postcopy-latency'].p99} µs; preempt pages ${st['preempt-pages']}; placed twice ${st['placed-twice']}; ${ms} ms; ` +
        `QEMU statuses ${[...new Set(statuses)].join(',')}`,
    );
    expect(cuts, 'the cuts came during postcopy').toBe(c.cuts);
    expect(st.recoveries, `one recovery per cut (pauses: ${paused.join(' | ')})`).toBe(cuts);
    expect(statuses.filter((s) => s === 'postcopy-paused').length, 'QEMU paused once per cut').toBe(cuts);
    expect(statuses).toContain('postcopy-recover');
    expect(st['placed-twice'], 'no page placed twice').toBe(0);
    expect(result.complete).toBe(true);

    // The source is stopped: its memory is the truth, block by block, bit for bit.
    const sourceBlocks = await readAllRamBlocks(src);
    const sourceMem = await readGuestRam(src, dumpSizeFor(src));
    const main = sink.blocks.get(MAIN_BLOCK)!;
    const diff = compareGuestRam(sourceMem, main);
    expect(diff, `pages differing from the stopped source: ${diff.pages.map((p) => `0x${p.toString(16)}`).join(', ')}`).toMatchObject({ equal: true, count: 0 });
    const inv = checkGuestInvariant(main, g);
    expect(inv.ok, inv.detail).toBe(true);
    for (const sb of sourceBlocks) {
      const got = sink.blocks.get(sb.name);
      expect(got, `received block ${sb.name}`).toBeDefined();
      const at = firstDifferentPage(sb.data, got!);
      expect(at, `${sb.name}: first differing page at +0x${at.toString(16)}`).toBe(-1);
    }
  } catch (err) {
    const st = session.stats();
    throw new Error(`${label}: ${(err as Error).message}\n  session: ${st.status}, recoveries ${st.recoveries}; relay: ${relay.fired.join('; ')}\n  source stderr: ${src?.stderrTail(800) ?? ''}`, { cause: err });
  } finally {
    session.close();
    await relay.close();
    await src?.stop();
    await demand?.catch(() => undefined);
    await rm(tmp, { recursive: true, force: true });
  }
}

describeWithQemu('postcopy recovery: QEMU 10 source → our destination', () => {
  it('postcopy, three cuts: QEMU and our session pause and resume each time; RAM bit for bit', () => recoverRun({ mode: 'postcopy', tls: false, cuts: 3 }), 120_000);
  it('postcopy-preempt, two cuts: a new preempt channel each time; RAM bit for bit', () => recoverRun({ mode: 'preempt', tls: false, cuts: 2 }), 120_000);
  it('postcopy-preempt over TLS, two cuts', () => recoverRun({ mode: 'preempt', tls: true, cuts: 2 }), 120_000);
});
