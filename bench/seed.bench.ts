/**
 * The seed's experiment (part 4 of `npm run bench`; alone: `node --import tsx
 * bench/seed.bench.ts [--quick] [--mib N] [--runs N] [--plain]`).
 *
 * `qmt demo`'s video-streaming guest (bench/lib/synthetic-guest.ts: an OS
 * image, a hot set rewritten all the time, a streaming buffer written front
 * to back at a steady rate) migrates library → library over TLS with the
 * preempt channel, source and destination in child processes of their own:
 * postcopy at once (after 0 passes), after 1 pass, after 2 passes, and
 * precopy only. Once it runs at the destination (postcopy), the guest goes on
 * there — streaming on from where it stopped, writing its hot set — and every
 * page it touches that is not there yet is a remote fault.
 *
 * Downtime = the source's `stopped` event → the destination running
 * (POSTCOPY_RUN arrived; precopy: the migration completed there), on
 * CLOCK_MONOTONIC in both processes. Prints figures; asserts nothing.
 */
import { fileURLToPath } from 'node:url';
import { join } from 'node:path';
import { mkdir, writeFile } from 'node:fs/promises';
import type { PostcopyPolicy } from '../src/protocol/postcopy-policy.js';
import { initPkiDir } from '../src/transport/pki.js';
import { BenchChild } from './lib/child.js';
import { runPart, type PartContext } from './lib/part.js';
import { barChartSvg, fmt, summarize } from './lib/report.js';
import type { DestinationRun, SessionCommand, SourceRun } from './lib/session-peer.js';
import { fmtRatio, fmtStats, ratio, runStats, type RunStats } from './lib/stats.js';
import { videoLayout } from './lib/synthetic-guest.js';

const MiB = 1024 * 1024;
const SESSION_PEER = fileURLToPath(new URL('./lib/session-peer.ts', import.meta.url));

type PolicyName = 'immediate' | 'after-1' | 'after-2' | 'precopy';
const POLICIES: { name: PolicyName; label: string; policy: PostcopyPolicy }[] = [
  { name: 'immediate', label: 'postcopy at once (after 0 passes)', policy: { afterPasses: 0 } },
  { name: 'after-1', label: 'postcopy after 1 pass', policy: { afterPasses: 1 } },
  { name: 'after-2', label: 'postcopy after 2 passes', policy: { afterPasses: 2 } },
  { name: 'precopy', label: 'precopy only', policy: 'never' },
];

export interface SeedRun {
  downtimeMs: number;
  totalMs: number;
  /** The source's own downtime figure (stop → RUN flushed / SHUT received). */
  sourceDowntimeMs: number | undefined;
  passes: number;
  remoteFaults: number;
  faultP50Us: number | undefined;
  faultP99Us: number | undefined;
  bytesSent: number;
  preemptBytes: number;
  identical: boolean;
  streamProgress?: number;
}

interface PolicyRow {
  name: PolicyName;
  label: string;
  runs: SeedRun[];
  errors: string[];
  downtime?: RunStats;
  total?: RunStats;
  faults?: RunStats;
  p50?: RunStats;
  p99?: RunStats;
  bytes?: RunStats;
}

export interface SeedData {
  guestBytes: number;
  tls: boolean;
  rows: PolicyRow[];
}

async function seedRun(ctx: PartContext, bytes: number, policy: PostcopyPolicy, tlsDir: string | undefined): Promise<SeedRun> {
  const src = ctx.track(BenchChild.start<SessionCommand>('source', SESSION_PEER));
  const dst = ctx.track(BenchChild.start<SessionCommand>('dest', SESSION_PEER));
  const postcopy = policy !== 'never';
  try {
    const [{ uri }] = await Promise.all([
      dst.call<{ uri: string }>({ cmd: 'dest-listen', host: '127.0.0.1', postcopy, sink: { kind: 'memory' }, workload: 'video', ...(tlsDir ? { tlsDir } : {}) }, 30_000),
      src.call({ cmd: 'source-prepare', memory: { kind: 'video', bytes } }, 120_000),
    ]);
    const [s, d] = await Promise.all([
      src.call<SourceRun>({ cmd: 'source-migrate', to: uri, policy, preempt: postcopy, maxPasses: 10, hash: true, timeoutMs: 300_000, ...(tlsDir ? { tlsDir } : {}) }, 310_000),
      dst.call<DestinationRun>({ cmd: 'dest-wait', timeoutMs: 300_000, hash: true }, 310_000),
    ]);
    if (s.stoppedUs === undefined) throw new Error('the source never stopped the VM');
    const runningUs = d.postcopy ? d.runUs : d.completedUs;
    if (runningUs === undefined) throw new Error('the destination never ran');
    const faults = summarize(d.requestLatencyUs);
    const main = s.stats.channels.main?.bytesSent ?? s.stats.transferred;
    const preempt = s.stats.channels.preempt?.bytesSent ?? 0;
    return {
      downtimeMs: (runningUs - s.stoppedUs) / 1000,
      totalMs: (Math.max(d.completedUs, s.doneUs) - s.startUs) / 1000,
      sourceDowntimeMs: s.stats.downtime,
      passes: s.stats.passes,
      remoteFaults: d.stats['postcopy-requests'],
      faultP50Us: faults?.p50Us,
      faultP99Us: faults?.p99Us,
      bytesSent: main + preempt,
      preemptBytes: preempt,
      identical: s.hash !== undefined && s.hash === d.hash,
      ...(d.workload ? { streamProgress: d.workload.streamProgress } : {}),
    };
  } finally {
    await Promise.all([ctx.release(src), ctx.release(dst)]);
  }
}

function markdown(d: SeedData, runs: number): string {
  const layout = videoLayout(d.guestBytes);
  const row = (n: PolicyName): PolicyRow | undefined => d.rows.find((r) => r.name === n);
  const lines: string[] = [];
  lines.push(
    `Guest: ${fmt(d.guestBytes / MiB)} MiB, \`qmt demo\`'s video-streaming workload: a third of the pages hold data, hot set ${fmt(layout.hot.length / MiB)} MiB (${fmt(layout.hotWritesPerSec)} scattered 64-byte writes/s), streaming buffer ${fmt(layout.stream.length / MiB)} MiB written front to back at ${fmt(layout.streamBytesPerSec / MiB)} MiB/s. Library → library over loopback, ${d.tls ? 'TLS 1.3' : 'plain TCP'}, preempt channel in postcopy, source and destination in separate processes; precopy completes when the dirty set fits 300 ms (at most 10 passes). After POSTCOPY_RUN the destination's four "vCPUs" go on with the workload (reads only), each blocked on a missing page. ${runs} runs per policy, interleaved; median (min–max).`,
    '',
    '| policy | downtime (ms) | vs postcopy at once | vs precopy only | total time (ms) | precopy passes | remote faults | fault latency p50 (ms) | fault latency p99 (ms) | bytes sent (MB) | RAM identical |',
    '|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|',
  );
  const imm = row('immediate')?.downtime?.median;
  const pre = row('precopy')?.downtime?.median;
  for (const r of d.rows) {
    const m = r.downtime?.median;
    const passes = r.runs.map((x) => x.passes);
    const err = r.errors.length > 0 ? ` (errors: ${r.errors.join('; ')})` : '';
    lines.push(
      `| ${r.label}${err} | ${fmtStats(r.downtime, 1)} | ${r.name === 'immediate' ? '1.00× (baseline)' : fmtRatio(m, imm)} | ${r.name === 'precopy' ? '1.00× (baseline)' : fmtRatio(m, pre)} | ${fmtStats(r.total)} | ${passes.length > 0 ? [...new Set(passes)].join(', ') : '–'} | ${fmtStats(r.faults)} | ${fmtStats(r.p50, 2, 1 / 1000)} | ${fmtStats(r.p99, 2, 1 / 1000)} | ${fmtStats(r.bytes, 0, 1 / 1e6)} | ${r.runs.length === 0 ? '–' : r.runs.every((x) => x.identical) ? 'yes (SHA-1), every run' : 'NO'} |`,
    );
  }
  lines.push('');
  const a1 = row('after-1')?.downtime?.median;
  const r = ratio(imm, a1);
  lines.push(
    `The seed reported downtime falling from 3.5 s (postcopy at once) to under 1 s (postcopy after one pass), a ratio above 3.5. Here: postcopy at once ${fmt(imm, 1)} ms, after one pass ${fmt(a1, 1)} ms — ratio immediate / after-1 = ${r === undefined ? '–' : `${fmt(r, 2)}×`}. Downtime is measured from the source's \`stopped\` event to POSTCOPY_RUN arriving at the destination (precopy: the destination completing), both on CLOCK_MONOTONIC; it covers the device state and, in precopy, the last dirty pages. What postcopy at once costs instead shows in the remote faults: every page the guest touches first at the destination is fetched on demand.`,
    '',
    'Remote faults = REQ_PAGES sent by the destination; fault latency = request sent → page landed, at the destination. Bytes sent = main + preempt channel payload from the source.',
    '',
    'Chart: [seed-downtime.svg](seed-downtime.svg).',
  );
  return lines.join('\n');
}

await runPart<SeedData>(
  'seed',
  "The seed's experiment: when to switch to postcopy",
  { mib: { type: 'string' }, runs: { type: 'string' }, plain: { type: 'boolean', default: false } },
  async (ctx) => {
    const mib = Number(ctx.options.mib ?? (ctx.quick ? 256 : 1024));
    const runs = Number(ctx.options.runs ?? 3);
    const tls = ctx.options.plain !== true;
    const bytes = mib * MiB;
    const pkiDir = join(await ctx.tmpDir('seed'), 'pki');
    if (tls) await initPkiDir(pkiDir);
    const data: SeedData = { guestBytes: bytes, tls, rows: POLICIES.map((p) => ({ name: p.name, label: p.label, runs: [], errors: [] })) };
    for (let round = 0; round < runs; round++) {
      for (const p of POLICIES) {
        const row = data.rows.find((r) => r.name === p.name)!;
        try {
          const r = await seedRun(ctx, bytes, p.policy, tls ? pkiDir : undefined);
          row.runs.push(r);
          ctx.log(`round ${round + 1}/${runs}: ${p.name}: downtime ${fmt(r.downtimeMs, 1)} ms, total ${fmt(r.totalMs)} ms, passes ${r.passes}, faults ${r.remoteFaults}${r.identical ? '' : ', RAM DIFFERS'}`);
        } catch (e) {
          row.errors.push(e instanceof Error ? e.message.split('\n')[0]! : String(e));
          ctx.log(`round ${round + 1}: ${p.name} failed: ${String(e)}`);
        }
      }
    }
    for (const row of data.rows) {
      const set = <K extends keyof PolicyRow>(k: K, v: PolicyRow[K] | undefined): void => {
        if (v !== undefined) row[k] = v;
      };
      set('downtime', runStats(row.runs.map((r) => r.downtimeMs)));
      set('total', runStats(row.runs.map((r) => r.totalMs)));
      set('faults', runStats(row.runs.map((r) => r.remoteFaults)));
      set('p50', runStats(row.runs.flatMap((r) => (r.faultP50Us === undefined ? [] : [r.faultP50Us]))));
      set('p99', runStats(row.runs.flatMap((r) => (r.faultP99Us === undefined ? [] : [r.faultP99Us]))));
      set('bytes', runStats(row.runs.map((r) => r.bytesSent)));
    }
    const svg = await barChartSvg(
      `Downtime (source stop → destination running), ${fmt(mib)} MiB video guest (median of ${runs}; whiskers: min–max)`,
      'ms',
      data.rows.filter((r) => r.downtime).map((r) => ({ group: 'downtime', label: r.label, value: r.downtime!.median, min: r.downtime!.min, max: r.downtime!.max })),
      1,
    );
    await mkdir(ctx.out, { recursive: true });
    await writeFile(join(ctx.out, 'seed-downtime.svg'), svg);
    return { config: { mib, runs, tls, preempt: true, maxPasses: 10, downtimeLimitMs: 300, workload: videoLayout(bytes) }, data, markdown: markdown(data, runs) };
  },
);
