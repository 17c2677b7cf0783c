/**
 * Reads V8 CPU profiles (`node --cpu-prof`, *.cpuprofile): per process, the
 * functions with the most self time and the shares of idle, garbage
 * collection, "program" (native code outside any JS frame) and JS by origin.
 */
import { readdirSync, readFileSync } from 'node:fs';
import { join, relative } from 'node:path';
import { REPO_ROOT } from './child.js';

interface CallFrame {
  functionName: string;
  url: string;
  lineNumber: number;
  columnNumber: number;
}

interface ProfileNode {
  id: number;
  callFrame: CallFrame;
  children?: number[];
}

interface CpuProfile {
  nodes: ProfileNode[];
  startTime: number;
  endTime: number;
  samples: number[];
  timeDeltas: number[];
}

export interface TopFunction {
  name: string;
  /** Repository-relative file:line, node:internal/..., or '' for V8 builtins and native code. */
  where: string;
  selfMs: number;
  /** Share of the profile's whole time, %. */
  pct: number;
}

export interface ProfileSummary {
  file: string;
  pid: number;
  /** The thread id of the profile's file name (0 = the main thread). */
  thread: number;
  totalMs: number;
  /** Shares of the whole time, % (they add up to 100). */
  shares: { idle: number; gc: number; program: number; ours: number; node: number; native: number; dependencies: number; other: number };
  top: TopFunction[];
}

const SPECIAL: Record<string, 'idle' | 'gc' | 'program' | 'root'> = { '(idle)': 'idle', '(garbage collector)': 'gc', '(program)': 'program', '(root)': 'root' };

function origin(url: string): 'ours' | 'node' | 'native' | 'dependencies' | 'other' {
  // V8 builtins and Node's C++ bindings called from JS (fs writes, socket reads and writes, crypto) have no script.
  if (url === '') return 'native';
  if (url.startsWith('node:')) return 'node';
  if (url.includes('/node_modules/')) return 'dependencies';
  if (url.includes('/src/') || url.includes('/dist/') || url.includes('/bench/')) return 'ours';
  return 'other';
}

const B64 = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/';

/** A decoded source map: per generated line, segments [generated column, source index, source line, source column]. */
interface SourceMap {
  sources: string[];
  lines: number[][][];
}

const maps = new Map<string, SourceMap | undefined>();

/** The source map next to a built file (`dist/*.js.map`, written by tsup), decoded once. */
function sourceMapOf(path: string): SourceMap | undefined {
  if (maps.has(path)) return maps.get(path);
  let map: SourceMap | undefined;
  try {
    const raw = JSON.parse(readFileSync(`${path}.map`, 'utf8')) as { sources: string[]; mappings: string };
    const lines: number[][][] = [];
    const state = [0, 0, 0, 0];
    for (const line of raw.mappings.split(';')) {
      state[0] = 0;
      const segs: number[][] = [];
      for (const seg of line.split(',')) {
        if (!seg) continue;
        const vals: number[] = [];
        let v = 0;
        let shift = 0;
        for (const ch of seg) {
          const d = B64.indexOf(ch);
          v += (d & 31) << shift;
          if (d & 32) shift += 5;
          else {
            vals.push(v & 1 ? -(v >>> 1) : v >>> 1);
            v = 0;
            shift = 0;
          }
        }
        for (let i = 0; i < Math.min(4, vals.length); i++) state[i]! += vals[i]!;
        if (vals.length >= 4) segs.push([state[0]!, state[1]!, state[2]!, state[3]!]);
      }
      lines.push(segs);
    }
    map = { sources: raw.sources.map((s) => relative(REPO_ROOT, join(path, '..', s))), lines };
  } catch {
    map = undefined;
  }
  maps.set(path, map);
  return map;
}

function where(f: CallFrame): string {
  if (!f.url) return '';
  if (!f.url.startsWith('file://')) return `${f.url}:${f.lineNumber + 1}`;
  const abs = decodeURIComponent(new URL(f.url).pathname);
  // Built code (dist/, bundled by tsup): the place in src/ from its source map.
  const map = abs.endsWith('.js') ? sourceMapOf(abs) : undefined;
  const segs = map?.lines[f.lineNumber];
  if (map && segs && segs.length > 0) {
    let best = segs[0]!;
    for (const s of segs) if (s[0]! <= f.columnNumber) best = s;
    return `${map.sources[best[1]!] ?? '?'}:${best[2]! + 1}`;
  }
  // Sources run by tsx: V8 sees the transformed module, whose line numbers are not the file's.
  if (abs.endsWith('.ts')) return relative(REPO_ROOT, abs);
  return `${relative(REPO_ROOT, abs)}:${f.lineNumber + 1}`;
}

/** Summarizes one *.cpuprofile file. */
export function summarizeProfile(file: string, topN = 15): ProfileSummary {
  const p = JSON.parse(readFileSync(file, 'utf8')) as CpuProfile;
  const byId = new Map<number, ProfileNode>();
  for (const n of p.nodes) byId.set(n.id, n);
  const selfUs = new Map<number, number>();
  for (let i = 0; i < p.samples.length; i++) selfUs.set(p.samples[i]!, (selfUs.get(p.samples[i]!) ?? 0) + (p.timeDeltas[i] ?? 0));
  const total = Math.max(1, [...selfUs.values()].reduce((a, b) => a + b, 0));
  const shares = { idle: 0, gc: 0, program: 0, ours: 0, node: 0, native: 0, dependencies: 0, other: 0 };
  const fns = new Map<string, { name: string; where: string; us: number }>();
  for (const [id, us] of selfUs) {
    const f = byId.get(id)?.callFrame;
    if (!f) continue;
    const special = SPECIAL[f.functionName];
    if (special === 'root') shares.program += us;
    else if (special) shares[special] += us;
    else shares[origin(f.url)] += us;
    if (special) continue;
    const w = where(f);
    const key = `${f.functionName}@${w}`;
    const e = fns.get(key) ?? { name: f.functionName || '(anonymous)', where: w, us: 0 };
    e.us += us;
    fns.set(key, e);
  }
  const pct = (us: number): number => Math.round((us / total) * 1000) / 10;
  const m = /\.(\d+)\.(\d+)\.\d+\.cpuprofile$/.exec(file);
  return {
    file,
    pid: Number(m?.[1] ?? 0),
    thread: Number(m?.[2] ?? 0),
    totalMs: Math.round((p.endTime - p.startTime) / 1000),
    shares: { idle: pct(shares.idle), gc: pct(shares.gc), program: pct(shares.program), ours: pct(shares.ours), node: pct(shares.node), native: pct(shares.native), dependencies: pct(shares.dependencies), other: pct(shares.other) },
    top: [...fns.values()]
      .sort((a, b) => b.us - a.us)
      .slice(0, topN)
      .map((e) => ({ name: e.name, where: e.where, selfMs: Math.round(e.us / 100) / 10, pct: pct(e.us) })),
  };
}

/** Every profile in `dir`, longest first. */
export function summarizeProfiles(dir: string, topN = 15): ProfileSummary[] {
  let files: string[];
  try {
    files = readdirSync(dir).filter((f) => f.endsWith('.cpuprofile'));
  } catch {
    return [];
  }
  return files.map((f) => summarizeProfile(join(dir, f), topN)).sort((a, b) => b.totalMs - a.totalMs);
}

/** One markdown block per profile: shares, then the top functions. */
export function profileMarkdown(title: string, s: ProfileSummary): string {
  const sh = s.shares;
  const lines = [
    `**${title}** — pid ${s.pid}${s.thread ? `, thread ${s.thread}` : ''}, ${s.totalMs} ms profiled: idle ${sh.idle} %, GC ${sh.gc} %, program (native, outside JS) ${sh.program} %, our JS ${sh.ours} %, node internals (JS) ${sh.node} %, native functions called from JS (syscalls, bindings, builtins) ${sh.native} %, dependencies ${sh.dependencies} %, other ${sh.other} %.`,
    '',
    '| # | function (self time) | where | self ms | % of all |',
    '|--:|---|---|--:|--:|',
    ...s.top.map((t, i) => `| ${i + 1} | \`${t.name}\` | ${t.where ? `\`${t.where}\`` : '(builtin)'} | ${t.selfMs} | ${t.pct} |`),
  ];
  return lines.join('\n');
}

/** What bench/profile.ts records per profiled migration (bench/results/profile.json). */
export interface ProfiledPath {
  id: string;
  path: string;
  kind: 'plain' | 'tls';
  error?: string;
  processes: ({ role: string } & Omit<ProfileSummary, 'file'>)[];
}

/** The heading of a profiled path in profile.md. */
export function profileHeading(r: { path: string; kind: 'plain' | 'tls' }): string {
  return `Profile: ${r.path}, ${r.kind === 'tls' ? 'TLS 1.3' : 'plain TCP'}`;
}

/** GitHub's anchor of a markdown heading. */
export function headingAnchor(heading: string): string {
  return heading
    .toLowerCase()
    .replace(/[^\p{L}\p{M}\p{N}\p{Pc} -]/gu, '')
    .replace(/ /g, '-');
}

/**
 * One line per path for the report's summary: per process (the waiting
 * parent of a re-run left out) idle and GC, then the top functions.
 */
export function profileDigest(r: ProfiledPath, top = 3): string {
  if (r.error) return `profile failed: ${r.error}`;
  return r.processes
    .filter((p) => !p.role.includes('parent'))
    .map((p) => `${p.role.replace(/ \(.*\)$/, '')}: idle ${p.shares.idle} %, GC ${p.shares.gc} %; ${p.top
      .slice(0, top)
      .map((t) => `${t.name} ${t.pct} %`)
      .join(', ')}`)
    .join('; ');
}
