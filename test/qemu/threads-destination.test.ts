/**
 * A QEMU 10.0 source → DestinationSession with its channels in worker
 * threads (threads: 'on', shared InMemorySink): precopy and postcopy with
 * postcopy-preempt, plain and TLS. RAM bit for bit against the stopped
 * source (every block), the guest's invariant, demand requests answered
 * (on preempt), and no worker left after done. Needs Node 26.6+ (socket
 * transfer) and QEMU; skipped otherwise.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Worker } from 'node:worker_threads';
import { afterAll, expect, it } from 'vitest';
import { DestinationSession } from '../../src/protocol/destination.js';
import { InMemorySink } from '../../src/protocol/memory.js';
import { initPkiDir } from '../../src/transport/pki.js';
import { socketTransferSupported } from '../../src/transport/worker/support.js';
import { capabilitiesFor, demandTopDown, firstDifferentPage, MiB, nextEvent, pollMigration, readAllRamBlocks, startSource, within, type DemandResult, type Mode } from './destination-helpers.js';
import { checkGuestInvariant, compareGuestRam, dumpSizeFor, guestRangeOf, readGuestRam, stopAll, type QemuProcess } from './harness.js';
import { describeWithQemu } from './require-qemu.js';

const GUEST = { startMiB: 1, endMiB: 24, direction: 'down' as const };

afterAll(async () => {
  await stopAll();
});

describeWithQemu('QEMU 10 → DestinationSession with threads', () => {
  const cases: [Mode, boolean][] = [
    ['precopy', false],
    ['precopy', true],
    ['preempt', false],
    ['preempt', true],
  ];

  it.skipIf(!socketTransferSupported()).each(cases)('%s (TLS: %s): completed, RAM bit for bit, channels in workers, none left', async (mode, tls) => {
    const alive = new Set<Worker>();
    const onWorker = (w: Worker): void => {
      alive.add(w);
      w.once('exit', () => alive.delete(w));
    };
    process.on('worker', onWorker);
    const tmp = await mkdtemp(join(tmpdir(), `qmt-threads-qemu-${mode}-`));
    const tlsDir = tls ? join(tmp, 'pki') : undefined;
    if (tlsDir) await initPkiDir(tlsDir);
    const sink = new InMemorySink({ shared: true });
    const session = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, postcopy: mode !== 'precopy', ...(tlsDir ? { transport: { tls: { dir: tlsDir } } } : {}), idleTimeoutMs: 20_000, threads: 'on' });
    let src: QemuProcess | undefined;
    try {
      src = await startSource(`src-threads-${mode}${tls ? '-tls' : ''}`, { memoryMiB: 64, guest: GUEST, ...(tlsDir ? { tlsDir } : {}) });
      await src.waitSerialPasses(3, 15_000);
      // TLS precopy with the return path, as mfd-dest's TLS case: QEMU then closes after our SHUT; without
      // it, the TLS 1.3 tickets it never reads can make its close a reset before we read its last bytes.
      await src.setCapabilities(capabilitiesFor(mode, tls ? { 'return-path': true } : {}));
      // Postcopy: slow enough that the guest rewrites much of its range during the first pass (a busy machine
      // slows the TCG guest), so that postcopy still has pages to fetch when the demand walk begins; at 32 MiB/s
      // the second pass could hold so few that postcopy ended before the first request, and preempt carried none.
      await src.setParameters(mode === 'precopy' ? { 'max-bandwidth': 32 * MiB, 'max-postcopy-bandwidth': 16 * MiB, 'downtime-limit': 10 } : { 'max-bandwidth': 8 * MiB, 'max-postcopy-bandwidth': 8 * MiB, 'downtime-limit': 10 });
      await src.migrate(session.uri);
      let demand: Promise<DemandResult> | undefined;
      if (mode === 'precopy') {
        await pollMigration(src, (m) => (m.ram?.['dirty-sync-count'] ?? 0) >= 3, 'dirty-sync-count >= 3', 20_000);
        await src.setParameters({ 'downtime-limit': 20_000, 'max-bandwidth': 256 * MiB });
      } else {
        await pollMigration(src, (m) => m.status === 'active' && (m.ram?.['dirty-sync-count'] ?? 0) >= 2, 'dirty-sync-count >= 2', 20_000);
        const run = nextEvent(session, 'postcopy-run', 15_000);
        await src.startPostcopy();
        await run;
        const g = guestRangeOf(src);
        demand = demandTopDown(session, 'pc.ram', g.startMiB * MiB, g.endMiB * MiB);

      }
      await src.waitMigration(['completed'], 30_000);
      const result = await within(session.done, 10_000, 'DestinationSession.done');
      const d = demand ? await within(demand, 10_000, 'demand paging') : undefined;
      const sourceBlocks = await readAllRamBlocks(src);
      const sourceMem = await readGuestRam(src, dumpSizeFor(src));
      const main = sink.blocks.get('pc.ram')!;
      const diff = compareGuestRam(sourceMem, main);
      expect(diff, 'pages differing from the stopped source').toMatchObject({ equal: true, count: 0 });
      const inv = checkGuestInvariant(main, guestRangeOf(src));
      expect(inv.ok, inv.detail).toBe(true);
      for (const sb of sourceBlocks) {
        const got = sink.blocks.get(sb.name);
        expect(got?.length, `length of ${sb.name}`).toBe(sb.usedLength);
        expect(firstDifferentPage(sb.data, got!), `${sb.name}: first differing page`).toBe(-1);
      }
      const st = result.stats;
      expect(st.threads.used, st.threads.why).toBe(true);
      expect(st.threads.channels.map((c) => c.role).sort()).toEqual(mode === 'preempt' ? ['main', 'preempt'] : ['main']);
      expect(st['placed-twice']).toBe(0);
      if (tls) expect(st.channels.main?.tls?.protocol).toBe('TLSv1.3');
      if (d) {
        expect(d.answered.length, 'demand requests answered').toBeGreaterThan(0);
        expect(d.answered.filter((a) => a.channel === 'preempt').length, 'answered on preempt').toBeGreaterThan(0);
        const us = d.answered.map((a) => a.latencyUs).sort((a, b) => a - b);
        console.log(`[threads qemu] ${mode}${tls ? ' TLS' : ''}: ${d.answered.length} requests, p50 ${Math.round(us[us.length >> 1]!)} µs, p99 ${Math.round(us[Math.floor(us.length * 0.99)]!)} µs; CPU ${st.threads.channels.map((c) => `${c.role} ${c.cpuSeconds.toFixed(2)} s`).join(', ')}`);
      }
      expect(alive.size, 'workers alive after done').toBe(0);
    } finally {
      process.off('worker', onWorker);
      await session.close();
      await src?.stop();
      await rm(tmp, { recursive: true, force: true });
    }
  }, 60_000);
});
