/**
 * The aims of issue 12 ("the page path at memory speed") and the per-GB CPU
 * figures, computed from the parts' data: shared by the parts (their own
 * sections) and bench/lib/summary.ts (the report's summary), which must not
 * import a part's script (each runs itself when loaded).
 */
import type { Variant as BulkVariant } from '../bulk.bench.js';
import type { DemoData } from '../demo.bench.js';
import type { MultifdData, MultifdRow, MultifdVariant } from '../multifd.bench.js';
import type { Kind, SavedData, SavedRow } from '../saved.bench.js';
import { median, ratio } from './stats.js';

export const SAVED_LABEL: Record<SavedRow, string> = {
  'qemu-qemu': 'QEMU → QEMU',
  'qemu-receive': 'QEMU → `qmt receive` (saved VM, durable)',
  'file-save': "QEMU's own `migrate file:` + fsync",
  'send-qemu': '`qmt send` (saved VM) → QEMU',
  'file-restore': "QEMU's own `migrate-incoming file:`",
  'mr-receive': 'QEMU → `qmt receive --format mapped-ram` (durable)',
  'mr-file-save': "QEMU's own mapped-ram `migrate file:` + fsync",
  'mr-load-ours': 'QEMU loads our mapped-ram file',
  'mr-file-restore': 'QEMU loads its own mapped-ram file',
  'mr-send-qemu': "`qmt send` (QEMU's mapped-ram file) → QEMU",
};

/** The aims of issue 12, as ratios of medians: [row, kind, baseline row, baseline kind, at least]. */
export const SAVED_AIMS: readonly [SavedRow, Kind, SavedRow, Kind, number][] = [
  ['qemu-receive', 'plain', 'qemu-qemu', 'plain', 2],
  ['qemu-receive', 'tls', 'qemu-qemu', 'tls', 1],
  ['qemu-receive', 'plain', 'file-save', 'plain', 0.7],
  ['send-qemu', 'plain', 'qemu-qemu', 'plain', 1],
  ['send-qemu', 'tls', 'qemu-qemu', 'tls', 1],
  ['send-qemu', 'plain', 'file-restore', 'plain', 0.7],
];

export function savedAims(d: SavedData): { what: string; figure: number | undefined; baseline: number | undefined; ratio: number | undefined; aim: number; met: boolean | undefined }[] {
  const m = (row: SavedRow, kind: Kind): number | undefined => d.variants.find((v) => v.row === row && v.kind === kind)?.stats?.median;
  return SAVED_AIMS.map(([row, kind, base, bkind, aim]) => {
    const a = m(row, kind);
    const b = m(base, bkind);
    const r = ratio(a, b);
    return { what: `${SAVED_LABEL[row]}, ${kind === 'tls' ? 'TLS' : 'plain'} vs ${SAVED_LABEL[base]}${base === 'qemu-qemu' ? `, ${bkind === 'tls' ? 'TLS' : 'plain'}` : ''}`, figure: a, baseline: b, ratio: r, aim, met: r === undefined ? undefined : r >= aim };
  });
}

/** Core-seconds per GB of guest RAM at each end, median over the runs. */
export function bulkCpuPerGb(v: BulkVariant, guestBytes: number): { source?: number; dest?: number } {
  const gb = guestBytes / 1e9;
  const med = (xs: (number | undefined)[]): number | undefined => median(xs.filter((x): x is number => x !== undefined).map((x) => x / gb));
  const source = med(v.runs.map((r) => r.cpuSeconds?.source));
  const dest = med(v.runs.map((r) => r.cpuSeconds?.dest));
  return { ...(source !== undefined ? { source } : {}), ...(dest !== undefined ? { dest } : {}) };
}

/** Aim of issue 12: library → library at least this fraction of the raw socket pair of the same kind. */
export const BULK_AIM_VS_RAW = 0.8;

/** Aims of issue 12: preempt this many times better than without, at p50 and p99. */
export const DEMO_AIMS = { p50: 20, p99: 10 } as const;

/** Preempt vs `--no-preempt` for one `--threads` mode (undefined: a build without `--threads`, else 'off' when there is no such variant). */
export function demoAims(d: DemoData, threads?: 'on' | 'off'): { p50: number | undefined; p99: number | undefined } {
  const mode = threads ?? (d.variants.some((v) => v.threads === undefined) ? undefined : 'off');
  const on = d.variants.find((v) => v.preempt && v.threads === mode);
  const off = d.variants.find((v) => !v.preempt && v.threads === mode);
  return { p50: ratio(off?.p50?.median, on?.p50?.median), p99: ratio(off?.p99?.median, on?.p99?.median) };
}


// ---------------------------------------------------------------------------
// Issue 13: a thread per channel, and multifd
// ---------------------------------------------------------------------------

/** Aim of issue 13: the worst urgent p99 of the eight concurrent migrations at most this many times a single migration's, same run. */
export const LOAD_AIM = 10;

/** Aim of issue 13 on a 2-core machine: 2 TLS multifd channels at least this many times the throughput of one. */
export const MULTIFD_TLS_2_VS_1 = 1.6;

/** The host the report extrapolates the per-core cost to. */
export const REFERENCE_CORES = 16;

export const MULTIFD_LABEL: Record<MultifdRow, string> = {
  'qemu-qemu': 'QEMU → QEMU multifd',
  'qemu-receive': 'QEMU multifd → `qmt receive --multifd N` (saved VM, durable)',
  'send-qemu': '`qmt send --multifd N` (saved VM) → QEMU multifd',
  library: 'library ↔ library multifd',
};

/** The rows the multifd aim is read on, in the report's order (threads: the rows that ran in either mode, each apart). */
export const MULTIFD_AIM_ROWS: readonly (readonly [MultifdRow, ('on' | 'off')?])[] = [['library', 'on'], ['library', 'off'], ['qemu-receive', 'on'], ['qemu-receive', 'off'], ['qemu-receive'], ['send-qemu'], ['qemu-qemu']];

/** Whether the run has the row: a row split by threads is read per mode, an older run's `qmt receive` row (no mode) alone. */
export function multifdAimRowMeasured(d: MultifdData, row: MultifdRow, threads?: 'on' | 'off'): boolean {
  const split = d.variants.some((v) => v.row === row && v.threads !== undefined);
  return threads === undefined ? !split : d.variants.some((v) => v.row === row && v.threads === threads);
}

/** 2 TLS channels against 1 for a row: ratio of median GB/s. */
export function multifdScaling(d: MultifdData, row: MultifdRow, threads?: 'on' | 'off'): { one?: number; two?: number; ratio?: number; unavailable?: string } {
  const v = (n: number): MultifdVariant | undefined => d.variants.find((x) => x.row === row && x.kind === 'tls' && x.channels === n && (threads === undefined || x.threads === threads));
  const na = v(1)?.unavailable ?? v(2)?.unavailable;
  if (na) return { unavailable: na };
  const one = v(1)?.stats?.median;
  const two = v(2)?.stats?.median;
  const r = ratio(two, one);
  return { ...(one !== undefined ? { one } : {}), ...(two !== undefined ? { two } : {}), ...(r !== undefined ? { ratio: r } : {}) };
}
