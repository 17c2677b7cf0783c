/**
 * What every part of `npm run bench` shares: its command line (--quick,
 * --out), cleanup of child processes and temporary directories on every exit
 * path, how busy the machine was while it ran, and its result file
 * (bench/results/<part>.json and .md) that bench/run.ts gathers into
 * bench/REPORT.md.
 */
import { execFileSync } from 'node:child_process';
import { rmSync } from 'node:fs';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import type { BenchChild } from './child.js';
import { REPO_ROOT } from './child.js';
import { cpuSnapshot, cpuUse, loadAverage, type CpuUse } from './cpu.js';
import { machineInfo, type MachineInfo } from './report.js';
import { cleanUpOnSignal } from './signal-cleanup.js';

export interface PartResult<D = unknown> {
  part: string;
  title: string;
  quick: boolean;
  machine: MachineInfo;
  startedAt: string;
  durationS: number;
  /** /proc/loadavg at the start and the end, and the highest 1-minute value seen (sampled every 5 s). */
  load: { start: string; end: string; max1m: number };
  /** The whole machine's CPU use over the part (100 = every core), `ours` = the benchmark's own processes where tracked. */
  cpu: CpuUse | undefined;
  config: Record<string, unknown>;
  data: D;
  /** The part's section of the report (markdown, headed by `###` and below). */
  markdown: string;
  error?: string;
}

export interface PartContext {
  quick: boolean;
  out: string;
  /** Extra options of the part (strings as given). */
  options: Record<string, string | boolean | undefined>;
  /** Kills the child with the rest on any exit path; returns it. */
  track<T extends BenchChild<{ cmd: string }>>(child: T): T;
  /** Stops a tracked child (by its PID) and forgets it. */
  release(child: BenchChild<{ cmd: string }>): Promise<void>;
  /** A fresh temporary directory, removed at the end. */
  tmpDir(label: string): Promise<string>;
  /** Runs at cleanup (e.g. removing a veth link); must not throw. */
  onCleanup(fn: () => Promise<void>, sync?: () => void): void;
  /** Progress line on stderr. */
  log(line: string): void;
}

export interface PartOutput<D> {
  config: Record<string, unknown>;
  data: D;
  markdown: string;
}

type ExtraOptions = Record<string, { type: 'string' | 'boolean'; default?: string | boolean }>;

/**
 * Runs one part: parses the command line, calls `body`, writes
 * `<out>/<part>.json` and `.md`, and cleans up whatever happens.
 */
export async function runPart<D>(part: string, title: string, extra: ExtraOptions, body: (ctx: PartContext) => Promise<PartOutput<D>>): Promise<void> {
  const { values } = parseArgs({
    options: { quick: { type: 'boolean', default: false }, out: { type: 'string', default: join(REPO_ROOT, 'bench', 'results') }, ...extra },
    strict: true,
  });
  const quick = values.quick === true;
  const out = String(values.out);
  const children = new Set<BenchChild<{ cmd: string }>>();
  const dirs: string[] = [];
  const hooks: { fn: () => Promise<void>; sync?: () => void }[] = [];
  let cleaning: Promise<void> | undefined;
  const cleanup = (): Promise<void> => {
    cleaning ??= (async () => {
      await Promise.allSettled([...children].map((c) => c.stop()));
      children.clear();
      for (const h of hooks.splice(0).reverse()) await h.fn().catch(() => undefined);
      for (const d of dirs.splice(0)) await rm(d, { recursive: true, force: true });
    })();
    return cleaning;
  };
  const cleanupSync = (): void => {
    for (const c of children) c.killNow();
    for (const h of hooks) h.sync?.();
    for (const d of dirs) rmSync(d, { recursive: true, force: true });
  };
  cleanUpOnSignal(cleanup, cleanupSync);

  const ctx: PartContext = {
    quick,
    out,
    options: values as PartContext['options'],
    track(child) {
      children.add(child);
      return child;
    },
    async release(child) {
      await child.stop();
      children.delete(child);
    },
    async tmpDir(label) {
      const d = await mkdtemp(join(os.tmpdir(), `qmt-bench-${label}-`));
      dirs.push(d);
      return d;
    },
    onCleanup(fn, sync) {
      hooks.push(sync ? { fn, sync } : { fn });
    },
    log(line) {
      process.stderr.write(`[${part}] ${line}\n`);
    },
  };

  const started = Date.now();
  const loadStart = loadAverage();
  let max1m = Number(loadStart.split(' ')[0]);
  const sampler = setInterval(() => {
    max1m = Math.max(max1m, Number(loadAverage().split(' ')[0]));
  }, 5000);
  sampler.unref();
  const cpu0 = cpuSnapshot([]);
  const result: PartResult<D | undefined> = {
    part,
    title,
    quick,
    machine: machineInfo(REPO_ROOT),
    startedAt: new Date(started).toISOString(),
    durationS: 0,
    load: { start: loadStart, end: '', max1m },
    cpu: undefined,
    config: {},
    data: undefined,
    markdown: '',
  };
  try {
    const o = await body(ctx);
    result.config = o.config;
    result.data = o.data;
    result.markdown = o.markdown;
  } catch (e) {
    result.error = e instanceof Error ? (e.stack ?? e.message) : String(e);
    result.markdown = `**This part failed:** ${e instanceof Error ? e.message : String(e)}\n`;
    process.stderr.write(`${part} failed: ${result.error}\n`);
    process.exitCode = 1;
  } finally {
    clearInterval(sampler);
    await cleanup();
  }
  result.durationS = Math.round((Date.now() - started) / 100) / 10;
  result.load.end = loadAverage();
  result.load.max1m = Math.max(max1m, Number(result.load.end.split(' ')[0]));
  result.cpu = cpuUse(cpu0, cpuSnapshot([]));
  await mkdir(out, { recursive: true });
  await writeFile(join(out, `${part}.json`), `${JSON.stringify(result, null, 1)}\n`);
  const md = `## ${title}\n\n${partHeader(result)}\n\n${result.markdown}\n`;
  await writeFile(join(out, `${part}.md`), md);
  process.stdout.write(md);
}

/** One line: when, how long, how loaded. */
export function partHeader(r: PartResult<unknown>): string {
  const cpu = r.cpu ? `; machine CPU busy ${r.cpu.hostBusyPct} % over the part (steal ${r.cpu.stealPct} %)` : '';
  return `_Run ${r.startedAt}${r.quick ? ' (--quick)' : ''}, ${r.durationS} s; load average ${r.load.start} at the start, ${r.load.end} at the end, 1-minute peak ${r.load.max1m}${cpu}; code ${r.machine.revision}._`;
}

/** Synchronous command for exit paths; never throws. */
export function runSync(cmd: string, args: string[]): void {
  try {
    execFileSync(cmd, args, { timeout: 5000, stdio: 'ignore' });
  } catch {
    // best effort on the way out
  }
}
