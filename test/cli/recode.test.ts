/**
 * `qmt recode` never damages what it is given: IN = OUT refused (also through
 * a symlink), an existing OUT kept unless --force, OUT written to a temporary
 * file and renamed, and a failed or interrupted recode leaves nothing behind.
 * Progress: a bar on a terminal (a real pty through script(1)) for a large
 * file, none for a small one or a pipe; demo's bar.
 */
import { spawnSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { writeBigStream } from './big-stream.js';
import { qmt, ROOT, startQmt } from './qmt.js';

const work = mkdtempSync(join(tmpdir(), 'qmt-recode-'));
afterAll(() => rmSync(work, { recursive: true, force: true }));
const STREAM = join(ROOT, 'test', 'fixtures', 'xbzrle.bin');
const BIG = join(work, 'big.bin');

beforeAll(async () => {
  await writeBigStream(BIG, 96);
}, 60_000);

/** A directory of its own per case, to see exactly what a run leaves in it. */
function dirFor(name: string): string {
  const d = join(work, name);
  mkdirSync(d);
  return d;
}

describe('qmt recode', () => {
  it('IN = OUT is refused (also through a symlink); IN untouched', async () => {
    const d = dirFor('same');
    const input = join(d, 'in.bin');
    copyFileSync(STREAM, input);
    symlinkSync(input, join(d, 'alias.bin'));
    const [a, b] = await Promise.all([qmt(['recode', input, input]), qmt(['recode', input, join(d, 'alias.bin'), '--force'])]);
    for (const r of [a, b]) {
      expect(r.code).toBe(2);
      expect(r.stderr).toMatch(/^qmt: usage: IN and OUT are the same file \(.*\): write to another file, then rename\n$/);
    }
    expect(readFileSync(input).equals(readFileSync(STREAM))).toBe(true);
    expect(readdirSync(d).sort()).toEqual(['alias.bin', 'in.bin']);
  }, 60_000);

  it('an existing OUT is kept without --force and replaced with it, through a rename', async () => {
    const d = dirFor('force');
    const out = join(d, 'out.bin');
    writeFileSync(out, 'precious');
    const refused = await qmt(['recode', STREAM, out]);
    expect(refused.code).toBe(1);
    expect(refused.stderr).toBe(`qmt: exists: ${out}: already exists (use --force to replace it)\n`);
    expect(readFileSync(out, 'utf8')).toBe('precious');
    const forced = await qmt(['recode', STREAM, out, '--force']);
    expect(forced.code, forced.stderr).toBe(0);
    expect(forced.stderr).toMatch(/^qmt: wrote \d+ bytes to /);
    // A QEMU capture recodes byte for byte.
    expect(readFileSync(out).equals(readFileSync(STREAM))).toBe(true);
    expect(readdirSync(d)).toEqual(['out.bin']);
  }, 60_000);

  it('a recode that fails half-way leaves nothing behind (and an existing OUT as it was)', async () => {
    const d = dirFor('fail');
    const bad = join(d, 'bad.bin');
    const bytes = readFileSync(STREAM);
    // Corrupt a byte well inside: the first megabyte is written before the decoder meets it.
    const at = bytes.indexOf(Buffer.from([0x02, 0, 0, 0, 1]), bytes.length >> 1); // a RAM PART header
    expect(at).toBeGreaterThan(0);
    bytes.writeUInt32BE(99, at + 1);
    writeFileSync(bad, bytes);
    const fresh = await qmt(['recode', bad, join(d, 'new.bin')]);
    expect(fresh.code).toBe(1);
    expect(fresh.stderr).toMatch(new RegExp(`^qmt: unknown-section: ${bad.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')} at offset \\d+: section 99 was never started\\n$`));
    writeFileSync(join(d, 'old.bin'), 'old');
    const over = await qmt(['recode', bad, join(d, 'old.bin'), '--force']);
    expect(over.code).toBe(1);
    expect(readFileSync(join(d, 'old.bin'), 'utf8')).toBe('old');
    expect(readdirSync(d).sort()).toEqual(['bad.bin', 'old.bin']);
  }, 60_000);

  it('SIGINT in the middle: exit 130, no OUT, no temporary file', async () => {
    const d = dirFor('sigint');
    const run = startQmt(['recode', BIG, join(d, 'out.bin')]);
    // The temporary file exists once writing started.
    for (let i = 0; i < 600 && !readdirSync(d).some((f) => f.endsWith('.tmp')); i++) await sleep(50);
    expect(readdirSync(d).some((f) => /^\.out\.bin\.\d+\.[0-9a-f]+\.tmp$/.test(f))).toBe(true);
    run.child.kill('SIGINT');
    const r = await run.exit;
    expect(r.code).toBe(130);
    expect(r.stderr).toBe('qmt: cancelled: interrupted by SIGINT\n');
    expect(readdirSync(d)).toEqual([]);
  }, 60_000);
});

describe('progress of inspect and recode', () => {
  const tsx = pathToFileURL(join(ROOT, 'node_modules', 'tsx', 'dist', 'loader.mjs')).href;
  const hasScript = spawnSync('script', ['--version']).status === 0;

  /** Runs qmt with stdin/stdout/stderr on a pseudo-terminal (script(1)); returns what the terminal showed. */
  function onTty(args: string[]): { status: number | null; screen: string } {
    const cmd = [process.execPath, '--import', tsx, join(ROOT, 'src', 'cli', 'main.ts'), ...args].map((a) => `'${a}'`).join(' ');
    const r = spawnSync('script', ['-qefc', cmd, '/dev/null'], { cwd: work, encoding: 'utf8', timeout: 55_000 });
    return { status: r.status, screen: r.stdout };
  }

  it('a bar on a terminal for a large file, none for a small one', () => {
    expect(hasScript, 'script(1) (util-linux) runs commands on a pty').toBe(true);
    const big = onTty(['inspect', BIG]);
    expect(big.status, big.screen).toBe(0);
    expect(big.screen).toMatch(/inspect\s+\|[█░]+\| 100% \|.*97\/97 MiB/);
    const small = onTty(['inspect', STREAM]);
    expect(small.status, small.screen).toBe(0);
    expect(small.screen).not.toMatch(/\| \d+% \|/);
    expect(small.screen).toMatch(/RAM blocks:/);
  }, 60_000);

  it('recode on a terminal shows it too; a pipe gets no bar', async () => {
    const tty = onTty(['recode', BIG, join(work, 'big-copy.bin')]);
    expect(tty.status, tty.screen).toBe(0);
    expect(tty.screen).toMatch(/recode\s+\|[█░]+\| 100% \|.*97\/97 MiB/);
    expect(readFileSync(join(work, 'big-copy.bin')).equals(readFileSync(BIG))).toBe(true);
    const piped = await qmt(['inspect', BIG]);
    expect(piped.code).toBe(0);
    expect(piped.stderr).toBe('');
    expect(existsSync(join(work, 'big-copy.bin'))).toBe(true);
  }, 60_000);

  it('demo on a terminal: a bar with the bytes and pages sent', () => {
    const tty = onTty(['demo', '--size', '16', '--no-tls', '--workload', 'idle']);
    expect(tty.status, tty.screen).toBe(0);
    expect(tty.screen).toMatch(/(precopy|postcopy|switchover)\s+\|[█░]+\| \d+% \|.* pages/);
    expect(tty.screen).toMatch(/memory +identical at both ends/);
  }, 60_000);
});
