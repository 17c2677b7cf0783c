/**
 * Machine description and the charts (vega-lite → SVG, no browser). The
 * statistics themselves (latency summaries, medians) are in stats.ts.
 */
import { execFileSync } from 'node:child_process';
import os from 'node:os';
import * as vega from 'vega';
import * as vl from 'vega-lite';
import { fmt, type CdfPoint } from './stats.js';

// Number formatting lives in the statistics module; re-exported for the parts that import it from here.
export { fmt };

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
