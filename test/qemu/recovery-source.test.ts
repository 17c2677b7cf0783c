/**
 * SourceSession's postcopy recovery against a real QEMU 10.0 destination.
 *
 * A saved VM (captured from a QEMU source, as in source.test.ts) is restored
 * into a fresh QEMU destination in postcopy, "still running" at our source
 * until the switch, with the background stream throttled so that postcopy
 * lasts. The migration goes through a fault relay; once QEMU reports
 * postcopy-active and its guest runs and faults pages in, the relay resets
 * every connection, or the preempt channel alone (a network failure), and
 * then stops listening. QEMU goes to postcopy-paused; the test issues
 * `migrate-recover` on it (a new port), puts a new relay in front of that
 * port and calls `resume()` with the relay's address, as a management layer
 * would with `migrate … resume=true`. Once per run the first recovery
 * connection is reset too, in the middle of QEMU's received-bitmaps, so both
 * sides go back to paused and recover a second time. Several cuts per
 * migration, with and without preempt. Each run must end with QEMU
 * `completed`, one pause and one recovery per cut on both sides, nothing
 * resent that QEMU's bitmaps say it holds, the guest running on with its
 * invariant intact, and every page outside the guest's range equal to the
 * saved VM bit for bit.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterAll, beforeAll, expect, it } from 'vitest';
import type { MigrationError } from '../../src/protocol/errors.js';
import type { SavedVmManifest } from '../../src/protocol/saved-vm.js';
import { SourceSession, type SourceStats } from '../../src/protocol/source.js';
import { FaultRelay } from '../faults/relay.js';
import { liveQemus, stopAll } from './harness.js';
import { describeWithQemu } from './require-qemu.js';
import { captureSavedVm, checkDestination, EmulatedGuest, incomingPort, MiB, savedDevices, savedRam, savedVmdesc, startDestination, type DestinationCheck, type GuestSpec } from './source-helpers.js';

/** As source.test.ts: 64 MiB q35, a top-down guest over 32 MiB, so that the destination faults. */
const SPEC: GuestSpec = { memoryMiB: 64, guest: { startMiB: 1, endMiB: 33, direction: 'down' } };
const RANGE = { start: SPEC.guest.startMiB * MiB, end: SPEC.guest.endMiB * MiB };
const BANDWIDTH = 32 * MiB;
/** The background stream during postcopy: the 32 MiB range would take 8 s, so the cuts come while it runs. */
const POSTCOPY_BANDWIDTH = 4 * MiB;
const DIRTY_INTERVAL_MS = 50;
/** Page requests answered since the switch (or the last resume) before the next cut: the guest runs and faults there (few: on a busy machine the TCG guest faults slowly while the background stream runs out). */
const REQUESTS_BEFORE_CUT = 8;

interface Cut {
  /** What the cut resets: every connection of the relay, or the preempt channel alone (the source must notice and pause). */
  reset: 'all' | 'preempt';
  /**
   * The first recovery connection is reset too, in the middle of QEMU's
   * received-bitmaps: both sides must go back to postcopy-paused, and a
   * second migrate-recover and resume() complete the recovery.
   */
  interruptRecovery?: boolean;
}
interface Case {
  name: string;
  preempt: boolean;
  cuts: Cut[];
}
const CASES: Case[] = [
  { name: 'no preempt', preempt: false, cuts: [{ reset: 'all' }, { reset: 'all', interruptRecovery: true }] },
  { name: 'preempt', preempt: true, cuts: [{ reset: 'all' }, { reset: 'preempt' }, { reset: 'all', interruptRecovery: true }] },
];
/** Where the interrupted recovery connection is reset: inside the return path's first received-bitmap (pc.ram's is 2 KiB). */
const INTERRUPT_AT_RP_BYTE = 1000;

let work: string;
let vmDir: string;
let manifest: SavedVmManifest;

interface Recovery {
  cut: Cut;
  /** Bytes the source still had to send at the cut. */
  remainingAtCut: number;
  /** The same once QEMU's received-bitmaps were applied (RESUME_ACK). */
  remainingAfterResume: number;
  /** Cut → QEMU postcopy-paused seen by polling query-migrate, ms. */
  qemuPausedAfterMs: number;
  /** Reconnection attempts the source made in this pause (before resume() they hit the closed relay). */
  attempts: number;
  /** The source's own figure ('resumed'): failure → RESUME_ACK, ms. */
  pausedMs: number;
  /** The test's last migrate-recover and resume(uri) → RESUME_ACK, ms. */
  resumeMs: number;
}

interface Outcome {
  stats: SourceStats;
  check: DestinationCheck;
  recoveries: Recovery[];
  /** Every 'paused' event: one per cut, plus one per recovery connection lost before RESUME_ACK. */
  pauses: MigrationError[];
  /** Pauses that ended postcopy-active (the first of each cut). */
  episodes: number;
  answered: { main: number; preempt: number };
  ms: number;
}

async function until(what: string, cond: () => boolean | Promise<boolean>, timeoutMs: number, context: () => string | Promise<string>): Promise<void> {
  const deadline = performance.now() + timeoutMs;
  while (!(await cond())) {
    if (performance.now() > deadline) throw new Error(`no ${what} within ${timeoutMs} ms: ${await context()}`);
    await sleep(10);
  }
}

async function restoreWithCuts(c: Case): Promise<Outcome> {
  const label = c.preempt ? 'preempt' : 'plain';
  const { q, uri } = await startDestination(`dst-recover-${label}`, SPEC, { postcopy: true, preempt: c.preempt });
  const relays: FaultRelay[] = [];
  // One relay per connection generation. It refuses more connections than that generation
  // opens (an interrupted one: only its main channel), so that no retry of the source reaches
  // QEMU behind the test's back: each recovery goes through the test's migrate-recover.
  const newRelay = async (target: string, interrupt = false): Promise<FaultRelay> => {
    const r = await FaultRelay.start({
      target,
      maxConnections: c.preempt && !interrupt ? 2 : 1,
      ...(interrupt ? { connections: [{ down: { dropAt: INTERRUPT_AT_RP_BYTE } }] } : {}),
    });
    relays.push(r);
    return r;
  };
  let relay = await newRelay(uri);
  const guest = new EmulatedGuest(savedRam(vmDir, manifest), 'pc.ram', RANGE);
  const t0 = performance.now();
  const s = new SourceSession({
    to: relay.uri,
    memory: guest.source,
    machineType: manifest.machineType!,
    devices: savedDevices(vmDir, manifest),
    vmdesc: savedVmdesc(vmDir, manifest),
    postcopy: { afterPasses: 1 },
    preempt: c.preempt,
    bandwidthLimit: BANDWIDTH,
    postcopyBandwidthLimit: POSTCOPY_BANDWIDTH,
    stopVm: () => guest.stop(),
    // Until resume() names QEMU's new port, attempts go to the closed relay and are refused.
    recovery: { initialDelayMs: 50, maxDelayMs: 250 },
  });
  const answered = { main: 0, preempt: 0 };
  const pauses: MigrationError[] = [];
  const resumed: { pausedMs: number; at: number; remaining: number }[] = [];
  let attempts = 0;
  let active = false;
  let episodes = 0;
  let inPause = false;
  s.on('page-request', (r) => answered[r.channel]++);
  s.on('postcopy-active', () => (active = true));
  s.on('paused', (e) => {
    pauses.push(e.error);
    if (!inPause) episodes++;
    inPause = true;
  });
  s.on('recovering', () => attempts++);
  s.on('resumed', (e) => {
    inPause = false;
    resumed.push({ pausedMs: e.pausedMs, at: performance.now(), remaining: s.stats().remaining });
  });
  const context = async (): Promise<string> =>
    `source ${JSON.stringify({ status: s.stats().status, remaining: s.stats().remaining, answered, pauses: pauses.map((e) => e.message) })}; ` +
    `destination ${JSON.stringify(await q.queryMigrate().catch((e: Error) => e.message))} ${q.stderrTail(500)}; relays: ${relays.flatMap((r) => r.fired).join('; ')}`;
  const recoveries: Recovery[] = [];
  guest.start(DIRTY_INTERVAL_MS);
  s.start();
  try {
    await until('postcopy-active at the source', () => active, 30_000, context);
    await q.waitMigration(['postcopy-active'], 15_000);
    for (const [i, cut] of c.cuts.entries()) {
      // The guest runs at the destination and faults pages in through this connection.
      const base = answered.main + answered.preempt;
      await until(`${REQUESTS_BEFORE_CUT} answered page requests before cut ${i + 1}`, () => answered.main + answered.preempt - base >= REQUESTS_BEFORE_CUT, 15_000, context);
      expect((await q.queryStatus()).status, 'the guest runs at the destination').toBe('running');
      const st = s.stats();
      expect(st.status, `still in postcopy at cut ${i + 1}`).toBe('postcopy-active');
      expect(st.remaining, `the background stream still has pages to send at cut ${i + 1}`).toBeGreaterThan(0);
      const attemptsBefore = attempts;
      const episodesBefore = episodes;
      // A network failure: both ends see a reset (index 1 is the preempt channel).
      expect(relay.cut(cut.reset === 'all' ? () => true : (index) => index === 1), `connections reset by cut ${i + 1}`).toBeGreaterThan(0);
      const cutAt = performance.now();
      await until(`pause ${i + 1} at the source`, () => episodes > episodesBefore, 10_000, context);
      await relay.close();
      await q.waitMigration(['postcopy-paused'], 15_000);
      const qemuPausedAfterMs = performance.now() - cutAt;
      const resumedBefore = resumed.length;
      // QEMU's side of the recovery: a new listener (port 0: QEMU picks, query-migrate tells), a relay in front of it.
      const recoverVia = async (interrupt: boolean): Promise<void> => {
        await q.execute('migrate-recover', { uri: 'tcp:127.0.0.1:0' });
        relay = await newRelay(`tcp:127.0.0.1:${await incomingPort(q)}`, interrupt);
        s.resume(relay.uri);
      };
      if (cut.interruptRecovery) {
        const cursor = q.qmp.eventCursor();
        await recoverVia(true);
        // QEMU took the connection (postcopy-recover) and lost it before POSTCOPY_RESUME: paused again.
        await q.waitEvent('MIGRATION', (e) => e.data?.status === 'postcopy-recover', 15_000, cursor);
        await q.waitEvent('MIGRATION', (e) => e.data?.status === 'postcopy-paused', 15_000, cursor);
        expect(relay.fired.join('; ')).toMatch(/down dropped \(reset\)/);
        expect(resumed.length, 'no RESUME_ACK on the interrupted connection').toBe(resumedBefore);
        await relay.close();
      }
      const resumeAt = performance.now();
      await recoverVia(false);
      await until(`RESUME_ACK ${i + 1}`, () => resumed.length > resumedBefore, 30_000, context);
      const r = resumed[resumed.length - 1]!;
      recoveries.push({ cut, remainingAtCut: st.remaining, remainingAfterResume: r.remaining, qemuPausedAfterMs, attempts: attempts - attemptsBefore, pausedMs: r.pausedMs, resumeMs: r.at - resumeAt });
    }
    let stats: SourceStats;
    try {
      stats = await s.done;
    } catch (e) {
      throw new Error(`${label}: ${(e as Error).message}; ${await context()}`, { cause: e });
    }
    const check = await checkDestination(q, savedRam(vmDir, manifest).get('pc.ram')!);
    return { stats, check, recoveries, pauses, episodes, answered, ms: Math.round(performance.now() - t0) };
  } finally {
    s.cancel();
    guest.stop();
    await Promise.all(relays.map((r) => r.close()));
    await q.stop();
  }
}

afterAll(async () => {
  await stopAll();
  if (work) await rm(work, { recursive: true, force: true });
});

describeWithQemu('SourceSession recovers a paused postcopy into QEMU 10.0', () => {
  beforeAll(async () => {
    work = await mkdtemp(join(tmpdir(), 'qmt-recover-'));
    vmDir = join(work, 'vm');
    manifest = await captureSavedVm(vmDir, SPEC, 'recover-capture-src');
    expect(liveQemus()).toEqual([]);
    expect(manifest.complete).toBe(true);
  });

  it.each(CASES)('$name, $cuts.length cuts: QEMU pauses, takes migrate-recover and our resume each time, completes; the guest runs on', async (c) => {
    const o = await restoreWithCuts(c);
    const l = o.stats['postcopy-latency'];
    console.log(
      `[recover] ${c.name}: ${o.ms} ms, ${o.episodes} pauses (${o.pauses.length} 'paused' events: ${o.pauses.map((e) => e.code).join(', ')}), ` +
        o.recoveries.map((r, i) => `recovery ${i + 1} (cut ${r.cut.reset}${r.cut.interruptRecovery ? ', first recovery interrupted' : ''}; ${(r.remainingAtCut / MiB).toFixed(1)} MiB left at the cut, ${(r.remainingAfterResume / MiB).toFixed(1)} after the bitmaps): QEMU paused +${r.qemuPausedAfterMs.toFixed(0)} ms, ${r.attempts} attempts, paused ${r.pausedMs.toFixed(0)} ms, resume→ack ${r.resumeMs.toFixed(1)} ms`).join('; ') +
        `; requests ${o.stats['postcopy-requests']} (main ${o.answered.main}, preempt ${o.answered.preempt}), ` +
        `latency p50 ${l.p50} µs p90 ${l.p90} µs p99 ${l.p99} µs max ${l.max} µs; ${o.check.invariant.detail}`,
    );
    expect(o.stats.status).toBe('completed');
    expect(o.check.info.status).toBe('completed');
    // One pause and one recovery per cut, on both sides.
    const cuts = c.cuts.length;
    expect(o.episodes).toBe(cuts);
    expect(o.stats.recoveries).toBe(cuts);
    const statuses = o.check.statuses;
    // QEMU paused once per cut and once more per interrupted recovery.
    const qemuPauses = cuts + c.cuts.filter((x) => x.interruptRecovery).length;
    expect(statuses.filter((x) => x === 'postcopy-paused'), statuses.join(' ')).toHaveLength(qemuPauses);
    expect(statuses.filter((x) => x === 'postcopy-recover'), statuses.join(' ')).toHaveLength(qemuPauses);
    // The received-bitmaps were applied: only pages of the guest's range can be missing at QEMU
    // (everything outside it went in the first pass and never changed), so nothing else is resent.
    for (const r of o.recoveries) expect(r.remainingAfterResume, 'bytes to send after the received-bitmaps').toBeLessThanOrEqual(RANGE.end - RANGE.start);
    // pausedMs spans the whole outage from the cut, an interrupted recovery included (an order of events:
    // the cut came before the test's last resume(), both end at the same RESUME_ACK).
    for (const r of o.recoveries) expect(r.pausedMs, 'pausedMs from the cut to RESUME_ACK').toBeGreaterThanOrEqual(r.resumeMs);
    expect(statuses[statuses.length - 1]).toBe('completed');
    // The guest runs on at the destination, its memory consistent.
    expect(o.check.passesAfter).toBeGreaterThanOrEqual(2);
    expect(o.check.invariant.ok, o.check.invariant.detail).toBe(true);
    const outside = o.check.outside!;
    expect(outside.count, `pages outside the guest's range differing: ${outside.pages.map((p) => `0x${p.toString(16)}`).join(', ')}`).toBe(0);
    // The destination kept faulting and we answered, on the channel the mode says.
    expect(o.stats['postcopy-requests']).toBeGreaterThan(cuts * REQUESTS_BEFORE_CUT);
    expect(o.stats['postcopy-latency'].count).toBe(o.answered.main + o.answered.preempt);
    // With preempt, main answers only pages already in flight there.
    if (c.preempt) expect(o.stats['requests-answered']['main-no-preempt']).toBe(0);
    else expect(o.answered.preempt).toBe(0);
    if (c.preempt) expect(o.stats['requests-answered']['main-in-flight']).toBe(o.answered.main);
  });
});
