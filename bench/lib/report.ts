/**
 * Latency summaries (hdr-histogram-js), machine description, and the CDF chart
 * (vega-lite → SVG, no browser).
 */
import { execFileSync } from 'node:child_process';
import os from 'node:os';
import hdr from 'hdr-histogram-js';
import * as vega from 'vega';
import * as vl from 'vega-lite';

export interface CdfPoint {
  /** Round trip, µs. */
  us: number;
  /** Fraction of samples at or below `us`. */
  p: number;
}

export interface LatencySummary {
  count: number;
  minUs: number;
  p50Us: number;
  p90Us: number;
  p99Us: number;
  p999Us: number;
  maxUs: number;
  meanUs: number;
  /** Value at each percentile of PERCENTILES, from the histogram. */
  percentiles: Record<string, number>;
  cdf: CdfPoint[];
}

const PERCENTILES = [0, 1, 5, 10, 20, 25, 30, 40, 50, 60, 70, 75, 80, 85, 90, 95, 97, 98, 99, 99.5, 99.8, 99.9, 99.95, 99.99, 100];
const CDF_STEPS = [...Array.from({ length: 100 }, (_, i) => i), 99.5, 99.75, 99.9, 99.95, 99.99, 100];

/** Records samples (µs, float) at 1 µs resolution, 3 significant digits. */
export function summarize(samplesUs: readonly number[]): LatencySummary | undefined {
  if (samplesUs.length === 0) return undefined;
  const h = hdr.build({ lowestDiscernibleValue: 1, highestTrackableValue: 60_000_000, numberOfSignificantValueDigits: 3, bitBucketSize: 64, autoResize: true, useWebAssembly: false });
  try {
    for (const s of samplesUs) h.recordValue(Math.max(1, Math.round(s)));
    const at = (p: number): number => h.getValueAtPercentile(p);
    const percentiles: Record<string, number> = {};
    for (const p of PERCENTILES) percentiles[String(p)] = at(p);
    const cdf: CdfPoint[] = [];
    for (const p of CDF_STEPS) {
      const us = p === 0 ? h.minNonZeroValue : p === 100 ? h.maxValue : at(p);
      cdf.push({ us, p: p / 100 });
    }
    return {
      count: h.totalCount,
      minUs: h.minNonZeroValue,
      p50Us: at(50),
      p90Us: at(90),
      p99Us: at(99),
      p999Us: at(99.9),
      maxUs: h.maxValue,
      meanUs: Math.round(h.mean * 10) / 10,
      percentiles,
      cdf,
    };
  } finally {
    h.destroy();
  }
}

export interface MachineInfo {
  /** `git describe`-like revision of the code measured, and uncommitted changes under src. */
  revision: string;
  cpu: string;
  cores: number;
  /** Physical memory, bytes. */
  memoryBytes: number;
  kernel: string;
  node: string;
  os: string;
  congestionControl: string;
  date: string;
}

export function machineInfo(repoRoot: string): MachineInfo {
  const sh = (c: string, a: string[]): string => {
    try {
      return execFileSync(c, a, { timeout: 5000, encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim();
    } catch {
      return '?';
    }
  };
  const cpus = os.cpus();
  const head = sh('git', ['-C', repoRoot, 'rev-parse', '--short', 'HEAD']);
  const dirty = sh('git', ['-C', repoRoot, 'status', '--porcelain', '--', 'src'])
    .split('\n')
    .map((l) => l.trim().split(/\s+/).pop() ?? '')
    .filter((f) => f !== '');
  // A copy of the tree without .git (e.g. a snapshot measured on its own) names its revision in QMT_BENCH_REVISION.
  const revision = head === '?' ? (process.env.QMT_BENCH_REVISION ?? '?') : dirty.length > 0 ? `${head}, with uncommitted changes to ${dirty.join(', ')}` : head;
  return {
    revision,
    cpu: cpus[0]?.model.trim() ?? '?',
    cores: cpus.length,
    memoryBytes: os.totalmem(),
    kernel: `${os.type()} ${os.release()} ${os.version()}`,
    node: process.version,
    os: sh('sh', ['-c', '. /etc/os-release 2>/dev/null && echo "$PRETTY_NAME"']) || '?',
    congestionControl: sh('sysctl', ['-n', 'net.ipv4.tcp_congestion_control']),
    date: new Date().toISOString(),
  };
}

export interface ChartSeries {
  label: string;
  /** 'loaded' (solid) or 'idle' (dashed). */
  load: string;
  cdf: readonly CdfPoint[];
}

/** One CDF line per series, log-scale x axis in µs. */
export async function cdfChartSvg(title: string, series: readonly ChartSeries[]): Promise<string> {
  const values = series.flatMap((s) => s.cdf.map((c) => ({ series: s.label, load: s.load, us: Math.max(1, c.us), p: c.p })));
  // A little room on both sides of the data, on the log scale.
  const xs = values.map((v) => v.us);
  const domain = xs.length > 0 ? [Math.min(...xs) / 1.3, Math.max(...xs) * 1.3] : [1, 1e6];
  const spec: vl.TopLevelSpec = {
    $schema: 'https://vega.github.io/schema/vega-lite/v6.json',
    title,
    width: 720,
    height: 380,
    background: 'white',
    data: { values },
    mark: { type: 'line', interpolate: 'step-after', strokeWidth: 1.6 },
    encoding: {
      x: { field: 'us', type: 'quantitative', scale: { type: 'log', nice: false, domain }, title: 'request → 4 KiB reply round trip (µs, log scale)' },
      y: { field: 'p', type: 'quantitative', scale: { domain: [0, 1] }, title: 'fraction of requests ≤ x' },
      color: { field: 'series', type: 'nominal', title: 'mode', sort: null, legend: { orient: 'right', labelLimit: 320 } },
      strokeDash: { field: 'load', type: 'nominal', title: 'load' },
      detail: { field: 'series' },
    },
  };
  return renderSvg(spec);
}

/** Right-aligned number formatting for tables. */
export function fmt(n: number | undefined, digits = 0): string {
  if (n === undefined || !Number.isFinite(n)) return '–';
  return n.toLocaleString('en-US', { minimumFractionDigits: digits, maximumFractionDigits: digits });
}

export interface Bar {
  /** Panel (one row of bars per group). */
  group: string;
  label: string;
  value: number;
  min?: number;
  max?: number;
}

/** Horizontal bars per group, with a min–max whisker and the value written at its end. */
export async function barChartSvg(title: string, unit: string, bars: readonly Bar[], digits = 2): Promise<string> {
  const values = bars.map((b) => ({ ...b, min: b.min ?? b.value, max: b.max ?? b.value }));
  const y = { field: 'label', type: 'nominal', title: null, sort: null, axis: { labelLimit: 360 } } as const;
  const spec: vl.TopLevelSpec = {
    $schema: 'https://vega.github.io/schema/vega-lite/v6.json',
    title,
    background: 'white',
    data: { values },
    facet: { row: { field: 'group', type: 'nominal', title: null, sort: [...new Set(bars.map((b) => b.group))] } },
    spec: {
      width: 460,
      height: { step: 26 },
      layer: [
        { mark: { type: 'bar', height: { band: 0.7 } }, encoding: { y, x: { field: 'value', type: 'quantitative', title: unit }, color: { field: 'label', type: 'nominal', legend: null } } },
        { mark: { type: 'rule', strokeWidth: 1.5 }, encoding: { y, x: { field: 'min', type: 'quantitative' }, x2: { field: 'max' } } },
        { mark: { type: 'text', align: 'left', dx: 5 }, encoding: { y, x: { field: 'max', type: 'quantitative' }, text: { field: 'value', type: 'quantitative', format: `.${digits}f` } } },
      ],
    },
    resolve: { scale: { y: 'independent' } },
  };
  return renderSvg(spec);
}

export interface FacetSeries {
  /** Panel. */
  panel: string;
  label: string;
  /** Line style group (e.g. what measured it). */
  dash: string;
  cdf: readonly CdfPoint[];
}

/** CDF lines in one panel per `panel`, log-scale x axis in µs. */
export async function facetedCdfSvg(title: string, xTitle: string, dashTitle: string, series: readonly FacetSeries[]): Promise<string> {
  const values = series.flatMap((s) => s.cdf.map((c) => ({ panel: s.panel, series: s.label, dash: s.dash, us: Math.max(1, c.us), p: c.p })));
  const xs = values.map((v) => v.us);
  const domain = xs.length > 0 ? [Math.min(...xs) / 1.3, Math.max(...xs) * 1.3] : [1, 1e6];
  const spec: vl.TopLevelSpec = {
    $schema: 'https://vega.github.io/schema/vega-lite/v6.json',
    title,
    background: 'white',
    data: { values },
    facet: { row: { field: 'panel', type: 'nominal', title: null, sort: [...new Set(series.map((x) => x.panel))] } },
    spec: {
      width: 720,
      height: 300,
      mark: { type: 'line', interpolate: 'step-after', strokeWidth: 1.6 },
      encoding: {
        x: { field: 'us', type: 'quantitative', scale: { type: 'log', nice: false, domain }, title: xTitle },
        y: { field: 'p', type: 'quantitative', scale: { domain: [0, 1] }, title: 'fraction of requests ≤ x' },
        color: { field: 'series', type: 'nominal', title: 'row', sort: null, scale: { scheme: 'tableau10' }, legend: { orient: 'right', labelLimit: 420 } },
        // The first kind of line in the data is drawn solid.
        strokeDash: { field: 'dash', type: 'nominal', title: dashTitle, scale: { domain: [...new Set(series.map((x) => x.dash))] }, legend: { labelLimit: 320 } },
        detail: { field: 'series' },
      },
    },
  };
  return renderSvg(spec);
}

/** vega-lite's notes on how it resolved scales are not ours to print. */
const quiet = vega.logger(vega.Error);

async function renderSvg(spec: vl.TopLevelSpec): Promise<string> {
  const view = new vega.View(vega.parse(vl.compile(spec, { logger: quiet }).spec), { renderer: 'none', logLevel: vega.Error });
  try {
    return await view.toSVG();
  } finally {
    view.finalize();
  }
}
