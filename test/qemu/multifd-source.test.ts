/**
 * Our source sends multifd into a real QEMU 10.0 destination (capability
 * `multifd`, `multifd-channels` N): a running test guest is captured into a
 * saved VM, then restored into fresh destinations — with SourceSession (the
 * public API, plain) and with the real `qmt send --multifd 4` command over
 * TLS. Each time the destination completes, the guest runs on there, its
 * invariant holds and every page outside its range equals the saved VM's
 * bit for bit; the pages went on the multifd channels, not on main. A
 * multifd channel cut in precopy (a relay that resets it) fails the source
 * with a typed error naming the channel and leaves nothing open; a
 * destination without multifd refuses the channels and the source fails
 * typed too.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import type { JsonEnvelope } from '../../src/cli/json.js';
import type { SendJson } from '../../src/cli/send.js';
import { MigrationError } from '../../src/protocol/errors.js';
import { SavedVmSource } from '../../src/protocol/memory-source.js';
import type { SavedVmManifest } from '../../src/protocol/saved-vm.js';
import { SourceSession, type SourceStats } from '../../src/protocol/source.js';
import { TransportError } from '../../src/transport/errors.js';
import { initPkiDir } from '../../src/transport/pki.js';
import { socketTransferSupported } from '../../src/transport/worker/support.js';
import { qmtChildren } from '../cli/qmt.js';
import { setTimeout as sleep } from 'node:timers/promises';
import { stopAll } from './harness.js';
import { startRelay } from './relay.js';
import { describeWithQemu } from './require-qemu.js';
import { captureSavedVm, checkDestination, EmulatedGuest, savedDevices, savedRam, savedVmdesc, startDestination, type GuestSpec } from './source-helpers.js';

const SPEC: GuestSpec = { memoryMiB: 64, guest: { startMiB: 1, endMiB: 33, direction: 'down' } };
const MiB = 1 << 20;

let work: string;
let vmDir: string;
let pkiDir: string;
let manifest: SavedVmManifest;

/** The real `qmt` command (src/cli/main.ts, as users run it), killed at the end if still running. */
const { run: qmt, killAll } = qmtChildren();

afterAll(async () => {
  killAll();
  await stopAll();
  if (work) await rm(work, { recursive: true, force: true });
});

/** Pages went on the multifd channels: each carried some, main none (its bytes are the device state and the records around it). */
function expectPagesOnMultifd(stats: SourceStats, channels: number): void {
  const mf = stats.channels.multifd ?? [];
  expect(mf.map((c) => c.id)).toEqual(Array.from({ length: channels }, (_, i) => i));
  for (const c of mf) expect(c.bytesSent, `multifd-${c.id} bytes`).toBeGreaterThan(64);
  const multifdBytes = mf.reduce((n, c) => n + c.bytesSent, 0);
  // A 64 MiB guest: its non-zero pages are MiBs; main holds the device state (a few hundred KiB at most).
  expect(multifdBytes).toBeGreaterThan(8 * MiB);
  expect(stats.channels.main!.bytesSent).toBeLessThan(2 * MiB);
}

describeWithQemu('multifd from our source into QEMU 10.0', () => {
  beforeAll(async () => {
    work = await mkdtemp(join(tmpdir(), 'qmt-multifd-src-'));
    vmDir = join(work, 'vm');
    pkiDir = join(work, 'pki');
    await initPkiDir(pkiDir);
    manifest = await captureSavedVm(vmDir, SPEC, 'mfd-capture');
  }, 120_000);

  it.each([1, 4])('SourceSession, %i plain multifd channels: QEMU completes, the guest runs on, memory as saved', async (channels) => {
    const { q, uri } = await startDestination(`mfd-dst-${channels}`, SPEC, { postcopy: false, preempt: false, multifd: channels });
    const saved = await SavedVmSource.open(vmDir);
    try {
      const s = new SourceSession({
        to: uri,
        memory: saved,
        machineType: manifest.machineType!,
        devices: savedDevices(vmDir, manifest),
        vmdesc: savedVmdesc(vmDir, manifest),
        multifd: { channels },
      });
      s.start();
      let stats: SourceStats;
      try {
        stats = await s.done;
      } catch (e) {
        throw new Error(`${(e as Error).message}; destination: ${JSON.stringify(await q.queryMigrate().catch(() => undefined))} ${q.stderrTail(800)}`, { cause: e });
      }
      expect(stats.status).toBe('completed');
      expectPagesOnMultifd(stats, channels);
      const check = await checkDestination(q, savedRam(vmDir, manifest).get('pc.ram')!);
      expect(check.info.status).toBe('completed');
      expect(check.passesAfter).toBeGreaterThanOrEqual(2);
      expect(check.invariant.ok, check.invariant.detail).toBe(true);
      expect(check.outside!.count, 'pages outside the guest range differing').toBe(0);
    } finally {
      saved.close();
      await q.stop();
    }
  }, 120_000);

  it('SourceSession, 4 channels, the guest still running at our source: three passes of rewritten pages land in order, invariant holds', async () => {
    const { q, uri } = await startDestination('mfd-dst-running', SPEC, { postcopy: false, preempt: false, multifd: 4 });
    const range = { start: SPEC.guest.startMiB * MiB, end: SPEC.guest.endMiB * MiB };
    const guest = new EmulatedGuest(savedRam(vmDir, manifest), 'pc.ram', range);
    try {
      const s = new SourceSession({
        to: uri,
        memory: guest.source,
        machineType: manifest.machineType!,
        devices: savedDevices(vmDir, manifest),
        vmdesc: savedVmdesc(vmDir, manifest),
        multifd: { channels: 4 },
        // Every counter page is rewritten many times per pass: each pass resends the whole range,
        // and a page of an earlier pass landing after a later one would break the invariant.
        bandwidthLimit: 32 * MiB,
        downtimeLimitMs: 1,
        maxPasses: 3,
        stopVm: () => guest.stop(),
      });
      guest.start(50);
      s.start();
      let stats: SourceStats;
      try {
        stats = await s.done;
      } catch (e) {
        throw new Error(`${(e as Error).message}; destination: ${JSON.stringify(await q.queryMigrate().catch(() => undefined))} ${q.stderrTail(800)}`, { cause: e });
      }
      expect(stats.passes).toBe(3);
      expect(guest.increments).toBeGreaterThan(3);
      expectPagesOnMultifd(stats, 4);
      // The range went again in every pass.
      expect(stats.normal).toBeGreaterThan((3 * (range.end - range.start)) / 4096);
      const check = await checkDestination(q, guest.source.memory.get('pc.ram')!);
      expect(check.info.status).toBe('completed');
      expect(check.passesAfter).toBeGreaterThanOrEqual(2);
      expect(check.invariant.ok, check.invariant.detail).toBe(true);
      expect(check.outside!.count, 'pages outside the guest range differing').toBe(0);
    } finally {
      guest.stop();
      await q.stop();
    }
  }, 120_000);

  it.skipIf(!socketTransferSupported())('SourceSession, 4 TLS channels in worker threads (threads on), the guest still running: QEMU completes, invariant holds, every thread ended by itself', async () => {
    const { q, uri } = await startDestination('mfd-dst-threads-tls', SPEC, { postcopy: false, preempt: false, multifd: 4, tlsDir: pkiDir });
    const range = { start: SPEC.guest.startMiB * MiB, end: SPEC.guest.endMiB * MiB };
    const guest = new EmulatedGuest(savedRam(vmDir, manifest), 'pc.ram', range, { shared: true });
    try {
      const s = new SourceSession({
        to: uri,
        transport: { tls: { dir: pkiDir, hostname: 'localhost' } },
        memory: guest.source,
        machineType: manifest.machineType!,
        devices: savedDevices(vmDir, manifest),
        vmdesc: savedVmdesc(vmDir, manifest),
        multifd: { channels: 4 },
        threads: 'on',
        bandwidthLimit: 32 * MiB,
        downtimeLimitMs: 1,
        maxPasses: 3,
        stopVm: () => guest.stop(),
      });
      guest.start(50);
      s.start();
      let stats: SourceStats;
      try {
        stats = await s.done;
      } catch (e) {
        throw new Error(`${(e as Error).message}; destination: ${JSON.stringify(await q.queryMigrate().catch(() => undefined))} ${q.stderrTail(800)}`, { cause: e });
      }
      expect(stats.passes).toBe(3);
      expectPagesOnMultifd(stats, 4);
      for (const c of stats.channels.multifd!) expect(c.tls?.protocol, `multifd-${c.id} TLS`).toBe('TLSv1.3');
      expect(stats.threads?.used).toBe(true);
      const check = await checkDestination(q, guest.source.memory.get('pc.ram')!);
      expect(check.info.status).toBe('completed');
      expect(check.passesAfter).toBeGreaterThanOrEqual(2);
      expect(check.invariant.ok, check.invariant.detail).toBe(true);
      expect(check.outside!.count, 'pages outside the guest range differing').toBe(0);
      // Every channel's thread ended by itself once the session was done.
      let t = s.stats().threads!;
      for (let i = 0; i < 250 && !t.channels.every((c) => c.ended); i++) {
        await new Promise((r) => setTimeout(r, 20));
        t = s.stats().threads!;
      }
      expect(t.channels.map((c) => [c.role, c.ended])).toEqual([['main', 'by-itself'], ...Array.from({ length: 4 }, () => ['multifd', 'by-itself'])]);
      console.log(`[multifd-src] threads on, 4 TLS channels into QEMU: passes ${stats.passes}, ${stats['total-time']} ms, threads ${JSON.stringify(t)}`);
    } finally {
      guest.stop();
      await q.stop();
    }
  }, 120_000);

  it('qmt send --multifd 4 over TLS: QEMU completes, the guest runs on, memory as saved', async () => {
    const { q, uri } = await startDestination('mfd-dst-tls', SPEC, { postcopy: false, preempt: false, multifd: 4, tlsDir: pkiDir });
    try {
      const r = await qmt(['send', '--from', vmDir, '--to', uri, '--tls', pkiDir, '--tls-hostname', 'localhost', '--multifd', '4', '--json', '--progress', 'plain']).exit;
      expect(r.code, `${r.stderr}\ndestination: ${JSON.stringify(await q.queryMigrate().catch(() => undefined))} ${q.stderrTail(800)}`).toBe(0);
      const out = JSON.parse(r.stdout) as JsonEnvelope & SendJson;
      expect(out.ok).toBe(true);
      expect(out.tls).toBe(true);
      expect(out.multifd).toBe(4);
      expect(r.stderr).toMatch(/with 4 multifd channels/);
      expect(r.stderr).toMatch(/channels: main .* sent, .* received; multifd 4 channels, \d+(\.\d+)? MiB sent/);
      const ch = out.stats!.channels;
      expect(ch.main!.tls?.protocol).toBe('TLSv1.3');
      expect(ch.multifd!.map((c) => c.id)).toEqual([0, 1, 2, 3]);
      for (const c of ch.multifd!) {
        expect(c.tls?.protocol, `multifd-${c.id} TLS`).toBe('TLSv1.3');
        expect(c.bytesSent).toBeGreaterThan(64);
      }
      expect(ch.multifd!.reduce((n, c) => n + c.bytesSent, 0)).toBeGreaterThan(8 * MiB);
      expect(ch.main!.bytesSent).toBeLessThan(2 * MiB);
      const check = await checkDestination(q, savedRam(vmDir, manifest).get('pc.ram')!);
      expect(check.info.status).toBe('completed');
      expect(check.passesAfter).toBeGreaterThanOrEqual(2);
      expect(check.invariant.ok, check.invariant.detail).toBe(true);
      expect(check.outside!.count, 'pages outside the guest range differing').toBe(0);
    } finally {
      await q.stop();
    }
  }, 120_000);

  it('a multifd channel cut in precopy: the source fails typed naming the channel, nothing left open', async () => {
    const { q, uri } = await startDestination('mfd-dst-cut', SPEC, { postcopy: false, preempt: false, multifd: 4 });
    const relay = await startRelay({ target: uri, record: true });
    const saved = await SavedVmSource.open(vmDir);
    const tcpBefore = tcpSockets();
    try {
      const s = new SourceSession({
        to: relay.uri,
        memory: saved,
        machineType: manifest.machineType!,
        devices: savedDevices(vmDir, manifest),
        // Slow enough that the cut comes in the middle of the first pass.
        bandwidthLimit: 4 * MiB,
        multifd: { channels: 4 },
      });
      s.start();
      await relay.waitConnections(5);
      // The channel whose init message says id 2 (byte 24), once pages flow on it.
      const target = await waitFor(() => relay.connections.find((c) => c.index > 0 && c.srcToDst.bytes > 64 * 1024 && c.srcToDst.data()[24] === 2));
      expect(s.stats().status).toBe('active');
      relay.cutConnection(target.index);
      const e = await s.done.then(
        () => undefined,
        (x: unknown) => x,
      );
      expect(e).toBeInstanceOf(MigrationError);
      const err = e as MigrationError;
      expect(err.kind).toBe('network');
      expect(err.phase).toBe('precopy');
      expect(err.cause).toBeInstanceOf(TransportError);
      // Named by the loss its thread saw first (a 100 ms window, loss-clock.ts). QEMU's teardown of the other
      // channels reaches us as resets too, and a worker starved of CPU sees its own reset late: under CI load
      // (2 busy cores) that named multifd-1 once in ~6 runs. So: a multifd channel, the cut one when it can tell.
      const named = (err.cause as TransportError).channel;
      expect(named).toMatch(/^multifd-[0-3]$/);
      expect(err.message).toContain(named!);
      if (named !== 'multifd-2') console.log(`[multifd-source] cut multifd-2, the source named ${named} (seen first)`);
      expect(s.stats().status).toBe('failed');
      // Every relayed connection ends (our sockets are gone too), and no TCP socket of ours is left.
      await relay.waitAllClosed(10_000);
      await waitFor(() => (tcpSockets() <= tcpBefore ? true : undefined));
      // The destination fails its incoming migration.
      const info = await q.waitMigration(['failed'], 15_000);
      expect(info.status).toBe('failed');
    } finally {
      saved.close();
      await relay.close();
      await q.stop();
    }
  }, 120_000);

  it('a destination without multifd: the source fails typed, nothing left open', async () => {
    const { q, uri } = await startDestination('mfd-dst-refuses', SPEC, { postcopy: false, preempt: false });
    const saved = await SavedVmSource.open(vmDir);
    const tcpBefore = tcpSockets();
    try {
      const s = new SourceSession({ to: uri, memory: saved, machineType: manifest.machineType!, devices: savedDevices(vmDir, manifest), multifd: { channels: 2 }, replyTimeoutMs: 5000 });
      s.start();
      const e = await s.done.then(
        () => undefined,
        (x: unknown) => x,
      );
      expect(e, `destination: ${JSON.stringify(await q.queryMigrate().catch(() => undefined))} ${q.stderrTail(500)}`).toBeInstanceOf(MigrationError);
      const err = e as MigrationError;
      // QEMU without multifd drops the extra connections: our first write on one fails, named.
      expect(err.kind).toBe('network');
      expect(err.message).toMatch(/multifd-\d channel/);
      expect(s.stats().status).toBe('failed');
      await waitFor(() => (tcpSockets() <= tcpBefore ? true : undefined));
    } finally {
      saved.close();
      await q.stop();
    }
  }, 120_000);
});

/** TCP sockets of this process (the QMP connections are unix sockets). */
function tcpSockets(): number {
  return process.getActiveResourcesInfo().filter((r) => r === 'TCPSocketWrap' || r === 'TLSWrap').length;
}

/** Polls `f` until it returns a value (10 s at most). */
async function waitFor<T>(f: () => T | undefined, timeoutMs = 10_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = f();
    if (v !== undefined && v !== false) return v;
    if (Date.now() > deadline) throw new Error(`not within ${timeoutMs} ms`);
    await sleep(20);
  }
}
