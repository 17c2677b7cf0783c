/**
 * SourceSession and `qmt send`: migrate into a real QEMU 10.0.
 *
 * A running test guest is captured from a QEMU source into a saved VM (our
 * DestinationSession + DirectorySink + writeSavedVm, as `qmt receive` does),
 * then sent into fresh QEMU destinations (same machine, RAM and guest image):
 * precopy from the saved VM as it is; postcopy after 1 and 2 passes, with
 * preempt, and on a manual switch, from the saved VM "still running" at our
 * source (every counter of the guest's range goes up by one every 50 ms until
 * the switch, so every pass leaves the whole range dirty for postcopy);
 * everything plain and over TLS. Each time the destination completes, the
 * guest keeps running there, its memory invariant holds and the pages outside
 * its range equal ours bit for bit; in postcopy the destination asked for
 * pages and, with preempt, every answered request went out on the preempt
 * channel. Then the same through the `qmt send` command (child process).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { JsonEnvelope } from '../../src/cli/json.js';
import type { SendJson } from '../../src/cli/send.js';
import { DestinationSession } from '../../src/protocol/destination.js';
import { InMemorySink } from '../../src/protocol/memory.js';
import { SavedVmSource } from '../../src/protocol/memory-source.js';
import type { PostcopyPolicy } from '../../src/protocol/postcopy-policy.js';
import { MANIFEST, type SavedVmManifest } from '../../src/protocol/saved-vm.js';
import { SourceSession, type SourceStats } from '../../src/protocol/source.js';
import { INCOMPLETE_MAGIC } from '../../src/stream/mapped-ram.js';
import { initPkiDir } from '../../src/transport/pki.js';
import { loadMappedRam } from '../stream/mapped-ram-fixtures.js';
import { liveQemus, stopAll } from './harness.js';
import { describeWithQemu } from './require-qemu.js';

type SendOutput = JsonEnvelope & SendJson;
import { captureSavedVm, checkDestination, EmulatedGuest, MiB, savedDevices, savedRam, savedVmdesc, startDestination, type DestinationCheck, type GuestSpec } from './source-helpers.js';

/** 64 MiB q35, a top-down guest over 32 MiB: against the background stream's order, so the destination faults. */
const SPEC: GuestSpec = { memoryMiB: 64, guest: { startMiB: 1, endMiB: 33, direction: 'down' } };
const RANGE = { start: SPEC.guest.startMiB * MiB, end: SPEC.guest.endMiB * MiB };
const RANGE_PAGES = (RANGE.end - RANGE.start) / 4096;
/** One pass moves the 32 MiB of counters in about a second: the emulated guest dirties all of them many times per pass. */
const BANDWIDTH = 32 * MiB;
const DIRTY_INTERVAL_MS = 50;
const ROOT = join(import.meta.dirname, '..', '..');
const RUNNER = join(ROOT, 'test', 'cli', 'run-send.ts');

type CaseName = 'precopy' | 'after:1' | 'after:2' | 'preempt' | 'manual';
interface Case {
  name: CaseName;
  policy: PostcopyPolicy;
  preempt: boolean;
  /** The saved VM still running at our source. */
  running: boolean;
}
const KINDS: Case[] = [
  { name: 'precopy', policy: 'never', preempt: false, running: false },
  { name: 'after:1', policy: { afterPasses: 1 }, preempt: false, running: true },
  { name: 'after:2', policy: { afterPasses: 2 }, preempt: false, running: true },
  { name: 'preempt', policy: { afterPasses: 1 }, preempt: true, running: true },
  { name: 'manual', policy: 'manual', preempt: false, running: true },
];
const CASES = [false, true].flatMap((tls) => KINDS.map((k) => ({ ...k, tls })));

let work: string;
let vmDir: string;
let pkiDir: string;
let manifest: SavedVmManifest;
const children = new Set<ChildProcess>();

interface Outcome {
  stats: SourceStats;
  check: DestinationCheck;
  answered: { main: number; preempt: number };
  /** Bytes still to send when postcopy started (after the discards). */
  remainingAtSwitch: number | undefined;
  increments: number;
  ms: number;
}

/** Sends the saved VM (as it is, or "running") into a fresh QEMU destination and checks the result there. */
async function restore(c: Case & { tls: boolean }): Promise<Outcome> {
  const label = `${c.name.replace(':', '')}${c.tls ? '-tls' : ''}`;
  const postcopy = c.policy !== 'never';
  const { q, uri } = await startDestination(`dst-${label}`, SPEC, { postcopy, preempt: c.preempt, ...(c.tls ? { tlsDir: pkiDir } : {}) });
  const guest = c.running ? new EmulatedGuest(savedRam(vmDir, manifest), 'pc.ram', RANGE) : undefined;
  const saved = guest ? undefined : await SavedVmSource.open(vmDir);
  const t0 = performance.now();
  try {
    const s = new SourceSession({
      to: uri,
      ...(c.tls ? { transport: { tls: { dir: pkiDir, hostname: 'localhost' } } } : {}),
      memory: guest?.source ?? saved!,
      machineType: manifest.machineType!,
      devices: savedDevices(vmDir, manifest),
      vmdesc: savedVmdesc(vmDir, manifest),
      postcopy: c.policy,
      preempt: c.preempt,
      bandwidthLimit: BANDWIDTH,
      postcopyBandwidthLimit: BANDWIDTH,
      stopVm: () => guest?.stop(),
    });
    const answered = { main: 0, preempt: 0 };
    let remainingAtSwitch: number | undefined;
    s.on('page-request', (r) => answered[r.channel]++);
    s.on('postcopy-active', () => (remainingAtSwitch = s.stats().remaining));
    // Manual: the switch comes from another async context, in the middle of the second pass.
    if (c.policy === 'manual') s.once('pass', () => setTimeout(() => s.startPostcopy(), 300));
    guest?.start(DIRTY_INTERVAL_MS);
    s.start();
    let stats: SourceStats;
    try {
      stats = await s.done;
    } catch (e) {
      throw new Error(`${label}: ${(e as Error).message}; destination: ${JSON.stringify(await q.queryMigrate().catch(() => undefined))} ${q.stderrTail(500)}`, { cause: e });
    }
    // Requested pages of a saved VM are read asynchronously (readPages), never with a synchronous read on the urgent path.
    if (saved && c.preempt) expect(saved.stats().syncReads, `${label}: synchronous reads of the saved VM ${JSON.stringify(saved.stats())}`).toBe(0);
    const expected = guest ? guest.source.memory.get('pc.ram')! : savedRam(vmDir, manifest).get('pc.ram')!;
    const check = await checkDestination(q, expected);
    return { stats, check, answered, remainingAtSwitch, increments: guest?.increments ?? 0, ms: Math.round(performance.now() - t0) };
  } finally {
    guest?.stop();
    saved?.close();
    await q.stop();
  }
}

function expectRestored(o: Outcome): void {
  expect(o.stats.status).toBe('completed');
  expect(o.check.info.status).toBe('completed');
  expect(o.check.passesAfter, 'guest passes at the destination after completion').toBeGreaterThanOrEqual(2);
  expect(o.check.invariant.ok, o.check.invariant.detail).toBe(true);
  const outside = o.check.outside!;
  expect(outside.count, `pages outside the guest's range differing: ${outside.pages.map((p) => `0x${p.toString(16)}`).join(', ')}`).toBe(0);
}

function describeOutcome(name: string, tls: boolean, o: Outcome): string {
  const l = o.stats['postcopy-latency'];
  return (
    `[send] ${name}${tls ? ' tls' : ''}: ${o.ms} ms, passes ${o.stats.passes}, downtime ${o.stats.downtime} ms, ` +
    `remaining at switch ${o.remainingAtSwitch === undefined ? '-' : `${o.remainingAtSwitch / 4096} pages`}, increments ${o.increments}, ` +
    `requests ${o.stats['postcopy-requests']} (main ${o.answered.main}, preempt ${o.answered.preempt}), ` +
    `latency p50 ${l.p50} µs p90 ${l.p90} µs p99 ${l.p99} µs max ${l.max} µs, ` +
    `bytes main ${o.stats.channels.main?.bytesSent} preempt ${o.stats.channels.preempt?.bytesSent ?? '-'}, ${o.check.invariant.detail}`
  );
}

interface CliRun {
  child: ChildProcess;
  /** Resolves when a stderr line matches. */
  line(re: RegExp): Promise<string>;
  exit: Promise<{ code: number | null; stdout: string; stderr: string }>;
}

/** Starts `qmt send ARGS` (test/cli/run-send.ts; stderr is a pipe: plain progress). */
function qmtSend(args: string[]): CliRun {
  const child = spawn(process.execPath, ['--import', 'tsx', RUNNER, 'send', ...args], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
  children.add(child);
  let stdout = '';
  let stderr = '';
  const watchers: { re: RegExp; resolve: (l: string) => void }[] = [];
  child.stdout!.setEncoding('utf8').on('data', (d: string) => (stdout += d));
  child.stderr!.setEncoding('utf8').on('data', (d: string) => {
    stderr += d;
    for (const w of [...watchers]) {
      const m = w.re.exec(stderr);
      if (m) {
        watchers.splice(watchers.indexOf(w), 1);
        w.resolve(m[0]);
      }
    }
  });
  const exit = new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve) => {
    child.on('close', (code) => {
      children.delete(child);
      resolve({ code, stdout, stderr });
    });
  });
  const line = (re: RegExp): Promise<string> => {
    const m = re.exec(stderr);
    if (m) return Promise.resolve(m[0]);
    const p = new Promise<string>((resolve) => watchers.push({ re, resolve }));
    return Promise.race([p, exit.then((e) => Promise.reject(new Error(`qmt send exited (${e.code}) before ${re}: ${e.stderr}`)))]);
  };
  return { child, line, exit };
}

/** The last stderr line, after checking that nothing looks like a stack trace. */
function lastLine(stderr: string): string {
  expect(stderr).not.toMatch(/^\s+at /m);
  const lines = stderr.trimEnd().split('\n');
  return lines[lines.length - 1]!;
}

afterAll(async () => {
  for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
  await stopAll();
  if (work) await rm(work, { recursive: true, force: true });
});

describeWithQemu('SourceSession restores a saved VM into QEMU 10.0', () => {
  beforeAll(async () => {
    work = await mkdtemp(join(tmpdir(), 'qmt-send-'));
    vmDir = join(work, 'vm');
    pkiDir = join(work, 'pki');
    const t0 = performance.now();
    [manifest] = await Promise.all([captureSavedVm(vmDir, SPEC), initPkiDir(pkiDir)]);
    // The capture's source QEMU is gone: only the saved VM remains.
    expect(liveQemus()).toEqual([]);
    expect(manifest.complete).toBe(true);
    expect(manifest.machineType).toMatch(/^pc-q35-10\.0/);
    console.log(`[send] captured ${manifest.blocks.length} RAM blocks and ${manifest.devices.length} device sections in ${Math.round(performance.now() - t0)} ms`);
  });

  it.each(CASES)('$name (tls: $tls): QEMU completes, the guest runs on, memory consistent', async (c) => {
    const o = await restore(c);
    console.log(describeOutcome(c.name, c.tls, o));
    expectRestored(o);
    const st = o.stats;
    if (c.tls) {
      expect(st.channels.main?.tls?.protocol).toBe('TLSv1.3');
      if (c.preempt) expect(st.channels.preempt?.tls?.protocol).toBe('TLSv1.3');
    }
    if (c.policy === 'never') {
      expect(o.check.statuses).not.toContain('postcopy-active');
      expect(st['postcopy-requests']).toBe(0);
      expect(st.passes).toBe(1);
      expect(st.channels.preempt).toBeUndefined();
      return;
    }
    expect(o.check.statuses).toContain('postcopy-active');
    // Passes as asked (manual: the switch cut the second pass short).
    expect(st.passes).toBe(c.name === 'after:2' ? 2 : 1);
    // The guest ran on at our source: half the range at least was dirty again for postcopy.
    expect(o.increments).toBeGreaterThan(st.passes * 5);
    expect(o.remainingAtSwitch).toBeGreaterThanOrEqual((RANGE_PAGES / 2) * 4096);
    // The destination faulted and asked for pages, and got them.
    expect(st['postcopy-requests']).toBeGreaterThan(0);
    expect(o.answered.main + o.answered.preempt).toBeGreaterThan(0);
    expect(st['postcopy-latency'].count).toBe(o.answered.main + o.answered.preempt);
    if (c.preempt) {
      // On main only pages handed to it before their request (already in flight); the rest on preempt.
      expect(st['requests-answered']['main-in-flight'], 'requests answered on the main channel').toBe(o.answered.main);
      expect(st['requests-answered']['main-no-preempt']).toBe(0);
      expect(st['requests-answered'].preempt).toBe(o.answered.preempt);
      expect(o.answered.preempt).toBeGreaterThan(0);
      expect(st.channels.preempt?.bytesSent).toBeGreaterThan(0);
    } else {
      expect(o.answered.preempt).toBe(0);
      expect(st['requests-answered']).toEqual({ preempt: 0, 'main-in-flight': 0, 'main-no-preempt': o.answered.main });
      expect(st.channels.preempt).toBeUndefined();
    }
  });

  it('qmt send --postcopy after:0 --preempt --json: a lazy restore of the saved VM', async () => {
    const { q, uri } = await startDestination('dst-cli-lazy', SPEC, { postcopy: true, preempt: true });
    const run = qmtSend(['--from', vmDir, '--to', uri, '--postcopy', 'after:0', '--preempt', '--json']);
    const { code, stdout, stderr } = await run.exit;
    expect(code, stderr).toBe(0);
    expect(stderr).not.toMatch(/^\s+at /m);
    expect(stderr).toMatch(/^qmt: connected to tcp:127\.0\.0\.1:\d+; postcopy after:0 with preempt$/m);
    expect(stderr).toMatch(/^qmt: postcopy active/m);
    expect(stderr).toMatch(/^qmt: completed after .*then postcopy/m);
    const r = JSON.parse(stdout) as SendOutput;
    expect(r).toMatchObject({ version: 1, command: 'send', ok: true, policy: 'after:0', preempt: true, postcopy: true, machineType: manifest.machineType });
    expect(r.error).toBeUndefined();
    const st = r.stats!;
    expect(st.status).toBe('completed');
    expect(st.passes).toBe(0);
    expect(st.channels.preempt).toBeDefined();
    // Every page crossed on one channel or the other (how many went on demand depends on timing).
    expect((st.channels.main?.bytesSent ?? 0) + (st.channels.preempt?.bytesSent ?? 0)).toBeGreaterThan(32 * MiB);
    // With preempt, main answers only pages already in flight there; the JSON says so per reason.
    expect(st.requestsAnswered.mainNoPreempt).toBe(0);
    expect(st.requestsAnswered.mainInFlight).toBe(r.answered.main);
    expect(st.requestsAnswered.preempt).toBe(r.answered.preempt);
    expect(st.postcopyLatency.count).toBe(r.answered.preempt + r.answered.main);
    const check = await checkDestination(q, savedRam(vmDir, manifest).get('pc.ram')!);
    console.log(
      `[send] qmt send after:0 --preempt: ${st.totalTimeMs} ms, downtime ${st.downtimeMs} ms, requests ${st.postcopyRequests} (preempt ${r.answered.preempt}), ` +
        `latency p50 ${st.postcopyLatency.p50Us} µs p99 ${st.postcopyLatency.p99Us} µs, ${check.invariant.detail}`,
    );
    expect(check.invariant.ok, check.invariant.detail).toBe(true);
    expect(check.passesAfter).toBeGreaterThanOrEqual(2);
    expect(check.outside!.count).toBe(0);
    await q.stop();
  });

  it('qmt send --postcopy manual over TLS: SIGUSR1 switches in the middle of the first pass', async () => {
    const { q, uri } = await startDestination('dst-cli-manual', SPEC, { postcopy: true, preempt: false, tlsDir: pkiDir });
    // 8 MiB/s: the first pass would take 4 s; postcopy then goes at 128 MiB/s.
    const run = qmtSend(['--from', vmDir, '--to', uri, '--tls', pkiDir, '--tls-hostname', 'localhost', '--postcopy', 'manual', '--bandwidth', '8M', '--postcopy-bandwidth', '128M', '--json']);
    await run.line(/^qmt: postcopy is manual: send SIGUSR1 \(kill -USR1 \d+\) to switch$/m);
    await run.line(/^qmt: connected to .* \(TLS\)/m);
    await new Promise((r) => setTimeout(r, 500));
    run.child.kill('SIGUSR1');
    const { code, stdout, stderr } = await run.exit;
    expect(code, stderr).toBe(0);
    expect(stderr).toMatch(/^qmt: switching to postcopy \(asked\)$/m);
    expect(stderr).toMatch(/^qmt: postcopy active/m);
    const r = JSON.parse(stdout) as SendOutput;
    expect(r).toMatchObject({ version: 1, command: 'send', ok: true, tls: true, policy: 'manual', postcopy: true });
    expect(r.stats!.passes).toBe(0);
    expect(r.stats!.channels.main?.tls?.protocol).toBe('TLSv1.3');
    const check = await checkDestination(q, savedRam(vmDir, manifest).get('pc.ram')!);
    expect(check.invariant.ok, check.invariant.detail).toBe(true);
    expect(check.outside!.count).toBe(0);
    await q.stop();
  });
});

describe('qmt send refuses what it cannot restore', () => {
  let dir: string;
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'qmt-send-refuse-'));
  });
  afterAll(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  /** A one-block saved VM (zero RAM, no devices). */
  function writeVm(name: string, patch: Partial<SavedVmManifest>): string {
    const d = join(dir, name);
    mkdirSync(join(d, 'ram'), { recursive: true });
    writeFileSync(join(d, 'ram', 'pc.ram.bin'), Buffer.alloc(0));
    const m: SavedVmManifest = {
      format: 'qemu-migration-transport/saved-vm',
      version: 1,
      complete: true,
      machineType: 'pc-q35-10.0',
      capabilities: [],
      postcopy: false,
      blocks: [{ idstr: 'pc.ram', length: 1 * MiB, file: 'ram/pc.ram.bin' }],
      devices: [],
      vmdesc: null,
      stats: null,
      savedAt: new Date().toISOString(),
      ...patch,
    };
    writeFileSync(join(d, MANIFEST), JSON.stringify(m));
    return d;
  }

  it('an incomplete saved VM: exit 1, one line naming why, nothing sent', async () => {
    const vm = writeVm('incomplete', { complete: false, error: { code: 'peer-disconnected', phase: 'precopy', message: 'the source closed the main channel (phase: precopy)' } });
    // Port 1: nothing listens; the refusal must come before any connection attempt.
    const { code, stdout, stderr } = await qmtSend(['--from', vm, '--to', 'tcp:127.0.0.1:1', '--json']).exit;
    expect(code).toBe(1);
    expect(lastLine(stderr)).toBe(`qmt: incomplete-saved-vm: ${vm}: the saved VM is incomplete (the capture failed in precopy: peer-disconnected: the source closed the main channel (phase: precopy)); only a complete capture can be restored`);
    const r = JSON.parse(stdout) as SendOutput;
    expect(r).toMatchObject({ version: 1, command: 'send', ok: false, error: { code: 'incomplete-saved-vm' }, stats: null });
  });

  it('not a saved VM, a missing RAM file, a bad option: one line each', async () => {
    const empty = join(dir, 'empty');
    mkdirSync(empty, { recursive: true });
    let r = await qmtSend(['--from', empty, '--to', 'tcp:127.0.0.1:1']).exit;
    expect(r.code).toBe(1);
    expect(lastLine(r.stderr)).toBe(`qmt: saved-vm: ${empty}: not a saved VM (no manifest.json; write one with qmt receive)`);

    const vm = writeVm('missing-ram', { blocks: [{ idstr: 'pc.ram', length: 1 * MiB, file: 'ram/pc.ram.bin' }, { idstr: 'pc.bios', length: 256 * 1024, file: 'ram/pc.bios.bin' }] });
    r = await qmtSend(['--from', vm, '--to', 'tcp:127.0.0.1:1']).exit;
    expect(r.code).toBe(1);
    expect(lastLine(r.stderr)).toBe(`qmt: saved-vm: ${vm}: ram/pc.bios.bin (RAM block "pc.bios") is missing`);

    const ok = writeVm('ok', {});
    r = await qmtSend(['--from', ok, '--to', 'tcp:127.0.0.1:1', '--preempt']).exit;
    expect(r.code).toBe(2);
    expect(lastLine(r.stderr)).toBe('qmt: usage: --preempt needs --postcopy manual, auto or after:N');
    r = await qmtSend(['--from', ok, '--to', 'tcp:127.0.0.1:1', '--postcopy', 'later']).exit;
    expect(r.code).toBe(2);
    expect(lastLine(r.stderr)).toMatch(/^qmt: usage: option '--postcopy <policy>' argument 'later' is invalid/);
    // Nothing listens on port 1: a transport error, in one line.
    r = await qmtSend(['--from', ok, '--to', 'tcp:127.0.0.1:1']).exit;
    expect(r.code).toBe(1);
    expect(lastLine(r.stderr)).toMatch(/^qmt: connect-failed: \(main channel\) connect ECONNREFUSED 127\.0\.0\.1:1/);
  });

  it('a mapped-ram file: an incomplete one, a cut one, a stream that is not mapped-ram, a missing path: exit 1, one line naming why', async () => {
    const capture = loadMappedRam('mapped-ram-paused');
    const incomplete = join(dir, 'incomplete.mapped-ram');
    // What qmt receive --format mapped-ram leaves until it is done: "QMTP" where "QEVM" will be.
    const q = Buffer.from(capture.bytes);
    q.writeUInt32BE(INCOMPLETE_MAGIC, 0);
    writeFileSync(incomplete, q);
    let r = await qmtSend(['--from', incomplete, '--to', 'tcp:127.0.0.1:1', '--json']).exit;
    expect(r.code).toBe(1);
    expect(lastLine(r.stderr)).toMatch(new RegExp(`^qmt: incomplete-saved-vm: ${incomplete}: the mapped-ram file is incomplete \\(.+\\); only a complete capture can be restored$`));
    expect(JSON.parse(r.stdout)).toMatchObject({ ok: false, format: null, error: { code: 'incomplete-saved-vm' }, stats: null });

    const cut = join(dir, 'cut.mapped-ram');
    writeFileSync(cut, capture.bytes.subarray(0, 3 * MiB));
    r = await qmtSend(['--from', cut, '--to', 'tcp:127.0.0.1:1']).exit;
    expect(r.code).toBe(1);
    expect(lastLine(r.stderr)).toMatch(new RegExp(`^qmt: saved-vm: ${cut}: not a saved VM \\(a directory from qmt receive, or a complete mapped-ram file\\): truncated at offset \\d+: the (bitmap|pages) of RAM block "pc.ram"`));

    const plain = join(dir, 'plain.bin');
    writeFileSync(plain, readFileSync(join(ROOT, 'test', 'fixtures', 'paused-guest.bin')));
    r = await qmtSend(['--from', plain, '--to', 'tcp:127.0.0.1:1']).exit;
    expect(r.code).toBe(1);
    expect(lastLine(r.stderr)).toBe(`qmt: saved-vm: ${plain}: not a saved VM (a directory from qmt receive, or a complete mapped-ram file): unsupported at offset 0: not a mapped-ram file (its configuration does not list the mapped-ram capability)`);

    const missing = join(dir, 'no-such-vm');
    r = await qmtSend(['--from', missing, '--to', 'tcp:127.0.0.1:1']).exit;
    expect(r.code).toBe(1);
    expect(lastLine(r.stderr)).toBe(`qmt: not-found: ${missing}: no such file or directory (--from, the saved VM)`);
  });

  it('--tls-allow: a destination whose valid certificate names none of the peers is refused, typed, in one line; a named one gets the saved VM', async () => {
    const pki = join(dir, 'allow-pki');
    await initPkiDir(pki);
    const vm = writeVm('allow', {});
    const sink = new InMemorySink();
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, transport: { tls: { dir: pki } } });
    try {
      const strangers: string[] = [];
      dst.on('stranger', (ev) => strangers.push(ev.reason));
      let r = await qmtSend(['--from', vm, '--to', dst.uri, '--tls', pki, '--tls-allow', 'dst.example', '--tls-allow', 'other.example']).exit;
      expect(r.code).toBe(1);
      expect(lastLine(r.stderr)).toMatch(/^qmt: tls-peer-not-allowed: .*names none of the allowed peers \(dst\.example, other\.example\)/);
      // Our destination saw a client that hung up after the handshake, and keeps waiting.
      expect(dst.stats().status).toBe('setup');
      r = await qmtSend(['--from', vm, '--to', dst.uri, '--tls', pki, '--tls-allow', 'localhost']).exit;
      expect(r.code, r.stderr).toBe(0);
      const result = await dst.done;
      expect(result.complete).toBe(true);
      expect(sink.blocks.get('pc.ram')?.equals(Buffer.alloc(1 * MiB))).toBe(true);
      expect(strangers.length).toBeGreaterThan(0);
      r = await qmtSend(['--from', vm, '--to', dst.uri, '--tls-allow', 'localhost']).exit;
      expect(r.code).toBe(2);
      expect(lastLine(r.stderr)).toBe('qmt: usage: --tls-allow needs --tls');
    } finally {
      dst.close();
    }
  });
});

