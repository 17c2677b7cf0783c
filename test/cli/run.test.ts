/**
 * The runner every command goes through (src/cli/run.ts), in a child process
 * with real signals: SIGINT/SIGTERM abort the command's signal and exit
 * 130/143 after its teardown, a second one exits at once, a command's own
 * signals (SIGUSR1 …) reach its handler and stop with it; and `qmt receive`
 * under SIGTERM.
 */
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { spawn } from 'node:child_process';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { readSavedVmManifest } from '../../src/protocol/saved-vm.js';
import { ROOT, startQmt } from './qmt.js';

const work = mkdtempSync(join(tmpdir(), 'qmt-run-'));
afterAll(() => rmSync(work, { recursive: true, force: true }));
const TSX = pathToFileURL(join(ROOT, 'node_modules', 'tsx', 'dist', 'loader.mjs')).href;

const SCRIPT = join(ROOT, 'test', 'cli', 'slow-command.ts');

function slow(args: string[]) {
  const child = spawn(process.execPath, ['--import', TSX, SCRIPT, 'slow', ...args], { cwd: work, stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  let stdout = '';
  child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
  child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  const exit = new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve) => child.on('close', (code) => resolve({ code, stdout, stderr })));
  const seen = (s: string) =>
    new Promise<void>((resolve, reject) => {
      const check = (): void => {
        if (stderr.includes(s)) resolve();
      };
      child.stderr.on('data', check);
      check();
      void exit.then((r) => reject(new Error(`exited (${r.code}) before "${s}": ${r.stderr}`)));
    });
  return { child, seen, exit };
}

describe('the runner', () => {
  it('SIGTERM: the command tears down, then exit 143 with one error line (and the JSON object)', async () => {
    const p = slow(['--teardown-ms', '200', '--json']);
    await p.seen('ready');
    p.child.kill('SIGTERM');
    const r = await p.exit;
    expect(r.code).toBe(143);
    expect(r.stderr).toBe('ready\ntearing down\ntorn down\nqmt: cancelled: interrupted by SIGTERM\n');
    expect(JSON.parse(r.stdout)).toMatchObject({ version: 1, command: 'slow', ok: false, error: { code: 'cancelled' }, tornDown: true });
  }, 60_000);

  it('a second SIGINT during a slow teardown exits at once with 130', async () => {
    const p = slow(['--teardown-ms', '30000']);
    await p.seen('ready');
    p.child.kill('SIGINT');
    await p.seen('tearing down');
    const t0 = Date.now();
    p.child.kill('SIGINT');
    const r = await p.exit;
    expect(r.code).toBe(130);
    expect(Date.now() - t0).toBeLessThan(20_000);
    expect(r.stderr).not.toContain('torn down');
  }, 60_000);

  it("a command's own signals reach it while it runs: from the options and registered inside", async () => {
    const p = slow([]);
    await p.seen('ready');
    p.child.kill('SIGUSR1');
    await p.seen('usr1');
    p.child.kill('SIGUSR2');
    await p.seen('usr2');
    p.child.kill('SIGINT');
    const r = await p.exit;
    expect(r.code).toBe(130);
    expect(r.stderr).toBe('ready\nusr1\nusr2\ntearing down\ntorn down\nqmt: cancelled: interrupted by SIGINT\n');
  }, 60_000);
});

describe('qmt receive under SIGTERM', () => {
  it('exit 143, the manifest written incomplete', async () => {
    const out = join(work, 'vm');
    const run = startQmt(['receive', '--listen', 'tcp:127.0.0.1:0', '--out', out]);
    await run.stderrMatches(/^qmt: listening on /m);
    run.child.kill('SIGTERM');
    const r = await run.exit;
    expect(r.code).toBe(143);
    expect(r.stderr.trimEnd().split('\n').pop()).toMatch(/^qmt: cancelled: /);
    expect(existsSync(join(out, 'manifest.json'))).toBe(true);
    const m = await readSavedVmManifest(out);
    expect(m.complete).toBe(false);
    expect(m.error?.code).toBe('cancelled');
  }, 60_000);
});
