/** Runs `qmt` (src/cli/main.ts under tsx, as users run it) as a child process. */
import { spawn, type ChildProcess } from 'node:child_process';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';

export const ROOT = join(import.meta.dirname, '..', '..');
const MAIN = join(ROOT, 'src', 'cli', 'main.ts');
const TSX = pathToFileURL(join(ROOT, 'node_modules', 'tsx', 'dist', 'loader.mjs')).href;

export interface QmtResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

export interface QmtRun {
  child: ChildProcess;
  /** Resolves with the match once stderr so far matches `re` (rejects if qmt exits first). */
  stderrMatches(re: RegExp): Promise<RegExpExecArray>;
  exit: Promise<QmtResult>;
}

export function startQmt(args: string[], opts: { cwd?: string } = {}): QmtRun {
  const child = spawn(process.execPath, ['--import', TSX, MAIN, ...args], { cwd: opts.cwd ?? ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
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
  const exit = new Promise<QmtResult>((resolve) => child.on('close', (code, signal) => resolve({ code, signal, stdout, stderr })));
  return {
    child,
    exit,
    stderrMatches: (re) =>
      new Promise<RegExpExecArray>((resolve, reject) => {
        const m = re.exec(stderr);
        if (m) return resolve(m);
        waiters.push({ re, resolve });
        void exit.then((r) => reject(new Error(`qmt exited (${r.code}) before stderr matched ${re}: ${r.stderr}`)));
      }),
  };
}

export function qmt(args: string[], opts: { cwd?: string } = {}): Promise<QmtResult> {
  return startQmt(args, opts).exit;
}

/** Runs `f` over `items`, at most `n` at a time (each child costs a tsx start-up). */
export async function mapLimit<T, R>(items: readonly T[], n: number, f: (x: T) => Promise<R>): Promise<R[]> {
  const out: R[] = new Array(items.length);
  let next = 0;
  await Promise.all(
    Array.from({ length: Math.min(n, items.length) }, async () => {
      while (next < items.length) {
        const i = next++;
        out[i] = await f(items[i]!);
      }
    }),
  );
  return out;
}

/**
 * `startQmt` for a test file whose runs must not outlive it: `run` starts
 * one and remembers it until it exits; `killAll` (in afterAll) kills those
 * still running.
 */
export function qmtChildren(): { run: (args: string[]) => QmtRun; killAll: () => void } {
  const children = new Set<ChildProcess>();
  return {
    run: (args) => {
      const r = startQmt(args);
      children.add(r.child);
      void r.exit.then(() => children.delete(r.child));
      return r;
    },
    killAll: () => {
      for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
    },
  };
}
