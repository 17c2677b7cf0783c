/**
 * The path a user takes with a saved VM: a running test guest on a QEMU 10.0
 * source is captured by the real `qmt receive --out DIR` command, then that
 * directory, unchanged, is restored by the real `qmt send --from DIR` command
 * into fresh QEMU destinations with every postcopy policy, with and without
 * preempt, plain and over TLS.
 *
 * A saved VM does not change: after its first pass nothing is dirty. With
 * `after:1` the switch then finds nothing to discard — the case that made a
 * QEMU 10.0 destination fail with "CMD_POSTCOPY_RUN in wrong postcopy state
 * (2)" (see SourceSession's writeDiscards). With `after:2` and `auto`,
 * precopy has converged after the first pass and completes as precopy; with
 * `manual` the switch comes by SIGUSR1 in the middle of the first pass.
 * Each time: `qmt send` exits 0, the QEMU destination completes, the guest
 * keeps running there, its invariant holds, and every page outside the
 * guest's range equals the saved VM's bit for bit.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { afterAll, beforeAll, expect, it } from 'vitest';
import type { JsonEnvelope } from '../../src/cli/json.js';
import type { SendJson } from '../../src/cli/send.js';
import { readSavedVmManifest, type SavedVmManifest } from '../../src/protocol/saved-vm.js';
import { initPkiDir } from '../../src/transport/pki.js';
import { qmtChildren } from '../cli/qmt.js';
import { startQemu, stopAll } from './harness.js';
import { describeWithQemu } from './require-qemu.js';
import { checkDestination, migrationStatuses, savedRam, startDestination, type GuestSpec } from './source-helpers.js';

const SPEC: GuestSpec = { memoryMiB: 64, guest: { startMiB: 1, endMiB: 33, direction: 'down' } };

type Policy = 'after:1' | 'after:2' | 'auto' | 'manual';
const POLICIES: Policy[] = ['after:1', 'after:2', 'auto', 'manual'];
const CASES = [false, true].flatMap((tls) => [false, true].flatMap((preempt) => POLICIES.map((policy) => ({ policy, preempt, tls }))));

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

describeWithQemu('a saved VM captured by qmt receive, restored unchanged by qmt send into QEMU 10.0', () => {
  beforeAll(async () => {
    work = await mkdtemp(join(tmpdir(), 'qmt-saved-vm-'));
    vmDir = join(work, 'vm');
    pkiDir = join(work, 'pki');
    await initPkiDir(pkiDir);
    const t0 = performance.now();
    const receive = qmt(['receive', '--listen', 'tcp:127.0.0.1:0', '--out', vmDir, '--idle-timeout', '30000']);
    const uri = (await receive.stderrMatches(/^qmt: listening on (\S+)/m))[1]!;
    const src = await startQemu({ name: 'saved-src', machine: 'q35', memoryMiB: SPEC.memoryMiB, guest: SPEC.guest });
    try {
      await src.waitSerialPasses(3, 15_000);
      // The guest rewrites its range all the time: a generous downtime budget lets precopy converge.
      await src.setParameters({ 'downtime-limit': 5000 });
      await src.migrate(uri);
      await src.waitMigration(['completed'], 30_000);
    } finally {
      await src.stop();
    }
    const r = await receive.exit;
    expect(r.code, r.stderr).toBe(0);
    manifest = await readSavedVmManifest(vmDir);
    expect(manifest.complete).toBe(true);
    console.log(`[saved-vm] captured by qmt receive in ${Math.round(performance.now() - t0)} ms: ${manifest.blocks.length} RAM blocks, ${manifest.devices.length} device sections`);
  });

  it.each(CASES)('--postcopy $policy, preempt $preempt, tls $tls: QEMU completes, the guest runs on, memory consistent', async (c) => {
    const label = `${c.policy.replace(':', '')}${c.preempt ? '-preempt' : ''}${c.tls ? '-tls' : ''}`;
    const { q, uri } = await startDestination(`dst-${label}`, SPEC, { postcopy: true, preempt: c.preempt, ...(c.tls ? { tlsDir: pkiDir } : {}) });
    try {
      const args = ['send', '--from', vmDir, '--to', uri, '--postcopy', c.policy, '--json'];
      if (c.preempt) args.push('--preempt');
      if (c.tls) args.push('--tls', pkiDir, '--tls-hostname', 'localhost');
      // Manual: a first pass of ~4 s at 16 MiB/s, and the switch in its middle.
      if (c.policy === 'manual') args.push('--bandwidth', '16M', '--postcopy-bandwidth', '256M');
      const t0 = performance.now();
      const run = qmt(args);
      if (c.policy === 'manual') {
        await run.stderrMatches(/^qmt: connected to /m);
        await new Promise((r) => setTimeout(r, 800));
        run.child.kill('SIGUSR1');
      }
      // A run that hangs (seen twice under CI load with 'manual', not reproduced since) is stopped and
      // described: qmt's own stderr and QEMU's migration state, instead of a bare test timeout.
      const hung = setTimeout(() => {
        void q
          .queryMigrate()
          .catch(() => undefined)
          .then((info) => console.log(`[saved-vm] ${label}: hung after 90 s; QEMU ${JSON.stringify(info)}`));
        run.child.kill('SIGINT');
      }, 90_000);
      const { code, stdout, stderr } = await run.exit.finally(() => clearTimeout(hung));
      expect(stderr).not.toMatch(/^\s+at /m);
      expect(code, `${stderr}\nQEMU: ${q.stderrTail(800)}`).toBe(0);
      const report = JSON.parse(stdout) as JsonEnvelope & SendJson;
      expect(report.ok).toBe(true);
      const st = report.stats!;
      const check = await checkDestination(q, savedRam(vmDir, manifest).get('pc.ram')!);
      console.log(
        `[saved-vm] ${label}: ${Math.round(performance.now() - t0)} ms, passes ${st.passes}, postcopy ${report.postcopy}, downtime ${st.downtimeMs} ms, ` +
          `requests ${st.postcopyRequests} (main ${report.answered.main}, preempt ${report.answered.preempt}), ${check.invariant.detail}`,
      );
      expect(check.info.status).toBe('completed');
      expect(check.passesAfter, 'guest passes at the destination after completion').toBeGreaterThanOrEqual(2);
      expect(check.invariant.ok, check.invariant.detail).toBe(true);
      expect(check.outside!.count, 'pages outside the guest range that differ from the saved VM').toBe(0);
      const statuses = migrationStatuses(q);
      if (c.policy === 'after:1' || c.policy === 'manual') {
        // after:1 switches after the one pass a saved VM needs, with nothing dirty; manual in the middle of it.
        expect(report.postcopy).toBe(true);
        expect(statuses).toContain('postcopy-active');
        expect(st.passes).toBe(c.policy === 'manual' ? 0 : 1);
        // With preempt, main answers only pages already in flight there (requestsAnswered says why).
        if (c.preempt) expect(st.requestsAnswered.mainNoPreempt, 'requests answered on main for want of preempt although it is there').toBe(0);
        if (c.preempt) expect(st.requestsAnswered.mainInFlight).toBe(report.answered.main);
      } else {
        // Nothing is dirty after the first pass: precopy has converged and completes.
        expect(report.postcopy).toBe(false);
        expect(statuses).not.toContain('postcopy-active');
        expect(st.passes).toBe(1);
      }
    } finally {
      await q.stop();
    }
  });
});
