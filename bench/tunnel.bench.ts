/**
 * `qmt tunnel`'s overhead (part of `npm run bench`; alone: `node --import tsx
 * bench/tunnel.bench.ts [--quick] [--runs N] [--mib N]`; needs QEMU and the
 * built CLI). Two QEMU 10.0 on loopback, three ways between them, interleaved
 * in every round:
 *   - direct: the source QEMU migrates to the destination QEMU itself;
 *   - tunnel: QEMU → `qmt tunnel entry` → `qmt tunnel exit` → QEMU, plain
 *     QEMU sides, mutual TLS on the hop (the built CLI, two processes);
 *   - relay: the KubeVirt way, a per-connection TLS byte relay pair
 *     (bench/lib/tls-relay.ts, two processes: plain in, TLS between, plain out).
 * Throughput: a paused guest of `--mib` MiB (every page holding data), one
 * precopy pass, timed by the source's MIGRATION events (setup → completed);
 * direct over QEMU's own TLS (the aim's baseline: ≥ 0.9× a direct QEMU → QEMU
 * TLS migration). Urgent latency: postcopy with preempt after one pass, the
 * test guest walking its RAM top-down, every request timed by a `qmt tap`
 * (its own process) in front of the destination QEMU — REQ_PAGES passing the
 * tap → the page passing it, which includes the way through the tunnel and
 * back; direct is then plain (the tap cannot read QEMU's TLS). Aim: p99
 * through the tunnel ≤ 1.2× direct. CPU: every thread of every process of
 * the row. Prints figures; asserts nothing.
 */
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { spawn, type ChildProcess } from 'node:child_process';
import { initPkiDir } from '../src/transport/pki.js';
import { BenchChild, REPO_ROOT } from './lib/child.js';
import { runPart, runSync, type PartContext } from './lib/part.js';
import { builtCliProblem, startQmtCli, type QmtCliRun } from './lib/qmt-cli.js';
import { fmt } from './lib/report.js';
import { fmtRatio, fmtStats, runStats, summarize, type LatencySummary, type RunStats } from './lib/stats.js';
import type { TapCommand, TapRun } from './lib/tap-peer.js';
import { ThreadCpuSampler, topThreads, type ThreadCpuReport } from './lib/thread-cpu.js';
import { profileMarkdown, summarizeProfiles } from './lib/cpuprofile.js';
import os from 'node:os';

const MiB = 1024 * 1024;
const TAP_PEER = fileURLToPath(new URL('./lib/tap-peer.ts', import.meta.url));
const TLS_RELAY = fileURLToPath(new URL('./lib/tls-relay.ts', import.meta.url));
/** Aims of issue 15. */
export const TUNNEL_THROUGHPUT_AIM = 0.9;
export const TUNNEL_P99_AIM = 1.2;

export type TunnelWay = 'direct' | 'tunnel' | 'relay';
const WAYS: readonly TunnelWay[] = ['direct', 'tunnel', 'relay'];
const LABEL: Record<TunnelWay, string> = {
  direct: 'QEMU → QEMU direct',
  tunnel: 'QEMU → `qmt tunnel entry` → `qmt tunnel exit` → QEMU',
  relay: 'QEMU → TLS byte relay pair (the KubeVirt way) → QEMU',
};

interface ThroughputRun {
  gbps: number;
  seconds: number;
  cpu: ThreadCpuReport;
}

export interface TunnelData {
  mib: number;
  latencyMib: number;
  runs: number;
  throughput: Record<TunnelWay, { runs: ThroughputRun[]; errors: string[]; stats?: RunStats; cpuPerGb?: number }>;
  latency: Record<TunnelWay, { samplesUs: number[]; errors: string[]; summary?: LatencySummary; p99s: number[]; p50s: number[]; p99?: RunStats; p50?: RunStats; cores: number[]; last?: ThreadCpuReport }>;
  /** The tunnel's two processes under V8's profiler, in the last round's runs. */
  profiles?: { throughput?: string; urgent?: string };
  unavailable?: string;
}

type Qemu = typeof import('./lib/qemu.js');

/** The way between a source and `to` (the destination QEMU's URI): where the source connects, and how to end it. */
async function startWay(ctx: PartContext, way: TunnelWay, to: string, pki: string, profileDir?: string): Promise<{ uri: string; pids: () => (number | undefined)[]; stop: () => Promise<void> }> {
  if (way === 'direct') return { uri: to, pids: () => [], stop: async () => undefined };
  if (way === 'tunnel') {
    const prof = profileDir ? { cpuProfDir: profileDir } : {};
    const exit = startQmtCli(['tunnel', 'exit', '--listen', 'tcp:127.0.0.1:0', '--to', to, '--tls', pki], prof);
    const exitUri = (await exit.stderrMatches(/^qmt: tunnel exit listening on (\S+),/m))[1]!;
    const entry = startQmtCli(['tunnel', 'entry', '--listen', 'tcp:127.0.0.1:0', '--to', exitUri, '--tls', pki, '--tls-hostname', 'localhost'], prof);
    const uri = (await entry.stderrMatches(/^qmt: tunnel entry listening on (\S+),/m))[1]!;
    const stop = async (r: QmtCliRun): Promise<void> => {
      r.child.kill('SIGTERM');
      await r.exit;
    };
    return { uri, pids: () => [entry.child.pid, exit.child.pid], stop: () => Promise.all([stop(entry), stop(exit)]).then(() => undefined) };
  }
  const relay = (side: 'in' | 'out', listen: string, target: string): Promise<{ child: ChildProcess; uri: string }> =>
    new Promise((resolve, reject) => {
      const child = spawn(process.execPath, ['--import', 'tsx', TLS_RELAY, side, listen, target, pki], { cwd: REPO_ROOT, stdio: ['ignore', 'pipe', 'inherit'] });
      ctx.onCleanup(async () => void child.kill('SIGKILL'));
      let out = '';
      child.stdout!.setEncoding('utf8').on('data', (d: string) => {
        out += d;
        const m = /listening on (\S+)/.exec(out);
        if (m) resolve({ child, uri: m[1]! });
      });
      child.once('exit', (c) => reject(new Error(`tls-relay ${side} exited ${c}`)));
    });
  const out = await relay('out', 'tcp:127.0.0.1:0', to);
  const inn = await relay('in', 'tcp:127.0.0.1:0', out.uri);
  return {
    uri: inn.uri,
    pids: () => [inn.child.pid, out.child.pid],
    stop: async () => {
      for (const c of [inn.child, out.child]) c.kill('SIGKILL');
    },
  };
}

async function throughputRun(ctx: PartContext, q: Qemu, way: TunnelWay, mib: number, pki: string, profileDir?: string): Promise<ThroughputRun> {
  const guest = { startMiB: 1, endMiB: mib, direction: 'up' as const };
  const tls = way === 'direct';
  const src = await q.startQemuIn(undefined, { name: 'tunnel-src', memoryMiB: mib, guest, ...(tls ? { extraArgs: q.tlsCredsArgs(pki, 'client') } : {}) });
  const dst = await q.startQemuIn(undefined, { name: 'tunnel-dst', memoryMiB: mib, guest, incoming: true, ...(tls ? { extraArgs: q.tlsCredsArgs(pki, 'server') } : {}) });
  const dstUri = `unix:${join(dst.dir, 'migrate.sock')}`;
  const w = await startWay(ctx, way, dstUri, pki, profileDir);
  try {
    await src.waitSerialPasses(1, 120_000);
    await src.pauseVm();
    runSync('sync', []);
    const sampler = new ThreadCpuSampler(() => [src.pid, dst.pid, ...w.pids()]);
    const r = await q.migrateBetween(src, dst, {
      uri: dstUri,
      connectUri: w.uri,
      capabilities: { events: true },
      sourceParameters: { ...q.UNLIMITED, ...(tls ? { 'tls-creds': 'tls0', 'tls-hostname': 'localhost' } : {}) },
      ...(tls ? { destinationParameters: { 'tls-creds': 'tls0' } } : {}),
      timeoutMs: 300_000,
    });
    const cpu = sampler.stop();
    const setup = q.migrationEventUs(src, 'setup');
    const done = q.migrationEventUs(src, 'completed');
    const seconds = setup !== undefined && done !== undefined ? (done - setup) / 1e6 : r.durationMs / 1000;
    return { gbps: (mib * MiB) / seconds / 1e9, seconds, cpu };
  } finally {
    await w.stop();
    await Promise.all([src.stop(), dst.stop()]);
  }
}

interface LatencyRun {
  samplesUs: number[];
  cpu: ThreadCpuReport;
}

async function latencyRun(ctx: PartContext, q: Qemu, way: TunnelWay, mib: number, pki: string, profileDir?: string): Promise<LatencyRun> {
  const guest = { startMiB: 1, endMiB: mib, direction: 'down' as const };
  const src = await q.startQemuIn(undefined, { name: 'tunnel-lat-src', memoryMiB: mib, guest });
  const dst = await q.startQemuIn(undefined, { name: 'tunnel-lat-dst', memoryMiB: mib, guest, incoming: true });
  const dstUri = `unix:${join(dst.dir, 'migrate.sock')}`;
  const tap = ctx.track(BenchChild.start<TapCommand>('tap', TAP_PEER));
  try {
    const { uri: tapUri } = await tap.call<{ uri: string }>({ cmd: 'tap-start', listen: 'tcp:127.0.0.1:0', to: dstUri }, 15_000);
    const w = await startWay(ctx, way, tapUri, pki, profileDir);
    try {
      await src.waitSerialPasses(2, 60_000);
      const sampler = new ThreadCpuSampler(() => [src.pid, dst.pid, tap.pid, ...w.pids()]);
      await q.migrateBetween(src, dst, {
        uri: dstUri,
        connectUri: w.uri,
        capabilities: { events: true, 'postcopy-ram': true, 'postcopy-preempt': true },
        sourceParameters: { ...q.UNLIMITED, 'downtime-limit': 1, 'max-postcopy-bandwidth': 0 },
        postcopyAfterPasses: 2,
        timeoutMs: 180_000,
      });
      const cpu = sampler.stop();
      const tr = await tap.call<TapRun>({ cmd: 'tap-wait', timeoutMs: 20_000 }, 25_000);
      return { samplesUs: tr.samplesUs, cpu };
    } finally {
      await w.stop();
    }
  } finally {
    await ctx.release(tap);
    await Promise.all([src.stop(), dst.stop()]);
  }
}

/** The entry's and the exit's profiles (told apart by their top functions' files: both are `qmt tunnel`). */
function profilesOf(dir: string): string {
  return summarizeProfiles(dir, 8)
    .map((p, i) => profileMarkdown(`qmt tunnel, process ${i + 1}`, p))
    .join('\n\n');
}

function markdown(d: TunnelData): string {
  const lines: string[] = [];
  if (d.unavailable) return `Not run: ${d.unavailable}.`;
  lines.push(
    `Two QEMU 10.0 on loopback, three ways between them, interleaved in each of ${d.runs} round(s); medians (min–max). Throughput: a paused ${fmt(d.mib)} MiB guest, every page holding data, one precopy pass, \`max-bandwidth\` unlimited, timed by the source's MIGRATION events; direct over QEMU's own TLS 1.3, the tunnel and the relay with plain QEMU sides and TLS 1.3 on the hop. CPU: every thread of the QEMUs and of the processes in between, core-seconds per GB.`,
    '',
    '| way | GB/s | vs direct TLS | CPU s/GB | errors |',
    '|---|--:|--:|--:|---|',
  );
  const base = d.throughput.direct.stats?.median;
  for (const w of WAYS) {
    const t = d.throughput[w];
    lines.push(`| ${LABEL[w]}${w === 'direct' ? ' (QEMU TLS)' : ''} | ${fmtStats(t.stats, 2)} | ${w === 'direct' ? '1.00× (baseline)' : fmtRatio(t.stats?.median, base)} | ${fmt(t.cpuPerGb, 2)} | ${t.errors.join('; ')} |`);
  }
  lines.push(
    '',
    `Urgent latency: postcopy with preempt after one pass, a ${fmt(d.latencyMib)} MiB test guest walking its RAM top-down (its faults land behind the background stream); every request timed by \`qmt tap\` in front of the destination QEMU (REQ_PAGES passing it → the page passing it: the way through the tunnel and back included). Direct is plain here (the tap cannot read QEMU's TLS). p50/p99: median over the rounds of each round's percentile; all: the percentiles of every request of every round.`,
    '',
    '| way | requests | p50 ms | p99 ms | p99 vs direct | all: p50 / p99 ms | cores used (of the machine) | busiest threads (last run) | errors |',
    '|---|--:|--:|--:|--:|--:|--:|---|---|',
  );
  const lbase = d.latency.direct.p99?.median;
  for (const w of WAYS) {
    const l = d.latency[w];
    lines.push(
      `| ${LABEL[w]} | ${l.samplesUs.length} | ${fmtStats(l.p50, 2, 1 / 1000)} | ${fmtStats(l.p99, 2, 1 / 1000)} | ${w === 'direct' ? '1.00× (baseline)' : fmtRatio(l.p99?.median, lbase)} | ${l.summary ? `${fmt(l.summary.p50Us / 1000, 2)} / ${fmt(l.summary.p99Us / 1000, 2)}` : '–'} | ${fmtStats(runStats(l.cores), 2)} of ${os.cpus().length} | ${topThreads(l.last, 5)} | ${l.errors.join('; ')} |`,
    );
  }
  const tr = base && d.throughput.tunnel.stats ? d.throughput.tunnel.stats.median / base : undefined;
  const lr = lbase && d.latency.tunnel.p99 ? d.latency.tunnel.p99.median / lbase : undefined;
  lines.push(
    '',
    'Aims (issue 15), reported, not asserted:',
    '',
    `- throughput through the tunnel ≥ ${TUNNEL_THROUGHPUT_AIM}× direct QEMU TLS: ${tr === undefined ? 'not measured' : `${fmt(tr, 2)}× — ${tr >= TUNNEL_THROUGHPUT_AIM ? 'met' : 'missed'}`} (the relay: ${fmtRatio(d.throughput.relay.stats?.median, base)})`,
    `- urgent p99 through the tunnel ≤ ${TUNNEL_P99_AIM}× direct: ${lr === undefined ? 'not measured' : `${fmt(lr, 2)}× — ${lr <= TUNNEL_P99_AIM ? 'met' : 'missed'}`} (the relay: ${fmtRatio(d.latency.relay.p99?.median, lbase)})`,
  );
  if (d.profiles?.throughput) lines.push('', "Where the tunnel's time goes in the throughput run (V8's CPU profiler, 1 ms sampling, the last round: each process whole, start-up included; the slower a profiled run, the more idle):", '', d.profiles.throughput);
  if (d.profiles?.urgent) lines.push('', "And in the urgent run:", '', d.profiles.urgent);
  return lines.join('\n');
}

await runPart<TunnelData>('tunnel', '`qmt tunnel`: overhead against direct and against a TLS byte relay', { mib: { type: 'string' }, runs: { type: 'string' }, 'latency-mib': { type: 'string' } }, async (ctx) => {
  const mib = Number(ctx.options.mib ?? (ctx.quick ? 256 : 1024));
  const latencyMib = Number(ctx.options['latency-mib'] ?? 256);
  const runs = Number(ctx.options.runs ?? (ctx.quick ? 1 : 3));
  const empty = () => ({ runs: [] as ThroughputRun[], errors: [] as string[] });
  const emptyL = () => ({ samplesUs: [] as number[], errors: [] as string[], p50s: [] as number[], p99s: [] as number[], cores: [] as number[] });
  const data: TunnelData = { mib, latencyMib, runs, throughput: { direct: empty(), tunnel: empty(), relay: empty() }, latency: { direct: emptyL(), tunnel: emptyL(), relay: emptyL() } };
  const q = await import('./lib/qemu.js');
  const why = (await q.qemuUnavailable()) ?? builtCliProblem();
  if (why) {
    data.unavailable = why;
    return { config: { mib, runs }, data, markdown: markdown(data) };
  }
  ctx.onCleanup(() => q.stopAll());
  const work = await ctx.tmpDir('tunnel');
  const pki = join(work, 'pki');
  await mkdir(pki, { recursive: true });
  await initPkiDir(pki);
  for (let round = 0; round < runs; round++) {
    for (const w of WAYS) {
      try {
        const profileDir = w === 'tunnel' && round === runs - 1 ? join(work, 'profiles-throughput') : undefined;
        if (profileDir) await mkdir(profileDir, { recursive: true });
        const r = await throughputRun(ctx, q, w, mib, pki, profileDir);
        if (profileDir) (data.profiles ??= {}).throughput = profilesOf(profileDir);
        data.throughput[w].runs.push(r);
        ctx.log(`round ${round + 1}/${runs}: throughput ${w}: ${fmt(r.gbps, 2)} GB/s, CPU ${fmt(r.cpu.totalS, 2)} s`);
      } catch (e) {
        data.throughput[w].errors.push((e as Error).message.split('\n')[0]!);
        ctx.log(`round ${round + 1}: throughput ${w} failed: ${String(e)}`);
      }
    }
    for (const w of WAYS) {
      try {
        const profileDir = w === 'tunnel' && round === runs - 1 ? join(work, 'profiles') : undefined;
        if (profileDir) await mkdir(profileDir, { recursive: true });
        const run = await latencyRun(ctx, q, w, latencyMib, pki, profileDir);
        const s = run.samplesUs;
        const l = data.latency[w];
        l.samplesUs.push(...s);
        l.cores.push(run.cpu.totalS / run.cpu.wallS);
        l.last = run.cpu;
        if (profileDir) (data.profiles ??= {}).urgent = profilesOf(profileDir);
        const one = summarize(s);
        if (one) {
          l.p50s.push(one.p50Us);
          l.p99s.push(one.p99Us);
        }
        ctx.log(`round ${round + 1}/${runs}: urgent ${w}: ${s.length} requests, p50 ${fmt((one?.p50Us ?? 0) / 1000, 2)} ms, p99 ${fmt((one?.p99Us ?? 0) / 1000, 2)} ms`);
      } catch (e) {
        data.latency[w].errors.push((e as Error).message.split('\n')[0]!);
        ctx.log(`round ${round + 1}: urgent ${w} failed: ${String(e)}`);
      }
    }
  }
  for (const w of WAYS) {
    const t = data.throughput[w];
    const st = runStats(t.runs.map((r) => r.gbps));
    if (st) t.stats = st;
    const cpg = runStats(t.runs.map((r) => r.cpu.totalS / ((mib * MiB) / 1e9)));
    if (cpg) t.cpuPerGb = cpg.median;
    const l = data.latency[w];
    const sum = summarize(l.samplesUs);
    if (sum) l.summary = sum;
    const p50 = runStats(l.p50s);
    const p99 = runStats(l.p99s);
    if (p50) l.p50 = p50;
    if (p99) l.p99 = p99;
  }
  return { config: { mib, latencyMib, runs }, data, markdown: markdown(data) };
});
