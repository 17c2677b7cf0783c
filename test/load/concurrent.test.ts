/**
 * Load: eight SourceSession → DestinationSession migrations at once in this
 * one process (both ends of each, so every byte is encoded and decoded on the
 * same event loop), plus one of our sources restoring a saved VM into a real
 * QEMU 10.0 at the same time.
 *
 * The library migrations: 32–64 MiB synthetic guests that keep rewriting a
 * hot region; half precopy (three passes, then the rest with the guest
 * stopped), half postcopy after one pass with preempt, the destination
 * faulting pages in top-down meanwhile; half of each over TLS. The QEMU one:
 * postcopy after one pass with preempt, the test guest walking its range
 * top-down (see qemu-restore.ts).
 *
 * Checked: every migration completes; each destination holds every page, and
 * its memory and device state equal the source's bit for bit (QEMU: the guest
 * runs on, its invariant holds, the pages outside its range equal ours);
 * postcopy ones were asked for pages, answered on the preempt channel (or on main when already in flight there); while
 * all were running (from the start until the first one completed) each
 * library migration moved at least STARVATION_FLOOR bytes — none starved;
 * afterwards no socket or timer is left.
 *
 * Measured, printed and written to .tmp/load/concurrent.json (never
 * asserted): per-migration throughput, aggregate throughput, Jain's fairness
 * index over the library migrations (whole run, and bytes moved while all
 * were running), the worst urgent-latency p99 (destination: request sent →
 * page placed; source: request read → the answer's last byte handed to the
 * kernel).
 *
 * The restore into QEMU is part of the load: like every test needing QEMU it
 * runs under describeWithQemu (with REQUIRE_QEMU=1 a missing QEMU fails).
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { afterAll, beforeAll, expect, it } from 'vitest';
import type { SavedVmManifest } from '../../src/protocol/saved-vm.js';
import { initPkiDir } from '../../src/transport/pki.js';
import { stopAll } from '../qemu/harness.js';
import { describeWithQemu, qemuAvailability } from '../qemu/require-qemu.js';
import { captureSavedVm } from '../qemu/source-helpers.js';
import { PAGE } from './dirtying-guest.js';
import { pagesReceived, pagesSent, prepareLibraryMigration, type LibraryMigrationSpec, type LibraryOutcome, type PreparedLibraryMigration, type RunningLibraryMigration } from './library-migration.js';
import { loadReport, reportLines, type Sample } from './load-report.js';
import { writeJson } from './metrics.js';
import { prepareQemuRestore, QEMU_SPEC, type PreparedQemuRestore, type QemuOutcome, type RunningQemuRestore } from './qemu-restore.js';
import { leftAfter, resourceSnapshot } from '../support/resources.js';

const MiB = 1024 * 1024;
const ROOT = join(import.meta.dirname, '..', '..');
const REPORT = join(ROOT, '.tmp', 'load', 'concurrent.json');
/** Bytes each library migration must have received while all were running: far below a fair share, far above the setup records. */
const STARVATION_FLOOR = 256 * 1024;
/** Bytes a destination has received once its migration is under way: past the setup records, into RAM. */
const UNDER_WAY_BYTES = 64 * 1024;
/** Sockets and timers must be gone this long after every migration settled. */
const SETTLE_MS = 5000;
/** A hang, not a slow run: every migration must have settled by then (a run takes seconds). */
const RUN_BOUND_MS = 180_000;

type Spec = Omit<LibraryMigrationSpec, 'tlsDir'> & { tls: boolean };
const SPECS: Spec[] = [
  // 96–192 MiB each, 1,152 MiB in all: long enough that all eight run together for a while now that
  // each moves tens of MB/s (at 32–64 MiB the first was done before the TLS ones were under way),
  // and well under a minute on two busy cores.
  { name: 'precopy-96', ramMiB: 96, mode: 'precopy', tls: false },
  { name: 'precopy-192', ramMiB: 192, mode: 'precopy', tls: false },
  { name: 'precopy-96-tls', ramMiB: 96, mode: 'precopy', tls: true },
  { name: 'precopy-144-tls', ramMiB: 144, mode: 'precopy', tls: true },
  { name: 'preempt-96', ramMiB: 96, mode: 'postcopy-preempt', tls: false },
  { name: 'preempt-192', ramMiB: 192, mode: 'postcopy-preempt', tls: false },
  { name: 'preempt-96-tls', ramMiB: 96, mode: 'postcopy-preempt', tls: true },
  { name: 'preempt-144-tls', ramMiB: 144, mode: 'postcopy-preempt', tls: true },
];

const QEMU = qemuAvailability();
let work: string;
let pkiDir: string;
let vmDir: string;
let manifest: SavedVmManifest;


function sample(t0: number, lib: readonly RunningLibraryMigration[], qemu: RunningQemuRestore): Sample {
  return { atMs: performance.now() - t0, library: lib.map((m) => m.received()), qemu: qemu.sent() };
}

describeWithQemu('load: eight library migrations and one into QEMU 10.0, at once', () => {
  beforeAll(async () => {
    work = await mkdtemp(join(tmpdir(), 'qmt-load-'));
    pkiDir = join(work, 'pki');
    vmDir = join(work, 'vm');
    await initPkiDir(pkiDir);
    // The saved VM to restore: captured from a QEMU source before the load starts.
    manifest = await captureSavedVm(vmDir, QEMU_SPEC, 'load-capture');
  });

  afterAll(async () => {
    await stopAll();
    if (work) await rm(work, { recursive: true, force: true });
  });

  it('all complete with memory intact, none starves, nothing is left open; numbers printed', { timeout: 300_000 }, async () => {
    const testStart = performance.now();
    const before = resourceSnapshot();

    // Everything is set up first (guests filled, destinations listening, QEMU started); then every source starts in one loop turn.
    let preparedQemu: PreparedQemuRestore | undefined;
    const preparedLib: PreparedLibraryMigration[] = [];
    try {
      preparedQemu = await prepareQemuRestore('qemu-preempt', vmDir, manifest);
      for (const [i, { tls, ...s }] of SPECS.entries()) preparedLib.push(await prepareLibraryMigration({ ...s, tlsDir: tls ? pkiDir : undefined }, i));
    } catch (e) {
      for (const p of preparedLib) p.abandon();
      await preparedQemu?.abandon();
      throw e;
    }
    const t0 = performance.now();
    const lib = preparedLib.map((p) => p.start());
    const qemuRun = preparedQemu.start();

    // The window in which every migration runs: from the moment each has its first RAM under way
    // (TLS handshakes on a busy machine take a while, and a fast plain migration may be half done
    // by then) until the first library migration settles.
    let windowStart: Sample | undefined;
    let windowEnd: Sample | undefined;
    const underWay = setInterval(() => {
      if (windowEnd || !lib.every((m) => m.received() >= UNDER_WAY_BYTES)) return;
      windowStart = sample(t0, lib, qemuRun);
      clearInterval(underWay);
    }, 5);
    for (const m of lib) void m.ended.then(() => (windowEnd ??= sample(t0, lib, qemuRun)));
    void Promise.race(lib.map((m) => m.ended)).then(() => clearInterval(underWay));
    const all = Promise.allSettled([...lib.map((m) => m.done), qemuRun.done]);
    let bound: NodeJS.Timeout | undefined;
    const hung = await Promise.race([all.then(() => false), new Promise<boolean>((resolve) => (bound = setTimeout(() => resolve(true), RUN_BOUND_MS)))]);
    clearTimeout(bound);
    if (hung) {
      const states = lib.map((m) => `${m.spec.name}: ${m.state()}`).join('\n  ');
      for (const m of lib) m.cancel();
      qemuRun.cancel();
      throw new Error(`not every migration settled within ${RUN_BOUND_MS} ms:\n  ${states}\n  qemu: sent ${qemuRun.sent()} bytes`);
    }
    const results = await all;
    const settled = results.slice(0, lib.length) as PromiseSettledResult<LibraryOutcome>[];
    const qemuSettled = results[lib.length] as PromiseSettledResult<QemuOutcome>;

    const failures = [
      ...settled.flatMap((r, i) => (r.status === 'rejected' ? [`${SPECS[i]!.name}: ${String((r.reason as Error)?.message ?? r.reason)}; ${lib[i]!.state()}`] : [])),
      ...(qemuSettled.status === 'rejected' ? [`qemu: ${String((qemuSettled.reason as Error)?.stack ?? qemuSettled.reason)}`] : []),
    ];
    expect(failures, 'migrations that failed').toEqual([]);
    const outcomes = settled.map((r) => (r as PromiseFulfilledResult<LibraryOutcome>).value);
    const qemu = (qemuSettled as PromiseFulfilledResult<QemuOutcome>).value;

    // ---- numbers (reported, not asserted) ----------------------------------------------
    const report = loadReport({
      library: outcomes,
      qemu,
      qemuVersion: QEMU.version,
      t0,
      window: { start: windowStart ?? windowEnd!, end: windowEnd! },
      testMs: performance.now() - testStart,
    });
    writeJson(REPORT, report);
    for (const line of reportLines(report)) console.log(line);

    // ---- correctness ------------------------------------------------------------------
    for (const o of outcomes) {
      const name = o.spec.name;
      expect(o.source.status, name).toBe('completed');
      expect(o.destination.complete, name).toBe(true);
      expect(o.firstDifference, `${name}: first differing page at +0x${o.firstDifference.toString(16)}`).toBe(-1);
      expect(o.devicesEqual, `${name}: device state`).toBe(true);
      // Every page went, and arrived.
      expect(o.pagesMissing, `${name}: pages the destination does not hold`).toBe(0);
      expect(pagesSent(o), `${name}: pages sent`).toBeGreaterThanOrEqual(o.spec.ramMiB * (MiB / PAGE));
      expect(pagesReceived(o), `${name}: pages received`).toBeGreaterThanOrEqual(o.spec.ramMiB * (MiB / PAGE));
      if (o.spec.mode === 'precopy') {
        expect(o.destination.postcopy, name).toBe(false);
        expect(o.source.passes, `${name}: passes`).toBe(3);
        expect(o.source['postcopy-requests'], name).toBe(0);
      } else {
        expect(o.destination.postcopy, name).toBe(true);
        expect(o.source.passes, `${name}: passes`).toBe(1);
        expect(o.demand, `${name}: demand requests answered at the destination`).toBeGreaterThan(0);
        // With preempt a request goes to the main channel only if its page was handed to main before it came.
        expect(o.answered.main, `${name}: requests answered on the main channel, all already in flight there`).toBe(o.answered.mainInFlight);
        expect(o.answered.preempt, `${name}: requests answered on the preempt channel`).toBeGreaterThan(0);
        expect(o.latency.source.count, name).toBe(o.answered.preempt + o.answered.main);
      }
    }
    expect(qemu.source.status).toBe('completed');
    expect(qemu.check.info.status).toBe('completed');
    expect(qemu.check.statuses).toContain('postcopy-active');
    expect(qemu.check.passesAfter, 'guest passes at the destination after completion').toBeGreaterThanOrEqual(2);
    expect(qemu.check.invariant.ok, qemu.check.invariant.detail).toBe(true);
    expect(qemu.check.outside!.count, `pages outside the guest's range differing: ${qemu.check.outside!.pages.map((p) => `0x${p.toString(16)}`).join(', ')}`).toBe(0);
    expect(qemu.source['postcopy-requests'], 'QEMU asked for pages').toBeGreaterThan(0);
    expect(qemu.answered.main, 'requests answered on the main channel: only pages already in flight there').toBe(qemu.answered.mainInFlight);
    // None starved: every one was under way before the first ended, and while all ran, each moved pages (counted in bytes, not time).
    expect(windowStart, `every library migration had ${UNDER_WAY_BYTES} bytes in before the first one ended: ${JSON.stringify(windowEnd)}`).toBeDefined();
    const starved = report.fairness.window.bytes.flatMap((b, i) => (b < STARVATION_FLOOR ? [`${SPECS[i]!.name}: ${b} bytes`] : []));
    expect(starved, `library migrations that moved less than ${STARVATION_FLOOR} bytes while all ran`).toEqual([]);

    expect(await leftAfter(before, SETTLE_MS), 'sockets or timers left after the run').toEqual([]);
    console.log(`[load] test ${Math.round(report.testMs)} ms until every migration was checked; report: ${REPORT}`);
  });
});
