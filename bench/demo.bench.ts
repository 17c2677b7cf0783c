/**
 * The demo's fault latency with and without the preempt channel (part `demo`
 * of `npm run bench`; alone: `node --import tsx bench/demo.bench.ts [--quick]
 * [--mib N] [--runs N]`; needs `npm run build`).
 *
 * The real, built `qmt demo --json` (library ↔ library in one process, the
 * destination in a worker thread; TLS; the video workload; postcopy after
 * one pass) and the same with `--no-preempt`, interleaved, N runs each. The
 * destination's fault latency (request sent → page placed) per run: p50 and
 * p99 as the demo reports them; the figure is the median over the runs, and
 * "better" is the ratio without / with preempt. CPU: the demo process's
 * core-seconds (both ends, every thread) per GB its channels carried.
 * Prints figures; asserts nothing.
 */
import { runPart } from './lib/part.js';
import { builtCliProblem, startQmtCli } from './lib/qmt-cli.js';
import { fmt } from './lib/report.js';
import { DEMO_AIMS, demoAims } from './lib/aims.js';
import os from 'node:os';
import { cliHasFlag, notAvailable, threadSampler, threadsNode } from './lib/features.js';
import { ThreadCpuSampler, topThreads } from './lib/thread-cpu.js';

/**
 * The demo's `threads` report, whatever its exact shape: `{ used, why }` and
 * the channel threads, from the source's and the destination's stats or one
 * object (the demo runs both ends).
 */
function threadsOfReport(t: unknown): { used: boolean; why: string; workers: number } | undefined {
  if (!t || typeof t !== 'object') return undefined;
  const parts = ('used' in t ? [t] : Object.values(t as Record<string, unknown>)).filter((x): x is { used: boolean; why?: string; channels?: unknown[] } => !!x && typeof x === 'object' && typeof (x as { used?: unknown }).used === 'boolean');
  if (parts.length === 0) return undefined;
  return { used: parts.some((p) => p.used), why: parts.map((p) => p.why ?? '').filter(Boolean).join('; '), workers: parts.reduce((n, p) => n + (Array.isArray(p.channels) ? p.channels.length : 0), 0) };
}
import { fmtStats, ratio, runStats, type RunStats } from './lib/stats.js';

export interface DemoRun {
  p50Us: number;
  p99Us: number;
  faults: number;
  migrationMs: number;
  bytes: number;
  cpuS: number | undefined;
  identical: boolean;
  /** Issue 13: peak OS threads of the demo process, what its report says of threads, and the cores it kept busy (CPU s / wall s). */
  osThreads?: number;
  threads?: { used: boolean; why: string; workers: number };
  coresUsed?: number;
  /** Where the demo's CPU went, per thread (busiest first). */
  topThreads?: string;
}

export interface DemoVariant {
  preempt: boolean;
  /** Issue 13: `--threads on|off`; undefined: a CLI without `--threads` (the library's only mode then). */
  threads?: 'on' | 'off';
  /** Why this variant cannot run with this build: printed as "not available". */
  unavailable?: string;
  runs: DemoRun[];
  errors: string[];
  p50?: RunStats;
  p99?: RunStats;
  faults?: RunStats;
  cpuPerGb?: number;
}

export interface DemoData {
  mib: number;
  runs: number;
  /** The Node.js the `--threads` variants ran under (≥ 26.6), and this machine's cores. */
  node?: string;
  cores?: number;
  variants: DemoVariant[];
  skipped?: string;
}

interface DemoReportJson {
  ok: boolean;
  migrationMs: number;
  faults: { count: number; p50Us: number; p99Us: number };
  channels: { mainBytes: number; preemptBytes: number; returnPathBytes: number };
  memoryIdentical: boolean;
  /** Issue 13: the source's stats (with `threads`) and the destination's `threads`: `{ used, why, channels: [{ role, id, cpuMs }] }`. */
  source?: { threads?: unknown };
  destinationThreads?: unknown;
}

function markdown(d: DemoData): string {
  const lines: string[] = [];
  lines.push(
    `\`qmt demo --json --size ${d.mib}\` (built CLI; library ↔ library in one process, TLS 1.3, video workload, postcopy after one pass) with and without \`--no-preempt\`, ${d.runs} run${d.runs === 1 ? '' : 's'} each, interleaved. Fault latency = the destination's request sent → page placed, p50 and p99 per run as the demo reports them; median (min–max) over the runs. CPU: the demo process's core-seconds (both ends, all threads) per GB carried by its channels — start-up, filling the synthetic guest, the workload and the final comparison of both memories included, so it is far above a bulk transfer's.`,
    '',
    '| demo | threads | faults per run | fault p50 (ms) | fault p99 (ms) | p50 better by | p99 better by | migration (ms) | CPU s/GB (both ends) | OS threads (workers), cores used | memory identical |',
    '|---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|',
  );
  for (const v of d.variants) {
    const off = d.variants.find((x) => !x.preempt && x.threads === v.threads);
    const name = v.preempt ? 'preempt channel (default)' : '`--no-preempt`';
    const th = v.threads ? `\`--threads ${v.threads}\`` : 'no `--threads` (one thread)';
    if (v.unavailable) {
      lines.push(`| ${name} | ${th} | ${notAvailable(v.unavailable)} | | | | | | | | |`);
      continue;
    }
    const err = v.errors.length > 0 ? ` (errors: ${v.errors.join('; ')})` : '';
    const workers = v.runs.map((r) => r.threads?.workers).filter((x): x is number => x !== undefined);
    const procs = `${fmtStats(runStats(v.runs.map((r) => r.osThreads ?? NaN)))} (${workers.length > 0 ? fmtStats(runStats(workers)) : '–'}), ${fmtStats(runStats(v.runs.map((r) => r.coresUsed ?? NaN)), 2)} of ${d.cores ?? '?'}`;
    const better = (a: RunStats | undefined, b: RunStats | undefined): string => (v.preempt ? (ratio(b?.median, a?.median) === undefined ? '–' : `${fmt(ratio(b?.median, a?.median), 1)}×`) : '1.0× (baseline)');
    lines.push(
      `| ${name}${err} | ${th} | ${fmtStats(v.faults)} | ${fmtStats(v.p50, 2, 1e-3)} | ${fmtStats(v.p99, 2, 1e-3)} | ${better(v.p50, off?.p50)} | ${better(v.p99, off?.p99)} | ${fmtStats(runStats(v.runs.map((r) => r.migrationMs)))} | ${fmt(v.cpuPerGb, 2)} | ${procs} | ${v.runs.length === 0 ? '–' : v.runs.every((r) => r.identical) ? 'yes, every run' : 'NO'} |`,
    );
  }
  const verdict = (r: number | undefined, aim: number): string => (r === undefined ? 'not measured' : `${fmt(r, 1)}× (${r >= aim ? 'met' : 'missed'})`);
  lines.push('', `Aims (issues 12 and 13), reported, not asserted: preempt ≥ ${DEMO_AIMS.p50}× better than \`--no-preempt\` at p50, ≥ ${DEMO_AIMS.p99}× at p99, in the same run:`, '');
  for (const t of [...new Set(d.variants.map((v) => v.threads))]) {
    const a = demoAims(d, t);
    const which = t ? `\`--threads ${t}\`` : 'one thread (no `--threads` in this build)';
    const na = d.variants.find((v) => v.threads === t && v.unavailable)?.unavailable;
    lines.push(na ? `- ${which}: ${notAvailable(na)}` : `- ${which}: p50 ${verdict(a.p50, DEMO_AIMS.p50)}; p99 ${verdict(a.p99, DEMO_AIMS.p99)}`);
  }
  lines.push('', 'Where the CPU went, per thread of the demo process (last run of each variant):', '');
  for (const v of d.variants) {
    const t = v.runs[v.runs.length - 1]?.topThreads;
    if (t) lines.push(`- ${v.preempt ? 'preempt' : '`--no-preempt`'}, ${v.threads ? `\`--threads ${v.threads}\`` : 'one thread'}: ${t}`);
  }
  lines.push('', `OS threads: the demo process's peak (/proc/PID/status; Node's own threads included), workers: channel threads its report names; cores used: its CPU core-seconds over its wall time (spawn to exit)${d.node ? `; \`--threads\` variants under Node.js ${d.node}` : ''}.`);
  if (d.skipped) lines.push('', `Skipped: ${d.skipped}.`);
  return lines.join('\n');
}

await runPart<DemoData>('demo', "The demo's fault latency: preempt channel or not", { mib: { type: 'string' }, runs: { type: 'string' } }, async (ctx) => {
  const mib = Number(ctx.options.mib ?? (ctx.quick ? 256 : 1024));
  const runs = Number(ctx.options.runs ?? (ctx.quick ? 1 : 3));
  const data: DemoData = { mib, runs, variants: [], cores: os.cpus().length };
  const why = builtCliProblem();
  if (why) {
    data.variants = [true, false].map((preempt) => ({ preempt, runs: [], errors: [] }));
    data.skipped = why;
    return { config: { mib, runs }, data, markdown: markdown(data) };
  }
  // Issue 13: with `--threads` in the CLI, every variant says which mode, under a Node.js that can transfer sockets (off too: only the threads differ).
  const hasFlag = cliHasFlag('demo', '--threads');
  const node = threadsNode();
  if (hasFlag && node) data.node = node.version;
  for (const threads of hasFlag ? (['off', 'on'] as const) : [undefined]) {
    for (const preempt of [true, false]) data.variants.push({ preempt, ...(threads ? { threads } : {}), runs: [], errors: [], ...(threads === 'on' && !node ? { unavailable: 'no Node.js ≥ 26.6 for socket transfer (set QMT_BENCH_NODE)' } : {}) });
  }
  if (!hasFlag) for (const preempt of [true, false]) data.variants.push({ preempt, threads: 'on', runs: [], errors: [], unavailable: 'this build of `qmt demo` has no `--threads`' });
  for (let round = 0; round < runs; round++) {
    for (const v of data.variants) {
      if (v.unavailable) continue;
      const run = startQmtCli(['demo', '--size', String(mib), '--json', '--progress', 'none', ...(v.preempt ? [] : ['--no-preempt']), ...(v.threads ? ['--threads', v.threads] : [])], v.threads && node ? { node: node.path } : {});
      const sampler = threadSampler(() => [run.child.pid]);
      const perThread = new ThreadCpuSampler(() => [run.child.pid]);
      ctx.onCleanup(async () => {
        if (run.child.exitCode === null && run.child.signalCode === null) run.child.kill('SIGKILL');
      });
      const r = await run.exit;
      const [osThreads] = sampler.stop();
      const threadCpu = perThread.stop();
      const wallS = (r.exitUs - run.spawnUs) / 1e6;
      try {
        const j = JSON.parse(r.stdout) as DemoReportJson;
        if (r.code !== 0 || !j.ok) throw new Error(`qmt demo exited ${r.code ?? r.signal}: ${r.stderr.slice(-800)}`);
        const dr: DemoRun = {
          p50Us: j.faults.p50Us,
          p99Us: j.faults.p99Us,
          faults: j.faults.count,
          migrationMs: j.migrationMs,
          bytes: j.channels.mainBytes + j.channels.preemptBytes + j.channels.returnPathBytes,
          cpuS: r.cpu ? r.cpu.userS + r.cpu.systemS : undefined,
          identical: j.memoryIdentical,
          ...(osThreads ? { osThreads } : {}),
          topThreads: topThreads(threadCpu, 6),
          ...(r.cpu && wallS > 0 ? { coresUsed: (r.cpu.userS + r.cpu.systemS) / wallS } : {}),
        };
        const th = threadsOfReport({ source: j.source?.threads, destination: j.destinationThreads });
        if (th) dr.threads = th;
        // `--threads on` accepted but one thread used: not what the variant says.
        if (v.threads === 'on' && th && !th.used) throw new Error(`--threads on, but the demo says threads were not used: ${th.why}`);
        v.runs.push(dr);
        ctx.log(`round ${round + 1}/${runs}: ${v.preempt ? 'preempt' : 'no preempt'}${v.threads ? `, threads ${v.threads}` : ''}: ${dr.faults} faults, p50 ${fmt(dr.p50Us / 1000, 2)} ms, p99 ${fmt(dr.p99Us / 1000, 2)} ms, CPU ${fmt(dr.cpuS, 2)} s`);
      } catch (e) {
        v.errors.push(e instanceof Error ? e.message.split('\n')[0]! : String(e));
        ctx.log(`round ${round + 1}: ${v.preempt ? 'preempt' : 'no preempt'} failed: ${String(e)}`);
      }
    }
  }
  for (const v of data.variants) {
    const p50 = runStats(v.runs.map((r) => r.p50Us));
    const p99 = runStats(v.runs.map((r) => r.p99Us));
    const faults = runStats(v.runs.map((r) => r.faults));
    if (p50) v.p50 = p50;
    if (p99) v.p99 = p99;
    if (faults) v.faults = faults;
    const per = runStats(v.runs.filter((r) => r.cpuS !== undefined && r.bytes > 0).map((r) => r.cpuS! / (r.bytes / 1e9)));
    if (per) v.cpuPerGb = per.median;
  }
  return { config: { mib, runs, tls: true, policy: 'after:1', workload: 'video' }, data, markdown: markdown(data) };
});
