/**
 * The eight-migration load (part `load` of `npm run bench`; alone: `node
 * --import tsx bench/load.bench.ts [--quick] [--runs N] [--no-qemu] [--single
 * NAME]`; the threads rows need Node.js ≥ 26.6, which `npm run bench` runs
 * this part under when it finds one).
 *
 * The scenario of test/load/concurrent.test.ts, in this one process: eight
 * SourceSession → DestinationSession migrations at once (96–192 MiB
 * synthetic guests rewriting a hot region; half precopy, half postcopy after
 * one pass with preempt, the destination faulting pages in top-down; half of
 * each over TLS), plus one of our sources restoring a saved VM into a real
 * QEMU 10.0 (postcopy + preempt). Next to it, in the same round, the single
 * migration alone (default the 144 MiB postcopy + preempt one over TLS), and
 * the QEMU restore alone (the baseline of its p99 under the eight).
 * Each round runs, interleaved: single, eight with threads off, then the
 * same with threads on (when the tree has them).
 *
 * The figure: the worst urgent p99 among the eight (destination: request
 * sent → page placed, the library's own histogram) against the single
 * migration's p99, as a ratio of the medians over the rounds. Aim (issue 13):
 * ≤ 10×. Every run's memory is compared page by page at both ends (reported).
 * Prints figures; asserts nothing.
 */
import { join } from 'node:path';
import os from 'node:os';
import { performance } from 'node:perf_hooks';
import { initPkiDir } from '../src/transport/pki.js';
import { prepareLibraryMigration, type LibraryMigrationSpec, type LibraryOutcome, type PreparedLibraryMigration } from '../test/load/library-migration.js';
import { LOAD_AIM } from './lib/aims.js';
import { notAvailable, osThreads, threadsOf, threadsRefused, threadsUnavailable } from './lib/features.js';
import { runPart, type PartContext } from './lib/part.js';
import { fmt } from './lib/report.js';
import { fmtStats, ratio, runStats, type RunStats } from './lib/stats.js';
import { ThreadCpuSampler, topThreads } from './lib/thread-cpu.js';

const MiB = 1024 * 1024;
/** A hang, not a slow run. */
const RUN_BOUND_MS = 240_000;

type Spec = Omit<LibraryMigrationSpec, 'tlsDir' | 'threads'> & { tls: boolean };
/** As test/load/concurrent.test.ts: 1,152 MiB in all. */
const SPECS: Spec[] = [
  { name: 'precopy-96', ramMiB: 96, mode: 'precopy', tls: false },
  { name: 'precopy-192', ramMiB: 192, mode: 'precopy', tls: false },
  { name: 'precopy-96-tls', ramMiB: 96, mode: 'precopy', tls: true },
  { name: 'precopy-144-tls', ramMiB: 144, mode: 'precopy', tls: true },
  { name: 'preempt-96', ramMiB: 96, mode: 'postcopy-preempt', tls: false },
  { name: 'preempt-192', ramMiB: 192, mode: 'postcopy-preempt', tls: false },
  { name: 'preempt-96-tls', ramMiB: 96, mode: 'postcopy-preempt', tls: true },
  { name: 'preempt-144-tls', ramMiB: 144, mode: 'postcopy-preempt', tls: true },
];

export type LoadThreads = 'off' | 'on';
/** 'qemu-alone': the QEMU restore of the eight's run by itself, the baseline of its p99. */
export type LoadShape = 'single' | 'eight' | 'qemu-alone';

export interface LoadMigration {
  name: string;
  mode: string;
  ms: number;
  mbps: number;
  /** µs: destination request sent → page placed; source request read → answer handed to the kernel. */
  p50Dst?: number;
  p99Dst?: number;
  p99Src?: number;
  requests: number;
  identical: boolean;
  threadsUsed?: boolean;
  workers?: number;
  why?: string;
}

export interface LoadRun {
  migrations: LoadMigration[];
  /** The worst destination p99 of the postcopy migrations (the single one's own p99 for `single`), µs. */
  worstP99Us: number | undefined;
  worstName: string | undefined;
  qemu?: { p99SrcUs: number; requests: number; ok: boolean; error?: string };
  wallMs: number;
  /** This process (both ends of every library migration): CPU core-seconds, peak OS threads. */
  cpuS: number;
  osThreads: number | undefined;
  /** Where this process's CPU went, per thread (busiest first). */
  topThreads?: string;
  failures: string[];
}

export interface LoadVariant {
  shape: LoadShape;
  threads: LoadThreads;
  runs: LoadRun[];
  errors: string[];
  unavailable?: string;
  worstP99?: RunStats;
}

export interface LoadData {
  runs: number;
  scale: number;
  single: string;
  withQemu: boolean;
  qemuSkipped?: string;
  node: string;
  cores: number;
  variants: LoadVariant[];
}

type QemuMods = {
  restore: typeof import('../test/load/qemu-restore.js');
  helpers: typeof import('../test/qemu/source-helpers.js');
  harness: typeof import('../test/qemu/harness.js');
};

async function oneRun(ctx: PartContext, specs: readonly Spec[], scale: number, pkiDir: string, threads: LoadThreads, qemu: { mods: QemuMods; vmDir: string; manifest: import('../src/protocol/saved-vm.js').SavedVmManifest } | undefined): Promise<LoadRun> {
  const prepared: PreparedLibraryMigration[] = [];
  let preparedQemu: import('../test/load/qemu-restore.js').PreparedQemuRestore | undefined;
  try {
    if (qemu) preparedQemu = await qemu.mods.restore.prepareQemuRestore('qemu-preempt', qemu.vmDir, qemu.manifest);
    for (const [i, spec] of specs.entries()) {
      const { tls, ...s } = spec;
      prepared.push(await prepareLibraryMigration({ ...s, name: scaledName(spec, scale), ramMiB: Math.max(16, Math.round(s.ramMiB * scale)), tlsDir: tls ? pkiDir : undefined, threads }, i));
    }
  } catch (e) {
    for (const p of prepared) p.abandon();
    await preparedQemu?.abandon();
    throw e;
  }
  let peakThreads = osThreads(process.pid);
  const sampler = setInterval(() => (peakThreads = Math.max(peakThreads ?? 0, osThreads(process.pid) ?? 0)), 100);
  const perThread = new ThreadCpuSampler(() => [process.pid]);
  const cpu0 = process.cpuUsage();
  const t0 = performance.now();
  const lib = prepared.map((p) => p.start());
  const qemuRun = preparedQemu?.start();
  const all = Promise.allSettled([...lib.map((m) => m.done), ...(qemuRun ? [qemuRun.done] : [])]);
  let bound: NodeJS.Timeout | undefined;
  const hung = await Promise.race([all.then(() => false), new Promise<boolean>((resolve) => (bound = setTimeout(() => resolve(true), RUN_BOUND_MS)))]);
  clearTimeout(bound);
  if (hung) {
    for (const m of lib) m.cancel();
    qemuRun?.cancel();
    await all;
    clearInterval(sampler);
    perThread.stop();
    throw new Error(`not every migration settled within ${RUN_BOUND_MS} ms: ${lib.map((m) => `${m.spec.name}: ${m.state()}`).join('; ')}`);
  }
  const results = await all;
  const wallMs = performance.now() - t0;
  const cpu = process.cpuUsage(cpu0);
  clearInterval(sampler);
  const threadCpu = perThread.stop();
  const failures: string[] = [];
  const migrations: LoadMigration[] = [];
  for (const [i, r] of results.slice(0, lib.length).entries()) {
    if (r.status === 'rejected') {
      failures.push(`${lib[i]!.spec.name}: ${String((r.reason as Error)?.message ?? r.reason).split('\n')[0]}`);
      continue;
    }
    const o = r.value as LibraryOutcome;
    const ms = o.endedAt - o.startedAt;
    const post = o.spec.mode !== 'precopy';
    const ts = threadsOf({ threads: o.threads?.source });
    const td = threadsOf({ threads: o.threads?.destination });
    migrations.push({
      name: o.spec.name,
      mode: o.spec.mode,
      ms,
      mbps: o.bytesReceived / 1000 / ms,
      ...(post && o.latency.destination.count > 0 ? { p50Dst: o.latency.destination.p50, p99Dst: o.latency.destination.p99 } : {}),
      ...(post && o.latency.source.count > 0 ? { p99Src: o.latency.source.p99 } : {}),
      requests: o.source['postcopy-requests'],
      identical: o.firstDifference === -1 && o.pagesMissing === 0 && o.devicesEqual,
      ...(ts || td ? { threadsUsed: (ts?.used ?? false) || (td?.used ?? false), workers: (ts?.channels.length ?? 0) + (td?.channels.length ?? 0), why: [ts?.why, td?.why].filter(Boolean).join('; ') } : {}),
    });
  }
  let q: LoadRun['qemu'];
  if (qemuRun) {
    const r = results[lib.length]!;
    if (r.status === 'fulfilled') {
      const o = r.value as import('../test/load/qemu-restore.js').QemuOutcome;
      q = { p99SrcUs: o.latency.source.p99, requests: o.source['postcopy-requests'], ok: o.check.invariant.ok && o.check.info.status === 'completed' };
    } else {
      q = { p99SrcUs: NaN, requests: 0, ok: false, error: String((r.reason as Error)?.message ?? r.reason).split('\n')[0]! };
      failures.push(`qemu: ${q.error}`);
    }
  }
  const worst = migrations.filter((m) => m.p99Dst !== undefined).reduce<LoadMigration | undefined>((w, m) => (w === undefined || m.p99Dst! > w.p99Dst! ? m : w), undefined);
  return { migrations, worstP99Us: worst?.p99Dst, worstName: worst?.name, ...(q ? { qemu: q } : {}), wallMs, cpuS: (cpu.user + cpu.system) / 1e6, osThreads: peakThreads, topThreads: topThreads(threadCpu, 6), failures };
}

/** A spec's name with its size as run (--quick halves them). */
const scaledName = (s: Spec, scale: number): string => s.name.replace(/-\d+/, `-${Math.max(16, Math.round(s.ramMiB * scale))}`);

function markdown(d: LoadData): string {
  const lines: string[] = [];
  const single = (t: LoadThreads): LoadVariant | undefined => d.variants.find((v) => v.shape === 'single' && v.threads === t);
  lines.push(
    `The scenario of test/load/concurrent.test.ts in one process under Node.js ${d.node}: eight library migrations at once (${SPECS.map((s) => scaledName(s, d.scale)).join(', ')}; MiB, synthetic guests rewriting a hot region; postcopy ones fault top-down at the destination)${d.withQemu ? ' plus our source restoring a saved VM into QEMU 10.0 (postcopy + preempt)' : ''}, against \`${d.single}\` alone (the same spec as in the eight)${d.withQemu ? ' and the QEMU restore alone' : ''}; ${d.runs} round${d.runs === 1 ? '' : 's'}, each running ${d.withQemu ? 'the QEMU restore alone, ' : ''}single and eight with threads off, then with threads on (interleaved). Urgent p99 = the destination's request sent → page placed (the library's histogram), per run; the eight's figure is the worst p99 among its postcopy migrations. Median (min–max) over the rounds; ratio of medians.${d.qemuSkipped ? ` QEMU restore skipped: ${d.qemuSkipped}.` : ''}`,
    '',
    '| load | threads | worst urgent p99 (ms) | worst of | vs single, same threads | aim | memory identical | migrations completed | aggregate MB/s (wire), vs single | CPU s/GB (both ends) | QEMU restore p99 at our source (ms), vs alone | OS threads (workers), cores used |',
    '|---|---|--:|---|--:|---|---|--:|--:|--:|--:|--:|',
  );
  for (const v of d.variants) {
    const what = v.shape === 'single' ? `\`${d.single}\` alone (1 migration)` : v.shape === 'qemu-alone' ? 'the QEMU restore alone (baseline of its p99)' : `eight at once${d.withQemu ? ' + QEMU restore' : ''}`;
    if (v.unavailable) {
      lines.push(`| ${what} | ${v.threads} | ${notAvailable(v.unavailable)} | | | | | | | | | |`);
      continue;
    }
    const qp99 = (x: LoadVariant | undefined): RunStats | undefined => (x?.runs.some((r) => r.qemu) ? runStats(x.runs.map((r) => (r.qemu?.p99SrcUs ?? NaN) / 1000)) : undefined);
    if (v.shape === 'qemu-alone') {
      const ok = v.runs.length === 0 ? '–' : v.runs.every((x) => x.qemu?.ok) ? 'yes, every run (invariant, completed)' : 'NO';
      lines.push(`| ${what}${v.errors.length > 0 ? ` (errors: ${v.errors.join('; ')})` : ''} | ${v.threads} | – | | | | ${ok} | ${v.runs.filter((x) => x.qemu?.ok).length}/${v.runs.length} | – | – | ${fmtStats(qp99(v), 1)} (baseline) | ${fmtStats(runStats(v.runs.map((x) => x.osThreads ?? NaN)))} (–), ${fmtStats(runStats(v.runs.map((x) => x.cpuS / (x.wallMs / 1000))), 2)} of ${d.cores} |`);
      continue;
    }
    const err = v.errors.length > 0 ? ` (errors: ${v.errors.join('; ')})` : '';
    const base = single(v.threads)?.worstP99?.median;
    const r = v.shape === 'eight' ? ratio(v.worstP99?.median, base) : undefined;
    const names = [...new Set(v.runs.map((x) => x.worstName).filter(Boolean))].join(', ') || '–';
    const ident = v.runs.length === 0 ? '–' : v.runs.every((x) => x.migrations.every((m) => m.identical)) ? 'yes, every run' : 'NO';
    const completed = v.runs.map((x) => `${x.migrations.length}/${x.migrations.length + x.failures.filter((f) => !f.startsWith('qemu')).length}`).join(', ');
    const aggOf = (x: LoadVariant | undefined): RunStats | undefined => (x ? runStats(x.runs.map((y) => y.migrations.reduce((s, m) => s + (m.mbps * m.ms) / 1000, 0) / (y.wallMs / 1000))) : undefined);
    const aggStats = aggOf(v);
    const aggRatio = v.shape === 'eight' ? ratio(aggStats?.median, aggOf(single(v.threads))?.median) : undefined;
    const agg = `${fmtStats(aggStats)}${v.shape === 'single' ? ' (baseline)' : aggRatio === undefined ? '' : `, ${fmt(aggRatio, 2)}×`}`;
    // Core-seconds of this process (both ends of every library migration) per GB (10⁹ bytes) they carried.
    const cpuPerGb = fmtStats(runStats(v.runs.map((x) => x.cpuS / (x.migrations.reduce((s, m) => s + m.mbps * m.ms, 0) / 1e6))), 2);
    const qs = qp99(v);
    const qRatio = ratio(qs?.median, qp99(d.variants.find((x) => x.shape === 'qemu-alone'))?.median);
    const q = qs ? `${fmtStats(qs, 1)}${qRatio === undefined ? '' : `, ${fmt(qRatio, 2)}×`}` : '–';
    const workers = v.runs.flatMap((x) => (x.migrations.some((m) => m.workers !== undefined) ? [x.migrations.reduce((s, m) => s + (m.workers ?? 0), 0)] : []));
    const used = v.runs.flatMap((x) => x.migrations.map((m) => m.threadsUsed)).filter((x) => x !== undefined);
    const procs = `${fmtStats(runStats(v.runs.map((x) => x.osThreads ?? NaN)))} (${workers.length > 0 ? fmtStats(runStats(workers)) : '–'}${v.threads === 'on' && used.length > 0 && used.some((u) => !u) ? `; not used by ${used.filter((u) => !u).length}` : ''}), ${fmtStats(runStats(v.runs.map((x) => x.cpuS / (x.wallMs / 1000))), 2)} of ${d.cores}`;
    lines.push(
      `| ${what}${err} | ${v.threads} | ${fmtStats(v.worstP99, 1, 1e-3)} | ${names} | ${v.shape === 'single' ? '1.00× (baseline)' : r === undefined ? '–' : `${fmt(r, 2)}×`} | ${v.shape === 'eight' ? `≤ ${LOAD_AIM}×${r === undefined ? '' : r <= LOAD_AIM ? ' — met' : ' — missed'}` : ''} | ${ident} | ${completed || '–'} | ${agg} | ${cpuPerGb} | ${q} | ${procs} |`,
    );
  }
  lines.push(
    '',
    'Per migration, last round (p99 µs at the destination / at the source):',
    '',
    ...d.variants
      .filter((v) => v.runs.length > 0 && v.shape !== 'qemu-alone')
      .map((v) => `- ${v.shape}, threads ${v.threads}: ${v.runs[v.runs.length - 1]!.migrations.map((m) => `${m.name} ${fmt(m.mbps)} MB/s${m.p99Dst !== undefined ? ` p99 ${fmt(m.p99Dst)} / ${fmt(m.p99Src)}` : ''}${m.identical ? '' : ' MEMORY DIFFERS'}`).join('; ')}`),
    '',
    'Where the CPU went, per thread of this process (last round):',
    '',
    ...d.variants.filter((v) => v.runs.length > 0).map((v) => `- ${v.shape}, threads ${v.threads}: ${v.runs[v.runs.length - 1]!.topThreads ?? '–'}`),
    '',
    `OS threads: this process's peak (/proc/self/status; Node's own threads included), workers: the channel threads the sessions' stats name; cores used: this process's CPU core-seconds (both ends of every library migration) over the run's wall time, of ${d.cores} cores. A failure of one migration is listed, not fatal.`,
  );
  return lines.join('\n');
}

await runPart<LoadData>('load', 'The eight-migration load: urgent p99 against a single migration', { runs: { type: 'string' }, 'no-qemu': { type: 'boolean', default: false }, single: { type: 'string' } }, async (ctx) => {
  const runs = Number(ctx.options.runs ?? (ctx.quick ? 1 : 3));
  const scale = ctx.quick ? 0.5 : 1;
  const single = SPECS.find((s) => s.name === String(ctx.options.single ?? 'preempt-144-tls'));
  if (!single) throw new Error(`--single ${String(ctx.options.single)}: not one of ${SPECS.map((s) => s.name).join(', ')}`);
  const singleName = scaledName(single, scale);
  const data: LoadData = { runs, scale, single: singleName, withQemu: false, node: process.version, cores: os.cpus().length, variants: [] };
  // This part runs both ends in this process: its own Node.js must transfer sockets.
  const [maj = 0, min = 0] = process.versions.node.split('.').map(Number);
  const noThreads = threadsUnavailable() ?? (maj > 26 || (maj === 26 && min >= 6) ? undefined : `this process runs Node.js ${process.version}; the threads rows need ≥ 26.6 (\`npm run bench\` runs this part under one when it finds it)`);
  for (const threads of ['off', 'on'] as const) for (const shape of ['single', 'eight'] as const) data.variants.push({ shape, threads, runs: [], errors: [], ...(threads === 'on' && noThreads ? { unavailable: noThreads } : {}) });

  const work = await ctx.tmpDir('load');
  const pkiDir = join(work, 'pki');
  await initPkiDir(pkiDir);
  let qemu: Parameters<typeof oneRun>[5];
  if (ctx.options['no-qemu']) data.qemuSkipped = '--no-qemu';
  else {
    const q = await import('./lib/qemu.js');
    const why = await q.qemuUnavailable();
    if (why) data.qemuSkipped = why;
    else {
      const mods: QemuMods = { restore: await import('../test/load/qemu-restore.js'), helpers: await import('../test/qemu/source-helpers.js'), harness: await import('../test/qemu/harness.js') };
      ctx.onCleanup(() => mods.harness.stopAll());
      const vmDir = join(work, 'vm');
      ctx.log('capturing the saved VM the QEMU restore sends …');
      const manifest = await mods.helpers.captureSavedVm(vmDir, mods.restore.QEMU_SPEC, 'load-capture');
      qemu = { mods, vmDir, manifest };
      data.withQemu = true;
      // First in each round: the QEMU restore by itself, the baseline of its p99 under the eight.
      data.variants.unshift({ shape: 'qemu-alone', threads: 'off', runs: [], errors: [] });
    }
  }
  for (let round = 0; round < runs; round++) {
    for (const v of data.variants) {
      if (v.unavailable) continue;
      try {
        const r = await oneRun(ctx, v.shape === 'single' ? [single] : v.shape === 'qemu-alone' ? [] : SPECS, scale, pkiDir, v.threads, v.shape === 'single' ? undefined : qemu);
        v.runs.push(r);
        ctx.log(`round ${round + 1}/${runs}: ${v.shape}, threads ${v.threads}: worst urgent p99 ${fmt((r.worstP99Us ?? NaN) / 1000, 1)} ms (${r.worstName ?? '–'}), ${fmt(r.wallMs)} ms, CPU ${fmt(r.cpuS, 1)} s${r.qemu ? `, QEMU restore p99 at our source ${fmt(r.qemu.p99SrcUs / 1000, 1)} ms` : ''}${r.failures.length ? `, failed: ${r.failures.join('; ')}` : ''}`);
        // A tree that has threads but whose sessions report none: not what the row says.
        if (v.threads === 'on' && r.migrations.length > 0 && r.migrations.every((m) => m.threadsUsed === undefined)) {
          v.unavailable = 'the sessions report no stats.threads';
          v.runs = [];
        }
      } catch (e) {
        const refused = threadsRefused(e);
        if (refused) {
          v.unavailable = refused;
          ctx.log(`${v.shape}, threads ${v.threads}: not available: ${refused}`);
          continue;
        }
        v.errors.push(e instanceof Error ? e.message.split('\n')[0]! : String(e));
        ctx.log(`round ${round + 1}: ${v.shape}, threads ${v.threads} failed: ${String(e)}`);
      }
    }
  }
  for (const v of data.variants) {
    const s = runStats(v.runs.map((r) => r.worstP99Us ?? NaN));
    if (s) v.worstP99 = s;
  }
  return { config: { runs, scale, single: singleName, specs: SPECS, withQemu: data.withQemu, MiB }, data, markdown: markdown(data) };
});
