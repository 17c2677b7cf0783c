/**
 * Urgent-request latency under bulk load (npm run bench:latency [-- --quick] [-- --no-veth] [-- --rounds N]).
 *
 * A destination sends a 16-byte request; the source answers with a 4 KiB page
 * while the main channel saturates the link source → destination with bulk
 * data. Three ways to carry the answer:
 *   (a) one shared socket: requests on the main channel's reverse direction,
 *       the answer queued on the main channel with send(..., 'urgent') — it
 *       overtakes bulk data queued in user space, not the socket's write
 *       buffer, the kernel send buffer or the bottleneck queue;
 *   (b) two sockets, every socket option at its kernel default;
 *   (c) two sockets with the default profiles (BULK_PROFILE / URGENT_PROFILE).
 * Links: loopback, and (as root) a veth pair between two namespaces created
 * here, shaped to 1 Gbit/s with tbf on the source side; on that link also
 * (c) with a prio qdisc under the tbf (bands by SO_PRIORITY, or by DSCP).
 * Each side runs in its own process (bench/lib/peer.ts), in its own namespace
 * on the veth link. Also: bulk throughput of one Channel (plain and TLS) next
 * to a raw socket pair of the same kind, on loopback, measured in this run.
 *
 * Prints a markdown table and writes bench/results/latency.{md,json} and
 * latency-cdf-<link>.svg. Prints figures next to same-run baselines; asserts nothing.
 */
import { execFileSync } from 'node:child_process';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { rmSync } from 'node:fs';
import os from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { initPkiDir } from '../src/transport/pki.js';
import { cpuSnapshot, cpuUse, loadAverage, type CpuUse } from './lib/cpu.js';
import { VethLink, removeStaleNamespaces, vethUnavailable, type Shaping } from './lib/netns.js';
import { PeerProcess, REPO_ROOT } from './lib/peer-process.js';
import { MODE_LABEL, MODE_SHORT, MODES, type CellKind, type LoopDelay, type Mode, type RunResult, type ThroughputVariant } from './lib/protocol.js';
import { probeUrgentPriority } from './lib/sockets.js';
import { cdfChartSvg, fmt, machineInfo, type ChartSeries, type MachineInfo } from './lib/report.js';
import { cleanUpOnSignal } from './lib/signal-cleanup.js';
import { mean, median, summarize, type LatencySummary } from './lib/stats.js';

const { values: args } = parseArgs({
  options: {
    quick: { type: 'boolean', default: false },
    'no-veth': { type: 'boolean', default: false },
    /** Run both peers under `nice -n N` (negative needs root): less interference from other work on a shared machine. */
    nice: { type: 'string', default: '0' },
    /** Rounds per cell (default 2, --quick 1); `npm run bench` asks for 3. */
    rounds: { type: 'string' },
    out: { type: 'string', default: join(REPO_ROOT, 'bench', 'results') },
  },
});

/**
 * Durations (ms) of one round of a cell; every cell runs `rounds` times, the
 * rounds of all cells of a link interleaved, so that a burst of outside load
 * on this shared machine spreads over the modes instead of hitting one. The
 * whole benchmark stays under ~3 minutes on 2 cores.
 */
const T = args.quick
  ? { rounds: 1, idle: 800, warmup: 500, alone: 500, loaded: 1500, gap: 1, thrWarmup: 300, thr: 800, thrRounds: 1 }
  : { rounds: 2, idle: 1250, warmup: 800, alone: 750, loaded: 2500, gap: 1, thrWarmup: 400, thr: 1500, thrRounds: 5 };
if (args.rounds !== undefined) T.rounds = Number(args.rounds);
if (!Number.isInteger(T.rounds) || T.rounds < 1) throw new Error(`--rounds must be a positive integer, got ${args.rounds}`);
const MAX_SAMPLES = 20_000;
const CMD_MS = 15_000;
const LINK = { rate: '1gbit', burst: '256kb', latency: '50ms' };

// ---------------------------------------------------------------------------
// Cleanup: every child and namespace, on success, error, SIGINT and exit
// ---------------------------------------------------------------------------

const live = { peers: new Set<PeerProcess>(), link: undefined as VethLink | undefined, tmpDirs: [] as string[] };
let cleaning: Promise<void> | undefined;

function cleanup(): Promise<void> {
  cleaning ??= (async () => {
    await Promise.allSettled([...live.peers].map((p) => p.stop()));
    live.peers.clear();
    if (live.link) {
      const errs = await live.link.destroy();
      for (const e of errs) process.stderr.write(`cleanup: ${e}\n`);
      live.link = undefined;
    }
    for (const d of live.tmpDirs.splice(0)) await rm(d, { recursive: true, force: true });
  })();
  return cleaning;
}

function cleanupSync(): void {
  for (const p of live.peers) p.killNow();
  live.link?.destroySync((c, a) => {
    try {
      execFileSync(c, a, { timeout: 5000, stdio: 'ignore' });
    } catch {
      // best effort on the way out
    }
  });
  for (const d of live.tmpDirs) rmSync(d, { recursive: true, force: true });
}

cleanUpOnSignal(cleanup, cleanupSync);

// ---------------------------------------------------------------------------
// Cells
// ---------------------------------------------------------------------------

interface Peers {
  src: PeerProcess;
  dst: PeerProcess;
  /** Address the destination listens on. */
  host: string;
}

/** One latency configuration: a mode on a link, with the bottleneck's setup (veth). */
interface CellSpec {
  link: 'loopback' | 'veth';
  mode: Mode;
  /** How the bottleneck was configured (veth), and any socket change made by the benchmark. */
  variant: string;
  label: string;
  /** Legend text in the chart. */
  short: string;
  idle: boolean;
  shaping?: Shaping;
  reassertPriority?: number;
}

interface RoundResult {
  idle?: RunResult;
  alone: RunResult[];
  loaded?: RunResult;
  cpu?: CpuUse;
  loopDelay?: { source: LoopDelay; dest: LoopDelay };
  setup?: unknown;
  closeStats?: unknown;
  qdisc?: string;
  error?: string;
}

interface LatencyCell {
  link: CellSpec['link'];
  mode: Mode;
  variant: string;
  label: string;
  short: string;
  idle?: LatencySummary;
  loaded?: LatencySummary;
  /** The loaded run of each round on its own (p50/p99/p99.9, µs). */
  loadedPerRound: { count: number; p50Us: number; p99Us: number; p999Us: number }[];
  loadedUnanswered: number;
  bulkDuringMBps?: number;
  bulkAloneMBps?: number;
  bulkAloneRunsMBps: number[];
  /** CPU use over the loaded run of each round. */
  cpu: CpuUse[];
  /** Event-loop delay of both peers over the loaded run of each round. */
  loopDelay: { source: LoopDelay; dest: LoopDelay }[];
  setup?: unknown;
  closeStats?: unknown[];
  qdisc?: { text: string; classBytes?: number[] };
  errors: string[];
}

const mbps = (r: RunResult): number => r.bulkBytes / 1e6 / r.windowSec;

async function openCell(p: Peers, cell: CellKind, opts: { tlsDir?: string; reassertPriority?: number } = {}): Promise<Record<string, unknown>> {
  const { uri } = await p.dst.call<{ uri: string }>({ cmd: 'listen', host: p.host, cell, ...(opts.tlsDir ? { tlsDir: opts.tlsDir } : {}) }, CMD_MS);
  const [srcMain, dstMain] = await Promise.all([
    p.src.call({ cmd: 'connect', uri, cell, ...(opts.tlsDir ? { tlsDir: opts.tlsDir } : {}) }, CMD_MS),
    p.dst.call({ cmd: 'accept', timeoutMs: 10_000 }, CMD_MS),
  ]);
  const setup: Record<string, unknown> = { uri, srcMain, dstMain };
  if (cell.kind === 'latency' && cell.mode !== 'shared') {
    // Only once the destination has accepted the main channel (roles follow arrival order).
    const [srcPreempt, dstPreempt] = await Promise.all([
      p.src.call({ cmd: 'preempt', ...(opts.reassertPriority !== undefined ? { reassertPriority: opts.reassertPriority } : {}) }, CMD_MS),
      p.dst.call({ cmd: 'wait-preempt', timeoutMs: 10_000 }, CMD_MS),
    ]);
    Object.assign(setup, { srcPreempt, dstPreempt });
  }
  return setup;
}

async function closeCell(p: Peers): Promise<unknown> {
  await p.src.call({ cmd: 'bulk', on: false }, CMD_MS).catch(() => undefined);
  const [s, d] = await Promise.allSettled([p.src.call({ cmd: 'close', timeoutMs: 5000 }, CMD_MS), p.dst.call({ cmd: 'close', timeoutMs: 5000 }, CMD_MS)]);
  return { source: s.status === 'fulfilled' ? s.value : String(s.reason), dest: d.status === 'fulfilled' ? d.value : String(d.reason) };
}

const runCmd = (durationMs: number, warmupMs: number, requests: boolean) =>
  ({ cmd: 'run', durationMs, warmupMs, requests, gapMs: T.gap, maxSamples: MAX_SAMPLES }) as const;

/**
 * One round of a cell on a fresh connection: idle round trips (optional),
 * then bulk alone, bulk + requests, bulk alone again (the two alone windows
 * bracket the loaded one against drift).
 */
async function latencyRound(p: Peers, spec: CellSpec, link: VethLink | undefined): Promise<RoundResult> {
  const r: RoundResult = { alone: [] };
  let opened = false;
  try {
    if (link && spec.shaping) {
      // A fresh qdisc per round, so that its counters cover this round only.
      await link.shape(undefined);
      await link.shape(spec.shaping);
    }
    r.setup = await openCell(p, { kind: 'latency', mode: spec.mode }, spec.reassertPriority !== undefined ? { reassertPriority: spec.reassertPriority } : {});
    opened = true;
    const long = T.loaded + T.warmup + CMD_MS;
    if (spec.idle) r.idle = await p.dst.call<RunResult>(runCmd(T.idle, 200, true), long);
    await p.src.call({ cmd: 'bulk', on: true }, CMD_MS);
    r.alone.push(await p.dst.call<RunResult>(runCmd(T.alone, T.warmup, false), long));
    await Promise.all([p.src.call({ cmd: 'loop-delay' }, CMD_MS), p.dst.call({ cmd: 'loop-delay' }, CMD_MS)]);
    const c0 = cpuSnapshot([p.src.pid, p.dst.pid]);
    r.loaded = await p.dst.call<RunResult>(runCmd(T.loaded, 0, true), long);
    r.cpu = cpuUse(c0, cpuSnapshot([p.src.pid, p.dst.pid]));
    const [source, dest] = await Promise.all([p.src.call<LoopDelay>({ cmd: 'loop-delay' }, CMD_MS), p.dst.call<LoopDelay>({ cmd: 'loop-delay' }, CMD_MS)]);
    r.loopDelay = { source, dest };
    r.alone.push(await p.dst.call<RunResult>(runCmd(T.alone, 0, false), long));
    if (link && spec.shaping && spec.shaping !== 'tbf') r.qdisc = await link.qdiscStats();
  } catch (e) {
    r.error = e instanceof Error ? e.message : String(e);
    process.stderr.write(`  error: ${r.error}\n`);
  } finally {
    if (opened || r.error) r.closeStats = await closeCell(p).catch((e: unknown) => String(e));
  }
  return r;
}

/** Runs every spec `T.rounds` times, rounds interleaved, and merges each spec's rounds. */
async function latencyCells(p: Peers, specs: readonly CellSpec[], link: VethLink | undefined): Promise<LatencyCell[]> {
  const rounds = specs.map(() => [] as RoundResult[]);
  for (let round = 0; round < T.rounds; round++) {
    for (const [i, spec] of specs.entries()) {
      process.stderr.write(`- ${spec.link}: ${spec.label} (round ${round + 1}/${T.rounds}) …\n`);
      rounds[i]!.push(await latencyRound(p, spec, link));
    }
  }
  return specs.map((spec, i) => merge(spec, rounds[i]!));
}

function merge(spec: CellSpec, rounds: readonly RoundResult[]): LatencyCell {
  const c: LatencyCell = {
    link: spec.link,
    mode: spec.mode,
    variant: spec.variant,
    label: spec.label,
    short: spec.short,
    loadedPerRound: [],
    loadedUnanswered: 0,
    bulkAloneRunsMBps: [],
    cpu: [],
    loopDelay: [],
    errors: [],
  };
  const idle: number[] = [];
  const loaded: number[] = [];
  let during = { bytes: 0, sec: 0 };
  let alone = { bytes: 0, sec: 0 };
  for (const r of rounds) {
    if (r.error) c.errors.push(r.error);
    if (r.idle) idle.push(...r.idle.samples);
    if (r.loaded) {
      loaded.push(...r.loaded.samples);
      c.loadedUnanswered += r.loaded.unanswered;
      during = { bytes: during.bytes + r.loaded.bulkBytes, sec: during.sec + r.loaded.windowSec };
      const s = summarize(r.loaded.samples);
      if (s) c.loadedPerRound.push({ count: s.count, p50Us: s.p50Us, p99Us: s.p99Us, p999Us: s.p999Us });
    }
    for (const a of r.alone) {
      alone = { bytes: alone.bytes + a.bulkBytes, sec: alone.sec + a.windowSec };
      c.bulkAloneRunsMBps.push(Math.round(mbps(a) * 10) / 10);
    }
    if (r.cpu) c.cpu.push(r.cpu);
    if (r.loopDelay) c.loopDelay.push(r.loopDelay);
  }
  const si = summarize(idle);
  if (si) c.idle = si;
  const sl = summarize(loaded);
  if (sl) c.loaded = sl;
  if (during.sec > 0) c.bulkDuringMBps = during.bytes / 1e6 / during.sec;
  if (alone.sec > 0) c.bulkAloneMBps = alone.bytes / 1e6 / alone.sec;
  c.setup = rounds.find((r) => r.setup)?.setup;
  c.closeStats = rounds.map((r) => r.closeStats);
  const q = rounds.map((r) => r.qdisc).filter((x): x is string => x !== undefined);
  if (q.length > 0) {
    const per = q.map(classBytes);
    const sum = per.every((b) => b !== undefined) ? per.reduce<number[]>((acc, b) => acc.map((v, k) => v + (b[k] ?? 0)), [0, 0]) : undefined;
    c.qdisc = sum ? { text: q.join('\n'), classBytes: sum } : { text: q.join('\n') };
  }
  return c;
}

interface ThroughputCell {
  variant: ThroughputVariant;
  runsMBps: number[];
  medianMBps?: number;
  tls?: unknown;
  error?: string;
}

async function throughputRun(p: Peers, variant: ThroughputVariant, tlsDir: string): Promise<{ mbps: number; tls?: unknown }> {
  let opened = false;
  try {
    const setup = await openCell(p, { kind: 'throughput', variant }, variant.endsWith('tls') ? { tlsDir } : {});
    opened = true;
    await p.src.call({ cmd: 'bulk', on: true }, CMD_MS);
    const r = await p.dst.call<RunResult>(runCmd(T.thr, T.thrWarmup, false), T.thr + T.thrWarmup + CMD_MS);
    const main = setup.dstMain as { tls?: unknown } | undefined;
    return { mbps: mbps(r), tls: main?.tls };
  } finally {
    if (opened) await closeCell(p).catch(() => undefined);
  }
}

const NICE = Number(args.nice);
if (!Number.isInteger(NICE) || NICE < -20 || NICE > 19) throw new Error(`--nice must be an integer in -20 … 19, got ${args.nice}`);

function spawnPeers(prefixSrc: readonly string[], prefixDst: readonly string[], host: string): Peers {
  const nice = NICE !== 0 ? ['nice', '-n', String(NICE)] : [];
  const src = PeerProcess.spawn('source', 'source', [...nice, ...prefixSrc]);
  live.peers.add(src);
  const dst = PeerProcess.spawn('dest', 'dest', [...nice, ...prefixDst]);
  live.peers.add(dst);
  return { src, dst, host };
}

async function stopPeers(p: Peers): Promise<void> {
  await Promise.allSettled([p.src.stop(), p.dst.stop()]);
  live.peers.delete(p.src);
  live.peers.delete(p.dst);
}

/** Bytes sent by the htb leaves 1:10 (urgent) and 1:20 (default) from `tc -s class show`. */
function classBytes(text: string): number[] | undefined {
  const out: number[] = [];
  for (const cls of ['1:10', '1:20']) {
    const m = new RegExp(`class htb ${cls} [^\\n]*\\n\\s*Sent (\\d+) bytes`).exec(text);
    if (!m) return undefined;
    out.push(Number(m[1]));
  }
  return out;
}

// ---------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------

interface Report {
  machine: MachineInfo;
  config: typeof T & { nice: number; maxSamples: number; requestBytes: number; replyBytes: number; bulkChunkBytes: number };
  links: { loopback: string[]; veth?: { commands: string[]; congestionControl: string; note?: string }; vethSkipped?: string };
  /** /proc/loadavg (1, 5, 15 min) at the start and the end of the run. */
  loadAverage: { start: string; end?: string };
  /** SO_PRIORITY of a default preempt channel: as the transport reports it, and as the kernel holds it. */
  urgentPriority?: { reported?: number; actual?: number; tos?: number };
  latency: LatencyCell[];
  throughput: ThroughputCell[];
  findings: string[];
}

function us(n: number | undefined): string {
  return fmt(n);
}

function latencyTable(cells: readonly LatencyCell[]): string {
  const rows = [
    '| link | mode | samples | idle p50 | idle p99 | loaded p50 | loaded p99 | loaded p99.9 | loaded max | p99 per round | bulk during (MB/s) | bulk alone (MB/s) | during / alone | CPU % busy / ours / irq / others |',
    '|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|',
  ];
  for (const c of cells) {
    const ratio = c.bulkDuringMBps !== undefined && c.bulkAloneMBps ? c.bulkDuringMBps / c.bulkAloneMBps : undefined;
    const err = c.errors.length > 0 ? ` (errors: ${c.errors.join('; ')})` : '';
    const avg = (f: (x: CpuUse) => number): string => fmt(mean(c.cpu.map(f)));
    const cpu = c.cpu.length > 0 ? `${avg((x) => x.hostBusyPct)} / ${avg((x) => x.oursPct)} / ${avg((x) => x.irqPct)} / ${avg((x) => Math.max(0, x.otherPct))}` : '–';
    rows.push(
      `| ${c.link} | ${c.label}${err} | ${fmt(c.loaded?.count)}${c.loadedUnanswered ? ` (+${c.loadedUnanswered} unanswered)` : ''} | ${us(c.idle?.p50Us)} | ${us(c.idle?.p99Us)} | ${us(c.loaded?.p50Us)} | ${us(c.loaded?.p99Us)} | ${us(c.loaded?.p999Us)} | ${us(c.loaded?.maxUs)} | ${c.loadedPerRound.map((r) => us(r.p99Us)).join(', ')} | ${fmt(c.bulkDuringMBps, 1)} | ${fmt(c.bulkAloneMBps, 1)} | ${ratio === undefined ? '–' : `${fmt(ratio * 100, 1)} %`} | ${cpu} |`,
    );
  }
  return rows.join('\n');
}

function throughputTable(cells: readonly ThroughputCell[]): string {
  const get = (v: ThroughputVariant): ThroughputCell | undefined => cells.find((c) => c.variant === v);
  const rows = [
    '| kind | raw socket pair (MB/s, median) | our Channel, main profile (MB/s, median) | Channel / raw (medians) | Channel / raw (median of per-round ratios) | runs raw | runs Channel |',
    '|---|--:|--:|--:|--:|---|---|',
  ];
  for (const [kind, raw, ch] of [
    ['plain TCP', 'raw-tcp', 'channel-tcp'],
    ['TLS 1.3', 'raw-tls', 'channel-tls'],
  ] as const) {
    const r = get(raw);
    const c = get(ch);
    const ratio = r?.medianMBps && c?.medianMBps ? c.medianMBps / r.medianMBps : undefined;
    // Raw and Channel of one round ran back to back: their ratio cancels slow drifts in outside load.
    const paired = median((c?.runsMBps ?? []).flatMap((v, i) => (r?.runsMBps[i] ? [v / r.runsMBps[i]] : [])));
    const runs = (x: ThroughputCell | undefined): string => (x?.error ? `error: ${x.error}` : (x?.runsMBps ?? []).map((v) => fmt(v)).join(', '));
    const x = (v: number | undefined): string => (v === undefined ? '–' : `${fmt(v, 2)}×`);
    rows.push(`| ${kind} | ${fmt(r?.medianMBps)} | ${fmt(c?.medianMBps)} | ${x(ratio)} | ${x(paired)} | ${runs(r)} | ${runs(c)} |`);
  }
  return rows.join('\n');
}

function loopDelayTable(cells: readonly LatencyCell[]): string {
  const rows = ['| link | mode | source | destination |', '|---|---|---|---|'];
  const ms = (d: LoopDelay): string => `${fmt(d.p99Us / 1000, 1)} / ${fmt(d.maxUs / 1000, 1)}`;
  for (const c of cells) {
    if (c.loopDelay.length === 0) continue;
    rows.push(`| ${c.link} | ${c.label} | ${c.loopDelay.map((d) => ms(d.source)).join('; ')} | ${c.loopDelay.map((d) => ms(d.dest)).join('; ')} |`);
  }
  return rows.join('\n');
}

function aims(cells: readonly LatencyCell[]): string[] {
  const out: string[] = [];
  const find = (mode: Mode, variant: string): LatencyCell | undefined => cells.find((c) => c.link === 'veth' && c.mode === mode && c.variant === variant);
  const tuned = find('two-tuned', 'tbf');
  const shared = find('shared', 'tbf');
  if (!tuned?.loaded || !shared?.loaded) return ['- (no shaped-link results)'];
  const verdict = (ok: boolean): string => (ok ? 'met' : 'missed');
  out.push(`- (c) tuned p99 ≤ 1 ms: ${us(tuned.loaded.p99Us)} µs — ${verdict(tuned.loaded.p99Us <= 1000)} (same link idle p99: ${us(tuned.idle?.p99Us)} µs)`);
  const x = shared.loaded.p99Us / tuned.loaded.p99Us;
  out.push(`- (c) tuned p99 ≥ 10× better than the shared socket's: ${us(shared.loaded.p99Us)} / ${us(tuned.loaded.p99Us)} µs = ${fmt(x, 1)}× — ${verdict(x >= 10)}`);
  for (const c of cells.filter((c) => c.link === 'veth' && c.mode === 'two-tuned')) {
    if (c.bulkDuringMBps === undefined || !c.bulkAloneMBps || !c.loaded) continue;
    const r = c.bulkDuringMBps / c.bulkAloneMBps;
    const extra = c.variant === 'tbf' ? '' : `; p99 ${us(c.loaded.p99Us)} µs (${c.loaded.p99Us <= 1000 ? '≤' : '>'} 1 ms), ${fmt(shared.loaded.p99Us / c.loaded.p99Us, 1)}× better than shared`;
    out.push(`- ${c.label}: bulk ${fmt(c.bulkDuringMBps, 1)} / ${fmt(c.bulkAloneMBps, 1)} MB/s alone = ${fmt(r * 100, 1)} % (within 5 %: ${verdict(r >= 0.95)})${extra}`);
  }
  return out;
}

function tuningSection(cells: readonly LatencyCell[]): string {
  const rows = ['| link | mode | channel | SO_SNDBUF | TCP_NODELAY | NOTSENT_LOWAT | SO_PRIORITY reported by the transport | SO_PRIORITY in the kernel | IP_TOS |', '|---|---|---|--:|---|--:|--:|--:|--:|'];
  type Side = { tuning?: { priority?: number; sndbuf?: number; noDelay?: boolean; notSentLowat?: number; tos?: number }; actual?: { priority?: number; tos?: number } };
  for (const c of cells) {
    if (c.link !== 'loopback' && c.variant !== 'tbf' && !c.variant.includes('re-set')) continue;
    const s = c.setup as { srcMain?: Side; srcPreempt?: Side } | undefined;
    for (const [name, side] of [
      ['source main', s?.srcMain],
      ['source preempt', s?.srcPreempt],
    ] as const) {
      if (!side) continue;
      const t = side.tuning ?? {};
      rows.push(
        `| ${c.link} | ${c.label} | ${name} | ${fmt(t.sndbuf)} | ${t.noDelay ?? '–'} | ${t.notSentLowat === 0 ? '0 (unlimited)' : fmt(t.notSentLowat)} | ${fmt(t.priority)} | ${fmt(side.actual?.priority)} | ${side.actual?.tos === undefined ? '–' : `0x${side.actual.tos.toString(16)}`} |`,
      );
    }
  }
  return rows.join('\n');
}

function markdown(rep: Report): string {
  const m = rep.machine;
  const lines: string[] = [];
  lines.push('# Urgent page requests under bulk load (bench/latency.bench.ts)', '');
  lines.push(`- Machine: ${m.cpu}, ${m.cores} cores; ${m.os}; kernel ${m.kernel}; Node ${m.node}; TCP congestion control ${m.congestionControl}; run ${m.date}; code ${m.revision}.`);
  lines.push(
    `- Load average at start / end: ${rep.loadAverage.start} / ${rep.loadAverage.end ?? '?'}. The VM is shared with other work; the CPU column is the whole machine's busy time during the loaded runs (100 = both cores), split into the two benchmark processes, interrupts + softirqs (network processing, mostly ours; tick-based, it can overlap the processes' own time) and everything else (other people's processes, steal; floored at 0).`,
  );
  lines.push(
    `- Method: a 16-byte request destination → source, answered by a 12-byte header + 4 KiB page source → destination; one request outstanding, ${T.gap} ms pause between requests; round trip timed at the destination (hrtime), recorded in an HDR histogram (perf_hooks.createHistogram: 1 µs, 3 digits). Bulk: 256 KiB groups on the main channel, the sender awaiting send() for backpressure and yielding to the event loop after each group (as the source session does in postcopy; send() resolves as a microtask while under its bound, so a producer that only awaits it never lets the request be read). Source and destination are separate Node processes${NICE !== 0 ? `, both under \`nice -n ${NICE}\`` : ' at normal priority'}.`,
  );
  lines.push(
    `- Each cell runs ${T.rounds} round(s) on a fresh connection, the rounds of all cells of a link interleaved; per round: idle round trips ${T.idle / 1000} s (no bulk; 0.2 s of requests discarded first), bulk alone ${T.alone / 1000} s (after ${T.warmup / 1000} s warm-up), bulk + requests ${T.loaded / 1000} s, bulk alone ${T.alone / 1000} s again. Percentiles are over all rounds' samples; "bulk alone" is all alone windows together. Bulk is counted at the destination (payload bytes of bulk frames), MB = 10⁶ bytes.`,
  );
  lines.push(`- Loopback: ${rep.links.loopback.join('; ')}.`);
  if (rep.links.veth) {
    lines.push(`- Shaped link: ${rep.links.veth.note ?? ''} TCP congestion control inside the namespaces: ${rep.links.veth.congestionControl}. Commands:`, '', '```', ...rep.links.veth.commands, '```');
  } else {
    lines.push(`- Shaped link: skipped (${rep.links.vethSkipped ?? 'not requested'})`);
  }
  lines.push('', '## Round trips (µs) and bulk throughput', '', latencyTable(rep.latency), '');
  lines.push(
    'Modes: (a) one socket, the answer queued on the main channel as urgent (it overtakes bulk queued in user space only); (b) main + preempt socket, every socket option at the kernel default (KERNEL_DEFAULTS override, cork off); (c) main + preempt with BULK_PROFILE / URGENT_PROFILE. Extra rows on the shaped link: mode (c) with a priority-aware bottleneck (this kernel has no `prio` qdisc: pfifo_fast under the tbf gives the same 3 bands by SO_PRIORITY; htb with a u32 filter classifies by DSCP).',
    '',
  );
  lines.push('## Event-loop delay during the loaded runs (ms: p99 / max, per round)', '', loopDelayTable(rep.latency), '');
  lines.push(
    'Sampled every 1 ms with perf_hooks.monitorEventLoopDelay in each peer (≈ 1 ms = no delay). A request that arrives while its receiver\'s loop is busy, or while the process is not scheduled, waits this long before it is even read.',
    '',
  );
  lines.push('## Against the aims (shaped link; reported, not asserted)', '', ...aims(rep.latency), '');
  lines.push('## Bulk throughput of one channel vs a raw socket pair (loopback, same run)', '');
  lines.push(
    `${T.thrRounds} rounds of ${T.thr / 1000} s per variant (after ${T.thrWarmup / 1000} s warm-up, a fresh connection each), raw and Channel back to back in each round; 1 MiB writes, the receiver reads and discards; raw = plain \`net\` / \`tls\` sockets with Node's defaults and the same certificates (TLS 1.3 both).`,
    '',
  );
  lines.push(throughputTable(rep.throughput), '');
  lines.push('## Socket options (read back on the source)', '', tuningSection(rep.latency), '');
  const htb = rep.latency.filter((c) => c.qdisc?.classBytes);
  if (htb.length > 0) {
    lines.push('## htb class counters (bytes sent per class, all rounds)', '', '| variant | 1:10 (urgent, prio 0) | 1:20 (default, prio 1) |', '|---|--:|--:|');
    for (const c of htb) lines.push(`| ${c.label} | ${(c.qdisc!.classBytes ?? []).map((b) => fmt(b)).join(' | ')} |`);
    lines.push('');
  }
  if (rep.findings.length > 0) lines.push('## Findings', '', ...rep.findings.map((f) => `- ${f}`), '');
  lines.push('CDF charts: ' + ['loopback', 'veth'].filter((l) => rep.latency.some((c) => c.link === l)).map((l) => `latency-cdf-${l}.svg`).join(', '), '');
  return lines.join('\n');
}

/** Observations that follow from the numbers of this run. */
function findings(cells: readonly LatencyCell[], prio: Report['urgentPriority']): string[] {
  const out: string[] = [];
  if (prio?.reported !== undefined && prio.actual !== undefined && prio.reported !== prio.actual) {
    out.push(
      `Transport bug: the preempt socket's SO_PRIORITY is reported as ${prio.reported} (stats.tuning.priority) but the kernel holds ${prio.actual}. applyTuning sets SO_PRIORITY and reads it back at once, then sets IP_TOS=0x${(prio.tos ?? 0xb8).toString(16)}; Linux's IP_TOS handler overwrites sk_priority with rt_tos2priority(0xb8) = 4 (TC_PRIO_INTERACTIVE_BULK). The default priomap of prio/pfifo_fast sends priority 4 to band 1, the band of bulk (priority 0), so SO_PRIORITY gives the urgent channel no precedence. Fix: set IP_TOS / IPV6_TCLASS first and SO_PRIORITY last, and read all values back after the last set.`,
    );
  } else if (prio?.actual !== undefined) {
    out.push(`The preempt socket's SO_PRIORITY is ${prio.actual} in the kernel, as reported by the transport (IP_TOS 0x${(prio.tos ?? 0).toString(16)}).`);
  }
  const b = cells.find((c) => c.link === 'loopback' && c.mode === 'two-default');
  if (b?.idle && b.idle.p50Us > 20_000) {
    out.push(
      `Transport slowness: in mode (b) even an idle round trip on loopback takes ${us(b.idle.p50Us)} µs (p50). A channel whose tuning has cork off writes the pieces of one group ([12-byte header, 4 KiB page]) as separate writes; with Nagle on (kernel default) the page waits for the ACK of the header segment, which the receiver delays (~40 ms). On the veth link (MSS 1448) full-sized segments are exempt from Nagle and the effect mostly disappears. Writing a multi-piece group in one corked write (or writev) whatever the profile avoids it.`,
    );
  }
  const vb = cells.find((c) => c.link === 'veth' && c.mode === 'two-default' && c.variant === 'tbf');
  const vc = cells.find((c) => c.link === 'veth' && c.mode === 'two-tuned' && c.variant === 'tbf');
  if (vb?.loaded && vc?.loaded && vb.loaded.p50Us > 1.5 * vc.loaded.p50Us) {
    out.push(
      `On the shaped link (b) needs ${us(vb.loaded.p50Us)} µs at p50 against ${us(vc.loaded.p50Us)} µs for (c): the same Nagle effect, milder — the last, partial segment of the page waits for the ACK of the previous ones, one queue-inflated round trip.`,
    );
  }
  const lc = cells.find((c) => c.link === 'loopback' && c.mode === 'two-tuned');
  if (lc?.loaded && lc.loaded.p99Us > 1000 && lc.loopDelay.length > 0) {
    const worst = (f: (d: { source: LoopDelay; dest: LoopDelay }) => LoopDelay): string => us(Math.max(...lc.loopDelay.map((d) => f(d).p99Us)));
    out.push(
      `Loopback is CPU-bound, not link-bound: bulk runs at ${fmt(lc.bulkDuringMBps)} MB/s and keeps both peers busy (CPU column), so an urgent reply waits for the event loops rather than for a queue — (c) loaded p50 ${us(lc.loaded.p50Us)} µs / p99 ${us(lc.loaded.p99Us)} µs, with event-loop delay p99 up to ${worst((d) => d.source)} µs on the source and ${worst((d) => d.dest)} µs on the destination.`,
    );
  }
  const parts: string[] = [];
  for (const c of cells.filter((c) => c.link === 'veth' && c.mode === 'two-tuned')) {
    if (c.loaded) parts.push(`${c.variant}: p50 ${us(c.loaded.p50Us)} / p99 ${us(c.loaded.p99Us)} / p99.9 ${us(c.loaded.p999Us)} µs, bulk ${fmt(c.bulkDuringMBps, 1)} MB/s`);
  }
  if (parts.length > 1) out.push(`Priority at the bottleneck (mode c, shaped link): ${parts.join('; ')}.`);
  // Cells whose idle round trip is itself slow (the Nagle stall above) say nothing about the noise.
  const quiet = cells.filter((c) => c.idle && c.idle.p50Us < 20_000);
  if (quiet.some((c) => c.idle!.p99Us > 1000)) {
    out.push(
      `Noise floor: with no bulk at all, idle round trips already reach p99 ${quiet.map((c) => `${us(c.idle!.p99Us)} (${c.link} ${c.mode})`).join(', ')} µs in this run, and on the shaped link, where the peers have little to do, their event loops still run late by milliseconds (table above): tails of that size come from scheduling on this shared 2-core VM, not from the link.`,
    );
  }
  return out;
}

// ---------------------------------------------------------------------------
// Main
// ---------------------------------------------------------------------------

async function main(): Promise<void> {
  const started = Date.now();
  const machine = machineInfo(REPO_ROOT);
  const rep: Report = {
    machine,
    config: { ...T, nice: NICE, maxSamples: MAX_SAMPLES, requestBytes: 16, replyBytes: 4096, bulkChunkBytes: 256 * 1024 },
    links: { loopback: ['127.0.0.1, lo (noqueue: no qdisc, no shaping)', 'both peers in the root namespace, one process each'] },
    loadAverage: { start: loadAverage() },
    latency: [],
    throughput: [],
    findings: [],
  };

  rep.urgentPriority = await probeUrgentPriority().catch((e: unknown) => {
    process.stderr.write(`priority probe failed: ${String(e)}\n`);
    return undefined;
  });
  const priorityLost = rep.urgentPriority?.reported !== undefined && rep.urgentPriority.actual !== rep.urgentPriority.reported;

  const pkiDir = await mkdtemp(join(os.tmpdir(), 'qmt-latency-pki-'));
  live.tmpDirs.push(pkiDir);
  await initPkiDir(pkiDir);

  // Loopback.
  {
    const p = spawnPeers([], [], '127.0.0.1');
    try {
      const specs = MODES.map((mode): CellSpec => ({ link: 'loopback', mode, variant: 'lo', label: MODE_LABEL[mode], short: MODE_SHORT[mode], idle: true }));
      rep.latency.push(...(await latencyCells(p, specs, undefined)));
      const variants: ThroughputVariant[] = ['raw-tcp', 'channel-tcp', 'raw-tls', 'channel-tls'];
      const thr = new Map<ThroughputVariant, ThroughputCell>(variants.map((v) => [v, { variant: v, runsMBps: [] }]));
      process.stderr.write(`- loopback: bulk throughput, Channel vs raw (${T.thrRounds} rounds) …\n`);
      for (let round = 0; round < T.thrRounds; round++) {
        for (const v of variants) {
          const cell = thr.get(v)!;
          try {
            const r = await throughputRun(p, v, pkiDir);
            cell.runsMBps.push(r.mbps);
            if (r.tls) cell.tls = r.tls;
          } catch (e) {
            cell.error = e instanceof Error ? e.message : String(e);
            process.stderr.write(`  error (${v}): ${cell.error}\n`);
          }
        }
      }
      for (const c of thr.values()) {
        const m = median(c.runsMBps);
        if (m !== undefined) c.medianMBps = m;
        rep.throughput.push(c);
      }
    } finally {
      await stopPeers(p);
    }
  }

  // Shaped veth link between two namespaces.
  const why = args['no-veth'] ? '--no-veth' : await vethUnavailable();
  if (why) {
    rep.links.vethSkipped = why;
  } else {
    const stale = await removeStaleNamespaces();
    if (stale.length > 0) process.stderr.write(`removed stale namespaces of an earlier run: ${stale.join(', ')}\n`);
    const link = new VethLink(LINK);
    live.link = link;
    try {
      await link.create();
      const p = spawnPeers(link.execPrefix('source'), link.execPrefix('dest'), link.addrDst);
      try {
        const specs: CellSpec[] = [
          ...MODES.map((mode): CellSpec => ({ link: 'veth', mode, variant: 'tbf', label: MODE_LABEL[mode], short: MODE_SHORT[mode], idle: true, shaping: 'tbf' })),
          { link: 'veth', mode: 'two-tuned', idle: false, shaping: 'tbf+pfifo_fast', variant: 'tbf+pfifo_fast', label: '(c) tuned, tbf + pfifo_fast bands (transport as is)', short: 'c + pfifo_fast bands' },
          // Only while the transport loses its SO_PRIORITY (see findings): the benchmark's workaround, for comparison.
          ...(priorityLost
            ? [
                {
                  link: 'veth',
                  mode: 'two-tuned',
                  idle: false,
                  shaping: 'tbf+pfifo_fast',
                  variant: 'tbf+pfifo_fast, SO_PRIORITY re-set',
                  label: '(c) tuned, tbf + pfifo_fast bands, SO_PRIORITY 6 re-set after tuning',
                  short: 'c + pfifo_fast bands, SO_PRIORITY re-set',
                  reassertPriority: 6,
                } satisfies CellSpec,
              ]
            : []),
          { link: 'veth', mode: 'two-tuned', idle: false, shaping: 'htb', variant: 'htb', label: '(c) tuned, htb, no filter (control)', short: 'c + htb, no filter' },
          { link: 'veth', mode: 'two-tuned', idle: false, shaping: 'htb+dscp', variant: 'htb+dscp', label: '(c) tuned, htb + u32 DSCP EF → prio-0 class', short: 'c + htb, DSCP EF filter' },
        ];
        rep.latency.push(...(await latencyCells(p, specs, link)));
      } finally {
        await stopPeers(p);
      }
      rep.links.veth = {
        commands: [...new Set(link.log)],
        congestionControl: await link.sysctl('net.ipv4.tcp_congestion_control'),
        note: `veth pair ${link.devSrc} (${link.addrSrc}/${link.prefixLen}, namespace ${link.nsSrc}, source) ↔ ${link.devDst} (${link.addrDst}/${link.prefixLen}, namespace ${link.nsDst}, destination); tbf ${LINK.rate} burst ${LINK.burst} latency ${LINK.latency} as root qdisc of the source side's veth (the only queue that builds); the reverse direction is unshaped; no netem in this kernel, so no added delay. Namespaces removed at the end.`,
      };
    } finally {
      const errs = await link.destroy();
      for (const e of errs) process.stderr.write(`cleanup: ${e}\n`);
      live.link = undefined;
    }
  }

  rep.loadAverage.end = loadAverage();
  rep.findings = findings(rep.latency, rep.urgentPriority);

  // Outputs.
  await mkdir(args.out, { recursive: true });
  const md = markdown(rep) + `\nTotal run time: ${fmt((Date.now() - started) / 1000, 0)} s.\n`;
  await writeFile(join(args.out, 'latency.md'), md);
  await writeFile(join(args.out, 'latency.json'), `${JSON.stringify(rep, null, 2)}\n`);
  for (const link of ['loopback', 'veth'] as const) {
    const cells = rep.latency.filter((c) => c.link === link);
    if (cells.length === 0) continue;
    const series: ChartSeries[] = [];
    for (const c of cells) {
      if (c.loaded) series.push({ label: c.short, load: 'with bulk', cdf: c.loaded.cdf });
      if (c.idle) series.push({ label: c.short, load: 'idle', cdf: c.idle.cdf });
    }
    const title = link === 'veth' ? `Round-trip CDF, veth shaped to ${LINK.rate} (tbf)` : 'Round-trip CDF, loopback';
    await writeFile(join(args.out, `latency-cdf-${link}.svg`), await cdfChartSvg(title, series));
  }
  process.stdout.write(md);
}

try {
  await main();
} catch (e) {
  process.stderr.write(`latency bench failed: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}\n`);
  process.exitCode = 1;
} finally {
  await cleanup();
}
