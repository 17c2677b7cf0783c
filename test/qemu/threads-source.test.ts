/**
 * SourceSession with `threads: 'on'` (each channel in its own worker thread,
 * TLS in the worker) into a real QEMU 10.0 destination: a saved VM "still
 * running" at our source, postcopy after one pass with preempt (plain and
 * TLS) and precopy over TLS. QEMU completes, the guest runs on there, its
 * invariant holds and the pages outside its range equal ours. The same
 * postcopy run with `threads: 'off'` runs alongside, for the latency figures
 * of both paths in one run (printed; nothing asserts on timing).
 */
import { spawn } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import type { JsonEnvelope } from '../../src/cli/json.js';
import type { SendJson } from '../../src/cli/send.js';
import type { PostcopyPolicy } from '../../src/protocol/postcopy-policy.js';
import type { SavedVmManifest } from '../../src/protocol/saved-vm.js';
import { SourceSession, type SourceStats } from '../../src/protocol/source.js';
import { initPkiDir } from '../../src/transport/pki.js';
import { socketTransferSupported } from '../../src/transport/worker/support.js';
import { stopAll } from './harness.js';
import { describeWithQemu } from './require-qemu.js';
import { captureSavedVm, checkDestination, EmulatedGuest, MiB, savedDevices, savedRam, savedVmdesc, startDestination, type DestinationCheck, type GuestSpec } from './source-helpers.js';

const SPEC: GuestSpec = { memoryMiB: 64, guest: { startMiB: 1, endMiB: 33, direction: 'down' } };
const RANGE = { start: SPEC.guest.startMiB * MiB, end: SPEC.guest.endMiB * MiB };
const BANDWIDTH = 32 * MiB;
const ROOT = join(import.meta.dirname, '..', '..');
const RUNNER = join(ROOT, 'test', 'cli', 'run-send.ts');

let work: string;
let vmDir: string;
let pkiDir: string;
let manifest: SavedVmManifest;

interface Case {
  name: string;
  policy: PostcopyPolicy;
  preempt: boolean;
  tls: boolean;
  threads: 'on' | 'off';
}

async function restore(c: Case): Promise<{ stats: SourceStats; check: DestinationCheck; answered: { main: number; preempt: number } }> {
  const postcopy = c.policy !== 'never';
  const { q, uri } = await startDestination(`dst-threads-${c.name}`, SPEC, { postcopy, preempt: c.preempt, ...(c.tls ? { tlsDir: pkiDir } : {}) });
  const guest = new EmulatedGuest(savedRam(vmDir, manifest), 'pc.ram', RANGE, { shared: true });
  try {
    const s = new SourceSession({
      to: uri,
      ...(c.tls ? { transport: { tls: { dir: pkiDir, hostname: 'localhost' } } } : {}),
      memory: guest.source,
      machineType: manifest.machineType!,
      devices: savedDevices(vmDir, manifest),
      vmdesc: savedVmdesc(vmDir, manifest),
      postcopy: c.policy,
      preempt: c.preempt,
      threads: c.threads,
      bandwidthLimit: BANDWIDTH,
      postcopyBandwidthLimit: BANDWIDTH,
      // The guest dirties its whole range faster than a pass: precopy completes with the VM stopped after two.
      maxPasses: 2,
      stopVm: () => guest.stop(),
    });
    const answered = { main: 0, preempt: 0 };
    s.on('page-request', (r) => answered[r.channel]++);
    guest.start(50);
    s.start();
    let stats: SourceStats;
    try {
      stats = await s.done;
    } catch (e) {
      throw new Error(`${c.name}: ${(e as Error).message}; destination: ${JSON.stringify(await q.queryMigrate().catch(() => undefined))} ${q.stderrTail(500)}`, { cause: e });
    }
    const check = await checkDestination(q, guest.source.memory.get('pc.ram')!);
    return { stats, check, answered };
  } finally {
    guest.stop();
    await q.stop();
  }
}

afterAll(async () => {
  await stopAll();
  if (work) await rm(work, { recursive: true, force: true });
});

describeWithQemu('SourceSession with threads into QEMU 10.0', () => {
  beforeAll(async () => {
    work = await mkdtemp(join(tmpdir(), 'qmt-threads-send-'));
    vmDir = join(work, 'vm');
    pkiDir = join(work, 'pki');
    [manifest] = await Promise.all([captureSavedVm(vmDir, SPEC, 'capture-threads'), initPkiDir(pkiDir)]);
    expect(manifest.complete).toBe(true);
  });

  const cases: Case[] = [
    { name: 'postcopy-preempt', policy: { afterPasses: 1 }, preempt: true, tls: false, threads: 'on' },
    { name: 'postcopy-preempt-off', policy: { afterPasses: 1 }, preempt: true, tls: false, threads: 'off' },
    { name: 'postcopy-preempt-tls', policy: { afterPasses: 1 }, preempt: true, tls: true, threads: 'on' },
    { name: 'precopy-tls', policy: 'never', preempt: false, tls: true, threads: 'on' },
  ];

  it.skipIf(!socketTransferSupported()).each(cases)('$name (threads $threads): QEMU completes, the guest runs on, memory consistent', async (c) => {
    const { stats: st, check, answered } = await restore(c);
    const l = st['postcopy-latency'];
    console.log(
      `[threads-send] ${c.name} threads ${c.threads}: passes ${st.passes}, downtime ${st.downtime} ms, requests ${st['postcopy-requests']} ` +
        `(main ${answered.main}, preempt ${answered.preempt}) ${JSON.stringify(st['requests-answered'])}, latency p50 ${l.p50} µs p90 ${l.p90} µs p99 ${l.p99} µs max ${l.max} µs, ` +
        `threads ${JSON.stringify(st.threads)}`,
    );
    expect(st.status).toBe('completed');
    expect(check.info.status).toBe('completed');
    expect(check.passesAfter).toBeGreaterThanOrEqual(2);
    expect(check.invariant.ok, check.invariant.detail).toBe(true);
    expect(check.outside!.count).toBe(0);
    expect(st.threads?.used).toBe(c.threads === 'on');
    if (c.threads === 'on') expect(st.threads!.channels.map((x) => x.role).sort()).toEqual(c.preempt ? ['main', 'preempt'] : ['main']);
    if (c.tls) expect(st.channels.main?.tls?.protocol).toBe('TLSv1.3');
    if (c.policy === 'never') {
      expect(check.statuses).not.toContain('postcopy-active');
      expect(st.passes).toBe(2);
      return;
    }
    expect(check.statuses).toContain('postcopy-active');
    expect(st['postcopy-requests']).toBeGreaterThan(0);
    // With preempt, main answers only pages handed to it before their request.
    expect(st['requests-answered']['main-no-preempt']).toBe(0);
    expect(answered.main).toBe(st['requests-answered']['main-in-flight']);
    expect(answered.preempt).toBe(st['requests-answered'].preempt);
    expect(answered.preempt).toBeGreaterThan(0);
    if (c.tls) expect(st.channels.preempt?.tls?.protocol).toBe('TLSv1.3');
  });

  const cliCases = [
    { name: 'after:0 --preempt --tls', postcopy: true, tls: true },
    { name: 'precopy', postcopy: false, tls: false },
  ];
  it.skipIf(!socketTransferSupported()).each(cliCases)('qmt send --from DIR --threads on $name: QEMU completes, the guest runs, each thread read its pages from the files', async (c) => {
    const { q, uri } = await startDestination(`dst-threads-cli-${c.postcopy ? 'pc' : 'pre'}`, SPEC, { postcopy: c.postcopy, preempt: c.postcopy, ...(c.tls ? { tlsDir: pkiDir } : {}) });
    try {
      const args = ['send', '--from', vmDir, '--to', uri, '--threads', 'on', '--json'];
      if (c.tls) args.push('--tls', pkiDir, '--tls-hostname', 'localhost');
      if (c.postcopy) args.push('--postcopy', 'after:0', '--preempt');
      const child = spawn(process.execPath, ['--import', 'tsx', RUNNER, ...args], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
      let stdout = '';
      let stderr = '';
      child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
      child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
      const code = await new Promise<number | null>((resolve) => child.on('close', resolve));
      expect(code, stderr).toBe(0);
      expect(stderr).not.toMatch(/^\s+at /m);
      expect(stderr).toMatch(/^qmt: threads: main \(thread \d+, [\d.]+ s CPU, read [\d.]+ \w+ of the saved VM in \d+ reads\)/m);
      if (c.postcopy) expect(stderr).toMatch(/^qmt: threads: main \(.*\), preempt \(thread \d+/m);
      const r = JSON.parse(stdout) as JsonEnvelope & SendJson;
      expect(r).toMatchObject({ command: 'send', ok: true, postcopy: c.postcopy, preempt: c.postcopy, tls: c.tls });
      const st = r.stats!;
      // Each channel's thread read the pages it sent from the saved files: every page once, by one of them.
      expect(st.threads).toMatchObject({ used: true, why: "threads: 'on'; each channel's thread reads the pages it sends from the block files" });
      expect(st.threads!.channels.map((t) => [t.role, t.ended]), JSON.stringify(st.threads)).toEqual(c.postcopy ? [['main', 'by-itself'], ['preempt', 'by-itself']] : [['main', 'by-itself']]);
      const ramBytes = manifest.blocks.reduce((n, b) => n + b.length, 0);
      expect(st.threads!.channels.reduce((n, t) => n + (t.reads?.bytes ?? 0), 0)).toBe(ramBytes);
      if (c.postcopy) {
        expect(st.threads!.channels.find((t) => t.role === 'preempt')!.reads?.bytes, 'the preempt thread read the pages it answered').toBeGreaterThan(0);
        expect(st.channels.preempt?.tls?.protocol).toBe('TLSv1.3');
        expect(st.requestsAnswered.mainNoPreempt).toBe(0);
      }
      const check = await checkDestination(q, savedRam(vmDir, manifest).get('pc.ram')!);
      console.log(`[threads-send] qmt send --threads on ${c.name}: ${st.totalTimeMs} ms, downtime ${st.downtimeMs} ms, requests ${st.postcopyRequests}, latency p50 ${st.postcopyLatency.p50Us} µs p99 ${st.postcopyLatency.p99Us} µs, threads ${JSON.stringify(st.threads)}`);
      expect(check.info.status).toBe('completed');
      expect(check.passesAfter).toBeGreaterThanOrEqual(2);
      expect(check.invariant.ok, check.invariant.detail).toBe(true);
      expect(check.outside!.count).toBe(0);
    } finally {
      await q.stop();
    }
  });
});
