/**
 * `qmt receive` as a command (a child process running test/cli/run-qmt.ts):
 * precopy and postcopy from a real QEMU 10 source, memory compared bit for bit
 * with the stopped source; failures (source killed, idle timeout, bad URI,
 * SIGINT) end with exit code 1 (130 for SIGINT), one error line and an incomplete manifest.
 * Plus the fault generator and the progress display on their own.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { PassThrough } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterAll, describe, expect, it, vi } from 'vitest';
import { FaultGenerator, type FaultTarget } from '../../src/cli/fault.js';
import { Progress } from '../../src/cli/progress.js';
import type { JsonEnvelope } from '../../src/cli/json.js';
import type { ReceiveJson } from '../../src/cli/receive.js';

type ReceiveOutput = JsonEnvelope & ReceiveJson;
import type { PageRequestResult } from '../../src/protocol/page-tracker.js';
import { InMemorySource } from '../../src/protocol/memory-source.js';
import { readSavedVmManifest } from '../../src/protocol/saved-vm.js';
import { SourceSession } from '../../src/protocol/source.js';
import { FaultRelay } from '../faults/relay.js';
import { initPkiDir } from '../../src/transport/pki.js';
import { checkGuestInvariant, compareGuestRam, guestRangeOf, readGuestRam, startQemu, stopAll, type QemuProcess } from '../qemu/harness.js';
import { describeWithQemu } from '../qemu/require-qemu.js';
import { playStranger } from '../support/strangers.js';

const MiB = 1024 * 1024;
const ROOT = join(import.meta.dirname, '..', '..');
const RUNNER = join(ROOT, 'test', 'cli', 'run-qmt.ts');
const work = mkdtempSync(join(tmpdir(), 'qmt-receive-'));
const children = new Set<ChildProcess>();

afterAll(async () => {
  for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
  await stopAll();
  rmSync(work, { recursive: true, force: true });
});

interface Run {
  child: ChildProcess;
  /** The URI from "qmt: listening on URI". */
  uri: Promise<string>;
  exit: Promise<{ code: number | null; stdout: string; stderr: string }>;
  /** Resolves once a stderr line matches `re`. */
  printed(re: RegExp): Promise<void>;
}

/** Starts `qmt receive ARGS` (plain progress: stderr is a pipe). */
function receive(args: string[]): Run {
  const child = spawn(process.execPath, ['--import', 'tsx', RUNNER, 'receive', ...args], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
  children.add(child);
  let stdout = '';
  let stderr = '';
  child.stdout!.setEncoding('utf8').on('data', (d: string) => (stdout += d));
  let resolveUri!: (u: string) => void;
  const uri = new Promise<string>((r) => (resolveUri = r));
  const waiting: { re: RegExp; resolve: () => void }[] = [];
  child.stderr!.setEncoding('utf8').on('data', (d: string) => {
    stderr += d;
    const m = /^qmt: listening on (\S+)/m.exec(stderr);
    if (m) resolveUri(m[1]!);
    for (const w of waiting.splice(0)) {
      if (w.re.test(stderr)) w.resolve();
      else waiting.push(w);
    }
  });
  const printed = (re: RegExp): Promise<void> => (re.test(stderr) ? Promise.resolve() : new Promise((resolve) => waiting.push({ re, resolve })));
  const exit = new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve) => {
    child.on('close', (code) => {
      children.delete(child);
      resolve({ code, stdout, stderr });
    });
  });
  // A child that exits before listening must not leave `uri` pending forever.
  const exitFirst = exit.then((e) => {
    throw new Error(`qmt exited (${e.code}) before listening: ${e.stderr}`);
  });
  const listening = Promise.race([uri, exitFirst]);
  listening.catch(() => undefined);
  return { child, uri: listening, exit, printed };
}

/** The last stderr line, and a check that nothing looks like a stack trace. */
function errorLine(stderr: string): string {
  expect(stderr).not.toMatch(/^\s+at /m);
  const lines = stderr.trimEnd().split('\n');
  return lines[lines.length - 1]!;
}

/** Polls source `query-migrate` until `pred` holds. */
async function waitSource(q: QemuProcess, pred: (ram: Record<string, unknown>, status: string) => boolean, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const info = await q.queryMigrate();
    const status = info.status ?? 'none';
    if (pred((info.ram ?? {}) as Record<string, unknown>, status)) return;
    if (status === 'failed' || status === 'completed' || status === 'cancelled') throw new Error(`source migration ${status} before the condition: ${info['error-desc'] ?? ''}`);
    if (Date.now() > deadline) throw new Error(`source: condition not met after ${timeoutMs} ms (status ${status})`);
    await sleep(10);
  }
}

describeWithQemu('qmt receive from a QEMU 10 source', () => {
  it('precopy: exit 0, complete manifest, RAM equal to the stopped source, devices, --json report', async () => {
    const out = join(work, 'precopy');
    const run = receive(['--listen', 'tcp:127.0.0.1:0', '--out', out, '--json']);
    const q = await startQemu({ name: 'recv-pre', memoryMiB: 64, guest: { startMiB: 1, endMiB: 16 } });
    await q.waitSerialPasses(2);
    const uri = await run.uri;
    expect(uri).toMatch(/^tcp:127\.0\.0\.1:\d+$/);
    expect(uri).not.toBe('tcp:127.0.0.1:0');
    await q.migrate(uri);
    // A precopy that cannot converge over a busy guest is let through after two passes.
    await waitSource(q, (ram, st) => st === 'active' && Number(ram['dirty-sync-count'] ?? 0) >= 2).catch(() => undefined);
    await q.setParameters({ 'downtime-limit': 10_000 }).catch(() => undefined);
    await q.waitMigration('completed', 30_000);
    const { code, stdout, stderr } = await run.exit;
    expect(code, stderr).toBe(0);
    expect(stderr).toMatch(/^qmt: precopy iteration 1: \d+ pages/m);
    expect(stderr).toMatch(/^qmt: saved to .* \(complete: /m);

    const m = await readSavedVmManifest(out);
    expect(m.complete).toBe(true);
    expect(m.error).toBeUndefined();
    expect(m.machineType).toMatch(/^pc-q35-10\.0/);
    expect(m.devices.map((d) => d.idstr)).toEqual(expect.arrayContaining(['cpu', 'apic', 'mc146818rtc']));
    for (const d of m.devices) expect(readFileSync(join(out, d.file)).length).toBe(d.size);
    expect(m.vmdesc).toBe('vmdesc.json');
    const ramBlock = m.blocks.find((b) => b.idstr === 'pc.ram');
    expect(ramBlock?.length).toBe(64 * MiB);
    const mine = readFileSync(join(out, ramBlock!.file));
    const theirs = await readGuestRam(q, 64 * MiB);
    expect(compareGuestRam(theirs, mine)).toEqual({ equal: true, pages: [], count: 0 });
    // The RAM block holds what lies under the VGA window too: all of it is equal.
    expect(mine.equals(theirs)).toBe(true);
    expect(checkGuestInvariant(mine, guestRangeOf(q)).ok).toBe(true);

    const r = JSON.parse(stdout) as ReceiveOutput;
    expect(r).toMatchObject({ version: 1, command: 'receive', ok: true });
    expect(r.durationMs).toBeGreaterThan(0);
    expect(r.listen).toBe(uri);
    expect(r.manifest?.complete).toBe(true);
    expect(r.manifest?.devices.count).toBe(m.devices.length);
    expect(r.stats?.status).toBe('completed');
    const src = (await q.queryMigrate()).ram!;
    expect(r.stats!.pages.normal).toBe(src.normal);
    expect(r.stats!.pages.zero).toBe(src.duplicate);
    expect(r.stats!.transferredBytes).toBeGreaterThan(0);
    expect(r.faults).toBeUndefined();
    await q.stop();
  });

  it('postcopy with --fault random --fault-rate 200: faults served and timed, RAM equal to the stopped source', async () => {
    const out = join(work, 'postcopy');
    const run = receive(['--listen', 'tcp:127.0.0.1:0', '--out', out, '--postcopy', '--fault', 'random', '--fault-rate', '200', '--json']);
    const q = await startQemu({ name: 'recv-post', memoryMiB: 64, guest: { startMiB: 1, endMiB: 48 } });
    await q.setCapabilities({ 'postcopy-ram': true });
    // Precopy cannot converge; postcopy's background stream is slow enough to last a few seconds.
    await q.setParameters({ 'max-bandwidth': 32 * MiB, 'max-postcopy-bandwidth': 8 * MiB, 'downtime-limit': 1 });
    await q.waitSerialPasses(2);
    await q.migrate(await run.uri);
    await waitSource(q, (ram, st) => st === 'active' && Number(ram['dirty-sync-count'] ?? 0) >= 2);
    await q.startPostcopy();
    const info = await q.waitMigration('completed', 60_000);
    const { code, stdout, stderr } = await run.exit;
    expect(code, stderr).toBe(0);
    expect(stderr).toMatch(/^qmt: postcopy running \(source stopped\): requesting 200 pages\/s \(random\)$/m);
    expect(stderr).toMatch(/^qmt: faults \(random, 200\/s\): \d+ issued, \d+ answered.*; latency p50 /m);

    const r = JSON.parse(stdout) as ReceiveOutput;
    expect(r).toMatchObject({ version: 1, command: 'receive', ok: true });
    expect(r.manifest?.complete).toBe(true);
    expect(r.manifest?.postcopy).toBe(true);
    const f = r.faults!;
    expect(f.pattern).toBe('random');
    expect(f.rate).toBe(200);
    expect(f.answered).toBeGreaterThan(0);
    expect(f.latency.count).toBe(f.answered);
    expect(f.latency.p50Us).toBeGreaterThan(0);
    expect(f.latency.p50Us).toBeLessThanOrEqual(f.latency.p90Us);
    expect(f.latency.p90Us).toBeLessThanOrEqual(f.latency.p99Us);
    expect(f.latency.p99Us).toBeLessThanOrEqual(f.latency.maxUs);
    // Roughly the asked rate over the postcopy phase (a loose bound: a 2-core CI box).
    expect(f.issued + f.skipped + f.throttled).toBeGreaterThan((f.durationMs / 1000) * 200 * 0.5);
    const sent = r.stats!.postcopyRequests;
    expect(sent).toBeGreaterThanOrEqual(f.answered);
    expect(r.stats!.postcopyLatency.count).toBe(f.answered);
    expect(info.ram!['postcopy-requests']).toBeGreaterThanOrEqual(sent);
    // The generator is vCPU 0, the only context: its blocktime is the total, and covers its longest wait.
    expect(r.stats!.postcopyVcpuBlocktimeMs).toEqual([r.stats!.postcopyBlocktimeMs]);
    expect(r.stats!.postcopyBlocktimeMs).toBeGreaterThanOrEqual(f.latency.maxUs / 1000 - 0.01);

    const m = await readSavedVmManifest(out);
    expect(m.complete).toBe(true);
    expect(m.postcopy).toBe(true);
    expect(m.devices.length).toBeGreaterThan(0);
    expect(m.devices.every((d) => d.packaged)).toBe(true);
    const mine = readFileSync(join(out, m.blocks.find((b) => b.idstr === 'pc.ram')!.file));
    const theirs = await readGuestRam(q, 64 * MiB);
    expect(compareGuestRam(theirs, mine)).toEqual({ equal: true, pages: [], count: 0 });
    expect(checkGuestInvariant(mine, guestRangeOf(q)).ok).toBe(true);
    await q.stop();
  });

  it('--tls: precopy over TLS 1.3 from a source with default capabilities (no return path)', async () => {
    const pki = join(work, 'pki');
    await initPkiDir(pki);
    const out = join(work, 'tls');
    const run = receive(['--listen', 'tcp:127.0.0.1:0', '--out', out, '--tls', pki]);
    const q = await startQemu({ name: 'recv-tls', memoryMiB: 32, guest: { startMiB: 1, endMiB: 8 }, extraArgs: ['-object', `tls-creds-x509,id=tls0,dir=${pki},endpoint=client,verify-peer=on`] });
    await q.setParameters({ 'tls-creds': 'tls0', 'tls-hostname': 'localhost' });
    // Without a return path QEMU never reads its socket: this passes only because the
    // command runs without TLS 1.3 session tickets (openssl/no-tls13-tickets.cnf).
    expect((await q.queryCapabilities())['return-path']).toBe(false);
    await q.waitSerialPasses(2);
    const uri = await run.uri;
    await q.migrate(uri);
    await q.waitMigration('completed', 30_000);
    const { code, stderr } = await run.exit;
    expect(code, stderr).toBe(0);
    expect(stderr).toMatch(/^qmt: listening on tcp:127\.0\.0\.1:\d+ \(TLS\)$/m);
    expect(stderr).toMatch(/^qmt: main channel connected \(TLSv1\.3\)$/m);
    const m = await readSavedVmManifest(out);
    expect(m.complete).toBe(true);
    const mine = readFileSync(join(out, m.blocks.find((b) => b.idstr === 'pc.ram')!.file));
    expect(compareGuestRam(await readGuestRam(q, 32 * MiB), mine).equal).toBe(true);
    await q.stop();
  });

  it('source killed mid-precopy: exit 1, one error line, incomplete manifest with what arrived', async () => {
    const out = join(work, 'killed');
    const run = receive(['--listen', 'tcp:127.0.0.1:0', '--out', out]);
    const q = await startQemu({ name: 'recv-kill', memoryMiB: 64, guest: { startMiB: 1, endMiB: 48 } });
    await q.setParameters({ 'max-bandwidth': 8 * MiB });
    await q.waitSerialPasses(1);
    await q.migrate(await run.uri);
    await waitSource(q, (ram) => Number(ram.transferred ?? 0) > 2 * MiB);
    await q.stop();
    const { code, stderr } = await run.exit;
    expect(code).toBe(1);
    expect(errorLine(stderr)).toMatch(/^qmt: (peer-disconnected|reset): \S.*\(phase: precopy\)$/);
    expect(stderr.match(/^qmt: (peer-disconnected|reset):/gm)).toHaveLength(1);
    const m = await readSavedVmManifest(out);
    expect(m.complete).toBe(false);
    expect(['peer-disconnected', 'reset']).toContain(m.error?.code);
    expect(m.error?.phase).toBe('precopy');
    expect((m.stats as { normal: number }).normal).toBeGreaterThan(0);
    expect(existsSync(join(out, 'ram', 'pc.ram.bin'))).toBe(true);
    expect(readFileSync(join(out, 'ram', 'pc.ram.bin')).some((b) => b !== 0)).toBe(true);
  });
});

describe('qmt receive without QEMU', () => {
  it('a bad --listen URI: exit 2 (usage), exactly one line naming the option, nothing written', async () => {
    const out = join(work, 'bad-uri');
    const { code, stdout, stderr } = await receive(['--listen', 'tcp:nohost', '--out', out]).exit;
    expect(code).toBe(2);
    expect(stdout).toBe('');
    expect(stderr).toBe(`qmt: usage: option '--listen <uri>' argument 'tcp:nohost' is invalid. expected tcp:HOST:PORT, got "tcp:nohost"\n`);
    expect(existsSync(out)).toBe(false);
  });

  it('usage errors are one line too, exit 2', async () => {
    const a = await receive(['--listen', 'tcp:127.0.0.1:0', '--out', join(work, 'u1'), '--fault', 'random']).exit;
    expect(a.code).toBe(2);
    expect(a.stderr).toBe('qmt: usage: --fault needs --postcopy (fault generation happens in postcopy)\n');
    const b = await receive(['--listen', 'tcp:127.0.0.1:0', '--out', join(work, 'u2'), '--postcopy', '--fault', 'random', '--fault-rate', '0']).exit;
    expect(b.code).toBe(2);
    expect(b.stderr).toMatch(/^qmt: usage: .*--fault-rate must be an integer in 1\.\.100000\n$/);
  });

  it('--idle-timeout 300 with a client that sends only the header: exit 1 idle-timeout, incomplete manifest', async () => {
    const out = join(work, 'idle');
    const run = receive(['--listen', 'tcp:127.0.0.1:0', '--out', out, '--idle-timeout', '300', '--json']);
    const m = /^tcp:(.+):(\d+)$/.exec(await run.uri)!;
    const sock = net.connect({ host: m[1], port: Number(m[2]) });
    sock.on('error', () => undefined);
    const header = Buffer.alloc(8);
    header.writeUInt32BE(0x5145564d, 0); // "QEVM"
    header.writeUInt32BE(3, 4); // QEMU_VM_FILE_VERSION
    const t0 = Date.now();
    sock.write(header);
    const { code, stdout, stderr } = await run.exit;
    sock.destroy();
    expect(code).toBe(1);
    expect(Date.now() - t0).toBeGreaterThanOrEqual(250);
    expect(errorLine(stderr)).toBe('qmt: idle-timeout: no data from the source for 300 ms (phase: setup)');
    const manifest = await readSavedVmManifest(out);
    expect(manifest.complete).toBe(false);
    expect(manifest.error).toEqual({ code: 'idle-timeout', phase: 'setup', message: 'no data from the source for 300 ms (phase: setup)' });
    const r = JSON.parse(stdout) as ReceiveOutput;
    expect(r).toMatchObject({ version: 1, command: 'receive', ok: false });
    expect(r.error?.code).toBe('idle-timeout');
    expect(r.manifest?.complete).toBe(false);
    expect(r.stats?.transferredBytes).toBe(8);
  });

  it('--postcopy: a cut in postcopy pauses, the source reconnects, exit 0 with the saved RAM equal to the source', async () => {
    const out = join(work, 'recover');
    const run = receive(['--listen', 'tcp:127.0.0.1:0', '--out', out, '--postcopy', '--progress', 'plain']);
    const relay = await FaultRelay.start({ target: (await run.uri).replace(/,$/, ''), maxConnections: 8 });
    const size = 8 * MiB;
    const memory = new InMemorySource([{ idstr: 'pc.ram', length: size }]);
    const ram = memory.memory.get('pc.ram')!;
    for (let p = 0; p < size; p += 8192) ram.fill((p >> 13) & 0xff, p, p + 4096);
    const src = new SourceSession({
      to: relay.uri,
      memory,
      machineType: 'pc-q35-10.0',
      devices: [{ idstr: 'timer', instanceId: 0, versionId: 2, data: Buffer.alloc(24, 7) }],
      postcopy: { afterPasses: 0 },
      postcopyBandwidthLimit: 2 * MiB,
      recovery: { initialDelayMs: 20 },
    });
    // Cut once both sides are in postcopy: the source's event alone came, under load, before qmt had read
    // the package (a VM then running on neither side: nothing to recover).
    const bothInPostcopy = Promise.all([new Promise<void>((r) => src.once('postcopy-active', () => r())), run.printed(/^qmt: postcopy running/m)]);
    void bothInPostcopy.then(() => setTimeout(() => relay.cut(), 300));
    src.start();
    const stats = await src.done;
    const { code, stderr } = await run.exit;
    await relay.close();
    expect(stats.recoveries).toBe(1);
    expect(code, stderr).toBe(0);
    expect(stderr).toMatch(/^qmt: postcopy paused \(.*\); waiting for the source to recover at tcp:127\.0\.0\.1:\d+$/m);
    expect(stderr).toMatch(/^qmt: postcopy resumed after \d+ ms \(recovery 1\)$/m);
    const manifest = await readSavedVmManifest(out);
    expect(manifest.complete).toBe(true);
    const block = manifest.blocks.find((b) => b.idstr === 'pc.ram')!;
    expect(readFileSync(join(out, block.file)).equals(ram), 'saved RAM equals the source, bit for bit').toBe(true);
  });

  it('SIGINT: exit 130 cancelled, manifest written incomplete', async () => {
    const out = join(work, 'sigint');
    const run = receive(['--listen', `unix:${join(work, 'sigint.sock')}`, '--out', out]);
    expect(await run.uri).toBe(`unix:${join(work, 'sigint.sock')}`);
    run.child.kill('SIGINT');
    const { code, stderr } = await run.exit;
    expect(code).toBe(130);
    expect(errorLine(stderr)).toBe('qmt: cancelled: the destination was closed (phase: setup)');
    const m = await readSavedVmManifest(out);
    expect(m.complete).toBe(false);
    expect(m.error?.code).toBe('cancelled');
  });
});

/** A fake destination: pages of one block, some present, requests answered after `delayMs`. */
function fakeTarget(pages: number, present: (i: number) => boolean, delayMs = 2): FaultTarget & { asked: number[]; have: Set<number> } {
  const have = new Set<number>();
  for (let i = 0; i < pages; i++) if (present(i)) have.add(i);
  const asked: number[] = [];
  return {
    asked,
    have,
    hasPage: (_b, offset) => have.has(offset / 4096),
    requestPage: (block, offset) => {
      asked.push(offset / 4096);
      return new Promise<PageRequestResult>((resolve) =>
        setTimeout(() => {
          have.add(offset / 4096);
          resolve({ block, offset, requested: true, channel: 'preempt', latencyUs: delayMs * 1000 });
        }, delayMs),
      );
    },
  };
}

describe('FaultGenerator', () => {
  it('random: about `rate` requests per second, only for missing pages, and no timer after stop()', async () => {
    const t = fakeTarget(4096, (i) => i % 2 === 0);
    const setSpy = vi.spyOn(globalThis, 'setInterval');
    const clearSpy = vi.spyOn(globalThis, 'clearInterval');
    const g = new FaultGenerator(t, { pattern: 'random', rate: 200, blocks: [{ idstr: 'pc.ram', length: 4096 * 4096 }] });
    g.start();
    expect(setSpy).toHaveBeenCalledTimes(1);
    const timer = setSpy.mock.results[0]!.value as NodeJS.Timeout;
    await sleep(500);
    const r = g.stop();
    // Its one interval is cleared.
    expect(clearSpy).toHaveBeenCalledWith(timer);
    setSpy.mockRestore();
    clearSpy.mockRestore();
    expect(g.running).toBe(false);
    expect(r.issued).toBeGreaterThan(60);
    expect(r.issued).toBeLessThan(130);
    expect(t.asked.every((i) => i % 2 === 1)).toBe(true);
    expect(new Set(t.asked).size).toBe(t.asked.length);
    expect(r.answered + r.unanswered).toBe(r.issued);
    expect(r.latency.count).toBe(r.answered);
    expect(r.byChannel.preempt).toBe(r.answered);
    await sleep(20);
    // Answers after stop() do not change the report.
    expect(g.report()).toEqual(r);
  });

  it('sequential: ascending from a random start, skipping received pages, wrapping over blocks', async () => {
    const blocks = [
      { idstr: 'a', length: 8 * 4096 },
      { idstr: 'b', length: 8 * 4096 },
    ];
    const seen: string[] = [];
    let draws = 0;
    const target: FaultTarget = {
      hasPage: (b, o) => b === 'a' && o / 4096 < 4,
      requestPage: (block, offset) => {
        seen.push(`${block}${offset / 4096}`);
        return Promise.resolve({ block, offset, requested: true, channel: 'main', latencyUs: 5 });
      },
    };
    const g = new FaultGenerator(target, { pattern: 'sequential', rate: 1000, blocks, random: () => (draws++ === 0 ? 10 / 16 : 0) });
    g.start();
    await sleep(60);
    const r = g.stop();
    expect(seen.slice(0, 10)).toEqual(['b2', 'b3', 'b4', 'b5', 'b6', 'b7', 'a4', 'a5', 'a6', 'a7']);
    expect(r.answered).toBe(r.issued);
  });

  it('skips when nothing is missing and throttles at maxOutstanding', async () => {
    const none = new FaultGenerator(fakeTarget(64, () => true), { pattern: 'random', rate: 500, blocks: [{ idstr: 'pc.ram', length: 64 * 4096 }] });
    none.start();
    await sleep(100);
    const a = none.stop();
    expect(a.issued).toBe(0);
    expect(a.skipped).toBeGreaterThan(10);
    const slow = new FaultGenerator(fakeTarget(4096, () => false, 10_000), { pattern: 'random', rate: 500, maxOutstanding: 5, blocks: [{ idstr: 'pc.ram', length: 4096 * 4096 }] });
    slow.start();
    await sleep(100);
    const b = slow.stop();
    expect(b.issued).toBe(5);
    expect(b.throttled).toBeGreaterThan(10);
    expect(b.unanswered).toBe(5);
  });

  it('refuses bad options', () => {
    const t = fakeTarget(1, () => false);
    expect(() => new FaultGenerator(t, { pattern: 'random', rate: 0, blocks: [] })).toThrow(RangeError);
    expect(() => new FaultGenerator(t, { pattern: 'zigzag' as 'random', rate: 1, blocks: [] })).toThrow(RangeError);
  });
});

describe('Progress', () => {
  it('plain: log lines with the prefix, status lines at the interval, nothing after stop()', async () => {
    const s = new PassThrough();
    let text = '';
    s.setEncoding('utf8').on('data', (d: string) => (text += d));
    const p = new Progress({ stream: s, mode: 'auto', intervalMs: 50 });
    expect(p.mode).toBe('plain');
    p.log('hello');
    p.update({ phase: 'precopy', bytes: 3 * MiB, done: 768, total: 1024 });
    await sleep(1100);
    p.stop();
    p.log('after');
    expect(text).toMatch(/^qmt: hello\nqmt: precopy: 3\.0 MiB, 768\/1024 pages(, [\d.]+ \w+\/s)?\n$/);
  });

  it('bar on a TTY: draws the bar and keeps log lines', async () => {
    const s = Object.assign(new PassThrough(), { isTTY: true, columns: 120, rows: 40, cursorTo: () => true, moveCursor: () => true, clearLine: () => true, clearScreenDown: () => true });
    let text = '';
    s.setEncoding('utf8').on('data', (d: string) => (text += d));
    const p = new Progress({ stream: s });
    expect(p.mode).toBe('bar');
    p.update({ phase: 'precopy', bytes: 2 * MiB, done: 512, total: 1024 });
    p.log('pass 1');
    await sleep(150);
    p.update({ phase: 'postcopy', bytes: 5 * MiB, done: 2048, total: 1024 });
    p.stop();
    expect(text).toContain('qmt: pass 1\n');
    expect(text).toMatch(/precopy\s+\|[█░]+\| 50% \|\s+2\.0 MiB \| 512\/1024 pages/);
    expect(text).toMatch(/postcopy\s+\|█+\| 100% \|\s+5\.0 MiB \| 2048 pages/);
  });
});

describe('qmt receive with strangers on its port', () => {
  it('--tls --tls-allow: a probe, an HTTP request, a TLS client of another CA, an idle client and a valid but unnamed source are each dropped with one line; the named source migrates, exit 0, RAM equal', async () => {
    const pkiDir = join(work, 'strangers-pki');
    const { pki } = await initPkiDir(pkiDir);
    // Same CA, a client certificate naming source-a.example; another CA altogether.
    const namedDir = join(work, 'strangers-named');
    await initPkiDir(namedDir, { ca: { cert: pki.caCert, key: pki.caKey }, hostnames: ['source-a.example'] });
    const otherDir = join(work, 'strangers-other-ca');
    await initPkiDir(otherDir);
    const out = join(work, 'strangers');
    const run = receive(['--listen', 'tcp:127.0.0.1:0', '--out', out, '--tls', pkiDir, '--tls-allow', 'source-a.example', '--progress', 'none']);
    const uri = await run.uri;
    const port = Number(uri.split(':').pop());
    const silent = await playStranger('silent', port);
    for (const kind of ['connect-close', 'http', 'tls-foreign-ca'] as const) await playStranger(kind, port, otherDir);
    const size = 4 * MiB;
    const source = (dir: string, memory: InMemorySource) =>
      new SourceSession({
        to: uri,
        memory,
        machineType: 'pc-q35-10.0',
        devices: [{ idstr: 'timer', instanceId: 0, versionId: 2, data: Buffer.alloc(24, 7) }],
        replyTimeoutMs: 5000,
        transport: { tls: { dir, hostname: 'localhost' }, connectTimeoutMs: 5000 },
      });
    // A certificate of the right CA, but not a name on the list: refused like a stranger.
    const unnamed = source(pkiDir, new InMemorySource([{ idstr: 'pc.ram', length: size }]));
    unnamed.start();
    expect(await unnamed.done.then(() => 'completed', (e: unknown) => (e as Error).name)).toBe('MigrationError');
    const memory = new InMemorySource([{ idstr: 'pc.ram', length: size }]);
    const ram = memory.memory.get('pc.ram')!;
    for (let p = 0; p < size; p += 8192) ram.fill((p >> 13) & 0xff, p, p + 4096);
    const src = source(namedDir, memory);
    src.start();
    await src.done;
    const { code, stderr } = await run.exit;
    silent?.destroy();
    expect(code, stderr).toBe(0);
    const dropped = stderr.split('\n').filter((l) => l.startsWith('qmt: dropped a connection'));
    expect(dropped, stderr).toHaveLength(5);
    for (const l of dropped) expect(l).toMatch(/^qmt: dropped a connection from 127\.0\.0\.1:\d+ that is not a migration channel \((closed|tls|extra|timeout)\): [a-z-]+( \((main|preempt) channel\))?: .+$/);
    expect(dropped.filter((l) => l.includes('tls-unknown-ca')), stderr).toHaveLength(1);
    expect(dropped.filter((l) => l.includes('tls-peer-not-allowed')), stderr).toHaveLength(1);
    expect(dropped.some((l) => /\(extra\)|\(timeout\)/.test(l)), 'the idle client').toBe(true);
    const manifest = await readSavedVmManifest(out);
    expect(manifest.complete).toBe(true);
    const block = manifest.blocks.find((b) => b.idstr === 'pc.ram')!;
    expect(readFileSync(join(out, block.file)).equals(ram), 'saved RAM equals the source, bit for bit').toBe(true);
  }, 60_000);

  it('--tls-allow without --tls is a usage error (exit 2)', async () => {
    const run = receive(['--listen', 'tcp:127.0.0.1:0', '--out', join(work, 'allow-no-tls'), '--tls-allow', 'x']);
    const { code, stderr } = await run.exit;
    expect(code).toBe(2);
    expect(errorLine(stderr)).toBe('qmt: usage: --tls-allow needs --tls');
  });
});
