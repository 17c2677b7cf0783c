/**
 * The issue-13 summary at the top of bench/REPORT.md ("Measure": urgent
 * latency, the demo, the eight-migration load, multifd), each figure against
 * its aim and its same-run baseline, from the parts' result files. A row whose
 * feature the measured tree lacked says "not available (why)".
 */
import type { DemoData, DemoVariant } from '../demo.bench.js';
import type { LoadData } from '../load.bench.js';
import type { MultifdData } from '../multifd.bench.js';
import type { UrgentData } from '../urgent.bench.js';
import { DEMO_AIMS, demoAims, LOAD_AIM, MULTIFD_AIM_ROWS, MULTIFD_LABEL, MULTIFD_TLS_2_VS_1, multifdAimRowMeasured, multifdScaling } from './aims.js';
import { notAvailable } from './features.js';
import type { PartResult } from './part.js';
import { fmt } from './report.js';
import { ratio } from './stats.js';
import { expectedGbps } from './thread-cpu.js';
import { headingAnchor, profileDigest, profileHeading, type ProfiledPath } from './cpuprofile.js';

export interface Issue13Line {
  row: string;
  figure: string;
  baseline: string;
  ratio: string;
  aim: string;
  /** Threads and cores: how the row used the machine. */
  machine: string;
  /** When the figure was taken, and whether it was a quick run. */
  run: string;
  /** For a missed aim: where the CPU went, per thread (and the function-level profile when bench:profile --threads ran). */
  time?: string;
}

let profiles: Map<string, ProfiledPath> | undefined;

/** A missed aim's "where the time goes": the busiest threads of its last run, and its CPU profile per thread when there is one. */
function timeGoesTo(met: boolean | undefined, threads: string | undefined, profileId?: string): string | undefined {
  if (met !== false) return undefined;
  const p = profileId ? profiles?.get(profileId) : undefined;
  const prof = p ? ` — [profile per thread](#${headingAnchor(profileHeading(p))}): ${profileDigest(p)}` : profileId ? ' — per-thread profile: `npm run bench:profile -- --only-threads`' : '';
  return `${threads && threads !== '–' ? `threads: ${threads}` : 'per-thread CPU not sampled'}${prof}`;
}

const verdict = (ok: boolean | undefined): string => (ok === undefined ? '' : ok ? ' — met' : ' — missed');
const ms = (us: number | undefined): string => (us === undefined ? '–' : fmt(us / 1000, 2));
const when = (p: PartResult<unknown>): string => `${p.startedAt.slice(0, 16).replace('T', ' ')}${p.quick ? ', --quick' : ''}, load ≤ ${fmt(p.load.max1m, 1)}`;

function urgentLines(p: PartResult<unknown>, out: Issue13Line[]): void {
  const d = p.data as UrgentData;
  for (const link of ['loopback', 'veth'] as const) {
    const q = d.rows.find((r) => r.link === link && r.source === 'qemu' && r.preempt);
    for (const threads of ['off', 'on'] as const) {
      const ours = d.rows.find((r) => r.link === link && r.source === 'library' && r.preempt && r.threads === threads);
      if (!ours) continue;
      const row = `urgent latency, our source (RAM in memory) + preempt → QEMU, threads ${threads}, ${link}`;
      if (ours.unavailable) {
        out.push({ row, figure: notAvailable(ours.unavailable), baseline: '', ratio: '', aim: 'p50 and p99 no worse than QEMU + preempt', machine: '', run: when(p) });
        continue;
      }
      const s = ours.summary;
      const b = q?.summary;
      const procs = ours.runs.map((r) => r.sourceProcess).filter((x) => x !== undefined);
      const last = procs[procs.length - 1];
      const met = s && b ? s.p50Us <= b.p50Us && s.p99Us <= b.p99Us : undefined;
      const time = timeGoesTo(met, last?.top);
      out.push({
        ...(time ? { time } : {}),
        row,
        figure: s ? `p50 ${ms(s.p50Us)} / p99 ${ms(s.p99Us)} ms (${fmt(s.count)} requests)` : '–',
        baseline: b ? `QEMU → QEMU + preempt p50 ${ms(b.p50Us)} / p99 ${ms(b.p99Us)} ms` : '–',
        ratio: s && b ? `p50 ${fmt(s.p50Us / b.p50Us, 2)}×, p99 ${fmt(s.p99Us / b.p99Us, 2)}×` : '–',
        aim: `p50 and p99 no worse than QEMU + preempt${verdict(met)}`,
        machine: last ? `source: ${last.osThreads} OS threads${last.workers !== undefined ? `, ${last.workers} workers` : ''}, ${last.cpuS !== undefined && last.seconds > 0 ? fmt(last.cpuS / last.seconds, 2) : '–'} of ${d.cores ?? '?'} cores` : '',
        run: when(p),
      });
    }
  }
}

function demoLines(p: PartResult<unknown>, out: Issue13Line[]): void {
  const d = p.data as DemoData;
  for (const threads of [...new Set(d.variants.map((v) => v.threads))]) {
    const on = d.variants.find((v) => v.preempt && v.threads === threads);
    const off = d.variants.find((v) => !v.preempt && v.threads === threads);
    const mode = threads ? `\`--threads ${threads}\`` : 'one thread (no `--threads` in this build)';
    const na = on?.unavailable ?? off?.unavailable;
    const a = demoAims(d, threads);
    const mach = (v: DemoVariant | undefined): string => {
      const r = v?.runs[v.runs.length - 1];
      return r ? `${r.osThreads ?? '–'} OS threads${r.threads ? `, ${r.threads.workers} workers` : ''}, ${fmt(r.coresUsed, 2)} of ${d.cores ?? '?'} cores` : '';
    };
    for (const pct of ['p50', 'p99'] as const) {
      const row = `demo fault latency ${pct}, preempt, ${mode} (TLS, after one pass, ${fmt(d.mib)} MiB)`;
      if (na) {
        out.push({ row, figure: notAvailable(na), baseline: '', ratio: '', aim: `≥ ${DEMO_AIMS[pct]}× better than \`--no-preempt\``, machine: '', run: when(p) });
        continue;
      }
      const met = a[pct] === undefined ? undefined : a[pct]! >= DEMO_AIMS[pct];
      const time = timeGoesTo(met, on?.runs[on.runs.length - 1]?.topThreads, threads === 'on' ? 'demo-preempt-threads' : 'demo-preempt');
      out.push({
        ...(time ? { time } : {}),
        row,
        figure: `${ms(on?.[pct]?.median)} ms`,
        baseline: `\`--no-preempt\` ${ms(off?.[pct]?.median)} ms`,
        ratio: a[pct] === undefined ? '–' : `${fmt(a[pct], 1)}× better`,
        aim: `≥ ${DEMO_AIMS[pct]}× better${verdict(met)}`,
        machine: mach(on),
        run: when(p),
      });
    }
  }
}

function loadLines(p: PartResult<unknown>, out: Issue13Line[]): void {
  const d = p.data as LoadData;
  for (const threads of ['off', 'on'] as const) {
    const eight = d.variants.find((v) => v.shape === 'eight' && v.threads === threads);
    const single = d.variants.find((v) => v.shape === 'single' && v.threads === threads);
    const row = `eight concurrent migrations${d.withQemu ? ' + a QEMU restore' : ''}: worst urgent p99, threads ${threads}`;
    const na = eight?.unavailable ?? single?.unavailable;
    if (na || !eight || !single) {
      out.push({ row, figure: notAvailable(na ?? 'not run'), baseline: '', ratio: '', aim: `≤ ${LOAD_AIM}× a single migration's p99`, machine: '', run: when(p) });
      continue;
    }
    const r = ratio(eight.worstP99?.median, single.worstP99?.median);
    const last = eight.runs[eight.runs.length - 1];
    const workers = last?.migrations.reduce((s, m) => s + (m.workers ?? 0), 0);
    const time = timeGoesTo(r === undefined ? undefined : r <= LOAD_AIM, last?.topThreads);
    out.push({
      ...(time ? { time } : {}),
      row,
      figure: `${ms(eight.worstP99?.median)} ms`,
      baseline: `\`${d.single}\` alone ${ms(single.worstP99?.median)} ms`,
      ratio: r === undefined ? '–' : `${fmt(r, 2)}×`,
      aim: `≤ ${LOAD_AIM}×${verdict(r === undefined ? undefined : r <= LOAD_AIM)}`,
      machine: last ? `${last.osThreads ?? '–'} OS threads${workers ? `, ${workers} workers` : ''}, ${fmt(last.cpuS / (last.wallMs / 1000), 2)} of ${d.cores} cores` : '',
      run: when(p),
    });
  }
}

function multifdLines(p: PartResult<unknown>, out: Issue13Line[]): void {
  const d = p.data as MultifdData;
  for (const [row, threads] of MULTIFD_AIM_ROWS) {
    // The library's row of the issue is threads on; off (same run) next to it, or alone when the tree has no threads.
    if (!multifdAimRowMeasured(d, row, threads)) continue;
    const s = multifdScaling(d, row, threads);
    const name = `${MULTIFD_LABEL[row]}${threads ? `, threads ${threads}` : ''}: 2 TLS channels vs 1${row === 'qemu-qemu' ? ' (reference)' : ''}`;
    if (s.unavailable) {
      out.push({ row: name, figure: notAvailable(s.unavailable), baseline: '', ratio: '', aim: `≥ ${MULTIFD_TLS_2_VS_1}×`, machine: '', run: when(p) });
      continue;
    }
    const two = d.variants.find((v) => v.row === row && v.kind === 'tls' && v.channels === 2 && (threads === undefined || v.threads === threads));
    const one = d.variants.find((v) => v.row === row && v.kind === 'tls' && v.channels === 1 && (threads === undefined || v.threads === threads));
    const time = timeGoesTo(s.ratio === undefined ? undefined : s.ratio >= MULTIFD_TLS_2_VS_1, two ? topThreadsOf(two) : undefined, row === 'library' && threads === 'on' ? 'library-multifd2-tls-threads' : undefined);
    out.push({
      ...(time ? { time } : {}),
      row: name,
      figure: s.two === undefined ? '–' : `${fmt(s.two, 2)} GB/s; ${fmt(two?.cpuPerGb, 2)} CPU s/GB`,
      baseline: s.one === undefined ? '–' : `1 channel ${fmt(s.one, 2)} GB/s; ${fmt(one?.cpuPerGb, 2)} CPU s/GB`,
      ratio: s.ratio === undefined ? '–' : `${fmt(s.ratio, 2)}×`,
      aim: `≥ ${MULTIFD_TLS_2_VS_1}×${verdict(s.ratio === undefined ? undefined : s.ratio >= MULTIFD_TLS_2_VS_1)}`,
      machine: two ? `${fmt(two.osThreads)} threads (${fmt(two.busyThreads)} busy), ${fmt(two.coresUsed, 2)} of ${d.cores} cores` : '',
      run: when(p),
    });
  }
  // Every TLS row with its per-core cost and what it would give on the reference host.
  for (const v of d.variants.filter((x) => x.kind === 'tls' && !x.unavailable && x.stats)) {
    const big = expectedGbps(d.referenceCores, v.cpuPerGb, v.busiestPerGb);
    const qq = d.variants.find((x) => x.row === 'qemu-qemu' && x.kind === 'tls' && x.channels === v.channels)?.stats?.median;
    out.push({
      row: `${MULTIFD_LABEL[v.row]}${v.threads ? `, threads ${v.threads}` : ''}, TLS, ${v.channels} channel${v.channels === 1 ? '' : 's'}, ${fmt(d.guestBytes / 2 ** 20)} MiB`,
      figure: `${fmt(v.stats!.median, 2)} GB/s; ${fmt(v.cpuPerGb, 2)} CPU s/GB; ${fmt(big, 2)} GB/s expected on ${d.referenceCores} cores`,
      baseline: v.row === 'qemu-qemu' ? '–' : `QEMU → QEMU ${qq === undefined ? '–' : `${fmt(qq, 2)} GB/s`}`,
      ratio: v.row === 'qemu-qemu' ? '–' : ratio(v.stats!.median, qq) === undefined ? '–' : `${fmt(ratio(v.stats!.median, qq), 2)}×`,
      aim: '',
      machine: `${fmt(v.osThreads)} threads (${fmt(v.busyThreads)} busy), ${fmt(v.coresUsed, 2)} of ${d.cores} cores`,
      run: when(p),
    });
  }
}

const topThreadsOf = (v: { runs: { cpu: import('./thread-cpu.js').ThreadCpuReport }[] }): string | undefined => {
  const last = v.runs[v.runs.length - 1];
  return last?.cpu.top ? last.cpu.top.slice(0, 5).map((t) => `${t.comm} ${fmt(t.cpuS, 2)} s`).join(', ') : undefined;
};

export function issue13Lines(parts: Map<string, PartResult<unknown>>, profilePaths?: Map<string, ProfiledPath>): Issue13Line[] {
  profiles = profilePaths;
  const out: Issue13Line[] = [];
  const add = (name: string, f: (p: PartResult<unknown>, o: Issue13Line[]) => void, what: string): void => {
    const p = parts.get(name);
    if (!p?.data) {
      out.push({ row: what, figure: `not run yet: \`npm run bench -- --only ${name}\``, baseline: '', ratio: '', aim: '', machine: '', run: '' });
      return;
    }
    f(p, out);
  };
  add('urgent', urgentLines, 'urgent latency under saturated bulk');
  add('demo', demoLines, 'the demo: preempt vs `--no-preempt`');
  add('load', loadLines, 'the eight-migration load');
  add('multifd', multifdLines, 'multifd');
  return out;
}

export function issue13Table(lines: readonly Issue13Line[]): string {
  const rows = ['| row | figure | baseline (same run) | ratio | aim | threads, cores used | run | missed: where the CPU went, per thread |', '|---|---|---|---|---|---|---|---|'];
  for (const l of lines) rows.push(`| ${l.row} | ${l.figure} | ${l.baseline} | ${l.ratio} | ${l.aim} | ${l.machine} | ${l.run} | ${l.time ?? ''} |`);
  return rows.join('\n');
}

/** What the table is, and a warning when its figures are quick ones or were taken on a busy machine. */
export function issue13Intro(parts: Map<string, PartResult<unknown>>, runStart: string): string {
  const mine = ['urgent', 'demo', 'load', 'multifd'].map((n) => parts.get(n)).filter((p): p is PartResult<unknown> => p !== undefined);
  const quick = mine.filter((p) => p.quick).map((p) => p.part);
  const busy = mine.filter((p) => p.load.max1m >= 4).map((p) => `${p.part} (${fmt(p.load.max1m, 1)})`);
  const stale = mine.filter((p) => p.startedAt < runStart).map((p) => p.part);
  const notes = [
    quick.length > 0 ? `**${quick.join(', ')}: quick figures** (\`--quick\`: smaller guests, one round), taken to validate the harness, not to judge the aims` : '',
    busy.length > 0 ? `**taken while other work loaded the machine** (1-minute load peak: ${busy.join(', ')}; ${mine[0]?.machine.cores ?? '?'} cores): the tails and the throughput are the machine's, not only ours` : '',
    stale.length > 0 ? `not run this time (earlier results): ${stale.join(', ')}` : '',
  ].filter(Boolean);
  return [
    'Each figure next to its same-run baseline (ratios of medians over the rounds), against the aim of issue 13; reported, not asserted. "Threads, cores used": the OS threads of the process(es) of the row (Node\'s and QEMU\'s own included; workers = channel threads the sessions name) and the cores their CPU kept busy over the run (CPU core-seconds / wall seconds). A row whose feature the measured tree lacked says "not available". These rows alone: `npm run bench -- --only urgent,demo,load,multifd --runs 3`.',
    ...(notes.length > 0 ? ['', `> ${notes.join('. ')}.`] : []),
  ].join('\n');
}
