/**
 * A silent partition and an operator's pause, through the commands as a user
 * runs them (child processes of the CLI's entry, src/cli/main.ts):
 *
 * - a QEMU 10 source → a relay that freezes (forwards nothing, closes
 *   nothing) → `qmt receive --postcopy --idle-timeout 3000`: qmt pauses on
 *   its own; QEMU is paused (`migrate-pause`) and resumed (`migrate …
 *   resume=true`) straight to qmt's listen address; QEMU completes and the
 *   saved RAM equals the stopped source's bit for bit;
 * - SIGUSR1 to `qmt receive` in postcopy: it pauses, our source reconnects, it completes;
 * - SIGUSR1 to `qmt send` in postcopy: it pauses and does not reconnect until SIGUSR2.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { PassThrough } from 'node:stream';
import { performance } from 'node:perf_hooks';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterAll, describe, expect, it } from 'vitest';
import { receiveMigration, type ReceiveReport } from '../../src/cli/receive.js';
import { DestinationSession } from '../../src/protocol/destination.js';
import { InMemorySink } from '../../src/protocol/memory.js';
import { InMemorySource } from '../../src/protocol/memory-source.js';
import { readSavedVmManifest } from '../../src/protocol/saved-vm.js';
import { SourceSession } from '../../src/protocol/source.js';
import { FaultRelay } from '../faults/relay.js';
import { checkGuestInvariant, compareGuestRam, dumpSizeFor, guestRangeOf, readGuestRam, startQemu, stopAll } from '../qemu/harness.js';
import { pollMigration } from '../qemu/destination-helpers.js';
import { describeWithQemu } from '../qemu/require-qemu.js';

const MiB = 1024 * 1024;
const ROOT = join(import.meta.dirname, '..', '..');
const work = mkdtempSync(join(tmpdir(), 'qmt-partition-cli-'));
const children = new Set<ChildProcess>();

afterAll(async () => {
  for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
  await stopAll();
  rmSync(work, { recursive: true, force: true });
});

interface Run {
  child: ChildProcess;
  /** Resolves with the first match of `re` in stderr (rejects if the command exits first or after `ms`). */
  line(re: RegExp, ms?: number): Promise<RegExpExecArray>;
  stderr(): string;
  exit: Promise<{ code: number | null; stdout: string; stderr: string }>;
}

/** Starts `qmt COMMAND ARGS` (stderr a pipe: plain progress lines). */
function qmt(command: 'receive' | 'send', args: string[]): Run {
  const child = spawn(process.execPath, ['--import', 'tsx', join(ROOT, 'src', 'cli', 'main.ts'), command, ...args], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
  children.add(child);
  let stdout = '';
  let stderr = '';
  let exited = false;
  const watchers = new Set<() => void>();
  child.stdout!.setEncoding('utf8').on('data', (d: string) => (stdout += d));
  child.stderr!.setEncoding('utf8').on('data', (d: string) => {
    stderr += d;
    for (const w of [...watchers]) w();
  });
  const exit = new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve) => {
    child.on('close', (code) => {
      exited = true;
      children.delete(child);
      for (const w of [...watchers]) w();
      resolve({ code, stdout, stderr });
    });
  });
  const line = (re: RegExp, ms = 30_000): Promise<RegExpExecArray> =>
    new Promise((resolve, reject) => {
      const timer = setTimeout(() => done(new Error(`qmt ${command}: no line matching ${re} within ${ms} ms; stderr:\n${stderr}`)), ms);
      const check = (): void => {
        const m = new RegExp(re.source, re.flags.includes('m') ? re.flags : `${re.flags}m`).exec(stderr);
        if (m) done(undefined, m);
        else if (exited) done(new Error(`qmt ${command} exited before a line matching ${re}; stderr:\n${stderr}`));
      };
      const done = (e?: Error, m?: RegExpExecArray): void => {
        clearTimeout(timer);
        watchers.delete(check);
        if (e) reject(e);
        else resolve(m!);
      };
      watchers.add(check);
      check();
    });
  return { child, line, stderr: () => stderr, exit };
}

describeWithQemu('qmt receive and a silent partition from a QEMU 10 source', () => {
  it('a frozen link pauses qmt on its own (--idle-timeout 3000); QEMU migrate-pause, resume=true straight to qmt; RAM bit for bit', async () => {
    const out = join(work, 'frozen');
    const run = qmt('receive', ['--listen', 'tcp:127.0.0.1:0', '--out', out, '--postcopy', '--idle-timeout', '3000', '--fault', 'random', '--fault-rate', '200', '--json']);
    const uri = (await run.line(/^qmt: listening on (\S+?),? /))[1]!;
    const relay = await FaultRelay.start({ target: uri, maxConnections: 8 });
    const q = await startQemu({ name: 'part-src', memoryMiB: 64, guest: { startMiB: 1, endMiB: 48 }, extraArgs: [] });
    try {
      await q.setCapabilities({ events: true, 'postcopy-ram': true });
      // Precopy cannot converge; postcopy's background stream lasts seconds (8 MiB/s).
      await q.setParameters({ 'max-bandwidth': 32 * MiB, 'max-postcopy-bandwidth': 8 * MiB, 'downtime-limit': 1 });
      await q.waitSerialPasses(2);
      await q.migrate(relay.uri);
      await pollMigration(q, (m) => m.status === 'active' && (m.ram?.['dirty-sync-count'] ?? 0) >= 2, 'dirty-sync-count >= 2', 30_000);
      await q.startPostcopy();
      await run.line(/^qmt: postcopy running \(source stopped\)/);
      await sleep(300);
      const { at: frozenAt, frozen } = relay.freeze();
      expect(frozen, 'the main channel frozen').toBe(1);
      const paused = await run.line(/^qmt: postcopy paused \((.*)\); waiting for the source to recover at (\S+)$/, 20_000);
      const detectMs = performance.now() - frozenAt;
      expect(paused[1]).toBe('no data from the source for 3000 ms');
      expect(relay.fired, 'the relay closed nothing').toEqual(['freeze: 1 connection(s) frozen by the test']);
      // QEMU sees nothing (no FIN, no RST): it is still in postcopy, blocked on the frozen socket.
      expect((await q.queryMigrate()).status).toBe('postcopy-active');
      // The operator: pause QEMU, resume it straight to qmt (the partition is not healed).
      await q.execute('migrate-pause');
      await pollMigration(q, (m) => m.status === 'postcopy-paused', 'QEMU postcopy-paused', 15_000, 20);
      const resumeAt = performance.now();
      await q.migrate(paused[2]!, { resume: true });
      const resumed = await run.line(/^qmt: postcopy resumed after (\d+) ms \(recovery 1\)$/, 20_000);
      const resumeMs = performance.now() - resumeAt;
      const info = await q.waitMigration('completed', 60_000);
      const { code, stdout, stderr } = await run.exit;
      expect(code, stderr).toBe(0);
      const r = JSON.parse(stdout) as ReceiveReport;
      expect(r.ok).toBe(true);
      expect(r.stats!.recoveries).toBe(1);
      expect(r.stats!['placed-twice']).toBe(0);
      const statuses = q.qmp.events.filter((e) => e.event === 'MIGRATION').map((e) => String((e.data as { status?: unknown }).status));
      expect(statuses).toContain('postcopy-paused');
      expect(statuses).toContain('postcopy-recover');
      const f = r.faults!;
      console.log(
        `[partition qemu→qmt receive] paused ${detectMs.toFixed(0)} ms after the freeze; resume=true → resumed ${resumeMs.toFixed(0)} ms; qmt pausedMs ${resumed[1]}; ` +
          `faults ${f.issued} issued, ${f.answered} answered, ${f.unanswered} unanswered; requests sent ${r.stats!['postcopy-requests']}, QEMU postcopy-requests ${info.ram?.['postcopy-requests']}`,
      );
      // From the last byte, which QEMU's rate limit may have sent a little before the freeze.
      expect(detectMs).toBeGreaterThan(2000);
      expect(f.answered).toBeGreaterThan(0);

      const manifest = await readSavedVmManifest(out);
      expect(manifest.complete).toBe(true);
      const block = manifest.blocks.find((b) => b.idstr === 'pc.ram')!;
      const saved = readFileSync(join(out, block.file));
      const sourceMem = await readGuestRam(q, dumpSizeFor(q));
      const diff = compareGuestRam(sourceMem, saved);
      expect(diff, `pages differing from the stopped source: ${diff.pages.slice(0, 8).map((p) => `0x${p.toString(16)}`).join(', ')}`).toMatchObject({ equal: true, count: 0 });
      const inv = checkGuestInvariant(saved, guestRangeOf(q));
      expect(inv.ok, inv.detail).toBe(true);
    } finally {
      await relay.close();
      await q.stop();
    }
  }, 90_000);
});

/** A guest of 8 MiB for our own source: distinct pages, half of them zero. */
function guestMemory(): InMemorySource {
  const memory = new InMemorySource([{ idstr: 'pc.ram', length: 8 * MiB }]);
  const ram = memory.memory.get('pc.ram')!;
  for (let p = 0; p < ram.length; p += 8192) randomFillSync(ram, p, 4096);
  return memory;
}

describe('pausing the commands with a signal', () => {
  it('SIGUSR1 to qmt receive in postcopy: it pauses, the source reconnects, exit 0 with the saved RAM equal to the source', async () => {
    const out = join(work, 'usr1-receive');
    const run = qmt('receive', ['--listen', 'tcp:127.0.0.1:0', '--out', out, '--postcopy', '--progress', 'plain']);
    const uri = (await run.line(/^qmt: listening on (\S+?),? /))[1]!;
    const memory = guestMemory();
    const src = new SourceSession({
      to: uri,
      memory,
      machineType: 'pc-q35-10.0',
      devices: [{ idstr: 'timer', instanceId: 0, versionId: 2, data: Buffer.alloc(24, 7) }],
      postcopy: { afterPasses: 0 },
      postcopyBandwidthLimit: 2 * MiB,
      recovery: { initialDelayMs: 20 },
    });
    const srcPaused = new Promise<{ error: { code: string } }>((r) => src.once('paused', r));
    src.start();
    await run.line(/^qmt: postcopy running \(source stopped\)$/);
    await sleep(200);
    const t = performance.now();
    run.child.kill('SIGUSR1');
    await run.line(/^qmt: pausing postcopy \(asked\)$/);
    await run.line(/^qmt: postcopy paused \(paused by the operator \(pause\(\)\)\); waiting for the source to recover at tcp:127\.0\.0\.1:\d+$/);
    const p = await srcPaused;
    const resumed = await run.line(/^qmt: postcopy resumed after (\d+) ms \(recovery 1\)$/);
    console.log(`[partition cli] SIGUSR1 → qmt receive paused; source paused (${p.error.code}); resumed ${(performance.now() - t).toFixed(0)} ms after the signal, pausedMs ${resumed[1]}`);
    const stats = await src.done;
    const { code, stderr } = await run.exit;
    expect(code, stderr).toBe(0);
    expect(stats.recoveries).toBe(1);
    const manifest = await readSavedVmManifest(out);
    expect(manifest.complete).toBe(true);
    const block = manifest.blocks.find((b) => b.idstr === 'pc.ram')!;
    expect(readFileSync(join(out, block.file)).equals(memory.memory.get('pc.ram')!), 'saved RAM equals the source, bit for bit').toBe(true);
  });

  it('SIGUSR1 to qmt receive before postcopy: one line why not, the migration goes on', async () => {
    const out = join(work, 'usr1-early');
    const run = qmt('receive', ['--listen', 'tcp:127.0.0.1:0', '--out', out, '--postcopy', '--progress', 'plain']);
    await run.line(/^qmt: listening on /);
    run.child.kill('SIGUSR1');
    await run.line(/^qmt: cannot pause: pause\(\) needs a running postcopy migration: the VM does not run here yet \(no postcopy package received\)$/);
    run.child.kill('SIGINT');
    const { code } = await run.exit;
    expect(code).toBe(1);
  });

  it('SIGUSR1 to qmt send in postcopy: paused, no reconnection until SIGUSR2, then it completes; memory bit for bit', async () => {
    // A saved VM to send: received from our own source.
    const from = join(work, 'usr1-send-vm');
    const memory = guestMemory();
    const saving = receiveMigration({ listen: 'tcp:127.0.0.1:0', out: from, progress: 'none', stderr: new PassThrough(), onListening: (uri) => void SourceSession.migrate({ to: uri, memory, machineType: 'pc-q35-10.0', devices: [{ idstr: 'timer', instanceId: 0, versionId: 2, data: Buffer.alloc(24, 7) }] }) });
    expect((await saving).ok).toBe(true);

    const sink = new InMemorySink();
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, postcopy: true });
    const dstPaused = new Promise<{ error: { code: string } }>((r) => dst.once('paused', r));
    const run = qmt('send', ['--from', from, '--to', dst.uri, '--postcopy', 'after:0', '--postcopy-bandwidth', '2M', '--progress', 'plain']);
    await run.line(/^qmt: postcopy active/);
    await sleep(200);
    run.child.kill('SIGUSR1');
    await run.line(/^qmt: postcopy paused \(asked\): no reconnection until resumed$/);
    expect((await dstPaused).error.code).toBe('peer-disconnected');
    await sleep(1000);
    expect(run.stderr(), 'no reconnection before SIGUSR2').not.toMatch(/recovery attempt/);
    expect(dst.stats().status).toBe('postcopy-paused');
    const t = performance.now();
    run.child.kill('SIGUSR2');
    await run.line(/^qmt: resuming postcopy \(asked\): reconnecting now$/);
    const resumed = await run.line(/^qmt: postcopy resumed after (\d+) ms \(recovery 1\)$/);
    console.log(`[partition cli] SIGUSR1 → qmt send paused; SIGUSR2 → resumed ${(performance.now() - t).toFixed(0)} ms later, pausedMs ${resumed[1]}`);
    const { code, stderr } = await run.exit;
    expect(code, stderr).toBe(0);
    const result = await dst.done;
    expect(result.stats.recoveries).toBe(1);
    expect(sink.blocks.get('pc.ram')!.equals(memory.memory.get('pc.ram')!), 'destination memory equals the saved VM, bit for bit').toBe(true);
  });
});
