/**
 * Multifd throughput and CPU per GB (part `multifd` of `npm run bench`;
 * alone: `node --import tsx bench/multifd.bench.ts [--quick] [--mib N]
 * [--runs N] [--channels 1,2,4] [--rows qemu-qemu,qemu-receive,send-qemu,library]`; the `qmt receive` rows need `npm run
 * build`, the threaded library rows Node.js ≥ 26.6, which `npm run bench`
 * runs this part under when it finds one).
 *
 * The test guest (TCG) walks all its RAM once and pauses; the same source
 * QEMU then migrates again and again (`cont` + `stop` between), with the
 * `multifd` capability and `multifd-channels` N:
 *   - QEMU → QEMU, plain and TLS (the baseline);
 *   - QEMU → `qmt receive --multifd N` (the built CLI; a saved VM on disk,
 *     fsynced before it exits; `sync` before each timed run), plain and TLS;
 *   - `qmt send --multifd N` (a saved VM of the same guest, captured once,
 *     in the page cache) → a waiting QEMU, plain and TLS (timed from the
 *     destination's first MIGRATION event to its `completed`);
 *   - library ↔ library over TLS, `multifd: { channels: N }`, threads on
 *     (a synthetic guest of the same size, every page holding data; RAM in
 *     shared memory at both ends, the destination's touched beforehand).
 * N = 1, 2, 4; every round runs every row once, interleaved. GB/s = guest
 * RAM bytes (10⁹) per second (QEMU source `setup` → destination `completed`,
 * or `qmt receive` exiting; library: first connection → destination done).
 * CPU: every thread of every process involved (QEMUs, `qmt` and what it
 * runs, both library peers), from /proc/PID/task/TID/stat sampled during the
 * run: core-seconds per GB, the cores kept busy, the threads that did work
 * and the busiest one. The expected figure for a bigger host follows from
 * those (bench/lib/thread-cpu.ts expectedGbps). Prints figures; asserts nothing.
 */
import { execFileSync } from 'node:child_process';
import { mkdir, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { initPkiDir } from '../src/transport/pki.js';
import { MULTIFD_AIM_ROWS, MULTIFD_LABEL, MULTIFD_TLS_2_VS_1, multifdAimRowMeasured, multifdScaling, REFERENCE_CORES } from './lib/aims.js';
import { BenchChild } from './lib/child.js';
import { cliHasFlag, multifdUnavailable, notAvailable, threadsNode, threadsOf, threadsRefused, threadsUnavailable } from './lib/features.js';
import { runPart, type PartContext } from './lib/part.js';
import type { QemuProcess } from './lib/qemu.js';
import { builtCliProblem, startQmtCli } from './lib/qmt-cli.js';
import { barChartSvg, fmt } from './lib/report.js';
import type { DestinationRun, SessionCommand, SourceRun } from './lib/session-peer.js';
import { fmtStats, median, ratio, runStats, type RunStats } from './lib/stats.js';
import { RAM_BLOCK } from './lib/synthetic-guest.js';
import { expectedGbps, ThreadCpuSampler, topThreads, type ThreadCpuReport } from './lib/thread-cpu.js';

const MiB = 1024 * 1024;
const SESSION_PEER = fileURLToPath(new URL('./lib/session-peer.ts', import.meta.url));

export type MultifdRow = 'qemu-qemu' | 'qemu-receive' | 'send-qemu' | 'library';
export type Kind = 'plain' | 'tls';

export interface MultifdRun {
  seconds: number;
  gbps: number;
  cpu: ThreadCpuReport;
  /** Library and `qmt receive`: each session's own word on threads (undefined: its stats say nothing of threads); library: the RAM the same at both ends. */
  threadsUsed?: { source?: boolean; dest?: boolean };
  workers?: number;
  identical?: boolean;
}

export interface MultifdVariant {
  row: MultifdRow;
  kind: Kind;
  channels: number;
  /** Library and `qmt receive` rows: the `threads` mode they ran with (a `qmt receive` row without: its default, 'auto'). */
  threads?: 'on' | 'off';
  runs: MultifdRun[];
  errors: string[];
  unavailable?: string;
  stats?: RunStats;
  /** Medians over the runs: CPU core-seconds per GB (every thread), the busiest thread's, cores busy, threads seen / doing work. */
  cpuPerGb?: number;
  busiestPerGb?: number;
  coresUsed?: number;
  osThreads?: number;
  busyThreads?: number;
}

export interface MultifdData {
  guestBytes: number;
  runs: number;
  cores: number;
  referenceCores: number;
  qemuVersion?: string;
  node?: string;
  variants: MultifdVariant[];
  skipped?: string;
}

/** The feature a row needs is missing: "not available", not a failure. */
class FeatureMissing extends Error {}

function syncDisks(): void {
  execFileSync('sync', [], { timeout: 300_000 });
}

type Q = typeof import('./lib/qemu.js');

interface Env {
  q: Q;
  ctx: PartContext;
  mib: number;
  pkiDir: string;
  work: string;
  src: QemuProcess;
  guest: { startMiB: number; endMiB: number; direction: 'up' };
}

const eventUsSince = (q: QemuProcess, since: number, status: string): number | undefined => {
  for (let i = since; i < q.qmp.events.length; i++) {
    const e = q.qmp.events[i]!;
    if (e.event === 'MIGRATION' && (e.data as { status?: unknown } | undefined)?.status === status) return e.timestamp.seconds * 1e6 + e.timestamp.microseconds;
  }
  return undefined;
};

async function resetSource(src: QemuProcess): Promise<void> {
  await src.resumeVm();
  await src.pauseVm();
}

async function sourceMultifd(env: Env, channels: number, tls: boolean): Promise<void> {
  await env.src.setCapabilities({ multifd: true });
  await env.src.setParameters({ 'multifd-channels': channels, 'tls-creds': tls ? 'tls0' : '', 'tls-hostname': tls ? 'localhost' : '' });
}

async function qemuToQemu(env: Env, channels: number, tls: boolean): Promise<MultifdRun> {
  const { q, src, mib } = env;
  const dst = await q.startQemuIn(undefined, { name: 'multifd-dst', memoryMiB: mib, guest: env.guest, incoming: true, extraArgs: q.tlsCredsArgs(env.pkiDir, 'server') });
  try {
    await dst.setCapabilities({ events: true, multifd: true });
    await dst.setParameters({ 'multifd-channels': channels, 'tls-creds': tls ? 'tls0' : '' });
    await sourceMultifd(env, channels, tls);
    await dst.migrateIncoming('tcp:127.0.0.1:0');
    const port = await q.incomingPort(dst);
    const since = src.qmp.events.length;
    const dsince = dst.qmp.events.length;
    syncDisks();
    const sampler = new ThreadCpuSampler(() => [src.pid, dst.pid]);
    await src.migrate(`tcp:127.0.0.1:${port}`);
    await q.waitMigrationEvent(dst, 'completed', 300_000, dsince);
    const cpu = sampler.stop();
    await q.waitMigrationEvent(src, 'completed', 60_000, since);
    const setup = eventUsSince(src, since, 'setup');
    const done = eventUsSince(dst, dsince, 'completed');
    if (setup === undefined || done === undefined) throw new Error('no MIGRATION setup/completed event');
    const seconds = (done - setup) / 1e6;
    return { seconds, gbps: (mib * MiB) / seconds / 1e9, cpu };
  } finally {
    await dst.stop();
    await resetSource(src);
  }
}

/** `stats` of a `qmt … --json` output, undefined when it is not that. */
function jsonStats(stdout: string): unknown {
  try {
    return (JSON.parse(stdout) as { stats?: unknown }).stats;
  } catch {
    return undefined;
  }
}

async function qemuToReceive(env: Env, channels: number, tls: boolean, node: string | undefined, threads: 'on' | 'off' | undefined): Promise<MultifdRun> {
  const { q, src, mib } = env;
  const out = join(env.work, `saved-${channels}-${tls ? 'tls' : 'plain'}`);
  const args = ['receive', '--listen', 'tcp:127.0.0.1:0', '--out', out, '--progress', 'none', '--json', '--multifd', String(channels), ...(tls ? ['--tls', env.pkiDir] : []), ...(threads ? ['--threads', threads] : [])];
  const recv = startQmtCli(args, node ? { node } : {});
  try {
    const uri = (await recv.stderrMatches(/^qmt: listening on (\S+)/m))[1]!;
    await sourceMultifd(env, channels, tls);
    const since = src.qmp.events.length;
    syncDisks();
    const sampler = new ThreadCpuSampler(() => [src.pid, recv.child.pid]);
    await src.migrate(uri);
    const r = await Promise.race([recv.exit, new Promise<never>((_, rej) => setTimeout(() => rej(new Error('qmt receive: no exit within 300 s')), 300_000).unref())]);
    const cpu = sampler.stop();
    if (r.code !== 0) throw new Error(`qmt receive exited ${r.code ?? r.signal}: ${r.stderr.slice(-1500)}`);
    // Its own word on threads (--json: stats.threads), so that a row says what ran.
    const td = threadsOf(jsonStats(r.stdout));
    if (threads === 'on' && td && !td.used) throw new FeatureMissing(`threads not used: ${td.why}`);
    await q.waitMigrationEvent(src, 'completed', 30_000, since);
    const setup = eventUsSince(src, since, 'setup');
    if (setup === undefined) throw new Error('no MIGRATION setup event on the source');
    const seconds = (r.exitUs - setup) / 1e6;
    // The sampler misses the last instants of a process that exits: qmt's own total (process.cpuUsage at exit) is the floor.
    const own = r.cpu ? r.cpu.userS + r.cpu.systemS : 0;
    return { seconds, gbps: (mib * MiB) / seconds / 1e9, cpu: { ...cpu, totalS: Math.max(cpu.totalS, own) }, ...(td ? { threadsUsed: { dest: td.used }, workers: td.channels.length } : {}) };
  } finally {
    if (recv.child.exitCode === null && recv.child.signalCode === null) recv.child.kill('SIGKILL');
    await rm(out, { recursive: true, force: true });
    await resetSource(src);
  }
}

/** The paused source QEMU's RAM and devices as a saved VM (our DestinationSession into a DirectorySink, no multifd): what `qmt send` restores. */
async function captureSavedVm(env: Env, dir: string): Promise<void> {
  const { DestinationSession, DirectorySink, RAM_DIR, writeSavedVm } = await import('../src/protocol/index.js');
  const sink = new DirectorySink(join(dir, RAM_DIR));
  const session = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, idleTimeoutMs: 60_000 });
  try {
    await env.src.setCapabilities({ multifd: false });
    await env.src.setParameters({ 'tls-creds': '', 'tls-hostname': '' });
    await env.src.migrate(session.uri);
    await env.src.waitMigration(['completed'], 300_000);
    const manifest = await writeSavedVm(dir, await session.done);
    if (!manifest.complete) throw new Error(`capture incomplete: ${JSON.stringify(manifest.error)}`);
  } finally {
    session.close();
    await sink.close();
    await resetSource(env.src);
  }
}

/** `qmt send --from DIR --multifd N` → a waiting QEMU (multifd N): timed from the destination's first MIGRATION event to its `completed`. */
async function sendToQemu(env: Env, channels: number, tls: boolean, vmDir: string, node: string | undefined): Promise<MultifdRun> {
  const { q, mib } = env;
  const dst = await q.startQemuIn(undefined, { name: 'multifd-dst', memoryMiB: mib, guest: env.guest, incoming: true, extraArgs: q.tlsCredsArgs(env.pkiDir, 'server') });
  try {
    await dst.setCapabilities({ events: true, multifd: true });
    await dst.setParameters({ 'multifd-channels': channels, 'tls-creds': tls ? 'tls0' : '' });
    await dst.migrateIncoming('tcp:127.0.0.1:0');
    const uri = `tcp:127.0.0.1:${await q.incomingPort(dst)}`;
    const dsince = dst.qmp.events.length;
    syncDisks();
    const run = startQmtCli(['send', '--from', vmDir, '--to', uri, '--progress', 'none', '--multifd', String(channels), ...(tls ? ['--tls', env.pkiDir, '--tls-hostname', 'localhost'] : [])], node ? { node } : {});
    const sampler = new ThreadCpuSampler(() => [dst.pid, run.child.pid]);
    const r = await Promise.race([run.exit, new Promise<never>((_, rej) => setTimeout(() => rej(new Error('qmt send: no exit within 300 s')), 300_000).unref())]);
    if (r.code !== 0) throw new Error(`qmt send exited ${r.code ?? r.signal}: ${r.stderr.slice(-1500)}`);
    await q.waitMigrationEvent(dst, 'completed', 60_000, dsince);
    const cpu = sampler.stop();
    const first = dst.qmp.events.slice(dsince).find((e) => e.event === 'MIGRATION');
    const done = eventUsSince(dst, dsince, 'completed');
    if (!first || done === undefined) throw new Error('no MIGRATION events on the destination');
    const seconds = (done - (first.timestamp.seconds * 1e6 + first.timestamp.microseconds)) / 1e6;
    const own = r.cpu ? r.cpu.userS + r.cpu.systemS : 0;
    return { seconds, gbps: (mib * MiB) / seconds / 1e9, cpu: { ...cpu, totalS: Math.max(cpu.totalS, own) } };
  } finally {
    await dst.stop();
  }
}

async function libraryRun(ctx: PartContext, bytes: number, channels: number, pkiDir: string, threads: 'on' | 'off', node: string | undefined): Promise<MultifdRun> {
  const src = ctx.track(BenchChild.start<SessionCommand>('source', SESSION_PEER, [], [], [], node));
  const dst = ctx.track(BenchChild.start<SessionCommand>('dest', SESSION_PEER, [], [], [], node));
  try {
    const [{ uri }] = await Promise.all([
      dst.call<{ uri: string }>({ cmd: 'dest-listen', host: '127.0.0.1', postcopy: false, sink: { kind: 'memory', shared: true, prefault: [{ idstr: RAM_BLOCK, length: bytes }] }, tlsDir: pkiDir, multifd: channels, threads }, 120_000),
      src.call({ cmd: 'source-prepare', memory: { kind: 'pattern', bytes, shared: true } }, 120_000),
    ]);
    const sampler = new ThreadCpuSampler(() => [src.pid, dst.pid]);
    const [s, d] = await Promise.all([
      src.call<SourceRun>({ cmd: 'source-migrate', to: uri, policy: 'never', preempt: false, hash: true, timeoutMs: 300_000, tlsDir: pkiDir, multifd: channels, threads }, 310_000),
      dst.call<DestinationRun>({ cmd: 'dest-wait', timeoutMs: 300_000, hash: true }, 310_000),
    ]);
    // Both ends hash their RAM after the migration (the ✓ check), inside the sampled interval: not the transfer's CPU.
    const cpu = sampler.stop(new Map([...(src.pid !== undefined ? ([[src.pid, s.hashCpuS ?? 0]] as const) : []), ...(dst.pid !== undefined ? ([[dst.pid, d.hashCpuS ?? 0]] as const) : [])]));
    const seconds = (d.completedUs - s.startUs) / 1e6;
    const ts = threadsOf(s.stats);
    const td = threadsOf(d.stats);
    // Neither end in threads although asked: not the row it says (one end without them is reported in the row).
    if (threads === 'on' && !ts?.used && !td?.used) throw new FeatureMissing(ts || td ? `threads not used: ${[ts?.why, td?.why].filter(Boolean).join('; ')}` : 'the sessions report no stats.threads');
    return {
      seconds,
      gbps: bytes / seconds / 1e9,
      cpu,
      ...(ts || td ? { threadsUsed: { ...(ts ? { source: ts.used } : {}), ...(td ? { dest: td.used } : {}) }, workers: (ts?.channels.length ?? 0) + (td?.channels.length ?? 0) } : {}),
      identical: s.hash !== undefined && s.hash === d.hash,
    };
  } finally {
    await Promise.all([ctx.release(src), ctx.release(dst)]);
  }
}

function summarise(v: MultifdVariant, guestBytes: number): void {
  const s = runStats(v.runs.map((r) => r.gbps));
  if (s) v.stats = s;
  const gb = guestBytes / 1e9;
  const m = (f: (r: MultifdRun) => number): number | undefined => median(v.runs.map(f));
  const set = <K extends 'cpuPerGb' | 'busiestPerGb' | 'coresUsed' | 'osThreads' | 'busyThreads'>(k: K, x: number | undefined): void => {
    if (x !== undefined) v[k] = x;
  };
  set('cpuPerGb', m((r) => r.cpu.totalS / gb));
  set('busiestPerGb', m((r) => (r.cpu.busiest?.cpuS ?? NaN) / gb));
  set('coresUsed', m((r) => r.cpu.totalS / r.seconds));
  set('osThreads', m((r) => r.cpu.threads));
  set('busyThreads', m((r) => r.cpu.busyThreads));
}

function markdown(d: MultifdData): string {
  const lines: string[] = [];
  lines.push(
    `Guest: ${fmt(d.guestBytes / MiB)} MiB, every page holding data, paused (one precopy pass); loopback, both ends on this ${d.cores}-core machine; ${d.runs} round${d.runs === 1 ? '' : 's'}, each running every row once (interleaved), \`sync\` before each timed run. GB/s = guest RAM bytes (10⁹) per second. Median (min–max) of the runs. CPU = every thread of every process of the row (QEMUs; \`qmt receive\` and the process it runs; both library peers) from /proc/PID/task/TID/stat, sampled every 100 ms during the run: core-seconds per GB; cores used = that CPU over the run's wall time; threads = OS threads seen (Node's and QEMU's own included) / those that kept ≥ 5 % of a core busy; busiest = the one thread's core-seconds per GB (a serial limit).${d.qemuVersion ? ` ${d.qemuVersion}, TCG test guest.` : ''}${d.node ? ` \`qmt receive\` and the library peers under Node.js ${d.node}.` : ''}`,
    '',
    `| transfer | kind | channels | GB/s median (min–max) | vs 1 channel | vs QEMU → QEMU, same kind and channels | CPU s/GB (all threads) | busiest thread s/GB | cores used (of ${d.cores}) | threads: seen / busy | CPU ceiling here (${d.cores} cores) | expected on ${d.referenceCores} cores |`,
    '|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|',
  );
  for (const v of d.variants) {
    const last = v.runs[v.runs.length - 1];
    const yn = (b: boolean | undefined): string => (b === undefined ? 'no stats' : b ? 'yes' : 'no');
    const used = !last?.threadsUsed
      ? ''
      : v.row === 'library'
        ? ` (in threads: source ${yn(last.threadsUsed.source)}, destination ${yn(last.threadsUsed.dest)}; ${last.workers ?? 0} workers)`
        : ` (in threads: ${yn(last.threadsUsed.dest)}; ${last.workers ?? 0} workers)`;
    const label = `${MULTIFD_LABEL[v.row]}${v.threads ? `, threads ${v.threads}${used}` : ''}`;
    const kind = v.kind === 'tls' ? 'TLS 1.3' : 'plain TCP';
    if (v.unavailable) {
      lines.push(`| ${label} | ${kind} | ${v.channels} | ${notAvailable(v.unavailable)} | | | | | | | | |`);
      continue;
    }
    const err = v.errors.length > 0 ? ` (errors: ${v.errors.join('; ')})` : '';
    const ident = v.row === 'library' && v.runs.length > 0 ? (v.runs.every((r) => r.identical) ? ' ✓' : ' ✗ RAM differs') : '';
    const one = d.variants.find((x) => x.row === v.row && x.kind === v.kind && x.threads === v.threads && x.channels === 1)?.stats?.median;
    const qq = d.variants.find((x) => x.row === 'qemu-qemu' && x.kind === v.kind && x.channels === v.channels)?.stats?.median;
    const r1 = v.channels === 1 ? '1.00× (baseline)' : ratio(v.stats?.median, one) === undefined ? '–' : `${fmt(ratio(v.stats?.median, one), 2)}×`;
    const rq = v.row === 'qemu-qemu' ? '1.00× (baseline)' : ratio(v.stats?.median, qq) === undefined ? '–' : `${fmt(ratio(v.stats?.median, qq), 2)}×`;
    const here = expectedGbps(d.cores, v.cpuPerGb, v.busiestPerGb);
    const big = expectedGbps(d.referenceCores, v.cpuPerGb, v.busiestPerGb);
    lines.push(
      `| ${label}${ident}${err} | ${kind} | ${v.channels} | ${fmtStats(v.stats, 2)} | ${r1} | ${rq} | ${fmt(v.cpuPerGb, 2)} | ${fmt(v.busiestPerGb, 2)} | ${fmt(v.coresUsed, 2)} | ${fmt(v.osThreads)} / ${fmt(v.busyThreads)} | ${here === undefined ? '–' : `${fmt(here, 2)} GB/s`} | ${big === undefined ? '–' : `${fmt(big, 2)} GB/s`} |`,
    );
  }
  lines.push('', 'Where the CPU went, per thread (the last run of each row; QEMU names its threads, e.g. `multifdsend_N`, `live_migration`; Node its workers after their `name`):', '');
  for (const v of d.variants) {
    const last = v.runs[v.runs.length - 1];
    if (!last) continue;
    lines.push(`- ${MULTIFD_LABEL[v.row]}${v.threads ? `, threads ${v.threads}` : ''}, ${v.kind === 'tls' ? 'TLS' : 'plain'}, ${v.channels} channel${v.channels === 1 ? '' : 's'}: ${topThreads(last.cpu, 6)}`);
  }
  lines.push('', `Aim (issue 13), reported, not asserted: on these ${d.cores}-core machines 2 TLS channels ≥ ${MULTIFD_TLS_2_VS_1}× the throughput of one:`, '');
  for (const [row, threads] of MULTIFD_AIM_ROWS) {
    if (!multifdAimRowMeasured(d, row, threads)) continue;
    const s = multifdScaling(d, row, threads);
    lines.push(
      `- ${MULTIFD_LABEL[row]}${threads ? `, threads ${threads}` : ''}${row === 'qemu-qemu' ? ' (reference)' : ''}: ${s.unavailable ? notAvailable(s.unavailable) : s.ratio === undefined ? 'not measured' : `${fmt(s.two, 2)} / ${fmt(s.one, 2)} GB/s = ${fmt(s.ratio, 2)}× — ${s.ratio >= MULTIFD_TLS_2_VS_1 ? 'met' : 'missed'}`}`,
    );
  }
  lines.push(
    '',
    `Expected on ${d.referenceCores} cores: GB/s = min(cores / CPU s per GB, 1 / busiest thread's s per GB) — all the row's CPU spread over the cores, but never faster than its busiest thread can go on one core: the ceiling the CPU cost sets. The same formula with this machine's ${d.cores} cores ("CPU ceiling here") checks it: a row measured well below its ceiling here was not CPU-bound (it waited on something else: the link, the disk, a lock, the other end), and the ${d.referenceCores}-core figure is then an upper bound too. It assumes the per-GB cost measured here holds there (same core speed, no contention, the link not the limit) and both ends on the one host, as here; with each end on its own host of that size it is higher. Rerun unchanged on the bigger host to measure it: \`npm run bench -- --only multifd\`.`,
  );
  if (d.skipped) lines.push('', `Skipped: ${d.skipped}.`);
  return lines.join('\n');
}

await runPart<MultifdData>('multifd', 'Multifd: throughput and CPU per GB by channel count', { mib: { type: 'string' }, runs: { type: 'string' }, channels: { type: 'string' }, rows: { type: 'string' } }, async (ctx) => {
  // --rows qemu-qemu,library …: a subset (the report then has only those).
  const rows = ctx.options.rows ? String(ctx.options.rows).split(',') : undefined;
  const mib = Number(ctx.options.mib ?? (ctx.quick ? 256 : 1024));
  const runs = Number(ctx.options.runs ?? (ctx.quick ? 1 : 3));
  const channelCounts = String(ctx.options.channels ?? '1,2,4')
    .split(',')
    .map(Number)
    .filter((n) => Number.isInteger(n) && n >= 1 && n <= 255);
  const bytes = mib * MiB;
  const node = threadsNode();
  const data: MultifdData = { guestBytes: bytes, runs, cores: os.cpus().length, referenceCores: REFERENCE_CORES, variants: [], ...(node ? { node: node.version } : {}) };
  const cliWhy = builtCliProblem() ?? (cliHasFlag('receive', '--multifd') ? undefined : 'this build of `qmt receive` has no `--multifd`');
  const sendWhy = builtCliProblem() ?? (cliHasFlag('send', '--multifd') ? undefined : 'this build of `qmt send` has no `--multifd`');
  const libWhy = multifdUnavailable('both');
  // Threads on is the row of the issue; off next to it (same run) shows what the threads bring. Without threads in the tree: off only.
  const libThreads = threadsUnavailable() ? (['off'] as const) : (['on', 'off'] as const);
  // `qmt receive`: both, where its build has --threads (its 'auto' is one thread on fewer than 4 cores); else its default alone.
  const recvThreads = !threadsUnavailable() && !cliWhy && cliHasFlag('receive', '--threads') ? (['on', 'off'] as const) : ([undefined] as const);
  const q = await import('./lib/qemu.js');
  const qemuWhy = await q.qemuUnavailable();
  for (const kind of ['plain', 'tls'] as const) {
    for (const channels of channelCounts) {
      data.variants.push({ row: 'qemu-qemu', kind, channels, runs: [], errors: [], ...(qemuWhy ? { unavailable: qemuWhy } : {}) });
      for (const threads of recvThreads) data.variants.push({ row: 'qemu-receive', kind, channels, ...(threads ? { threads } : {}), runs: [], errors: [], ...((qemuWhy ?? cliWhy) ? { unavailable: (qemuWhy ?? cliWhy)! } : {}) });
      data.variants.push({ row: 'send-qemu', kind, channels, runs: [], errors: [], ...((qemuWhy ?? sendWhy) ? { unavailable: (qemuWhy ?? sendWhy)! } : {}) });
      if (kind === 'tls') for (const threads of libThreads) data.variants.push({ row: 'library', kind, channels, threads, runs: [], errors: [], ...(libWhy ? { unavailable: libWhy } : {}) });
    }
  }
  const work = await ctx.tmpDir('multifd');
  const pkiDir = join(work, 'pki');
  await initPkiDir(pkiDir);
  let env: Env | undefined;
  let vmDir: string | undefined;
  if (!qemuWhy) {
    data.qemuVersion = await q.qemuVersion();
    ctx.onCleanup(() => q.stopAll());
    const guest = { startMiB: 1, endMiB: mib, direction: 'up' as const };
    ctx.log(`starting the QEMU source (${mib} MiB, test guest walking all of it once) …`);
    const src = await q.startQemuIn(undefined, { name: 'multifd-src', memoryMiB: mib, guest, extraArgs: q.tlsCredsArgs(pkiDir, 'client') });
    await src.waitSerialPasses(1, 120_000);
    await src.pauseVm();
    await src.setCapabilities({ events: true });
    await src.setParameters({ ...q.UNLIMITED });
    env = { q, ctx, mib, pkiDir, work, src, guest };
    ctx.log('warm-up migration (not counted) …');
    await qemuToQemu(env, 1, false);
    if (data.variants.some((v) => v.row === 'send-qemu' && !v.unavailable)) {
      ctx.log('capturing the guest into a saved VM for `qmt send` …');
      vmDir = join(work, 'saved-vm');
      await captureSavedVm(env, vmDir);
    }
  }
  for (let round = 0; round < runs; round++) {
    for (const v of data.variants) {
      if (v.unavailable || (rows && !rows.includes(v.row))) continue;
      const tls = v.kind === 'tls';
      try {
        const r =
          v.row === 'qemu-qemu'
            ? await qemuToQemu(env!, v.channels, tls)
            : v.row === 'qemu-receive'
              ? await qemuToReceive(env!, v.channels, tls, node?.path, v.threads)
              : v.row === 'send-qemu'
                ? await sendToQemu(env!, v.channels, tls, vmDir!, node?.path)
                : await libraryRun(ctx, bytes, v.channels, pkiDir, v.threads ?? 'off', node?.path);
        v.runs.push(r);
        ctx.log(`round ${round + 1}/${runs}: ${v.row}${v.threads ? ` threads ${v.threads}` : ''} ${v.kind} ×${v.channels}: ${fmt(r.gbps, 2)} GB/s, CPU ${fmt(r.cpu.totalS, 2)} s (${fmt(r.cpu.totalS / r.seconds, 2)} cores, ${r.cpu.busyThreads}/${r.cpu.threads} threads busy)${r.identical === false ? ' — RAM DIFFERS' : ''}`);
      } catch (e) {
        const refused = threadsRefused(e);
        if (e instanceof FeatureMissing || refused) {
          v.unavailable = refused ?? (e as Error).message;
          ctx.log(`${v.row} ${v.kind} ×${v.channels}: not available: ${v.unavailable}`);
          continue;
        }
        v.errors.push(e instanceof Error ? e.message.split('\n')[0]! : String(e));
        ctx.log(`round ${round + 1}: ${v.row} ${v.kind} ×${v.channels} failed: ${String(e)}`);
      }
    }
  }
  for (const v of data.variants) summarise(v, bytes);
  if (rows) data.variants = data.variants.filter((v) => rows.includes(v.row));
  const svg = await barChartSvg(
    `Multifd throughput by channel count, ${fmt(mib)} MiB guest over loopback (median of ${runs}; whiskers: min–max)`,
    'GB/s',
    data.variants.filter((v) => v.stats).map((v) => ({ group: `${MULTIFD_LABEL[v.row]}${v.threads ? `, threads ${v.threads}` : ''}`, label: `${v.kind === 'tls' ? 'TLS' : 'plain'}, ${v.channels} channel${v.channels === 1 ? '' : 's'}`, value: v.stats!.median, min: v.stats!.min, max: v.stats!.max })),
  );
  await mkdir(ctx.out, { recursive: true });
  await writeFile(join(ctx.out, 'multifd-throughput.svg'), svg);
  return { config: { mib, runs, channels: channelCounts, host: '127.0.0.1', referenceCores: REFERENCE_CORES }, data, markdown: markdown(data) };
});
