/**
 * Destination session: receive a live migration from a real QEMU 10.
 *
 * A QEMU 10.0 source running the test guest migrates to our
 * DestinationSession over TCP — precopy, postcopy started after the first
 * pass, postcopy with postcopy-preempt — plain and over TLS with certificates
 * from initPkiDir. Each migration must complete on both sides with the RAM we
 * received equal, bit for bit, to the stopped source's (every RAM block), and
 * in postcopy our demand requests must be answered (on the preempt channel
 * when it exists). A source killed mid-precopy must make the session fail
 * promptly with a MigrationError; mid-postcopy it pauses first (the source
 * might come back: postcopy recovery) and fails when its recovery timeout
 * ends. What arrived must still be savable as an incomplete saved VM.
 */
import { mkdtemp, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterAll, expect, it } from 'vitest';
import { DestinationSession, type DestinationResult } from '../../src/protocol/destination.js';
import { DirectorySink } from '../../src/protocol/directory-sink.js';
import { MigrationError } from '../../src/protocol/errors.js';
import { InMemorySink } from '../../src/protocol/memory.js';
import { MANIFEST, RAM_DIR, readSavedVmManifest, writeSavedVm } from '../../src/protocol/saved-vm.js';
import type { ChannelStats } from '../../src/transport/channel.js';
import { initPkiDir } from '../../src/transport/pki.js';
import {
  capabilitiesFor,
  demandTopDown,
  firstDifferentPage,
  migrationStatusesSeen,
  MiB,
  nextEvent,
  pollMigration,
  readAllRamBlocks,
  startSource,
  within,
  type DemandResult,
  type Mode,
} from './destination-helpers.js';
import {
  checkGuestInvariant,
  compareGuestRam,
  dumpSizeFor,
  guestRangeOf,
  readGuestRam,
  stopAll,
  type MigrationInfo,
  type QemuProcess,
} from './harness.js';
import { describeWithQemu } from './require-qemu.js';

/** 64 MiB q35 guest rewriting 23 MiB continuously: one precopy pass takes ~0.7 s at 32 MiB/s and never converges by itself. */
const MEMORY_MIB = 64;
const GUEST = { startMiB: 1, endMiB: 24, direction: 'down' as const };
const MAIN_BLOCK = 'pc.ram';
const PRECOPY_BANDWIDTH = 32 * MiB;
const POSTCOPY_BANDWIDTH = 16 * MiB;
const CASE_TIMEOUT_MS = 45_000;

afterAll(async () => {
  await stopAll();
});

interface Observed {
  mode: Mode;
  tls: boolean;
  result: DestinationResult;
  sink: InMemorySink;
  sourceInfo: MigrationInfo;
  sourceStatuses: string[];
  sawListen: boolean;
  sawRun: boolean;
  channelEvents: Array<{ role: 'main' | 'preempt' | 'multifd'; tls: ChannelStats['tls'] }>;
  pageRequestEvents: number;
  demand: DemandResult | undefined;
  /** Every RAM block of the stopped source. */
  sourceBlocks: Awaited<ReturnType<typeof readAllRamBlocks>>;
  /** Guest-physical dump of the stopped source (readGuestRam). */
  sourceMem: Buffer;
  guestRange: ReturnType<typeof guestRangeOf>;
  durationMs: number;
}

/** One migration from a fresh QEMU source to a fresh DestinationSession. */
async function migrate(mode: Mode, tls: boolean, returnPath = false): Promise<Observed> {
  const label = `${mode}${tls ? '-tls' : ''}${returnPath ? '-rp' : ''}`;
  const tmp = await mkdtemp(join(tmpdir(), `qmt-dest-${label}-`));
  const tlsDir = tls ? join(tmp, 'pki') : undefined;
  if (tlsDir) await initPkiDir(tlsDir);
  const sink = new InMemorySink();
  const session = await DestinationSession.listen({
    listen: 'tcp:127.0.0.1:0',
    sink,
    postcopy: mode !== 'precopy',
    ...(tlsDir ? { transport: { tls: { dir: tlsDir } } } : {}),
    idleTimeoutMs: 20_000,
  });
  const channelEvents: Observed['channelEvents'] = [];
  let sawListen = false;
  let sawRun = false;
  let pageRequestEvents = 0;
  session.on('channel', ({ role, stats }) => channelEvents.push({ role, tls: stats.tls }));
  session.on('postcopy-listen', () => (sawListen = true));
  session.on('postcopy-run', () => (sawRun = true));
  session.on('page-request', () => pageRequestEvents++);

  let src: QemuProcess | undefined;
  try {
    src = await startSource(`src-${label}`, { memoryMiB: MEMORY_MIB, guest: GUEST, ...(tlsDir ? { tlsDir } : {}) });
    // Let the guest run a few passes so its range holds non-zero counters.
    await src.waitSerialPasses(3, 15_000);
    await src.setCapabilities(capabilitiesFor(mode, returnPath ? { 'return-path': true } : {}));
    await src.setParameters({
      'max-bandwidth': PRECOPY_BANDWIDTH,
      'max-postcopy-bandwidth': POSTCOPY_BANDWIDTH,
      // Precopy must never converge by itself: several passes (precopy), or postcopy must be needed.
      'downtime-limit': 10,
    });
    const t0 = performance.now();
    await src.migrate(session.uri);

    let demand: Promise<DemandResult> | undefined;
    if (mode === 'precopy') {
      // Several passes over the running guest, then a generous downtime budget lets it converge.
      await pollMigration(src, (m) => (m.ram?.['dirty-sync-count'] ?? 0) >= 3, 'dirty-sync-count >= 3', 20_000);
      await src.setParameters({ 'downtime-limit': 20_000, 'max-bandwidth': 256 * MiB });
    } else {
      // Postcopy after the first full pass.
      await pollMigration(src, (m) => m.status === 'active' && (m.ram?.['dirty-sync-count'] ?? 0) >= 2, 'dirty-sync-count >= 2', 20_000);
      const run = nextEvent(session, 'postcopy-run', 15_000);
      await src.startPostcopy();
      await run;
      const g = guestRangeOf(src);
      demand = demandTopDown(session, MAIN_BLOCK, g.startMiB * MiB, g.endMiB * MiB);
    }

    const sourceInfo = await src.waitMigration(['completed'], 30_000);
    const result = await within(session.done, 10_000, 'DestinationSession.done');
    const durationMs = Math.round(performance.now() - t0);
    const demandResult = demand ? await within(demand, 10_000, 'demand paging') : undefined;

    // The source is stopped (postmigrate): its memory is the final truth.
    const sourceBlocks = await readAllRamBlocks(src);
    const sourceMem = await readGuestRam(src, dumpSizeFor(src));
    return {
      mode,
      tls,
      result,
      sink,
      sourceInfo,
      sourceStatuses: migrationStatusesSeen(src),
      sawListen,
      sawRun,
      channelEvents,
      pageRequestEvents,
      demand: demandResult,
      sourceBlocks,
      sourceMem,
      guestRange: guestRangeOf(src),
      durationMs,
    };
  } catch (err) {
    const st = session.stats();
    throw new Error(
      `${label}: ${(err as Error).message}\n  session: ${st.status} phase ${session.currentPhase}, ${st.transferred} bytes` +
        `\n  source stderr: ${src?.stderrTail(500) ?? ''}`,
      { cause: err },
    );
  } finally {
    session.close();
    await src?.stop();
    await rm(tmp, { recursive: true, force: true });
  }
}

function checkRam(o: Observed): void {
  // Main RAM: offsets equal guest-physical addresses below 2 GiB on q35.
  const main = o.sink.blocks.get(MAIN_BLOCK);
  expect(main, `received block ${MAIN_BLOCK}`).toBeDefined();
  const diff = compareGuestRam(o.sourceMem, main!);
  expect(diff, `pages differing from the stopped source: ${diff.pages.map((p) => `0x${p.toString(16)}`).join(', ')}`).toMatchObject({
    equal: true,
    count: 0,
  });
  const inv = checkGuestInvariant(main!, o.guestRange);
  expect(inv.ok, inv.detail).toBe(true);

  // The block list: names and lengths as the source's `info ramblock` (used length).
  const ours = o.result.blocks.map((b) => ({ name: b.idstr, length: b.length })).sort((a, b) => a.name.localeCompare(b.name));
  const theirs = o.sourceBlocks.map((b) => ({ name: b.name, length: b.usedLength })).sort((a, b) => a.name.localeCompare(b.name));
  expect(ours).toEqual(theirs);

  // The pages came in runs (decoder pageRuns → sink.writePages/zeroPages), not one call per page.
  const st = o.result.stats;
  expect(st.runs.pages, 'pages landed in runs').toBe(st.normal + st.duplicate + st.xbzrle);
  console.log(`[destination runs] ${o.mode}${o.tls ? ' over TLS' : ''}: ${st.runs.pages} pages in ${st.runs.count} runs (${(st.runs.pages / st.runs.count).toFixed(1)} per run)`);
  // Over TLS QEMU sends every iovec as a TLS record of its own (a page header, then the page), so
  // a data page never lies whole in one chunk with its neighbours: only zero pages make runs there.
  expect(st.runs.pages / st.runs.count, 'pages per run').toBeGreaterThan(o.tls ? 1 : 2);

  // Every block, byte for byte (including pc.ram under the VGA window and the ROM blocks).
  for (const sb of o.sourceBlocks) {
    const got = o.sink.blocks.get(sb.name);
    expect(got, `received block ${sb.name}`).toBeDefined();
    expect(got!.length, `length of ${sb.name}`).toBe(sb.usedLength);
    const at = firstDifferentPage(sb.data, got!);
    expect(at, `${sb.name}: first differing page at +0x${at.toString(16)}`).toBe(-1);
  }
}

function checkTls(o: Observed): void {
  const ch = o.result.stats.channels;
  expect(ch.main?.tls?.protocol).toBe('TLSv1.3');
  expect(o.channelEvents.find((c) => c.role === 'main')?.tls?.protocol).toBe('TLSv1.3');
  if (o.mode === 'preempt') {
    expect(ch.preempt?.tls?.protocol).toBe('TLSv1.3');
  }
  console.log(
    `[destination tls] ${o.mode}: main ${ch.main?.tls?.protocol} ${ch.main?.tls?.cipher} resumed=${ch.main?.tls?.resumed}` +
      (ch.preempt ? `; preempt ${ch.preempt.tls?.protocol} ${ch.preempt.tls?.cipher} resumed=${ch.preempt.tls?.resumed}` : '; no preempt channel'),
  );
}

function checkPostcopy(o: Observed): void {
  // Postcopy really happened: QEMU went through postcopy-active and the session listened and ran.
  expect(o.sourceStatuses).toContain('postcopy-active');
  expect(o.sawListen).toBe(true);
  expect(o.sawRun).toBe(true);
  expect(o.result.postcopy).toBe(true);

  const st = o.result.stats;
  const d = o.demand!;
  expect(d).toBeDefined();
  expect(d.answered.length, 'demand requests answered').toBeGreaterThan(0);
  expect(o.pageRequestEvents).toBe(d.answered.length);
  expect(st['postcopy-requests']).toBeGreaterThanOrEqual(d.answered.length);
  // Each REQ_PAGES we sent is counted by QEMU's source.
  expect(o.sourceInfo.ram?.['postcopy-requests'] ?? 0).toBeGreaterThanOrEqual(st['postcopy-requests']);
  const byChannel = { main: 0, preempt: 0, none: 0 };
  for (const r of d.answered) byChannel[r.channel]++;
  const expected = o.mode === 'preempt' ? 'preempt' : 'main';
  const lat = st['postcopy-latency'];
  console.log(
    `[destination latency] ${o.mode === 'preempt' ? 'postcopy+preempt' : 'postcopy (no preempt)'}${o.tls ? ' over TLS' : ''}: ` +
      `answered=${d.answered.length} sent=${st['postcopy-requests']} qemu-postcopy-requests=${o.sourceInfo.ram?.['postcopy-requests']} ` +
      `by-channel main=${byChannel.main} preempt=${byChannel.preempt} | p50=${lat.p50}µs p90=${lat.p90}µs p99=${lat.p99}µs max=${lat.max}µs (n=${lat.count}) ` +
      `| preempt-pages=${st['preempt-pages']} walk=${d.ended} not-walked=${d.notWalked} | total ${o.durationMs} ms`,
  );
  for (const [i, r] of d.answered.entries()) if (r.channel !== expected) console.log(`[destination debug] #${i}/${d.answered.length} ${r.block}+0x${r.offset.toString(16)} on ${r.channel} after ${r.latencyUs.toFixed(0)}µs`);
  expect(byChannel, `channels of answered requests`).toEqual({ main: expected === 'main' ? d.answered.length : 0, preempt: expected === 'preempt' ? d.answered.length : 0, none: 0 });
  if (o.mode === 'preempt') {
    expect(st.channels.preempt, 'preempt channel').toBeDefined();
    expect(st['preempt-pages']).toBeGreaterThanOrEqual(d.answered.length);
    expect(o.channelEvents.map((c) => c.role)).toEqual(['main', 'preempt']);
  } else {
    expect(st.channels.preempt).toBeUndefined();
    expect(st['preempt-pages']).toBe(0);
    expect(o.channelEvents.map((c) => c.role)).toEqual(['main']);
  }
}

/**
 * The six cases of the issue use QEMU's default capabilities besides
 * postcopy-ram/postcopy-preempt, so plain precopy has no return path and
 * QEMU never reads its main socket. Over TLS that case fails while the
 * destination's TLS 1.3 server sends session tickets nobody reads: QEMU
 * closes the socket with them unread, the kernel resets the connection and
 * drops the stream's tail (QEMU still reports `completed`). Node.js can only
 * turn the tickets off at process start (OPENSSL_CONF), which `qmt receive
 * --tls` does: that case, precopy over TLS with QEMU's default capabilities,
 * is proved in receive-tls.test.ts through the command. Here, in-process,
 * precopy over TLS runs with the return path on (QEMU then reads the tickets).
 */
const CASES: Array<{ mode: Mode; tls: boolean; returnPath: boolean }> = [
  { mode: 'precopy', tls: false, returnPath: false },
  { mode: 'postcopy', tls: false, returnPath: false },
  { mode: 'preempt', tls: false, returnPath: false },
  { mode: 'postcopy', tls: true, returnPath: false },
  { mode: 'preempt', tls: true, returnPath: false },
  { mode: 'precopy', tls: true, returnPath: true },
];

describeWithQemu('DestinationSession receives a live migration from QEMU 10.0', () => {
  it.each(CASES)(
    '$mode (tls: $tls, return-path: $returnPath): completes on both sides, RAM bit for bit',
    async ({ mode, tls, returnPath }) => {
      const o = await migrate(mode, tls, returnPath);
      expect(o.sourceInfo.status).toBe('completed');
      expect(o.result.complete).toBe(true);
      expect(o.result.stats.status).toBe('completed');
      expect(o.result.machineType).toMatch(/^pc-q35-10\.0/);
      checkRam(o);
      if (mode === 'precopy') {
        expect(o.result.postcopy).toBe(false);
        expect(o.result.vmdesc, 'VM description').toBeDefined();
        expect(o.sourceStatuses).not.toContain('postcopy-active');
        expect(o.result.stats['precopy-iterations']).toBeGreaterThan(1);
      } else {
        checkPostcopy(o);
      }
      if (tls) checkTls(o);
      else expect(o.result.stats.channels.main?.tls).toBeUndefined();
    },
    CASE_TIMEOUT_MS,
  );

  it.each(['precopy', 'postcopy'] as const)(
    'a source killed mid-%s: done rejects promptly, the partial VM is savable',
    async (phase) => {
      const tmp = await mkdtemp(join(tmpdir(), `qmt-dest-kill-${phase}-`));
      const sink = new DirectorySink(join(tmp, RAM_DIR));
      // In postcopy the VM runs here: a lost source pauses the migration (it may come back);
      // after a second without a recovery the session gives up with the failure's reason.
      const session = await DestinationSession.listen({
        listen: 'tcp:127.0.0.1:0',
        sink,
        postcopy: phase === 'postcopy',
        idleTimeoutMs: 20_000,
        recovery: { timeoutMs: 1000 },
      });
      let paused = false;
      session.on('paused', () => (paused = true));
      let src: QemuProcess | undefined;
      let demand: Promise<DemandResult> | undefined;
      try {
        src = await startSource(`src-kill-${phase}`, { memoryMiB: MEMORY_MIB, guest: GUEST });
        await src.waitSerialPasses(3, 15_000);
        await src.setCapabilities(capabilitiesFor(phase === 'postcopy' ? 'postcopy' : 'precopy'));
        // Never converges (downtime-limit 10 ms); one pass of 23 MiB takes ~0.7 s.
        await src.setParameters({ 'max-bandwidth': PRECOPY_BANDWIDTH, 'max-postcopy-bandwidth': 4 * MiB, 'downtime-limit': 10 });
        if (phase === 'precopy') {
          const pass = nextEvent(session, 'pass', 15_000);
          await src.migrate(session.uri);
          await pass;
          // Mid-pass: some RAM PART sections arrived, the first pass is not done.
          await sleep(200);
          expect(session.currentPhase).toBe('precopy');
        } else {
          await src.migrate(session.uri);
          await pollMigration(src, (m) => m.status === 'active' && (m.ram?.['dirty-sync-count'] ?? 0) >= 2, 'dirty-sync-count >= 2', 20_000);
          const run = nextEvent(session, 'postcopy-run', 15_000);
          await src.startPostcopy();
          await run;
          // A demand request outstanding when the source dies must fail, not hang.
          demand = demandTopDown(session, MAIN_BLOCK, GUEST.startMiB * MiB, GUEST.endMiB * MiB);
          await sleep(200);
          expect(session.currentPhase).toBe('postcopy');
          expect(migrationStatusesSeen(src)).toContain('postcopy-active');
        }
        const before = await src.queryMigrate();
        expect(before.status).toBe(phase === 'precopy' ? 'active' : 'postcopy-active');

        const killedAt = performance.now();
        process.kill(src.pid, 'SIGKILL');
        const err = await within(
          session.done.then(
            () => new Error('done resolved'),
            (e: unknown) => e,
          ),
          5_000,
          'DestinationSession.done after SIGKILL of the source',
        );
        const afterMs = Math.round(performance.now() - killedAt);
        console.log(`[destination kill] mid-${phase}: done rejected after ${afterMs} ms: ${(err as Error).message}`);
        expect(err).toBeInstanceOf(MigrationError);
        const me = err as MigrationError;
        expect(['peer-disconnected', 'reset']).toContain(me.code);
        expect(me.phase).toBe(phase);
        expect(afterMs).toBeLessThan(5_000);
        expect(paused, 'postcopy pauses before giving up; precopy fails at once').toBe(phase === 'postcopy');
        if (demand) {
          const d = await within(demand, 2_000, 'demand paging after the kill');
          expect(['session-ended', 'met-bulk-stream']).toContain(d.ended);
        }

        const manifest = await writeSavedVm(tmp, session.snapshot(me));
        const back = await readSavedVmManifest(tmp);
        expect(back).toEqual(manifest);
        expect(back.complete).toBe(false);
        expect(back.error).toMatchObject({ code: me.code, phase });
        expect(back.postcopy).toBe(phase === 'postcopy');
        expect(back.blocks.map((b) => b.idstr)).toContain(MAIN_BLOCK);
        for (const b of back.blocks) {
          const s = await stat(join(tmp, b.file));
          expect(s.size, `${b.file}`).toBe(b.length);
        }
        await stat(join(tmp, MANIFEST));
        expect((back.stats as { normal: number }).normal).toBeGreaterThan(0);
      } finally {
        session.close();
        await src?.stop();
        await demand?.catch(() => undefined);
        await sink.close().catch(() => undefined);
        await rm(tmp, { recursive: true, force: true });
      }
    },
    CASE_TIMEOUT_MS,
  );
});
