/**
 * The summary table at the top of bench/REPORT.md: the headline figure of
 * each part next to its same-run baseline, from the parts' result files.
 */
import type { BulkData } from '../bulk.bench.js';
import type { DemoData } from '../demo.bench.js';
import type { Kind, SavedData, SavedRow, SavedVariant } from '../saved.bench.js';
import { headingAnchor, profileDigest, profileHeading, type ProfiledPath } from './cpuprofile.js';
import { BULK_AIM_VS_RAW, bulkCpuPerGb, DEMO_AIMS, demoAims, SAVED_AIMS, SAVED_LABEL } from './aims.js';
import { median, ratio } from './stats.js';
import type { MemoryData } from '../memory.bench.js';
import type { SeedData } from '../seed.bench.js';
import type { SinkBenchData } from '../sink.bench.js';
import type { SwitchoverData } from '../switchover.bench.js';
import type { UrgentData } from '../urgent.bench.js';
import type { PartResult } from './part.js';
import { fmt } from './report.js';

export interface SummaryLine {
  part: string;
  what: string;
  figure: string;
  baseline: string;
  ratio: string;
  aim: string;
  /** Throughput rows: CPU core-seconds per GB (10⁹ bytes) of guest RAM, ours and the baseline's. */
  cpu?: string;
}

export interface CodecData {
  mib: number;
  runs: number;
  /** GB/s of guest RAM, median of the runs. */
  gbps: { copy: number; bulk: number; decode: number; encode: number };
  /** Seconds of each run of each path, CPU seconds (user + system) likewise, JS-heap bytes allocated per page. */
  secondsPerRun?: Record<string, number[]>;
  cpuSeconds?: Record<string, number[]>;
  allocatedPerPage?: Record<string, number>;
}

const x = (a: number | undefined, b: number | undefined): string => (a === undefined || b === undefined || !b ? '–' : `${fmt(a / b, 2)}×`);
/** Core-seconds per GB, or '–'. */
const sgb = (v: number | undefined): string => fmt(v, 2);
const verdict = (ok: boolean | undefined): string => (ok === undefined ? '' : ok ? ' — met' : ' — missed');
/** Issue 16's aim for the seed's experiment: the stall with postcopy at once ≥ 3× that after one pass. */
const seedAim = (atOnce: number | undefined, after1: number | undefined): string => `≥ 3× (the seed: 3.5 s → < 1 s)${verdict(atOnce === undefined || after1 === undefined || !after1 ? undefined : atOnce / after1 >= 3)}`;

export function summaryLines(parts: Map<string, PartResult<unknown>>): SummaryLine[] {
  const out: SummaryLine[] = [];
  const codec = parts.get('codec')?.data as CodecData | undefined;
  if (codec) {
    const perGb = (k: string): number | undefined => {
      const c = median(codec.cpuSeconds?.[k] ?? []);
      return c === undefined ? undefined : c / ((codec.mib * 2 ** 20) / 1e9);
    };
    const cpu = (k: string): string => `${sgb(perGb(k))} (copy ${sgb(perGb('copy'))})`;
    out.push({ part: 'codec', what: 'decode into guest memory', figure: `${fmt(codec.gbps.decode, 2)} GB/s`, baseline: `Buffer.copy page by page ${fmt(codec.gbps.copy, 2)} GB/s`, ratio: x(codec.gbps.decode, codec.gbps.copy), aim: '', cpu: cpu('decode') });
    out.push({ part: 'codec', what: 'encode with zero-page detection', figure: `${fmt(codec.gbps.encode, 2)} GB/s`, baseline: `Buffer.copy page by page ${fmt(codec.gbps.copy, 2)} GB/s`, ratio: x(codec.gbps.encode, codec.gbps.copy), aim: '', cpu: cpu('encode') });
  }
  const bulk = parts.get('bulk')?.data as BulkData | undefined;
  if (bulk) {
    const m = (impl: string, kind: string): number | undefined => bulk.variants.find((v) => v.impl === impl && v.kind === kind)?.stats?.median;
    const gb = (v: number | undefined): string => (v === undefined ? '–' : `${fmt(v, 2)} GB/s`);
    const tls = m('library', 'tls');
    const qtls = m('qemu', 'tls');
    // Sender + receiver core-seconds per GB of guest RAM.
    const c = (impl: string, kind: string): string => {
      const v = bulk.variants.find((y) => y.impl === impl && y.kind === kind);
      const p = v ? bulkCpuPerGb(v, bulk.guestBytes) : {};
      return sgb(p.source !== undefined && p.dest !== undefined ? p.source + p.dest : undefined);
    };
    out.push({ part: 'bulk', what: `library → library, TLS, ${fmt(bulk.guestBytes / 2 ** 20)} MiB guest`, figure: gb(tls), baseline: `QEMU → QEMU TLS ${gb(qtls)}`, ratio: x(tls, qtls), aim: `≥ 2×${verdict(tls !== undefined && qtls !== undefined ? tls / qtls >= 2 : undefined)}`, cpu: `${c('library', 'tls')} (QEMU ${c('qemu', 'tls')})` });
    out.push({ part: 'bulk', what: 'library → library, TLS', figure: gb(tls), baseline: `raw TLS socket pair ${gb(m('raw', 'tls'))}`, ratio: x(tls, m('raw', 'tls')), aim: '', cpu: `${c('library', 'tls')} (raw ${c('raw', 'tls')})` });
    out.push({ part: 'bulk', what: 'library → library, plain TCP', figure: gb(m('library', 'plain')), baseline: `QEMU → QEMU plain ${gb(m('qemu', 'plain'))}; raw pair ${gb(m('raw', 'plain'))}`, ratio: `${x(m('library', 'plain'), m('qemu', 'plain'))}; ${x(m('library', 'plain'), m('raw', 'plain'))}`, aim: '', cpu: `${c('library', 'plain')} (QEMU ${c('qemu', 'plain')}; raw ${c('raw', 'plain')})` });
  }
  const urgent = parts.get('urgent')?.data as UrgentData | undefined;
  if (urgent) {
    for (const link of ['loopback', 'veth'] as const) {
      const ours = urgent.rows.find((r) => r.link === link && r.source === 'library' && r.preempt)?.summary;
      const q = urgent.rows.find((r) => r.link === link && r.source === 'qemu' && r.preempt)?.summary;
      if (!ours && !q) continue;
      const f = (s: typeof ours): string => (s ? `p50 ${fmt(s.p50Us / 1000, 2)} / p99 ${fmt(s.p99Us / 1000, 2)} ms` : '–');
      out.push({
        part: 'urgent',
        what: `our source → QEMU, lazy restore + preempt, ${link}`,
        figure: f(ours),
        baseline: `QEMU → QEMU + preempt ${f(q)}`,
        ratio: `p50 ${x(ours?.p50Us, q?.p50Us)}, p99 ${x(ours?.p99Us, q?.p99Us)}`,
        aim: `no worse than QEMU + preempt${verdict(ours && q ? ours.p50Us <= q.p50Us && ours.p99Us <= q.p99Us : undefined)}`,
      });
    }
  }
  const seed = parts.get('seed')?.data as SeedData | undefined;
  if (seed) {
    const st = (n: string): number | undefined => seed.rows.find((r) => r.name === n)?.stall?.median;
    out.push({ part: 'seed', what: "the VM's stall (downtime + blocktime), library ↔ library, postcopy after 1 pass", figure: `${fmt(st('after-1'), 1)} ms`, baseline: `postcopy at once ${fmt(st('immediate'), 1)} ms; precopy only ${fmt(st('precopy'), 1)} ms`, ratio: `at once / after-1 = ${x(st('immediate'), st('after-1'))}`, aim: seedAim(st('immediate'), st('after-1')) });
    const q = (n: string): number | undefined => seed.qemu?.rows.find((r) => r.name === n && !r.viaTap)?.stall?.median;
    if (seed.qemu) out.push({ part: 'seed', what: "the VM's stall, QEMU → QEMU (seed guest), postcopy after 1 pass", figure: `${fmt(q('after-1'), 1)} ms`, baseline: `postcopy at once ${fmt(q('immediate'), 1)} ms; precopy only ${fmt(q('precopy'), 1)} ms`, ratio: `at once / after-1 = ${x(q('immediate'), q('after-1'))}`, aim: seedAim(q('immediate'), q('after-1')) });
    const t = (n: string): number | undefined => seed.qemu?.rows.find((r) => r.name === n && r.viaTap)?.stall?.median;
    if (seed.qemu && t('after-1') !== undefined) out.push({ part: 'seed', what: "the VM's stall, QEMU → `qmt tap` → QEMU (seed guest), postcopy after 1 pass", figure: `${fmt(t('after-1'), 1)} ms`, baseline: `postcopy at once ${fmt(t('immediate'), 1)} ms (through the tap)`, ratio: `at once / after-1 = ${x(t('immediate'), t('after-1'))}`, aim: seedAim(t('immediate'), t('after-1')) });
  }
  const sw = parts.get('switchover')?.data as SwitchoverData | undefined;
  if (sw) {
    for (const mode of ['precopy', 'postcopy'] as const) {
      const ours = sw.rows.find((r) => r.impl === 'library' && r.mode === mode);
      const q = sw.rows.find((r) => r.impl === 'qemu' && r.mode === mode);
      if (!ours?.toDevice) continue;
      out.push({
        part: 'switchover',
        what: `stop → first device-state byte on the wire, ${mode}`,
        figure: `${fmt(ours.toDevice.median, 2)} ms (running after ${fmt(ours.toRunning?.median, 2)} ms)`,
        baseline: q?.toDevice ? `QEMU ${fmt(q.toDevice.median, 2)} ms (running after ${fmt(q.toRunning?.median, 2)} ms)` : '–',
        ratio: x(ours.toDevice.median, q?.toDevice?.median),
        aim: 'no polling (the seed saw ~25 ms)',
      });
    }
  }
  const sink = parts.get('sink')?.data as SinkBenchData | undefined;
  if (sink) {
    const gb = (ts: { seconds: number }[] | undefined): number | undefined => median((ts ?? []).map((t) => sink.bytes / t.seconds / 1e9));
    const g = (v: number | undefined): string => (v === undefined ? '–' : `${fmt(v, 2)} GB/s`);
    const w = gb(sink.write?.sink);
    const wn = gb(sink.write?.node);
    // This process's core-seconds per GB (the part runs both the sink and the baseline in it).
    const c = (ts: { cpu?: number | undefined }[] | undefined): string => sgb(median((ts ?? []).flatMap((t) => (t.cpu === undefined ? [] : [t.cpu / (sink.bytes / 1e9)]))));
    out.push({ part: 'sink', what: `DirectorySink to durable (writePages + flush), ${fmt(sink.bytes / 2 ** 20)} MiB`, figure: g(w), baseline: `Node fs.write 1 MiB + fsync ${g(wn)}`, ratio: x(w, wn), aim: '', cpu: `${c(sink.write?.sink)} (fs.write ${c(sink.write?.node)})` });
    const r = gb(sink.read?.uncached?.source);
    const rn = gb(sink.read?.uncached?.node);
    out.push({ part: 'sink', what: 'SavedVmSource scan, not cached', figure: g(r), baseline: `Node fs.read 1 MiB ${g(rn)}`, ratio: x(r, rn), aim: '', cpu: `${c(sink.read?.uncached?.source)} (fs.read ${c(sink.read?.uncached?.node)})` });
  }
  const mem = parts.get('memory')?.data as MemoryData | undefined;
  if (mem?.source) {
    const MiB = 2 ** 20;
    out.push({
      part: 'memory',
      what: `source peak RSS, ${fmt(mem.guestBytes / MiB)} MiB file-backed guest`,
      figure: `${fmt(mem.source.median / MiB)} MiB (destination ${fmt((mem.dest?.median ?? NaN) / MiB)} MiB)`,
      baseline: `idle process ${fmt((mem.idleHwm?.median ?? NaN) / MiB)} MiB`,
      ratio: x(mem.source.median, mem.idleHwm?.median),
      aim: `≤ 256 MiB${verdict(mem.source.median <= 256 * MiB)}`,
    });
  }
  return out;
}

export function summaryTable(lines: readonly SummaryLine[]): string {
  const rows = ['| part | what | figure | baseline (same run) | ratio | aim | CPU s/GB (baseline) |', '|---|---|---|---|---|---|---|'];
  for (const l of lines) rows.push(`| ${l.part} | ${l.what} | ${l.figure} | ${l.baseline} | ${l.ratio} | ${l.aim} | ${l.cpu ?? ''} |`);
  return rows.join('\n');
}

/** One row of the issue-12 table: a figure, its same-run baseline, their ratio and the aim. */
export interface IssueLine {
  row: string;
  figure: string;
  baseline: string;
  ratio: string;
  aim: string;
  /** CPU core-seconds per GB at each end (source / destination), ours and the baseline's. */
  cpu: string;
  /** For a missed aim: where the time goes (the CPU profile's digest, linked). */
  time: string;
}

/** The profile of the path behind a row, for a missed aim: a link to its section and its digest. */
function timeGoesTo(profiles: Map<string, ProfiledPath> | undefined, id: string, met: boolean | undefined): string {
  if (met !== false) return '';
  const p = profiles?.get(id);
  if (!p) return 'not profiled (`npm run bench:profile`)';
  return `[profile](#${headingAnchor(profileHeading(p))}): ${profileDigest(p)}`;
}

const gbs = (v: number | undefined): string => (v === undefined ? '–' : `${fmt(v, 2)} GB/s`);
const cpuPair = (c: { source?: number; dest?: number } | undefined): string => (c && (c.source !== undefined || c.dest !== undefined) ? `${fmt(c.source, 2)} / ${fmt(c.dest, 2)}` : '–');
const aimText = (aim: number, r: number | undefined, unit = '×'): string => `≥ ${aim}${unit}${verdict(r === undefined ? undefined : r >= aim)}`;

/** Every measured row of issue 12 ("Measure"), in its order, from the parts' result files. */
export function issueLines(parts: Map<string, PartResult<unknown>>, profiles?: Map<string, ProfiledPath>): IssueLine[] {
  const out: IssueLine[] = [];
  const saved = parts.get('saved')?.data as SavedData | undefined;
  if (saved && saved.variants.some((v) => v.runs.length > 0)) {
    const v = (row: SavedRow, kind: Kind): SavedVariant | undefined => saved.variants.find((x) => x.row === row && x.kind === kind);
    for (const a of SAVED_AIMS) {
      const [row, kind, base, bkind, aim] = a;
      const f = v(row, kind);
      const b = v(base, bkind);
      const r = ratio(f?.stats?.median, b?.stats?.median);
      const k = (x: Kind): string => (x === 'tls' ? 'TLS' : 'plain');
      out.push({
        row: `${SAVED_LABEL[row]}, ${k(kind)}, ${fmt(saved.guestBytes / 2 ** 20)} MiB guest`,
        figure: gbs(f?.stats?.median),
        baseline: `${SAVED_LABEL[base]}${base === 'qemu-qemu' ? ` ${k(bkind)}` : ''} ${gbs(b?.stats?.median)}`,
        ratio: r === undefined ? '–' : `${fmt(r, 2)}×`,
        aim: aimText(aim, r),
        cpu: `${cpuPair(f?.cpuPerGb)} (baseline ${cpuPair(b?.cpuPerGb)})`,
        time: timeGoesTo(profiles, `${row === 'qemu-receive' ? 'receive' : 'send'}-${kind}`, r === undefined ? undefined : r >= aim),
      });
    }
  }
  const bulk = parts.get('bulk')?.data as BulkData | undefined;
  if (bulk) {
    for (const kind of ['plain', 'tls'] as const) {
      const lib = bulk.variants.find((x) => x.impl === 'library' && x.kind === kind);
      const raw = bulk.variants.find((x) => x.impl === 'raw' && x.kind === kind);
      if (!lib && !raw) continue;
      const r = ratio(lib?.stats?.median, raw?.stats?.median);
      out.push({
        row: `library → library, ${kind === 'tls' ? 'TLS' : 'plain'}, ${fmt(bulk.guestBytes / 2 ** 20)} MiB guest`,
        figure: gbs(lib?.stats?.median),
        baseline: `raw ${kind === 'tls' ? 'TLS ' : ''}socket pair ${gbs(raw?.stats?.median)}`,
        ratio: r === undefined ? '–' : `${fmt(r, 2)}×`,
        aim: aimText(BULK_AIM_VS_RAW, r),
        cpu: `${cpuPair(lib ? bulkCpuPerGb(lib, bulk.guestBytes) : undefined)} (raw pair ${cpuPair(raw ? bulkCpuPerGb(raw, bulk.guestBytes) : undefined)})`,
        time: timeGoesTo(profiles, `library-${kind}`, r === undefined ? undefined : r >= BULK_AIM_VS_RAW),
      });
    }
  }
  if (bulk) {
    for (const kind of ['plain', 'tls'] as const) {
      const raw = bulk.variants.find((x) => x.impl === 'raw' && x.kind === kind);
      if (!raw?.stats) continue;
      out.push({ row: `raw ${kind === 'tls' ? 'TLS ' : ''}socket pair (the CPU reference)`, figure: gbs(raw.stats.median), baseline: '–', ratio: '–', aim: '', cpu: `${cpuPair(bulkCpuPerGb(raw, bulk.guestBytes))} (sender / receiver)`, time: '' });
    }
  }
  const demo = parts.get('demo')?.data as DemoData | undefined;
  if (demo && demo.variants.some((v) => v.runs.length > 0)) {
    const on = demo.variants.find((v) => v.preempt);
    const off = demo.variants.find((v) => !v.preempt);
    const a = demoAims(demo);
    for (const p of ['p50', 'p99'] as const) {
      out.push({
        row: `demo fault latency ${p}, preempt (TLS, after one pass, ${fmt(demo.mib)} MiB)`,
        figure: `${fmt((on?.[p]?.median ?? NaN) / 1000, 2)} ms`,
        baseline: `\`--no-preempt\` ${fmt((off?.[p]?.median ?? NaN) / 1000, 2)} ms`,
        ratio: a[p] === undefined ? '–' : `${fmt(a[p], 1)}× better`,
        aim: aimText(DEMO_AIMS[p], a[p], '× better'),
        cpu: `${fmt(on?.cpuPerGb, 2)} both ends (no preempt ${fmt(off?.cpuPerGb, 2)})`,
        time: timeGoesTo(profiles, 'demo-preempt', a[p] === undefined ? undefined : a[p]! >= DEMO_AIMS[p]),
      });
    }
  }
  return out;
}

export function issueTable(lines: readonly IssueLine[]): string {
  const rows = ['| row | figure | baseline (same run) | ratio | aim | CPU s/GB, source / destination (baseline) | missed: what the time goes to (CPU profile: per process idle, GC, top self time) |', '|---|---|---|---|---|---|---|'];
  for (const l of lines) rows.push(`| ${l.row} | ${l.figure} | ${l.baseline} | ${l.ratio} | ${l.aim} | ${l.cpu} | ${l.time} |`);
  return rows.join('\n');
}
