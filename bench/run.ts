/**
 * `npm run bench [-- --quick] [-- --only codec,bulk,saved,demo,sink,latency,urgent,seed,switchover,memory,load,multifd,tunnel] [-- --skip ...] [-- --mib N] [-- --runs N] [-- --no-veth] [-- --trace] [-- --report-only]`
 *
 * Runs every part of the benchmark, each in a process of its own, one after
 * the other, and writes bench/REPORT.md: the machine, how loaded it was, a
 * summary of each part's headline figure next to its same-run baseline, and
 * each part's section; raw JSON, per-part markdown and SVG charts are in
 * bench/results/. A part not run this time keeps its earlier results, marked
 * with their date. Prints figures; asserts nothing.
 *
 * Parts: codec (bench/codec.bench.ts), bulk (bulk.bench.ts), saved
 * (saved.bench.ts: QEMU ↔ the built `qmt receive`/`qmt send`), demo
 * (demo.bench.ts: the built `qmt demo`, preempt or not), sink (sink.bench.ts:
 * DirectorySink and SavedVmSource against raw file I/O), latency (latency.bench.ts, then urgent.bench.ts with real
 * QEMU destinations, one table), seed (seed.bench.ts), switchover
 * (switchover.bench.ts), memory (memory.bench.ts); issue 13: urgent
 * (urgent.bench.ts alone, with the threads rows), load (load.bench.ts: the
 * eight-migration load), multifd (multifd.bench.ts); load and multifd run
 * under a Node.js ≥ 26.6 when one is found (bench/lib/features.ts). `--mib`
 * goes to codec, bulk, saved, demo, sink and multifd (default 1024 MiB; codec --quick 256); `--runs` to
 * those and to urgent and load (default 3 rounds).
 * saved and demo run dist/cli/main.js: it is built first when missing or
 * older than src/. Before each part: `sync` (no writeback of an earlier
 * part's files during the next). The CPU profiles (`npm run bench:profile`,
 * bench/profile.ts) are a separate run; their last results are a section here.
 */
import { execFileSync, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, statSync } from 'node:fs';
import { readFile, writeFile, mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { REPO_ROOT } from './lib/child.js';
import { cpuSnapshot, cpuUse, loadAverage } from './lib/cpu.js';
import { partHeader, type PartResult } from './lib/part.js';
import { fmt, machineInfo } from './lib/report.js';
import { median } from './lib/stats.js';
import type { ProfiledPath } from './lib/cpuprofile.js';
import { ensureBuiltCli } from './lib/qmt-cli.js';
import { threadsNode } from './lib/features.js';
import { issueLines, issueTable, summaryLines, summaryTable } from './lib/summary.js';
import { issue13Intro, issue13Lines, issue13Table } from './lib/summary13.js';

/**
 * Every part, in the order they run and appear in the report. A new part is
 * one entry: its script writes <out>/<name>.json and .md through runPart
 * (bench/lib/part.ts); `args` are its options from this run's command line
 * (--quick is always passed), `threads` runs it under a Node.js that
 * transfers sockets when there is one, `cli` needs the built `qmt`, `report:
 * false` keeps it out of the numbered sections (its rows appear in another's).
 */
interface PartEntry {
  name: string;
  script: string;
  args?: () => string[];
  threads?: boolean;
  cli?: boolean;
  report?: boolean;
}

const { values: args } = parseArgs({
  options: {
    quick: { type: 'boolean', default: false },
    only: { type: 'string' },
    skip: { type: 'string' },
    'no-veth': { type: 'boolean', default: false },
    trace: { type: 'boolean', default: false },
    mib: { type: 'string' },
    runs: { type: 'string' },
    'report-only': { type: 'boolean', default: false },
  },
});

const BENCH = join(REPO_ROOT, 'bench');
const OUT = join(BENCH, 'results');
const quick = args.quick ? ['--quick'] : [];
/** The size and rounds of the issue-12 rows (bulk, saved, demo, sink). */
const sizing = [...(args.mib ? ['--mib', args.mib] : []), ...(args.runs ? ['--runs', args.runs] : [])];
const veth = (): string[] => (args['no-veth'] ? ['--no-veth'] : []);
const trace = (): string[] => (args.trace ? ['--trace'] : []);
const runsOnly = (): string[] => (args.runs ? ['--runs', args.runs] : []);
const PARTS: readonly PartEntry[] = [
  // --mib for codec only when given (its own default: 1024 MiB, --quick 256).
  { name: 'codec', script: 'codec.bench.ts', args: () => sizing },
  { name: 'bulk', script: 'bulk.bench.ts', args: () => sizing },
  { name: 'saved', script: 'saved.bench.ts', args: () => sizing, cli: true },
  { name: 'demo', script: 'demo.bench.ts', args: () => sizing, cli: true },
  { name: 'sink', script: 'sink.bench.ts', args: () => sizing },
  // Three rounds per cell: the medians are of ≥ 3 runs. Its rows are merged into urgent's section (urgent.bench.ts).
  { name: 'latency', script: 'latency.bench.ts', args: () => [...(args.quick ? [] : ['--rounds', '3']), ...veth()], report: false },
  { name: 'urgent', script: 'urgent.bench.ts', args: () => [...runsOnly(), ...veth(), ...trace()] },
  { name: 'seed', script: 'seed.bench.ts' },
  { name: 'switchover', script: 'switchover.bench.ts' },
  { name: 'memory', script: 'memory.bench.ts' },
  { name: 'load', script: 'load.bench.ts', args: runsOnly, threads: true },
  { name: 'multifd', script: 'multifd.bench.ts', args: () => sizing, threads: true, cli: true },
  { name: 'tunnel', script: 'tunnel.bench.ts', args: () => sizing, cli: true },
  // Issue 14 adds its part here, e.g. { name: 'mapped-ram', script: 'mapped-ram.bench.ts', args: () => sizing, cli: true }.
];
const NAMES = PARTS.map((p) => p.name);
const list = (s: string | undefined): string[] => (s ? s.split(',').map((x) => x.trim()).filter(Boolean) : []);
for (const p of [...list(args.only), ...list(args.skip)]) if (!NAMES.includes(p)) throw new Error(`unknown part "${p}" (parts: ${NAMES.join(', ')})`);
// --report-only: no part runs; bench/REPORT.md is written again from bench/results/ (e.g. after `npm run bench:profile`).
const selected = args['report-only'] ? [] : PARTS.filter((p) => (args.only ? list(args.only).includes(p.name) : true) && !list(args.skip).includes(p.name));

/** The part running now, and the signal that stopped the run (no further part starts). */
let current: ChildProcess | undefined;
let stoppedBy: NodeJS.Signals | undefined;
for (const sig of ['SIGINT', 'SIGTERM'] as const) {
  process.on(sig, () => {
    // The part cleans up after itself (children, QEMUs, namespaces) and exits.
    stoppedBy ??= sig;
    current?.kill(sig);
  });
}

/** Runs `node --import tsx bench/SCRIPT ...` (`node`: another Node.js binary), stderr passed through; resolves with stdout and the exit code. */
function runScript(script: string, extra: string[], node = process.execPath): Promise<{ code: number | null; stdout: string }> {
  if (stoppedBy) return Promise.resolve({ code: 130, stdout: '' });
  return new Promise((resolve) => {
    const child = spawn(node, ['--import', 'tsx', join(BENCH, script), ...extra], { cwd: REPO_ROOT, stdio: ['ignore', 'pipe', 'inherit'] });
    current = child;
    let stdout = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.on('close', (code) => {
      current = undefined;
      resolve({ code, stdout });
    });
  });
}

/** The last `npm run bench:profile` (bench/results/profile.md and .json), with its date. */
async function readProfile(): Promise<{ date: string; markdown: string; paths: Map<string, ProfiledPath> } | undefined> {
  const f = join(OUT, 'profile.md');
  if (!existsSync(f)) return undefined;
  const paths = new Map<string, ProfiledPath>();
  try {
    const j = JSON.parse(await readFile(join(OUT, 'profile.json'), 'utf8')) as { startedAt?: string; results?: ProfiledPath[] };
    for (const r of j.results ?? []) if (r.id) paths.set(r.id, r);
    return { date: j.startedAt ?? statSync(f).mtime.toISOString(), markdown: (await readFile(f, 'utf8')).trim(), paths };
  } catch {
    return { date: statSync(f).mtime.toISOString(), markdown: (await readFile(f, 'utf8')).trim(), paths };
  }
}

/** What the report says of the run itself (bench/results/run.json, kept for --report-only). */
interface RunInfo {
  command: string;
  startedAt: string;
  totalS: number;
  ran: { part: string; seconds: number; code: number | null }[];
  load: string;
  cpu: string;
  revision?: string;
}

async function readRunInfo(): Promise<RunInfo | undefined> {
  try {
    return JSON.parse(await readFile(join(OUT, 'run.json'), 'utf8')) as RunInfo;
  } catch {
    return undefined;
  }
}

async function readPart(name: string): Promise<PartResult<unknown> | undefined> {
  try {
    return JSON.parse(await readFile(join(OUT, `${name}.json`), 'utf8')) as PartResult<unknown>;
  } catch {
    return undefined;
  }
}

/** bench:latency writes its own format; the report needs when it ran and how loaded the machine was. */
async function readLatency(): Promise<{ date: string; load: string; quick: boolean } | undefined> {
  try {
    const j = JSON.parse(await readFile(join(OUT, 'latency.json'), 'utf8')) as { machine: { date: string }; loadAverage: { start: string; end?: string }; config: { rounds: number } };
    return { date: j.machine.date, load: `${j.loadAverage.start} at the start, ${j.loadAverage.end ?? '?'} at the end`, quick: j.config.rounds < 2 };
  } catch {
    return undefined;
  }
}

function qemuVersion(): string {
  try {
    return execFileSync(process.env.QEMU_BINARY ?? 'qemu-system-x86_64', ['--version'], { encoding: 'utf8', timeout: 10_000 }).split('\n')[0] ?? '?';
  } catch {
    return 'not found';
  }
}

async function main(): Promise<void> {
  await mkdir(OUT, { recursive: true });
  const started = Date.now();
  const loads: number[] = [];
  const loadStart = loadAverage();
  const sample = (): void => void loads.push(Number(loadAverage().split(' ')[0]));
  sample();
  const sampler = setInterval(sample, 5000);
  const cpu0 = cpuSnapshot([]);
  const ran = new Map<string, { seconds: number; code: number | null }>();
  const extra = [...quick];
  if (selected.some((p) => p.cli)) {
    const still = ensureBuiltCli((l) => process.stderr.write(`${l}\n`));
    if (still) process.stderr.write(`${still}: the ${selected.filter((p) => p.cli).map((p) => p.name).join(', ')} parts will say so\n`);
  }
  const selectedNames = selected.map((p) => p.name);
  for (const part of selected) {
    if (stoppedBy) break;
    const t0 = Date.now();
    process.stderr.write(`\n=== ${part.name} ===\n`);
    // Page-cache writeback of an earlier part's files must not slow this one.
    spawnSync('sync', [], { stdio: 'ignore', timeout: 300_000 });
    // Library sessions with their channels in threads: under a Node.js that transfers sockets (≥ 26.6) when there is one.
    const node = part.threads ? threadsNode() : undefined;
    if (part.threads) process.stderr.write(`${part.name}: under Node.js ${node?.version ?? `${process.version} (none ≥ 26.6 found: the threads rows will say not available)`}\n`);
    let code = (await runScript(part.script, [...extra, ...(part.args?.() ?? [])], node?.path)).code;
    // bench:latency alone has no report section: urgent.bench.ts merges its rows (run here unless urgent runs as its own part next).
    if (part.name === 'latency' && !selectedNames.includes('urgent')) code ||= (await runScript('urgent.bench.ts', [...extra, ...veth(), ...trace()])).code;
    ran.set(part.name, { seconds: (Date.now() - t0) / 1000, code });
  }
  clearInterval(sampler);
  if (stoppedBy) {
    process.stderr.write(`\n${stoppedBy}: stopped; bench/REPORT.md left as it was\n`);
    process.exit(stoppedBy === 'SIGINT' ? 130 : 143);
  }
  sample();
  const cpu = cpuUse(cpu0, cpuSnapshot([]));
  const totalS = (Date.now() - started) / 1000;
  const thisRun: RunInfo = {
    command: `npm run bench${process.argv.length > 2 ? ` -- ${process.argv.slice(2).join(' ')}` : ''}`,
    startedAt: new Date(started).toISOString(),
    totalS,
    ran: [...ran].map(([part, r]) => ({ part, ...r })),
    load: `${loadStart} at the start, ${loadAverage()} at the end; 1-minute load sampled every 5 s: median ${fmt(median(loads), 2)}, peak ${fmt(Math.max(...loads), 2)}`,
    cpu: cpu ? `${cpu.hostBusyPct} % busy (100 = all cores; steal ${cpu.stealPct} %)` : '?',
    revision: machineInfo(REPO_ROOT).revision,
  };
  // --report-only describes the last run that ran parts, not itself.
  const run = args['report-only'] ? ((await readRunInfo()) ?? thisRun) : thisRun;
  if (!args['report-only']) await writeFile(join(OUT, 'run.json'), `${JSON.stringify(run, null, 1)}\n`);

  const parts = new Map<string, PartResult<unknown>>();
  for (const { name } of PARTS.filter((p) => p.report !== false)) {
    const p = await readPart(name);
    if (p) parts.set(name, p);
  }
  const latency = await readLatency();
  const m = machineInfo(REPO_ROOT);
  const runStart = run.startedAt;
  const fresh = (p: PartResult<unknown> | undefined): boolean => p !== undefined && p.startedAt >= runStart;
  const lines: string[] = [];
  lines.push('# Benchmark report', '');
  lines.push(
    `- Machine: ${m.cpu}, ${m.cores} cores, ${fmt(m.memoryBytes / 2 ** 30, 1)} GiB RAM; ${m.os}; kernel ${m.kernel}; Node ${m.node}; ${qemuVersion()}; TCP congestion control ${m.congestionControl}. A shared VM: other work may run at the same time (see the load).`,
    `- Code: ${run.revision ?? m.revision}.`,
    `- Run: \`${run.command}\`, started ${runStart}, ${fmt(run.totalS / 60, 1)} min (${run.ran.map((r) => `${r.part} ${fmt(r.seconds)} s${r.code ? ` (exit ${r.code})` : ''}`).join(', ')}).${args['report-only'] ? ' Report written again afterwards (`--report-only`).' : ''}`,
    `- Load average during the run: ${run.load}. The whole machine's CPU was ${run.cpu} over the run. Each part states its own load below.`,
    '- Every figure is measured next to its baseline in the same run; medians of the runs with (min–max); nothing asserts on timing. Raw data: `bench/results/*.json`.',
    '',
  );
  const stale = [...parts.values()].filter((p) => !fresh(p)).map((p) => `${p.part} (${p.startedAt})`);
  if (stale.length > 0 || (latency && latency.date < runStart)) {
    lines.push(`> Not run this time, results from an earlier run: ${[...stale, ...(latency && latency.date < runStart ? [`latency (${latency.date})`] : [])].join(', ')}.`, '');
  }
  const profile = await readProfile();
  lines.push(
    '## Summary: issue 13, a thread per channel and multifd',
    '',
    issue13Intro(parts, runStart),
    '',
    issue13Table(issue13Lines(parts, profile?.paths)),
    '',
  );
  lines.push(
    '## Summary: issue 12, the page path at memory speed',
    '',
    'Every row measured next to its baseline in the same run (ratios of medians); aims from the issue, reported, not asserted. CPU: core-seconds (user + system) per GB of guest RAM at the source / destination end, ours and, in brackets, the baseline\'s.',
    '',
    issueTable(issueLines(parts, profile?.paths)),
    '',
    profile ? `What the time goes to, for every missed aim: CPU profiles of each of our processes in [§ What the time goes to](#what-the-time-goes-to-cpu-profiles) (\`npm run bench:profile\`, run ${profile.date}).` : 'CPU profiles: not run yet (`npm run bench:profile`).',
    '',
    '## Summary: every part',
    '',
    summaryTable(summaryLines(parts)),
    '',
  );
  const section = (n: number, name: string, extraLinks = ''): void => {
    const p = parts.get(name);
    if (!p) {
      lines.push(`## ${n}. ${name}`, '', `Not run yet: \`npm run bench -- --only ${name}\`.`, '');
      return;
    }
    lines.push(`## ${n}. ${p.title}`, '', partHeader(p), '', p.markdown.replace(/\]\(([\w.-]+\.(?:svg|md|json))\)/g, '](results/$1)'), '', `Details: [results/${name}.md](results/${name}.md), raw: [results/${name}.json](results/${name}.json).${extraLinks}`, '');
  };
  // bench:latency's own report, linked from urgent's section.
  const latencyLinks = latency
    ? ` bench:latency's own report (${latency.date}${latency.quick ? ', --quick' : ''}; load ${latency.load}), with event-loop delays, socket options and the priority-queue variants: [results/latency.md](results/latency.md), CDFs [loopback](results/latency-cdf-loopback.svg) and [veth](results/latency-cdf-veth.svg).`
    : '';
  let n = 1;
  for (const { name } of PARTS.filter((p) => p.report !== false)) section(n++, name, name === 'urgent' ? latencyLinks : '');
  if (profile) lines.push(profile.markdown.replace(/\(bench\/results\//g, '(results/'), '', `Details: [results/profile.md](results/profile.md), raw: [results/profile.json](results/profile.json); rerun: \`npm run bench:profile\`.`, '');
  lines.push(
    '## Charts',
    '',
    ...[
      ['bulk-throughput.svg', 'bulk throughput'],
      ['multifd-throughput.svg', 'multifd throughput by channel count'],
      ['urgent-cdf.svg', 'urgent page requests, CDF (one chart, both links; the threads rows included)'],
      ['seed-stall.svg', "the seed's experiment: the VM's stall (downtime + blocktime)"],
      ['latency-cdf-loopback.svg', 'bench:latency, loopback'],
      ['latency-cdf-veth.svg', 'bench:latency, veth'],
    ].map(([f, t]) => `- [${t}](results/${f})`),
    '',
    `Reproduce: \`npm run bench\` as root on an idle machine with QEMU 10.0 (\`-- --quick\` for a short run, \`-- --only urgent,demo,load,multifd --runs 3\` for the issue-13 rows (the threaded ones under a Node.js ≥ 26.6: QMT_BENCH_NODE, this Node.js, or .cache/node/), \`-- --only bulk,saved,demo\` for the issue-12 rows, \`-- --mib 2048 --runs 5\` for their size and rounds, \`-- --no-veth\` without the shaped link); the CPU profiles: \`npm run bench:profile\`.`,
    '',
  );
  await writeFile(join(BENCH, 'REPORT.md'), lines.join('\n'));
  process.stderr.write(`\nwrote bench/REPORT.md (${fmt(totalS / 60, 1)} min)\n`);
  if ([...ran.values()].some((r) => r.code)) process.exitCode = 1;
}

await main();
