/**
 * Urgent page requests with real QEMU destinations (part 3 of `npm run
 * bench`, after bench/latency.bench.ts; alone: `node --import tsx
 * bench/urgent.bench.ts [--quick] [--runs N] [--no-veth] [--trace] [--issue13]`;
 * --issue13: only QEMU + preempt and our source + preempt with threads off and on).
 *
 * A test guest walking its RAM top-down — against the background stream,
 * which goes bottom-up, so its faults queue behind bulk data — in postcopy
 * into a QEMU 10.0 destination, through `qmt tap` (its own process, next to
 * the destination) that times every request: REQ_PAGES passing the tap →
 * the last byte of the page passing it. Four rows per link:
 *   - QEMU → QEMU, postcopy after the first precopy pass, without and with
 *     postcopy-preempt (`max-bandwidth` 1e15, `downtime-limit` 1 ms so that
 *     precopy cannot converge, `max-postcopy-bandwidth` unlimited);
 *   - our SourceSession restoring a saved VM of the same guest lazily
 *     (postcopy at once), without and with the preempt channel.
 * In both cases every page of the guest's range is missing when the
 * destination starts running (the guest rewrites its whole range far faster
 * than a pass goes), and the background stream sends all of it again.
 * Links: loopback, and a veth pair between two namespaces shaped to 1 Gbit/s
 * (tbf, as bench:latency), the source side (QEMU or our source) in one, the
 * destination QEMU and the tap in the other.
 *
 * Then one table and one CDF chart with bench:latency's rows (its
 * results/latency.json, measured just before by `npm run bench`). With
 * --trace the destination QEMUs also log `postcopy_ram_fault_thread_request`
 * and `postcopy_place_page`, a cross-check of the tap (it slows them).
 * Prints figures; asserts nothing.
 */
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import os from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { DestinationSession } from '../src/protocol/index.js';
import { DirectorySink } from '../src/protocol/directory-sink.js';
import { RAM_DIR, writeSavedVm } from '../src/protocol/saved-vm.js';
import { BenchChild } from './lib/child.js';
import { VethLink, removeStaleNamespaces, vethUnavailable } from './lib/netns.js';
import { runPart, runSync, type PartContext, type PartResult } from './lib/part.js';
import { facetedCdfSvg, fmt, type FacetSeries } from './lib/report.js';
import type { SessionCommand, SourceRun } from './lib/session-peer.js';
import { fmtRatio, fmtStats, runStats, summarize, type LatencySummary, type RunStats } from './lib/stats.js';
import type { TapCommand, TapRun } from './lib/tap-peer.js';
import { faultToPlaced } from './lib/qemu-trace.js';
import { processCpuSeconds } from './lib/cpu.js';
import { notAvailable, threadsNode, threadsOf, threadsRefused, threadsUnavailable } from './lib/features.js';
import { ThreadCpuSampler, topThreads } from './lib/thread-cpu.js';

/** A row whose feature this tree lacks: not a failure, "not available". */
class FeatureMissing extends Error {}

const diffCpu = (a: number | undefined, b: number | undefined): number | undefined => (a === undefined || b === undefined ? undefined : b - a);

const SESSION_PEER = fileURLToPath(new URL('./lib/session-peer.ts', import.meta.url));
const TAP_PEER = fileURLToPath(new URL('./lib/tap-peer.ts', import.meta.url));
const LINK = { rate: '1gbit', burst: '256kb', latency: '50ms' };

type Link = 'loopback' | 'veth';
type Source = 'qemu' | 'library';

interface RowSpec {
  link: Link;
  source: Source;
  preempt: boolean;
  /**
   * Issue 13 rows: our source over the saved VM's RAM in (shared) memory, its
   * channels in threads or not, run under a Node.js that can transfer sockets
   * (both rows, so that only the threads differ). Undefined: SavedVmSource, this
   * process's Node.js, the library's default.
   */
  threads?: 'on' | 'off';
}

interface UrgentRun {
  samplesUs: number[];
  /** Per run: the tap's request count, QEMU's own `postcopy-requests` (QEMU source) or the source session's. */
  tapRequests: number;
  sourceRequests: number | undefined;
  answered: { main: number; preempt: number };
  unanswered: number;
  /** Our source's own figure: request arrival → page handed to the kernel. */
  sourceSideUs?: { p50: number; p99: number };
  /** QEMU trace events: fault → page placed (µs), with --trace. */
  traceUs?: number[];
  postcopyMs: number | undefined;
  tapForwardP99Us: number;
  /** Our source process: peak OS threads, its worker threads (stats.threads), CPU core-seconds and wall seconds of the migration. */
  sourceProcess?: { osThreads: number; workers: number | undefined; threadsUsed: boolean | undefined; why?: string; cpuS: number | undefined; seconds: number; top?: string };
}

interface Row extends RowSpec {
  label: string;
  /** Why this row cannot run in this tree (its feature is missing): printed as "not available". */
  unavailable?: string;
  runs: UrgentRun[];
  errors: string[];
  summary?: LatencySummary;
  perRunP50?: RunStats;
  perRunP99?: RunStats;
  trace?: LatencySummary;
}

export interface UrgentData {
  guestMiB: Record<Link, number>;
  /** Cores of this machine; and the Node.js the threads rows ran under. */
  cores?: number;
  threadsNode?: string;
  rows: Row[];
  vethSkipped?: string;
  qemuVersion?: string;
  vethCommands?: string[];
}

const label = (r: RowSpec): string =>
  r.source === 'qemu'
    ? `QEMU → QEMU postcopy${r.preempt ? ' + preempt' : ''} (qmt tap)`
    : r.threads
      ? `our source (RAM in memory) → QEMU, lazy restore${r.preempt ? ' + preempt' : ''}, threads ${r.threads} (qmt tap)`
      : `our source → QEMU, lazy restore${r.preempt ? ' + preempt' : ''} (qmt tap)`;

interface LinkEnv {
  link: Link;
  /** Address the tap listens on (the destination side). */
  host: string;
  nsSrc?: string;
  nsDst?: string;
  srcPrefix: string[];
  dstPrefix: string[];
}

type Qemu = typeof import('./lib/qemu.js');

/** The test guest of `mib` MiB, walking [1 MiB, mib MiB) top-down. */
const guestOf = (mib: number) => ({ startMiB: 1, endMiB: mib, direction: 'down' as const });

/** Captures the running test guest (paused first, so one pass converges) into a saved-VM directory. */
async function captureSavedVm(q: Qemu, dir: string, mib: number): Promise<void> {
  const sink = new DirectorySink(join(dir, RAM_DIR));
  const session = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, idleTimeoutMs: 60_000 });
  const src = await q.startQemuIn(undefined, { name: 'urgent-capture', memoryMiB: mib, guest: guestOf(mib) });
  try {
    await src.waitSerialPasses(2, 60_000);
    await src.pauseVm();
    await src.setParameters({ ...q.UNLIMITED });
    await src.migrate(session.uri);
    await src.waitMigration(['completed'], 120_000);
    const manifest = await writeSavedVm(dir, await session.done);
    if (!manifest.complete) throw new Error(`capture incomplete: ${JSON.stringify(manifest.error)}`);
  } finally {
    session.close();
    await sink.close();
    await src.stop();
  }
}

function traceArgs(file: string): string[] {
  return ['-trace', 'postcopy_ram_fault_thread_request', '-trace', 'postcopy_place_page', '-trace', 'postcopy_place_page_zero', '-msg', 'timestamp=on', '-D', file];
}

async function startTap(ctx: PartContext, env: LinkEnv, to: string): Promise<{ tap: BenchChild<TapCommand>; uri: string }> {
  const tap = ctx.track(BenchChild.start<TapCommand>('tap', TAP_PEER, [], env.dstPrefix));
  const { uri } = await tap.call<{ uri: string }>({ cmd: 'tap-start', listen: `tcp:${env.host}:0`, to }, 15_000);
  return { tap, uri };
}

function fromTap(t: TapRun): Omit<UrgentRun, 'sourceRequests'> {
  const r = t.report;
  const sw = r.switchover;
  return {
    samplesUs: t.samplesUs,
    tapRequests: r.requests.count,
    answered: r.requests.answered,
    unanswered: r.requests.unanswered,
    postcopyMs: sw.eofMs !== null && sw.postcopyRunMs !== null ? sw.eofMs - sw.postcopyRunMs : undefined,
    tapForwardP99Us: r.overhead.forwardDelayUnqueued.p99,
  };
}

async function qemuRun(ctx: PartContext, q: Qemu, env: LinkEnv, mib: number, preempt: boolean, trace: string | undefined): Promise<UrgentRun> {
  const guest = guestOf(mib);
  const src = await q.startQemuIn(env.nsSrc, { name: 'urgent-src', memoryMiB: mib, guest });
  const dst = await q.startQemuIn(env.nsDst, { name: 'urgent-dst', memoryMiB: mib, guest, incoming: true, ...(trace ? { extraArgs: traceArgs(trace) } : {}) });
  let tap: BenchChild<TapCommand> | undefined;
  try {
    await src.waitSerialPasses(2, 60_000);
    const dstUri = `unix:${join(dst.dir, 'migrate.sock')}`;
    const t = await startTap(ctx, env, dstUri);
    tap = t.tap;
    const result = await q.migrateBetween(src, dst, {
      uri: dstUri,
      connectUri: t.uri,
      capabilities: { 'postcopy-ram': true, ...(preempt ? { 'postcopy-preempt': true } : {}) },
      sourceParameters: { ...q.UNLIMITED, 'downtime-limit': 1, 'max-postcopy-bandwidth': 0 },
      postcopyAfterPasses: 2,
      timeoutMs: 180_000,
    });
    const tr = await tap.call<TapRun>({ cmd: 'tap-wait', timeoutMs: 20_000 }, 25_000);
    const run: UrgentRun = { ...fromTap(tr), sourceRequests: result.source.ram?.['postcopy-requests'] };
    if (trace) run.traceUs = faultToPlaced(await readFile(trace, 'utf8'));
    return run;
  } finally {
    if (tap) await ctx.release(tap);
    await Promise.all([src.stop(), dst.stop()]);
  }
}

async function libraryRun(ctx: PartContext, q: Qemu, env: LinkEnv, mib: number, vmDir: string, preempt: boolean, trace: string | undefined, threads: 'on' | 'off' | undefined): Promise<UrgentRun> {
  const dst = await q.startQemuIn(env.nsDst, { name: 'urgent-dst', memoryMiB: mib, guest: guestOf(mib), incoming: true, ...(trace ? { extraArgs: traceArgs(trace) } : {}) });
  let tap: BenchChild<TapCommand> | undefined;
  const node = threads ? threadsNode()?.path : undefined;
  const src = ctx.track(BenchChild.start<SessionCommand>('source', SESSION_PEER, [], env.srcPrefix, [], node));
  try {
    await dst.setCapabilities({ events: true, 'postcopy-ram': true, ...(preempt ? { 'postcopy-preempt': true } : {}) });
    const dstUri = `unix:${join(dst.dir, 'migrate.sock')}`;
    await dst.migrateIncoming(dstUri, { 'exit-on-error': false });
    await src.call({ cmd: 'source-prepare', memory: { kind: 'saved-vm', dir: vmDir, ...(threads ? { inMemory: true } : {}) } }, 60_000);
    const t = await startTap(ctx, env, dstUri);
    tap = t.tap;
    const sampler = new ThreadCpuSampler(() => [src.pid]);
    const cpu0 = processCpuSeconds(src.pid);
    const s = await src.call<SourceRun>({ cmd: 'source-migrate', to: t.uri, policy: { afterPasses: 0 }, preempt, timeoutMs: 180_000, ...(threads ? { threads } : {}) }, 190_000);
    const cpuS = diffCpu(cpu0, processCpuSeconds(src.pid));
    const perThread = sampler.stop();
    const osThreads = perThread.threads;
    await dst.waitMigration(['completed'], 30_000);
    const tr = await tap.call<TapRun>({ cmd: 'tap-wait', timeoutMs: 20_000 }, 25_000);
    const own = summarize(s.requestLatencyUs);
    const th = threadsOf(s.stats);
    const run: UrgentRun = {
      ...fromTap(tr),
      sourceRequests: s.stats['postcopy-requests'],
      ...(own ? { sourceSideUs: { p50: own.p50Us, p99: own.p99Us } } : {}),
      sourceProcess: { osThreads, workers: th?.channels.length, threadsUsed: th?.used, ...(th ? { why: th.why } : {}), cpuS, seconds: (s.doneUs - s.startUs) / 1e6, top: topThreads(perThread) },
    };
    // A tree whose SourceSession ignores `threads` runs on one thread: that row is not what it says.
    if (threads === 'on' && !th?.used) throw new FeatureMissing(th ? `threads not used: ${th.why}` : 'the source reported no stats.threads: SourceSession has no threads yet');
    if (trace) run.traceUs = faultToPlaced(await readFile(trace, 'utf8'));
    return run;
  } finally {
    if (tap) await ctx.release(tap);
    await ctx.release(src);
    await dst.stop();
  }
}

// ---------------------------------------------------------------------------
// The merged table and chart
// ---------------------------------------------------------------------------

interface LatencyCellJson {
  link: Link;
  mode: string;
  variant: string;
  label: string;
  short: string;
  loaded?: LatencySummary;
  loadedPerRound?: { p50Us: number; p99Us: number }[];
}

interface MergedRow {
  link: Link;
  label: string;
  measured: string;
  s: LatencySummary | undefined;
  perRun?: string;
  requests?: string;
  unavailable?: string;
}

function mergedTable(rows: readonly MergedRow[], ref: Map<Link, LatencySummary | undefined>): string {
  const out = [
    '| link | row | what is timed | samples | p50 (µs) | p99 (µs) | p99.9 (µs) | max (µs) | p50 / p99 vs QEMU + preempt (same link) | per run p50 / p99 (µs): median (min–max) | requests: tap / source |',
    '|---|---|---|--:|--:|--:|--:|--:|--:|---|---|',
  ];
  for (const r of rows) {
    const b = ref.get(r.link);
    if (r.unavailable) {
      out.push(`| ${r.link} | ${r.label} | ${r.measured} | ${notAvailable(r.unavailable)} | | | | | | | |`);
      continue;
    }
    out.push(
      `| ${r.link} | ${r.label} | ${r.measured} | ${fmt(r.s?.count)} | ${fmt(r.s?.p50Us)} | ${fmt(r.s?.p99Us)} | ${fmt(r.s?.p999Us)} | ${fmt(r.s?.maxUs)} | ${fmtRatio(r.s?.p50Us, b?.p50Us)} / ${fmtRatio(r.s?.p99Us, b?.p99Us)} | ${r.perRun ?? '–'} | ${r.requests ?? '–'} |`,
    );
  }
  return out.join('\n');
}

function markdown(d: UrgentData, runs: number, latency: PartResult<unknown> | undefined, latencyCells: LatencyCellJson[], merged: MergedRow[], ref: Map<Link, LatencySummary | undefined>, trace: boolean): string {
  const lines: string[] = [];
  lines.push(
    `One table for every way of carrying an urgent page under bulk load. Rows marked *bench:latency* come from bench/latency.bench.ts (synthetic peers: a 16-byte request, a 4 KiB answer, 256 KiB bulk groups saturating the link; round trip timed at the requester)${latency ? `, run ${latency.startedAt}` : ''}. Rows marked *qmt tap* are real postcopy migrations into a QEMU 10.0 destination (${d.qemuVersion ?? 'QEMU'}, TCG) of the test guest walking its RAM top-down (${fmt(d.guestMiB.loopback)} MiB on loopback${d.guestMiB.veth ? `, ${fmt(d.guestMiB.veth)} MiB on the shaped link` : ''}), with the background stream at full speed; timed by \`qmt tap\` in its own process next to the destination, from REQ_PAGES passing the tap to the last byte of the page passing it; ${runs} runs per row, interleaved, samples pooled.`,
    '',
    mergedTable(merged, ref),
    '',
  );
  const skipped = latencyCells.length === 0 ? ' (no bench:latency results found: run `npm run bench -- --only latency`)' : '';
  lines.push(
    `Reference (issue): QEMU 10.0 on a 2-core machine, 1 GiB top-down guest over loopback, fault → placed (trace events) p50 3.3 ms / p99 8.2 ms without preempt, 0.19 / 0.36 ms with it; over a 1 Gbit/s veth link p50 33 ms without and 1.6 ms with preempt. Our aim: no worse than QEMU with preempt, in the same run (ratio column ≤ 1×).${skipped}`,
    '',
  );
  const aims: string[] = [];
  for (const link of ['loopback', 'veth'] as const) {
    const b = ref.get(link);
    for (const ours of d.rows.filter((r) => r.link === link && r.source === 'library' && r.preempt)) {
      const what = ours.threads ? `our source (RAM in memory) + preempt, threads ${ours.threads}` : 'our source + preempt (SavedVmSource)';
      if (ours.unavailable) {
        aims.push(`- ${link}: ${what}: ${notAvailable(ours.unavailable)}`);
        continue;
      }
      if (!b || !ours.summary) continue;
      const ok = ours.summary.p50Us <= b.p50Us && ours.summary.p99Us <= b.p99Us;
      aims.push(`- ${link}: ${what} p50 ${fmt(ours.summary.p50Us)} / p99 ${fmt(ours.summary.p99Us)} µs against QEMU + preempt ${fmt(b.p50Us)} / ${fmt(b.p99Us)} µs (${fmtRatio(ours.summary.p50Us, b.p50Us)} / ${fmtRatio(ours.summary.p99Us, b.p99Us)}) — ${ok ? 'no worse (met)' : 'worse (missed)'}`);
    }
  }
  if (aims.length > 0) lines.push('Against the aim (reported, not asserted):', '', ...aims, '');
  lines.push('Per QEMU-destination row:', '', '| link | row | answered on preempt / main | unanswered | postcopy phase (ms, median) | tap forwarding p99 (µs, median) | our source: arrival → written p50 / p99 (µs, median) | our source process: OS threads (workers), cores used |' + (trace ? ' QEMU trace: fault → placed p50 / p99 (µs) |' : ''), '|---|---|--:|--:|--:|--:|--:|--:|' + (trace ? '--:|' : ''));
  for (const r of d.rows) {
    if (r.unavailable) {
      lines.push(`| ${r.link} | ${r.label} | ${notAvailable(r.unavailable)} | | | | | |${trace ? ' |' : ''}`);
      continue;
    }
    const sum = (f: (x: UrgentRun) => number): number => r.runs.reduce((s, x) => s + f(x), 0);
    const med = (xs: (number | undefined)[]): string => fmtStats(runStats(xs.filter((x): x is number => x !== undefined)), 0);
    const own = r.source === 'library' ? `${med(r.runs.map((x) => x.sourceSideUs?.p50))} / ${med(r.runs.map((x) => x.sourceSideUs?.p99))}` : '–';
    const tr = trace ? ` ${r.trace ? `${fmt(r.trace.p50Us)} / ${fmt(r.trace.p99Us)} (${fmt(r.trace.count)})` : '–'} |` : '';
    const err = r.errors.length > 0 ? ` (errors: ${r.errors.join('; ')})` : '';
    const procs = r.runs.map((x) => x.sourceProcess).filter((x): x is NonNullable<UrgentRun['sourceProcess']> => x !== undefined);
    const workers = procs.map((p) => p.workers).filter((x): x is number => x !== undefined);
    const proc =
      procs.length === 0
        ? '–'
        : `${fmtStats(runStats(procs.map((p) => p.osThreads)))} (${workers.length > 0 ? `${fmtStats(runStats(workers))} workers` : 'no stats.threads'}), ${fmtStats(runStats(procs.filter((p) => p.cpuS !== undefined && p.seconds > 0).map((p) => p.cpuS! / p.seconds)), 2)} of ${d.cores ?? '?'}`;
    lines.push(`| ${r.link} | ${r.label}${err} | ${fmt(sum((x) => x.answered.preempt))} / ${fmt(sum((x) => x.answered.main))} | ${fmt(sum((x) => x.unanswered))} | ${med(r.runs.map((x) => x.postcopyMs))} | ${med(r.runs.map((x) => x.tapForwardP99Us))} | ${own} | ${proc} |${tr}`);
  }
  lines.push('', 'Our source process, where its CPU went per thread (last run of each row; threads seen over the run, Node names a worker\'s thread after the Worker\'s `name`):', '');
  for (const r of d.rows) {
    const top = r.runs[r.runs.length - 1]?.sourceProcess?.top;
    if (top) lines.push(`- ${r.link}, ${r.label}: ${top}`);
  }
  lines.push('');
  if (d.vethSkipped) lines.push(`Shaped link skipped: ${d.vethSkipped}.`, '');
  else if (d.vethCommands) lines.push(`Shaped link: ${LINK.rate} tbf (burst ${LINK.burst}, latency ${LINK.latency}) on the source side's veth; the source (QEMU or our source process) in one namespace, the destination QEMU and the tap in the other; the tap forwards to the destination over its unix socket.`, '');
  lines.push(
    `Threads rows (issue 13): our source over the saved VM's RAM read into SharedArrayBuffers (an InMemorySource: what channel threads share), \`threads: 'off'\` and \`'on'\`, both under Node.js ${d.threadsNode ?? '≥ 26.6 (none found)'}; OS threads = the source process's peak (/proc/PID/status, Node's own included), workers = its channel threads as its stats report them; cores used = its CPU core-seconds over the migration's wall time.`,
    '',
    'Requests: the tap\'s count of REQ_PAGES next to the source\'s own (`ram.postcopy-requests` of the QEMU source; `postcopy-requests` of our SourceSession) — they must agree. Our source\'s own latency (arrival → the page handed to the kernel) excludes the way back through the network and the tap.',
    '',
    'Chart: [urgent-cdf.svg](urgent-cdf.svg) (one panel per link; solid: migrations through the tap, dashed: bench:latency\'s synthetic peers).',
  );
  return lines.join('\n');
}

// ---------------------------------------------------------------------------

await runPart<UrgentData>(
  'urgent',
  'Urgent page requests under bulk load: one table',
  { runs: { type: 'string' }, 'no-veth': { type: 'boolean', default: false }, trace: { type: 'boolean', default: false }, mib: { type: 'string' }, 'veth-mib': { type: 'string' }, issue13: { type: 'boolean', default: false } },
  async (ctx) => {
    const runs = Number(ctx.options.runs ?? (ctx.quick ? 1 : 3));
    const trace = ctx.options.trace === true;
    const guestMiB: Record<Link, number> = { loopback: Number(ctx.options.mib ?? (ctx.quick ? 256 : 1024)), veth: Number(ctx.options['veth-mib'] ?? (ctx.quick ? 128 : 512)) };
    const data: UrgentData = { guestMiB, rows: [], cores: os.cpus().length, ...(threadsNode() ? { threadsNode: threadsNode()!.version } : {}) };
    const q = await import('./lib/qemu.js');
    const why = await q.qemuUnavailable();
    if (why) throw new Error(`QEMU is needed: ${why}`);
    data.qemuVersion = await q.qemuVersion();
    ctx.onCleanup(() => q.stopAll());
    const work = await ctx.tmpDir('urgent');

    const envs: LinkEnv[] = [{ link: 'loopback', host: '127.0.0.1', srcPrefix: [], dstPrefix: [] }];
    const vethWhy = ctx.options['no-veth'] ? '--no-veth' : await vethUnavailable();
    if (vethWhy) data.vethSkipped = vethWhy;
    else {
      await removeStaleNamespaces();
      const link = new VethLink(LINK);
      ctx.onCleanup(
        async () => void (await link.destroy()),
        () => link.destroySync(runSync),
      );
      await link.create();
      await link.shape('tbf');
      data.vethCommands = [...link.log];
      envs.push({ link: 'veth', host: link.addrDst, nsSrc: link.nsSrc, nsDst: link.nsDst, srcPrefix: link.execPrefix('source'), dstPrefix: link.execPrefix('dest') });
    }

    const vms = new Map<number, string>();
    for (const env of envs) {
      const mib = guestMiB[env.link];
      if (vms.has(mib)) continue;
      const dir = join(work, `vm-${mib}`);
      ctx.log(`capturing a ${mib} MiB top-down test guest into a saved VM …`);
      await captureSavedVm(q, dir, mib);
      vms.set(mib, dir);
    }

    const noThreads = threadsUnavailable();
    for (const env of envs) {
      for (const source of ['qemu', 'library'] as const) {
        for (const preempt of [false, true]) {
          // --issue13: only the rows issue 13 compares (QEMU + preempt, and ours with threads off and on).
          if (ctx.options.issue13 && !(source === 'qemu' && preempt)) continue;
          data.rows.push({ link: env.link, source, preempt, label: label({ link: env.link, source, preempt }), runs: [], errors: [] });
        }
      }
      // Issue 13: our source + preempt with its channels in threads and without, same memory, same Node.js.
      for (const threads of ['off', 'on'] as const) {
        const spec: RowSpec = { link: env.link, source: 'library', preempt: true, threads };
        data.rows.push({ ...spec, label: label(spec), runs: [], errors: [], ...(noThreads && (threads === 'on' || !threadsNode()) ? { unavailable: noThreads } : {}) });
      }
    }
    for (let round = 0; round < runs; round++) {
      for (const r of data.rows) {
        if (r.unavailable) continue;
        const env = envs.find((e) => e.link === r.link)!;
        const mib = guestMiB[r.link];
        const tracePath = trace ? join(work, `trace-${r.link}-${r.source}-${r.preempt}-${round}.log`) : undefined;
        try {
          const x = r.source === 'qemu' ? await qemuRun(ctx, q, env, mib, r.preempt, tracePath) : await libraryRun(ctx, q, env, mib, vms.get(mib)!, r.preempt, tracePath, r.threads);
          r.runs.push(x);
          const s = summarize(x.samplesUs);
          ctx.log(`round ${round + 1}/${runs}: ${r.link} ${r.label}: ${fmt(s?.count)} requests, p50 ${fmt(s?.p50Us)} µs, p99 ${fmt(s?.p99Us)} µs`);
        } catch (e) {
          const refused = threadsRefused(e);
          if (e instanceof FeatureMissing || refused) {
            r.unavailable = refused ?? (e as Error).message;
            ctx.log(`${r.link} ${r.label}: not available: ${r.unavailable}`);
            continue;
          }
          r.errors.push(e instanceof Error ? e.message.split('\n')[0]! : String(e));
          ctx.log(`round ${round + 1}: ${r.link} ${r.label} failed: ${String(e)}`);
        }
      }
    }
    for (const r of data.rows) {
      const s = summarize(r.runs.flatMap((x) => x.samplesUs));
      if (s) r.summary = s;
      const per = r.runs.map((x) => summarize(x.samplesUs)).filter((x): x is LatencySummary => x !== undefined);
      const p50 = runStats(per.map((x) => x.p50Us));
      const p99 = runStats(per.map((x) => x.p99Us));
      if (p50) r.perRunP50 = p50;
      if (p99) r.perRunP99 = p99;
      const t = summarize(r.runs.flatMap((x) => x.traceUs ?? []));
      if (t) r.trace = t;
    }

    // Merge with bench:latency's rows.
    let latency: PartResult<unknown> | undefined;
    let cells: LatencyCellJson[] = [];
    try {
      const j = JSON.parse(await readFile(join(ctx.out, 'latency.json'), 'utf8')) as { latency?: LatencyCellJson[]; machine?: { date?: string } };
      cells = (j.latency ?? []).filter((c) => c.loaded && (c.variant === 'lo' || c.variant === 'tbf'));
      latency = { startedAt: j.machine?.date ?? '?' } as PartResult<unknown>;
    } catch {
      // not run yet
    }
    const merged: MergedRow[] = [];
    const ref = new Map<Link, LatencySummary | undefined>();
    for (const link of ['loopback', 'veth'] as const) {
      for (const c of cells.filter((x) => x.link === link)) {
        const per = c.loadedPerRound ?? [];
        merged.push({
          link,
          label: `${c.label} (*bench:latency*)`,
          measured: 'request → 4 KiB reply, round trip at the requester',
          s: c.loaded,
          perRun: `${fmtStats(runStats(per.map((x) => x.p50Us)))} / ${fmtStats(runStats(per.map((x) => x.p99Us)))}`,
        });
      }
      for (const r of data.rows.filter((x) => x.link === link)) {
        merged.push({
          link,
          label: r.label,
          measured: 'REQ_PAGES → page, at the tap',
          s: r.summary,
          perRun: `${fmtStats(r.perRunP50)} / ${fmtStats(r.perRunP99)}`,
          requests: `${fmt(r.runs.reduce((s, x) => s + x.tapRequests, 0))} / ${fmt(r.runs.reduce((s, x) => s + (x.sourceRequests ?? NaN), 0))}`,
          ...(r.unavailable ? { unavailable: r.unavailable } : {}),
        });
      }
      ref.set(link, data.rows.find((r) => r.link === link && r.source === 'qemu' && r.preempt)?.summary);
    }
    const series: FacetSeries[] = [];
    // Migrations first: their lines are drawn solid.
    for (const m of [...merged].sort((a, b) => Number(a.measured.startsWith('request')) - Number(b.measured.startsWith('request')))) {
      if (!m.s) continue;
      // The same row has the same colour in both panels.
      series.push({ panel: m.link === 'veth' ? `veth shaped to ${LINK.rate}` : 'loopback', label: m.label.replace(' (*bench:latency*)', '').replace(' (qmt tap)', ''), dash: m.measured.startsWith('REQ') ? 'migration through qmt tap' : 'bench:latency synthetic peers', cdf: m.s.cdf });
    }
    await mkdir(ctx.out, { recursive: true });
    await writeFile(join(ctx.out, 'urgent-cdf.svg'), await facetedCdfSvg('Urgent page requests under bulk load: CDF', 'request → page (µs, log scale)', 'measured', series));
    return {
      config: { runs, guestMiB, trace, link: LINK, sourceParameters: { 'max-bandwidth': 1e15, 'downtime-limit': 1, 'max-postcopy-bandwidth': 0 }, postcopyAfterSyncs: 2 },
      data,
      markdown: markdown(data, runs, latency, cells, merged, ref, trace),
    };
  },
);
