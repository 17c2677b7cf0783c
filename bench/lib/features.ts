/**
 * Which issue-13 features the code under measurement has, so that a row
 * whose feature is not in this tree yet prints "not available (why)" instead
 * of failing: a thread per channel (the `threads` option, `--threads`) and
 * multifd (the `multifd` option, `--multifd N`); and a Node.js that can
 * transfer sockets to workers (≥ 26.6) to run the threaded rows with.
 *
 * The probes are of the source tree and the built CLI's help, not of a
 * session's behaviour: the session itself then proves what it used (its
 * stats say `threads.used`, and the bench reports a row as "not available"
 * too when a session that was asked for threads reports none).
 */
import { execFileSync } from 'node:child_process';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { REPO_ROOT } from './child.js';
import { QMT_MAIN } from './qmt-cli.js';

export type { ThreadMode } from '../../src/transport/worker/index.js';

/** Node ≥ 26.6 transfers a fresh net.Socket to a worker (the threads feature needs it). */
const MIN_THREADS_NODE: [number, number] = [26, 6];

const versionOf = (v: string): [number, number] => {
  const m = /^v?(\d+)\.(\d+)/.exec(v.trim());
  return m ? [Number(m[1]), Number(m[2])] : [0, 0];
};
const atLeast = (v: [number, number], min: [number, number]): boolean => v[0] > min[0] || (v[0] === min[0] && v[1] >= min[1]);

export interface NodeBinary {
  path: string;
  version: string;
}

let cachedNode: NodeBinary | null | undefined;

/**
 * A Node.js that can run the threaded rows: QMT_BENCH_NODE, else this process's
 * own when new enough, else the newest under .cache/node/ (where .ci/fetch-node
 * puts Node 26) of this checkout or of the repository it is a worktree of.
 * Undefined when there is none.
 */
export function threadsNode(): NodeBinary | undefined {
  if (cachedNode !== undefined) return cachedNode ?? undefined;
  const candidates: string[] = [];
  if (process.env.QMT_BENCH_NODE) candidates.push(process.env.QMT_BENCH_NODE);
  candidates.push(process.execPath);
  for (const root of new Set([REPO_ROOT, mainCheckout()].filter((x): x is string => x !== undefined))) {
    const dir = join(root, '.cache', 'node');
    if (!existsSync(dir)) continue;
    const versions = readdirSync(dir)
      .filter((v) => /^\d+\.\d+\.\d+$/.test(v))
      .sort((a, b) => {
        const [x, y] = [a.split('.').map(Number), b.split('.').map(Number)];
        return y[0]! - x[0]! || y[1]! - x[1]! || y[2]! - x[2]!;
      });
    for (const v of versions) candidates.push(join(dir, v, 'bin', 'node'));
  }
  for (const path of candidates) {
    const version = path === process.execPath ? process.version : probeVersion(path);
    if (version && atLeast(versionOf(version), MIN_THREADS_NODE)) {
      cachedNode = { path, version };
      return cachedNode;
    }
  }
  cachedNode = null;
  return undefined;
}

function probeVersion(path: string): string | undefined {
  try {
    return execFileSync(path, ['--version'], { encoding: 'utf8', timeout: 10_000 }).trim();
  } catch {
    return undefined;
  }
}

/** The main checkout when REPO_ROOT is a git worktree (its .git is a file). */
function mainCheckout(): string | undefined {
  try {
    const common = execFileSync('git', ['-C', REPO_ROOT, 'rev-parse', '--path-format=absolute', '--git-common-dir'], { encoding: 'utf8', timeout: 5000, stdio: ['ignore', 'pipe', 'ignore'] }).trim();
    return dirname(resolve(common));
  } catch {
    return undefined;
  }
}

const src = (...p: string[]): string => join(REPO_ROOT, 'src', ...p);
const mentions = (file: string, re: RegExp): boolean => {
  try {
    return re.test(readFileSync(file, 'utf8'));
  } catch {
    return false;
  }
};

/** Why the library cannot run its channels in threads here, or undefined. */
export function threadsUnavailable(): string | undefined {
  if (!existsSync(src('transport', 'worker'))) return 'not in this tree yet (no src/transport/worker)';
  const sourceFiles = readdirSync(src('protocol', 'source')).filter((f) => f.endsWith('.ts'));
  if (!sourceFiles.some((f) => mentions(src('protocol', 'source', f), /\bthreads\?\s*:\s*ThreadMode/))) return 'not in this tree yet (SourceOptions has no `threads`)';
  if (!threadsNode()) return `no Node.js ≥ ${MIN_THREADS_NODE.join('.')} (socket transfer to workers): set QMT_BENCH_NODE`;
  return undefined;
}

/** Why the library cannot do multifd here (source and destination sessions), or undefined: their options must name `multifd`. */
export function multifdUnavailable(side: 'source' | 'destination' | 'both' = 'both'): string | undefined {
  if (!existsSync(src('stream', 'multifd.ts'))) return 'not in this tree yet (no src/stream/multifd.ts)';
  const names = (d: string): boolean => {
    try {
      return readdirSync(src('protocol', d)).some((f) => f.endsWith('.ts') && mentions(src('protocol', d, f), /\bmultifd\?\s*:\s*\{\s*(readonly\s+)?channels/));
    } catch {
      return false;
    }
  };
  if (side !== 'destination' && !names('source')) return 'not in this tree yet (SourceOptions has no `multifd`)';
  if (side !== 'source' && !names('destination')) return 'not in this tree yet (DestinationOptions has no `multifd`)';
  return undefined;
}

const helpCache = new Map<string, string>();

/** Whether the built `qmt CMD --help` lists `flag` (e.g. `--threads`). */
export function cliHasFlag(cmd: string, flag: string): boolean {
  let help = helpCache.get(cmd);
  if (help === undefined) {
    try {
      help = execFileSync(process.execPath, [QMT_MAIN, cmd, '--help'], { encoding: 'utf8', timeout: 20_000, stdio: ['ignore', 'pipe', 'ignore'] });
    } catch (e) {
      help = String((e as { stdout?: unknown }).stdout ?? '');
    }
    helpCache.set(cmd, help);
  }
  return new RegExp(`(^|\\s)${flag.replace(/[-]/g, '\\-')}\\b`, 'm').test(help);
}

/** "not available (why)" for a row's cell. */
export const notAvailable = (why: string): string => `not available (${why})`;

/** What the session's stats say of threads (`stats.threads`, issue 13), when they say anything. */
export interface ThreadsStats {
  used: boolean;
  why: string;
  channels: { role: string; threadId: number; cpuSeconds: number }[];
}

export function threadsOf(stats: unknown): ThreadsStats | undefined {
  const t = (stats as { threads?: unknown } | undefined)?.threads as Partial<ThreadsStats> | undefined;
  if (!t || typeof t.used !== 'boolean') return undefined;
  return { used: t.used, why: String(t.why ?? ''), channels: Array.isArray(t.channels) ? t.channels : [] };
}

/** OS threads of a process now (/proc/PID/status `Threads:`), undefined once it is gone. */
export function osThreads(pid: number | undefined): number | undefined {
  if (pid === undefined) return undefined;
  try {
    const m = /^Threads:\s+(\d+)/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) : undefined;
  } catch {
    return undefined;
  }
}

/** Samples the peak OS thread count of some processes every `everyMs` until stopped. */
export function threadSampler(pids: () => readonly (number | undefined)[], everyMs = 100): { stop(): number[] } {
  let peak: number[] = [];
  const sample = (): void => {
    const now = pids().map((p) => osThreads(p) ?? 0);
    peak = now.map((n, i) => Math.max(n, peak[i] ?? 0));
  };
  sample();
  const t = setInterval(sample, everyMs);
  t.unref();
  return {
    stop() {
      sample();
      clearInterval(t);
      return peak;
    },
  };
}

/**
 * The library's typed refusal of `threads: 'on'` where it cannot run them
 * (code `threads-unavailable`: "threads: 'on' is not possible: WHY" at the source, "… is impossible here: WHY" at the destination), as
 * it reaches the bench (in-process, or through a child's error line): WHY, or
 * undefined for any other error. A row asking for threads then prints "not
 * available (WHY)" instead of failing.
 */
export function threadsRefused(e: unknown): string | undefined {
  const code = (e as { code?: unknown } | undefined)?.code;
  const msg = e instanceof Error ? e.message : String(e);
  const m = /threads: 'on' is (?:impossible here|not possible): ([^\n]*)/.exec(msg);
  if (m) return m[1]!.trim();
  return code === 'threads-unavailable' ? msg : undefined;
}
