/**
 * The real, built `qmt` command (dist/cli/main.js, as users run it after
 * `npm run build`) as a child process of the benchmark: its exit time on the
 * wall clock (comparable with QMP event timestamps), its own CPU time
 * (bench/lib/cpu-at-exit.mjs, preloaded), and optionally a V8 CPU profile of
 * every process it runs (`--cpu-prof`).
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from 'node:fs';
import os from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { REPO_ROOT } from './child.js';

export const QMT_MAIN = join(REPO_ROOT, 'dist', 'cli', 'main.js');
const CPU_AT_EXIT = fileURLToPath(new URL('./cpu-at-exit.mjs', import.meta.url));

/** Wall-clock µs (the clock of QMP timestamps). */
export const wallUs = (): number => Date.now() * 1000;

export interface CliCpu {
  /** Core-seconds in user and kernel mode, summed over the command's processes. */
  userS: number;
  systemS: number;
  processes: number;
}

export interface QmtCliResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  /** Wall-clock µs when the process exited. */
  exitUs: number;
  cpu: CliCpu | undefined;
}

export interface QmtCliRun {
  child: ChildProcess;
  /** Wall-clock µs when it was spawned. */
  spawnUs: number;
  /** Resolves with the match once stderr so far matches `re` (rejects if qmt exits first). */
  stderrMatches(re: RegExp): Promise<RegExpExecArray>;
  exit: Promise<QmtCliResult>;
}

/** Why the built CLI cannot be measured, or undefined: missing, or older than the sources. */
export function builtCliProblem(): string | undefined {
  if (!existsSync(QMT_MAIN)) return `${QMT_MAIN} is missing: run \`npm run build\` first`;
  const built = statSync(QMT_MAIN).mtimeMs;
  const newest = (dir: string): number => {
    let t = 0;
    for (const e of readdirSync(dir, { withFileTypes: true })) {
      const p = join(dir, e.name);
      t = Math.max(t, e.isDirectory() ? newest(p) : statSync(p).mtimeMs);
    }
    return t;
  };
  const src = newest(join(REPO_ROOT, 'src'));
  return src > built + 1000 ? `dist/ is older than src/ (by ${Math.round((src - built) / 1000)} s): run \`npm run build\` first` : undefined;
}

/** Builds dist/ (`npm run build`) when it is missing or older than src/; returns what is still wrong, or undefined. */
export function ensureBuiltCli(log: (line: string) => void): string | undefined {
  const problem = builtCliProblem();
  if (!problem) return undefined;
  log(`${problem}: building it (npm run build) …`);
  const b = spawnSync('npm', ['run', 'build'], { cwd: REPO_ROOT, stdio: ['ignore', 'inherit', 'inherit'] });
  return b.status === 0 ? builtCliProblem() : `npm run build failed (exit ${b.status ?? b.signal})`;
}

/** Starts `node [--cpu-prof --cpu-prof-dir DIR] dist/cli/main.js ...args` (`opts.node`: another Node.js binary, e.g. ≥ 26.6 for `--threads on`). */
export function startQmtCli(args: readonly string[], opts: { cpuProfDir?: string; node?: string } = {}): QmtCliRun {
  const cpuDir = mkdtempSync(join(os.tmpdir(), 'qmt-bench-cpu-'));
  const nodeArgs = [...(opts.cpuProfDir ? ['--cpu-prof', '--cpu-prof-dir', opts.cpuProfDir] : []), '--import', CPU_AT_EXIT];
  const spawnUs = wallUs();
  const child = spawn(opts.node ?? process.execPath, [...nodeArgs, QMT_MAIN, ...args], { cwd: REPO_ROOT, stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, QMT_BENCH_CPU_DIR: cpuDir } });
  let stdout = '';
  let stderr = '';
  let exitUs = 0;
  const waiters: { re: RegExp; resolve: (m: RegExpExecArray) => void }[] = [];
  child.stdout!.setEncoding('utf8').on('data', (d: string) => (stdout += d));
  child.stderr!.setEncoding('utf8').on('data', (d: string) => {
    stderr += d;
    for (const w of waiters.splice(0)) {
      const m = w.re.exec(stderr);
      if (m) w.resolve(m);
      else waiters.push(w);
    }
  });
  child.once('exit', () => (exitUs = wallUs()));
  const exit = new Promise<QmtCliResult>((resolve) =>
    child.once('close', (code, signal) => {
      resolve({ code, signal, stdout, stderr, exitUs: exitUs || wallUs(), cpu: readCpu(cpuDir) });
      rmSync(cpuDir, { recursive: true, force: true });
    }),
  );
  return {
    child,
    spawnUs,
    exit,
    stderrMatches: (re) =>
      new Promise<RegExpExecArray>((resolve, reject) => {
        const m = re.exec(stderr);
        if (m) return resolve(m);
        waiters.push({ re, resolve });
        void exit.then((r) => reject(new Error(`qmt exited (${r.code ?? r.signal}) before stderr matched ${re}: ${r.stderr.slice(-2000)}`)));
      }),
  };
}

function readCpu(dir: string): CliCpu | undefined {
  let userUs = 0;
  let systemUs = 0;
  let processes = 0;
  try {
    for (const f of readdirSync(dir)) {
      const j = JSON.parse(readFileSync(join(dir, f), 'utf8')) as { userUs: number; systemUs: number };
      userUs += j.userUs;
      systemUs += j.systemUs;
      processes++;
    }
  } catch {
    return undefined;
  }
  return processes === 0 ? undefined : { userS: userUs / 1e6, systemS: systemUs / 1e6, processes };
}
