/**
 * The seed's experiment (part 4 of `npm run bench`; alone: `node --import tsx
 * bench/seed.bench.ts [--quick] [--mib N] [--runs N] [--plain] [--no-qemu]`),
 * as the VM feels it: stall = downtime + postcopy-blocktime (the time during
 * which every vCPU waited on a missing page at once, as QEMU defines it).
 *
 * 1. QEMU 10 → QEMU 10 with the seed guest (test/guest/guest.S with a read
 *    region: a small hot set written every pass, most of RAM read every pass
 *    and never written, as the seed's video-streaming VM reads its kernel and
 *    read-only memory), 1 Gbit/s, QEMU's own `postcopy-blocktime` on the
 *    destination; directly, and through `qmt tap` (whose blocktime is that of
 *    a one-vCPU guest: time with a request waiting — the seed guest has one).
 *
 * 2. Library → library:
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
import { barChartSvg, fmt } from './lib/report.js';
import type { DestinationRun, SessionCommand, SourceRun } from './lib/session-peer.js';
import { fmtRatio, fmtStats, ratio, runStats, summarize, type RunStats } from './lib/stats.js';
import { VIDEO_VCPUS, videoLayout } from './lib/synthetic-guest.js';
import type { TapCommand, TapRun } from './lib/tap-peer.js';

const MiB = 1024 * 1024;
const SESSION_PEER = fileURLToPath(new URL('./lib/session-peer.ts', import.meta.url));
const TAP_PEER = fileURLToPath(new URL('./lib/tap-peer.ts', import.meta.url));

type PolicyName = 'immediate' | 'after-1' | 'after-2' | 'precopy';
const POLICIES: { name: PolicyName; label: string; policy: PostcopyPolicy }[] = [
  { name: 'immediate', label: 'postcopy at once (after 0 passes)', policy: { afterPasses: 0 } },
  { name: 'after-1', label: 'postcopy after 1 pass', policy: { afterPasses: 1 } },
  { name: 'after-2', label: 'postcopy after 2 passes', policy: { afterPasses: 2 } },
  { name: 'precopy', label: 'precopy only', policy: 'never' },
];

export interface SeedRun {
  downtimeMs: number;
  /** The destination's postcopy-blocktime (ms). */
  blocktimeMs: number;
  /** downtime + blocktime: what the VM felt. */
  stallMs: number;
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
  blocktime?: RunStats;
  stall?: RunStats;
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
  /** QEMU → QEMU with the seed guest; undefined when it did not run (why in qemuSkipped). */
  qemu?: QemuSeedData;
  qemuSkipped?: string;
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
    const downtimeMs = (runningUs - s.stoppedUs) / 1000;
    const blocktimeMs = d.stats['postcopy-blocktime'];
    return {
      downtimeMs,
      blocktimeMs,
      stallMs: downtimeMs + blocktimeMs,
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

// ---- QEMU 10 → QEMU 10 with the seed guest ----------------------------------------

type Qemu = typeof import('./lib/qemu.js');
/** The seed guest's hot set (MiB range, written every pass); the read region runs from its end to `readEndMiB`. */
const SEED_HOT = { startMiB: 1, endMiB: 9 };
/** 1 Gbit/s, as the seed's link: precopy and postcopy's background stream alike. */
const LINK_BYTES_PER_SEC = 125_000_000;
/** QEMU's passes: migrateBetween switches when dirty-sync-count reaches N + 1 (the first sync comes at setup). */
const QEMU_SYNCS: Record<PolicyName, number | undefined> = { immediate: 0, 'after-1': 2, 'after-2': 3, precopy: undefined };

export interface QemuSeedRun {
  /** QEMU's own `downtime` (source query-migrate, ms). */
  downtimeMs: number;
  /** The destination's `postcopy-blocktime` (ms; 0 in precopy). */
  blocktimeMs: number;
  stallMs: number;
  /** Through the tap: its blocktime (time with a request waiting), ms. */
  tapBlocktimeMs?: number;
  totalMs: number;
  passes: number;
  remoteFaults: number;
  bytes: number;
  /** Destination after the run: the hot set's invariant holds, the read region is intact. */
  sound: boolean;
}

export interface QemuSeedRow {
  name: PolicyName;
  label: string;
  viaTap: boolean;
  runs: QemuSeedRun[];
  errors: string[];
  downtime?: RunStats;
  blocktime?: RunStats;
  stall?: RunStats;
  tapBlocktime?: RunStats;
  total?: RunStats;
  faults?: RunStats;
  bytes?: RunStats;
}

export interface QemuSeedData {
  qemuVersion: string;
  guestMiB: number;
  hot: { startMiB: number; endMiB: number };
  readEndMiB: number;
  rows: QemuSeedRow[];
}

async function qemuSeedRun(ctx: PartContext, q: Qemu, mib: number, name: PolicyName, viaTap: boolean): Promise<QemuSeedRun> {
  const guest = { ...SEED_HOT, readEndMiB: mib - 8 };
  const src = await q.startQemu({ name: 'seed-src', memoryMiB: mib, guest });
  const dst = await q.startQemu({ name: 'seed-dst', memoryMiB: mib, guest, incoming: true });
  let tap: BenchChild<TapCommand> | undefined;
  try {
    // The guest has filled its read region and gone round at least once.
    await src.waitSerialPasses(2, 120_000);
    const dstUri = `unix:${join(dst.dir, 'migrate.sock')}`;
    let connectUri = dstUri;
    if (viaTap) {
      tap = ctx.track(BenchChild.start<TapCommand>('tap', TAP_PEER));
      connectUri = (await tap.call<{ uri: string }>({ cmd: 'tap-start', listen: 'tcp:127.0.0.1:0', to: dstUri }, 15_000)).uri;
    }
    const syncs = QEMU_SYNCS[name];
    const postcopy = syncs !== undefined;
    const r = await q.migrateBetween(src, dst, {
      uri: dstUri,
      connectUri,
      capabilities: postcopy ? { 'postcopy-ram': true, 'postcopy-preempt': true } : {},
      destinationCapabilities: { 'postcopy-blocktime': true },
      sourceParameters: { 'max-bandwidth': LINK_BYTES_PER_SEC, 'max-postcopy-bandwidth': LINK_BYTES_PER_SEC },
      ...(postcopy ? { postcopyAfterPasses: syncs } : {}),
      timeoutMs: 300_000,
    });
    const tr = tap ? await tap.call<TapRun>({ cmd: 'tap-wait', timeoutMs: 20_000 }, 25_000) : undefined;
    const downtimeMs = r.source.downtime ?? Number.NaN;
    const blocktimeMs = (r.destination?.['postcopy-blocktime'] as number | undefined) ?? 0;
    // Sound: the destination runs on, its hot set keeps the invariant, its read region is what the guest wrote.
    await dst.waitSerialPasses(dst.serialPasses() + 2, 60_000);
    await dst.pauseVm();
    const mem = await q.readGuestRam(dst, mib * MiB);
    const sound = q.checkGuestInvariant(mem, SEED_HOT).ok && q.checkReadRegion(mem, SEED_HOT.endMiB * MiB, guest.readEndMiB * MiB).ok && !dst.serialLog().includes('!');
    return {
      downtimeMs,
      blocktimeMs,
      stallMs: downtimeMs + blocktimeMs,
      ...(tr ? { tapBlocktimeMs: tr.report.requests.blocktimeMs } : {}),
      totalMs: r.durationMs,
      passes: Math.max(0, (r.source.ram?.['dirty-sync-count'] ?? 1) - 1),
      remoteFaults: r.source.ram?.['postcopy-requests'] ?? 0,
      bytes: r.source.ram?.transferred ?? 0,
      sound,
    };
  } finally {
    if (tap) await ctx.release(tap);
    await Promise.all([src.stop(), dst.stop()]);
  }
}

function qemuMarkdown(d: QemuSeedData, runs: number): string[] {
  const find = (n: PolicyName, tap: boolean) => d.rows.find((r) => r.name === n && r.viaTap === tap);
  const lines = [
    `${d.qemuVersion.replace(/^QEMU emulator version /, 'QEMU ')} → QEMU over a unix socket, TCG, 1 vCPU, ${fmt(d.guestMiB)} MiB: the seed guest writes a hot set of ${fmt(d.hot.endMiB - d.hot.startMiB)} MiB every pass and reads one word of every page of a ${fmt(d.readEndMiB - d.hot.endMiB)} MiB read region, never written after its first fill. \`max-bandwidth\` and \`max-postcopy-bandwidth\` 1 Gbit/s, preempt in postcopy, \`postcopy-blocktime\` on the destination. Downtime is QEMU's own (source \`query-migrate\`); blocktime is the destination's; stall = downtime + blocktime. Through the tap: the same with \`qmt tap\` between the two, its own blocktime next to QEMU's. ${runs} runs per row, interleaved; median (min–max).`,
    '',
    '| policy | path | stall (ms) | vs after 1 pass | downtime (ms) | blocktime (ms) | tap blocktime (ms) | total time (ms) | passes | remote faults | bytes (MB) | destination sound |',
    '|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|',
  ];
  for (const r of d.rows) {
    const a1 = find('after-1', r.viaTap)?.stall?.median;
    const err = r.errors.length > 0 ? ` (errors: ${r.errors.join('; ')})` : '';
    const passes = [...new Set(r.runs.map((x) => x.passes))].join(', ') || '–';
    lines.push(
      `| ${r.label}${err} | ${r.viaTap ? 'through qmt tap' : 'direct'} | ${fmtStats(r.stall, 1)} | ${r.name === 'after-1' ? '1.00× (baseline)' : fmtRatio(r.stall?.median, a1)} | ${fmtStats(r.downtime, 1)} | ${fmtStats(r.blocktime, 1)} | ${r.viaTap ? fmtStats(r.tapBlocktime, 1) : '–'} | ${fmtStats(r.total)} | ${passes} | ${fmtStats(r.faults)} | ${fmtStats(r.bytes, 0, 1 / 1e6)} | ${r.runs.length === 0 ? '–' : r.runs.every((x) => x.sound) ? 'yes, every run' : 'NO'} |`,
    );
  }
  const aim = (tap: boolean) => {
    const x = ratio(find('immediate', tap)?.stall?.median, find('after-1', tap)?.stall?.median);
    return x === undefined ? '–' : `${fmt(x, 2)}× (${x >= 3 ? 'met' : 'missed'})`;
  };
  lines.push('', `Stall, postcopy at once / after one pass (aim ≥ 3×; the seed: > 3.5×): direct ${aim(false)}, through the tap ${aim(true)}.`, '');
  return lines;
}

function markdown(d: SeedData, runs: number): string {
  const layout = videoLayout(d.guestBytes);
  const row = (n: PolicyName): PolicyRow | undefined => d.rows.find((r) => r.name === n);
  const lines: string[] = [];
  lines.push('#### QEMU → QEMU, the seed guest', '');
  if (d.qemu) lines.push(...qemuMarkdown(d.qemu, runs));
  else lines.push(`Not run: ${d.qemuSkipped ?? 'no QEMU'}.`, '');
  lines.push(
    '#### Library → library, the demo\'s workload',
    '',
    `Guest: ${fmt(d.guestBytes / MiB)} MiB, \`qmt demo\`'s video-streaming workload: a third of the pages hold data, hot set ${fmt(layout.hot.length / MiB)} MiB (${fmt(layout.hotWritesPerSec)} scattered 64-byte writes/s), streaming buffer ${fmt(layout.stream.length / MiB)} MiB written front to back at ${fmt(layout.streamBytesPerSec / MiB)} MiB/s. Library → library over loopback, ${d.tls ? 'TLS 1.3' : 'plain TCP'}, preempt channel in postcopy, source and destination in separate processes; precopy completes when the dirty set fits 300 ms (at most 10 passes). After POSTCOPY_RUN the destination's ${VIDEO_VCPUS} "vCPUs" (\`vcpus: ${VIDEO_VCPUS}\`; one streams, three write the hot set) go on with the workload, each blocked on a missing page; blocktime is the destination's \`postcopy-blocktime\` over them. ${runs} runs per policy, interleaved; median (min–max).`,
    '',
    '| policy | stall (ms) | vs after 1 pass | downtime (ms) | blocktime (ms) | total time (ms) | precopy passes | remote faults | fault latency p50 (ms) | fault latency p99 (ms) | bytes sent (MB) | RAM identical |',
    '|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|',
  );
  const a1 = row('after-1')?.stall?.median;
  for (const r of d.rows) {
    const passes = r.runs.map((x) => x.passes);
    const err = r.errors.length > 0 ? ` (errors: ${r.errors.join('; ')})` : '';
    lines.push(
      `| ${r.label}${err} | ${fmtStats(r.stall, 1)} | ${r.name === 'after-1' ? '1.00× (baseline)' : fmtRatio(r.stall?.median, a1)} | ${fmtStats(r.downtime, 1)} | ${fmtStats(r.blocktime, 1)} | ${fmtStats(r.total)} | ${passes.length > 0 ? [...new Set(passes)].join(', ') : '–'} | ${fmtStats(r.faults)} | ${fmtStats(r.p50, 2, 1 / 1000)} | ${fmtStats(r.p99, 2, 1 / 1000)} | ${fmtStats(r.bytes, 0, 1 / 1e6)} | ${r.runs.length === 0 ? '–' : r.runs.every((x) => x.identical) ? 'yes (SHA-1), every run' : 'NO'} |`,
    );
  }
  lines.push('');
  const imm = row('immediate');
  const x = ratio(imm?.stall?.median, a1);
  lines.push(
    `The seed reported the VM's stall falling from 3.5 s (postcopy at once) to under 1 s (postcopy after one pass), a ratio above 3.5. Here the stall, postcopy at once / after one pass: ${x === undefined ? '–' : `${fmt(x, 2)}× (aim ≥ 3×: ${x >= 3 ? 'met' : 'missed'})`}; downtime alone: ${fmtRatio(imm?.downtime?.median, row('after-1')?.downtime?.median)}. Downtime is measured from the source's \`stopped\` event to POSTCOPY_RUN arriving at the destination (precopy: the destination completing), both on CLOCK_MONOTONIC; it covers the device state and, in precopy, the last dirty pages. What postcopy at once costs instead is the blocktime: every page the guest touches first at the destination is fetched on demand, and the vCPUs wait.`,
    '',
    'Remote faults = REQ_PAGES sent by the destination; fault latency = request sent → page landed, at the destination. Bytes sent = main + preempt channel payload from the source.',
    '',
    'Chart: [seed-stall.svg](seed-stall.svg).',
  );
  return lines.join('\n');
}

await runPart<SeedData>(
  'seed',
  "The seed's experiment: when to switch to postcopy, as the VM feels it",
  { mib: { type: 'string' }, 'qemu-mib': { type: 'string' }, runs: { type: 'string' }, plain: { type: 'boolean', default: false }, 'no-qemu': { type: 'boolean', default: false } },
  async (ctx) => {
    const mib = Number(ctx.options.mib ?? (ctx.quick ? 256 : 1024));
    const qemuMib = Number(ctx.options['qemu-mib'] ?? (ctx.quick ? 256 : 512));
    const runs = Number(ctx.options.runs ?? 3);
    const tls = ctx.options.plain !== true;
    const bytes = mib * MiB;
    const pkiDir = join(await ctx.tmpDir('seed'), 'pki');
    if (tls) await initPkiDir(pkiDir);
    const data: SeedData = { guestBytes: bytes, tls, rows: POLICIES.map((p) => ({ name: p.name, label: p.label, runs: [], errors: [] })) };

    let q: Qemu | undefined;
    if (ctx.options['no-qemu']) data.qemuSkipped = '--no-qemu';
    else {
      q = await import('./lib/qemu.js');
      const why = await q.qemuUnavailable();
      if (why) {
        data.qemuSkipped = why;
        q = undefined;
      } else {
        ctx.onCleanup(() => q!.stopAll());
        data.qemu = { qemuVersion: await q.qemuVersion(), guestMiB: qemuMib, hot: SEED_HOT, readEndMiB: qemuMib - 8, rows: [false, true].flatMap((viaTap) => POLICIES.map((p) => ({ name: p.name, label: p.label, viaTap, runs: [], errors: [] }))) };
      }
    }

    for (let round = 0; round < runs; round++) {
      for (const p of POLICIES) {
        const row = data.rows.find((r) => r.name === p.name)!;
        try {
          const r = await seedRun(ctx, bytes, p.policy, tls ? pkiDir : undefined);
          row.runs.push(r);
          ctx.log(`round ${round + 1}/${runs}: library ${p.name}: stall ${fmt(r.stallMs, 1)} ms (downtime ${fmt(r.downtimeMs, 1)} + blocktime ${fmt(r.blocktimeMs, 1)}), total ${fmt(r.totalMs)} ms, passes ${r.passes}, faults ${r.remoteFaults}${r.identical ? '' : ', RAM DIFFERS'}`);
        } catch (e) {
          row.errors.push(e instanceof Error ? e.message.split('\n')[0]! : String(e));
          ctx.log(`round ${round + 1}: library ${p.name} failed: ${String(e)}`);
        }
        if (!q || !data.qemu) continue;
        for (const viaTap of [false, true]) {
          const qrow = data.qemu.rows.find((r) => r.name === p.name && r.viaTap === viaTap)!;
          try {
            const r = await qemuSeedRun(ctx, q, qemuMib, p.name, viaTap);
            qrow.runs.push(r);
            ctx.log(`round ${round + 1}/${runs}: QEMU ${viaTap ? 'via tap ' : ''}${p.name}: stall ${fmt(r.stallMs, 1)} ms (downtime ${fmt(r.downtimeMs, 1)} + blocktime ${fmt(r.blocktimeMs, 1)}${r.tapBlocktimeMs !== undefined ? `; tap ${fmt(r.tapBlocktimeMs, 1)}` : ''}), total ${fmt(r.totalMs)} ms, faults ${r.remoteFaults}${r.sound ? '' : ', DESTINATION NOT SOUND'}`);
          } catch (e) {
            qrow.errors.push(e instanceof Error ? e.message.split('\n')[0]! : String(e));
            ctx.log(`round ${round + 1}: QEMU ${p.name} failed: ${String(e)}`);
          }
        }
      }
    }
    for (const row of data.rows) {
      const set = <K extends keyof PolicyRow>(k: K, v: PolicyRow[K] | undefined): void => {
        if (v !== undefined) row[k] = v;
      };
      set('downtime', runStats(row.runs.map((r) => r.downtimeMs)));
      set('blocktime', runStats(row.runs.map((r) => r.blocktimeMs)));
      set('stall', runStats(row.runs.map((r) => r.stallMs)));
      set('total', runStats(row.runs.map((r) => r.totalMs)));
      set('faults', runStats(row.runs.map((r) => r.remoteFaults)));
      set('p50', runStats(row.runs.flatMap((r) => (r.faultP50Us === undefined ? [] : [r.faultP50Us]))));
      set('p99', runStats(row.runs.flatMap((r) => (r.faultP99Us === undefined ? [] : [r.faultP99Us]))));
      set('bytes', runStats(row.runs.map((r) => r.bytesSent)));
    }
    for (const row of data.qemu?.rows ?? []) {
      const set = <K extends keyof QemuSeedRow>(k: K, v: QemuSeedRow[K] | undefined): void => {
        if (v !== undefined) row[k] = v;
      };
      set('downtime', runStats(row.runs.map((r) => r.downtimeMs)));
      set('blocktime', runStats(row.runs.map((r) => r.blocktimeMs)));
      set('stall', runStats(row.runs.map((r) => r.stallMs)));
      set('tapBlocktime', runStats(row.runs.flatMap((r) => (r.tapBlocktimeMs === undefined ? [] : [r.tapBlocktimeMs]))));
      set('total', runStats(row.runs.map((r) => r.totalMs)));
      set('faults', runStats(row.runs.map((r) => r.remoteFaults)));
      set('bytes', runStats(row.runs.map((r) => r.bytes)));
    }
    const bars = [
      ...(data.qemu?.rows ?? []).filter((r) => r.stall).map((r) => ({ group: `QEMU → QEMU${r.viaTap ? ' through qmt tap' : ''}, seed guest ${fmt(qemuMib)} MiB`, label: r.label, value: r.stall!.median, min: r.stall!.min, max: r.stall!.max })),
      ...data.rows.filter((r) => r.stall).map((r) => ({ group: `library → library, video guest ${fmt(mib)} MiB`, label: r.label, value: r.stall!.median, min: r.stall!.min, max: r.stall!.max })),
    ];
    const svg = await barChartSvg(`The VM's stall: downtime + postcopy-blocktime (median of ${runs}; whiskers: min–max)`, 'ms', bars, 1);
    await mkdir(ctx.out, { recursive: true });
    await writeFile(join(ctx.out, 'seed-stall.svg'), svg);
    return {
      config: { mib, qemuMib, runs, tls, preempt: true, maxPasses: 10, downtimeLimitMs: 300, workload: videoLayout(bytes), vcpus: VIDEO_VCPUS, qemu: data.qemu ? { hot: SEED_HOT, readEndMiB: qemuMib - 8, linkBytesPerSec: LINK_BYTES_PER_SEC } : data.qemuSkipped },
      data,
      markdown: markdown(data, runs),
    };
  },
);
