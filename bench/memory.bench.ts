/**
 * Memory (part 6 of `npm run bench`; alone: `node --import tsx
 * bench/memory.bench.ts [--quick] [--mib N] [--runs N] [--plain]`).
 *
 * A file-backed guest of N MiB (default 4096): a saved VM (the directory
 * `qmt receive` writes) whose RAM file holds data in every page, sent by a
 * SourceSession reading it through SavedVmSource into a DestinationSession
 * writing a DirectorySink, each in a child process of its own, over TLS on
 * loopback. Peak resident set (VmHWM in /proc/<pid>/status) of both, next to
 * the same child process idle (Node, tsx and the library loaded, nothing
 * migrated) measured in the same run. Prints figures; asserts nothing.
 */
import { randomFillSync } from 'node:crypto';
import { open, mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { DEVICES_DIR, MANIFEST, RAM_DIR, type SavedVmManifest } from '../src/protocol/saved-vm.js';
import { initPkiDir } from '../src/transport/pki.js';
import { BenchChild } from './lib/child.js';
import { cpuDelta, processCpuSeconds } from './lib/cpu.js';
import { residentSet } from './lib/child-server.js';
import { runPart, type PartContext } from './lib/part.js';
import { fmt } from './lib/report.js';
import type { DestinationRun, SessionCommand, SourceRun } from './lib/session-peer.js';
import { fmtRatio, fmtStats, runStats, type RunStats } from './lib/stats.js';

const MiB = 1024 * 1024;
const PAGE = 4096;
const SESSION_PEER = fileURLToPath(new URL('./lib/session-peer.ts', import.meta.url));
const AIM_SOURCE = 256 * MiB;

interface MemRun {
  sourceHwm: number;
  destHwm: number;
  seconds: number;
  wireBytes: number;
  /** Core-seconds (user + system) of each child over the migration. */
  sourceCpuS: number | undefined;
  destCpuS: number | undefined;
}

export interface MemoryData {
  guestBytes: number;
  tls: boolean;
  idleHwm: RunStats | undefined;
  runs: MemRun[];
  errors: string[];
  source?: RunStats;
  dest?: RunStats;
  seconds?: RunStats;
  /** Core-seconds per GB (10⁹ bytes) of guest RAM, each end. */
  sourceCpuPerGb?: RunStats;
  destCpuPerGb?: RunStats;
}

/** A saved VM of `bytes` RAM whose every page holds data (a counter in its first byte), and two small devices. */
async function writeSavedVm(dir: string, bytes: number): Promise<void> {
  await mkdir(join(dir, RAM_DIR), { recursive: true });
  await mkdir(join(dir, DEVICES_DIR), { recursive: true });
  const chunk = Buffer.alloc(8 * MiB);
  const fh = await open(join(dir, RAM_DIR, 'pc.ram.bin'), 'w');
  try {
    for (let off = 0; off < bytes; off += chunk.length) {
      const n = Math.min(chunk.length, bytes - off);
      for (let p = 0; p < n; p += PAGE) chunk[p] = (((off + p) / PAGE) & 0xff) || 1;
      await fh.write(chunk, 0, n, off);
    }
  } finally {
    await fh.close();
  }
  const devices: SavedVmManifest['devices'] = [];
  for (const [i, [idstr, size, version]] of ([['timer', 24, 2], ['cpu', 1851, 12]] as const).entries()) {
    const file = join(DEVICES_DIR, `${String(i).padStart(3, '0')}-${idstr}-0.bin`);
    await writeFile(join(dir, file), randomFillSync(Buffer.alloc(size)));
    devices.push({ sectionId: i + 2, idstr, instanceId: 0, versionId: version, kind: 'full', packaged: false, size, file });
  }
  const manifest: SavedVmManifest = {
    format: 'qemu-migration-transport/saved-vm',
    version: 1,
    complete: true,
    machineType: 'pc-q35-10.0',
    capabilities: [],
    postcopy: false,
    blocks: [{ idstr: 'pc.ram', length: bytes, file: join(RAM_DIR, 'pc.ram.bin') }],
    devices,
    vmdesc: null,
    stats: null,
    savedAt: new Date().toISOString(),
  };
  await writeFile(join(dir, MANIFEST), JSON.stringify(manifest, null, 2));
}

async function idleHwm(ctx: PartContext): Promise<number> {
  const c = ctx.track(BenchChild.start<SessionCommand>('idle', SESSION_PEER));
  try {
    // One answered command: the child has loaded everything it would load to migrate.
    await c.call({ cmd: 'rss' }, 30_000);
    const r = residentSet(c.pid!);
    if (!r) throw new Error('cannot read /proc/<pid>/status');
    return r.hwm;
  } finally {
    await ctx.release(c);
  }
}

async function memoryRun(ctx: PartContext, vmDir: string, sinkDir: string, tlsDir: string | undefined): Promise<MemRun> {
  const src = ctx.track(BenchChild.start<SessionCommand>('source', SESSION_PEER));
  const dst = ctx.track(BenchChild.start<SessionCommand>('dest', SESSION_PEER));
  try {
    const [{ uri }] = await Promise.all([
      dst.call<{ uri: string }>({ cmd: 'dest-listen', host: '127.0.0.1', postcopy: false, sink: { kind: 'directory', dir: sinkDir }, ...(tlsDir ? { tlsDir } : {}) }, 30_000),
      src.call({ cmd: 'source-prepare', memory: { kind: 'saved-vm', dir: vmDir } }, 30_000),
    ]);
    const cpuBefore = [processCpuSeconds(src.pid), processCpuSeconds(dst.pid)];
    const [s, d] = await Promise.all([
      src.call<SourceRun>({ cmd: 'source-migrate', to: uri, policy: 'never', preempt: false, timeoutMs: 600_000, ...(tlsDir ? { tlsDir, tlsHostname: 'localhost' } : {}) }, 610_000),
      // The destination's answer comes after the sink closed (its directory is then removed): read its peak first.
      dst.call<DestinationRun>({ cmd: 'dest-wait', timeoutMs: 600_000 }, 610_000),
    ]);
    const [sourceCpuS, destCpuS] = cpuDelta(cpuBefore, [processCpuSeconds(src.pid), processCpuSeconds(dst.pid)]);
    // VmHWM is a high-water mark: reading it after the migration gives the peak over the whole run.
    const sr = residentSet(src.pid!);
    const dr = residentSet(dst.pid!);
    if (!sr || !dr) throw new Error('cannot read /proc/<pid>/status');
    return { sourceHwm: sr.hwm, destHwm: dr.hwm, seconds: (d.completedUs - s.startUs) / 1e6, wireBytes: s.stats.transferred, sourceCpuS, destCpuS };
  } finally {
    await Promise.all([ctx.release(src), ctx.release(dst)]);
  }
}

function markdown(d: MemoryData): string {
  const mib = (x: number): string => fmt(x / MiB, 0);
  const idle = d.idleHwm?.median;
  const lines: string[] = [];
  lines.push(
    `A saved VM of ${mib(d.guestBytes)} MiB RAM (one file, data in every page) sent by SourceSession reading it through SavedVmSource into DestinationSession writing a DirectorySink (one sparse file per block, positioned writes), precopy, ${d.tls ? 'TLS 1.3' : 'plain TCP'} on loopback, each side a child process of its own. Peak resident set = VmHWM of /proc/<pid>/status after the migration. Baseline: the same child process started and idle (Node, tsx and the library loaded), in the same run. ${d.runs.length} runs; median (min–max), MiB.`,
    '',
    '| process | peak RSS (MiB) | vs idle process | peak RSS / guest RAM | aim |',
    '|---|--:|--:|--:|---|',
    `| idle child process (baseline) | ${fmtStats(d.idleHwm, 0, 1 / MiB)} | 1.00× | – | – |`,
    `| source (SavedVmSource, reads the ${mib(d.guestBytes)} MiB file) | ${fmtStats(d.source, 0, 1 / MiB)} | ${fmtRatio(d.source?.median, idle)} | ${d.source ? `${fmt((d.source.median / d.guestBytes) * 100, 1)} %` : '–'} | ≤ 256 MiB: ${d.source ? (d.source.max <= AIM_SOURCE ? 'met (every run)' : d.source.median <= AIM_SOURCE ? 'met (median)' : 'missed') : '–'} |`,
    `| destination (DirectorySink) | ${fmtStats(d.dest, 0, 1 / MiB)} | ${fmtRatio(d.dest?.median, idle)} | ${d.dest ? `${fmt((d.dest.median / d.guestBytes) * 100, 1)} %` : '–'} | – |`,
    '',
    `Migration time ${fmtStats(d.seconds, 1)} s (${d.seconds ? fmt(d.guestBytes / d.seconds.median / 1e9, 2) : '–'} GB/s of guest RAM, reading from the page cache and writing into it). CPU s/GB (core-seconds per 10⁹ bytes of guest RAM, /proc/<pid>/stat): source ${fmtStats(d.sourceCpuPerGb, 2)}, destination ${fmtStats(d.destCpuPerGb, 2)}. RSS counts anonymous memory and mapped files, not the page cache that the reads and the positioned writes go through.${d.errors.length > 0 ? ` Errors: ${d.errors.join('; ')}.` : ''}`,
  );
  return lines.join('\n');
}

await runPart<MemoryData>(
  'memory',
  'Memory: peak RSS with a file-backed guest',
  { mib: { type: 'string' }, runs: { type: 'string' }, plain: { type: 'boolean', default: false } },
  async (ctx) => {
    const mib = Number(ctx.options.mib ?? (ctx.quick ? 512 : 4096));
    const runs = Number(ctx.options.runs ?? 3);
    const tls = ctx.options.plain !== true;
    const work = await ctx.tmpDir('memory');
    const pkiDir = join(work, 'pki');
    if (tls) await initPkiDir(pkiDir);
    const vmDir = join(work, 'vm');
    ctx.log(`writing a ${mib} MiB saved VM …`);
    await writeSavedVm(vmDir, mib * MiB);
    const data: MemoryData = { guestBytes: mib * MiB, tls, idleHwm: undefined, runs: [], errors: [] };
    const idle: number[] = [];
    for (let i = 0; i < runs; i++) {
      try {
        idle.push(await idleHwm(ctx));
        const r = await memoryRun(ctx, vmDir, join(work, `sink-${i}`), tls ? pkiDir : undefined);
        data.runs.push(r);
        ctx.log(`run ${i + 1}/${runs}: source ${fmt(r.sourceHwm / MiB)} MiB, destination ${fmt(r.destHwm / MiB)} MiB, ${fmt(r.seconds, 1)} s`);
      } catch (e) {
        data.errors.push(e instanceof Error ? e.message.split('\n')[0]! : String(e));
        ctx.log(`run ${i + 1} failed: ${String(e)}`);
      }
    }
    data.idleHwm = runStats(idle);
    const set = <K extends 'source' | 'dest' | 'seconds'>(k: K, v: RunStats | undefined): void => {
      if (v) data[k] = v;
    };
    set('source', runStats(data.runs.map((r) => r.sourceHwm)));
    set('dest', runStats(data.runs.map((r) => r.destHwm)));
    set('seconds', runStats(data.runs.map((r) => r.seconds)));
    const perGb = (cpu: number | undefined): number[] => (cpu === undefined ? [] : [cpu / (data.guestBytes / 1e9)]);
    const sc = runStats(data.runs.flatMap((r) => perGb(r.sourceCpuS)));
    const dc = runStats(data.runs.flatMap((r) => perGb(r.destCpuS)));
    if (sc) data.sourceCpuPerGb = sc;
    if (dc) data.destCpuPerGb = dc;
    return { config: { mib, runs, tls, aimSourceBytes: AIM_SOURCE }, data, markdown: markdown(data) };
  },
);
