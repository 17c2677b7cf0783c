/**
 * Guest-memory storage (alone: `node --import tsx bench/sink.bench.ts
 * [--quick] [--mib N] [--runs N]`).
 *
 * Writes: DirectorySink taking a guest of N MiB (default 1024, data in every
 * page) as the destination hands it over — runs of 64 pages viewed in a
 * wire-like buffer (8-byte record header per page, so a copy per page),
 * awaiting backpressure() — until flush() (every write done + fsync), next to
 * two raw baselines of the same size in the same run: Node `fs.write` of
 * 1 MiB buffers one after the other + fsync, and `dd if=/dev/zero bs=1M
 * conv=fsync`. `sync` before each timed run, variants interleaved (rotated
 * each run), medians of the runs.
 *
 * Reads: SavedVmSource scanning the saved VM in full (readPages, 64 pages a
 * call, awaiting the promise when there is one) next to a raw sequential read
 * of the same file (`fs.read` of 1 MiB buffers one after the other), with the
 * file's pages dropped from the page cache first (`dd iflag=nocache count=0`,
 * posix_fadvise DONTNEED on that one file; `fincore` tells how much stayed)
 * and again with the file cached.
 *
 * CPU: this process's user+system time per GB (the dd row: –). Prints
 * figures; asserts nothing.
 */
import { execFileSync } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import * as fs from 'node:fs';
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { DirectorySink, blockFileName, type DirectorySinkOptions } from '../src/protocol/directory-sink.js';
import { MANIFEST, RAM_DIR, type SavedVmManifest } from '../src/protocol/saved-vm.js';
import { SavedVmSource } from '../src/protocol/saved-vm-source.js';
import { runPart, type PartContext } from './lib/part.js';
import { fmt } from './lib/report.js';
import { fmtRatio, fmtStats, runStats, type RunStats } from './lib/stats.js';

const MiB = 1 << 20;
const PAGE = 4096;
const STRIDE = PAGE + 8; // a page record's header before each page, as the decoder's runs view them
const BATCH = 64;

interface Timed {
  seconds: number;
  /** This process's CPU (user + system) seconds; undefined for a child (dd). */
  cpu: number | undefined;
  /** Bytes of the file in the page cache before the run (fincore), for reads. */
  cachedBefore?: number;
}

type WriteVariant = 'sink' | 'sink1' | 'node' | 'dd';
type ReadVariant = 'source' | 'node';

export interface SinkBenchData {
  bytes: number;
  runs: number;
  write: Record<WriteVariant, Timed[]>;
  read: { uncached: Record<ReadVariant, Timed[]>; cached: Record<ReadVariant, Timed[]> };
  sinkStats?: ReturnType<DirectorySink['stats']>;
  sourceStats?: ReturnType<SavedVmSource['stats']>;
}

function sync(): void {
  execFileSync('sync');
}

function cpuNow(): number {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1e6;
}

async function timed(fn: () => Promise<void>, child = false): Promise<Timed> {
  const c0 = cpuNow();
  const t0 = performance.now();
  await fn();
  const seconds = (performance.now() - t0) / 1000;
  return { seconds, cpu: child ? undefined : cpuNow() - c0 };
}

/** Bytes of `file` in the page cache (fincore), or undefined. */
function cachedBytes(file: string): number | undefined {
  try {
    const out = execFileSync('fincore', ['--bytes', '--noheadings', '--output', 'RES', file], { encoding: 'utf8' });
    return Number(out.trim());
  } catch {
    return undefined;
  }
}

/** Drops `file`'s pages from the page cache (posix_fadvise DONTNEED through dd). */
function dropCache(file: string): void {
  execFileSync('dd', [`if=${file}`, 'iflag=nocache', 'count=0', 'status=none']);
}

/** The wire-like buffer the sink's runs are viewed in: many pages of data at STRIDE. */
function wireBuffer(pages: number): Buffer {
  const b = Buffer.alloc(pages * STRIDE);
  randomFillSync(b);
  return b;
}

async function sinkWrite(dir: string, bytes: number, wire: Buffer, keep: { stats?: SinkBenchData['sinkStats'] }, opts: DirectorySinkOptions = {}): Promise<void> {
  const sink = new DirectorySink(dir, opts);
  sink.setBlocks([{ idstr: 'pc.ram', length: bytes }]);
  const wirePages = wire.length / STRIDE;
  let w = 0;
  for (let off = 0; off < bytes; off += BATCH * PAGE) {
    if (w + BATCH > wirePages) w = 0;
    sink.writePages('pc.ram', off, BATCH, wire, w * STRIDE, STRIDE);
    w += BATCH;
    const bp = sink.backpressure();
    if (bp) await bp;
  }
  await sink.flush();
  keep.stats = sink.stats();
  await sink.close();
}

function nodeWrite(file: string, bytes: number, buf: Buffer): Promise<void> {
  return new Promise((resolve, reject) => {
    const fd = fs.openSync(file, 'w');
    const step = (off: number): void => {
      if (off >= bytes) {
        fs.fsync(fd, (e) => fs.close(fd, () => (e ? reject(e) : resolve())));
        return;
      }
      fs.write(fd, buf, 0, Math.min(buf.length, bytes - off), off, (e, n) => (e ? reject(e) : step(off + n)));
    };
    step(0);
  });
}

function ddWrite(file: string, bytes: number): Promise<void> {
  execFileSync('dd', ['if=/dev/zero', `of=${file}`, 'bs=1M', `count=${bytes / MiB}`, 'conv=fsync', 'status=none']);
  return Promise.resolve();
}

async function sourceScan(vmDir: string, keep: { stats?: SinkBenchData['sourceStats'] }): Promise<void> {
  const src = await SavedVmSource.open(vmDir);
  let sum = 0;
  for (const b of src.blocks()) {
    for (let off = 0; off < b.length; off += BATCH * PAGE) {
      const n = Math.min(BATCH, (b.length - off) / PAGE);
      const r = src.readPages(b.idstr, off, n);
      const v = r instanceof Promise ? await r : r;
      sum += v[0]!; // touch it, as the encoder's zero check does
    }
  }
  keep.stats = src.stats();
  src.close();
  await src.whenClosed();
  if (sum < 0) throw new Error('unreachable');
}

function nodeRead(file: string, bytes: number): Promise<void> {
  const buf = Buffer.allocUnsafe(MiB);
  return new Promise((resolve, reject) => {
    const fd = fs.openSync(file, 'r');
    const step = (off: number): void => {
      if (off >= bytes) {
        fs.close(fd, () => resolve());
        return;
      }
      fs.read(fd, buf, 0, MiB, off, (e, n) => (e ? reject(e) : n === 0 ? fs.close(fd, () => resolve()) : step(off + n)));
    };
    step(0);
  });
}

function rotate<T>(xs: readonly T[], r: number): T[] {
  return xs.map((_, i) => xs[(i + r) % xs.length]!);
}

async function body(ctx: PartContext): Promise<{ config: Record<string, unknown>; data: SinkBenchData; markdown: string }> {
  const mib = Number(ctx.options.mib ?? (ctx.quick ? 256 : 1024));
  const runs = Number(ctx.options.runs ?? (ctx.quick ? 1 : 3));
  const bytes = mib * MiB;
  const tmp = await ctx.tmpDir('sink');
  const data: SinkBenchData = { bytes, runs, write: { sink: [], sink1: [], node: [], dd: [] }, read: { uncached: { source: [], node: [] }, cached: { source: [], node: [] } } };
  const wire = wireBuffer(16 * 1024); // 64 MiB of page data
  const raw = Buffer.allocUnsafe(MiB);
  randomFillSync(raw);

  const sinkDir = join(tmp, 'sink');
  const rawFile = join(tmp, 'raw.bin');
  const clear = (): void => {
    fs.rmSync(sinkDir, { recursive: true, force: true });
    fs.rmSync(rawFile, { force: true });
  };
  const sinkKeep: { stats?: SinkBenchData['sinkStats'] } = {};
  const sourceKeep: { stats?: SinkBenchData['sourceStats'] } = {};
  const writers: Record<WriteVariant, () => Promise<Timed>> = {
    sink: () => timed(() => sinkWrite(sinkDir, bytes, wire, sinkKeep)),
    sink1: () => timed(() => sinkWrite(sinkDir, bytes, wire, {}, { writesPerFile: 1 })),
    node: () => timed(() => nodeWrite(rawFile, bytes, raw)),
    dd: () => timed(() => ddWrite(rawFile, bytes), true),
  };
  for (let r = 0; r < runs; r++) {
    for (const v of rotate(['sink', 'sink1', 'node', 'dd'] as const, r)) {
      clear();
      sync(); // the previous run's writeback (and the deletion) settled
      const t = await writers[v]();
      data.write[v].push(t);
      ctx.log(`write ${v} run ${r + 1}: ${fmt(bytes / t.seconds / 1e9, 2)} GB/s`);
    }
  }
  clear();

  // The saved VM to read: the sink's directory as `qmt receive` leaves it, plus a manifest.
  const vmDir = join(tmp, 'vm');
  await sinkWrite(join(vmDir, RAM_DIR), bytes, wire, {});
  const manifest: SavedVmManifest = { format: 'qemu-migration-transport/saved-vm', version: 1, complete: true, machineType: 'pc-q35-10.0', capabilities: [], postcopy: false, blocks: [{ idstr: 'pc.ram', length: bytes, file: join(RAM_DIR, blockFileName('pc.ram')) }], devices: [], vmdesc: null, stats: null, savedAt: new Date().toISOString() };
  await mkdir(vmDir, { recursive: true });
  await writeFile(join(vmDir, MANIFEST), JSON.stringify(manifest));
  const vmFile = join(vmDir, RAM_DIR, blockFileName('pc.ram'));
  sync();
  const readers: Record<ReadVariant, () => Promise<Timed>> = {
    source: () => timed(() => sourceScan(vmDir, sourceKeep)),
    node: () => timed(() => nodeRead(vmFile, bytes)),
  };
  for (let r = 0; r < runs; r++) {
    for (const cached of [false, true]) {
      for (const v of rotate(['source', 'node'] as const, r)) {
        if (!cached) dropCache(vmFile);
        else await nodeRead(vmFile, bytes); // warm: the whole file in the page cache
        const before = cachedBytes(vmFile);
        const t = await readers[v]();
        if (before !== undefined) t.cachedBefore = before;
        data.read[cached ? 'cached' : 'uncached'][v].push(t);
        ctx.log(`read ${cached ? 'cached' : 'uncached'} ${v} run ${r + 1}: ${fmt(bytes / t.seconds / 1e9, 2)} GB/s (${fmt((before ?? NaN) / MiB, 0)} MiB cached before)`);
      }
    }
  }
  if (sinkKeep.stats) data.sinkStats = sinkKeep.stats;
  if (sourceKeep.stats) data.sourceStats = sourceKeep.stats;
  return { config: { mib, runs, batchPages: BATCH, stride: STRIDE, sink: 'DirectorySink defaults (16 MiB in flight, 1 MiB writes, 4 per file)', source: 'SavedVmSource defaults (1 MiB runs, 8 ahead, 4 reads in flight, reuseAfterBytes 32 MiB)' }, data, markdown: markdown(data) };
}

function markdown(d: SinkBenchData): string {
  const gbps = (ts: Timed[]): RunStats | undefined => runStats(ts.map((t) => d.bytes / t.seconds / 1e9));
  const cpuPerGb = (ts: Timed[]): RunStats | undefined => runStats(ts.filter((t) => t.cpu !== undefined).map((t) => t.cpu! / (d.bytes / 1e9)));
  const lines: string[] = [];
  const w = { sink: gbps(d.write.sink), sink1: gbps(d.write.sink1), node: gbps(d.write.node), dd: gbps(d.write.dd) };
  lines.push(
    `### Writing ${fmt(d.bytes / MiB, 0)} MiB of guest RAM to durable (until fsync)`,
    '',
    `DirectorySink fed as the destination feeds it (runs of ${BATCH} pages viewed at a ${STRIDE}-byte stride, awaiting backpressure()), until flush(); baselines of the same size in the same run. \`sync\` before each run, variants interleaved; ${d.runs} run(s), median (min–max).`,
    '',
    '| path | GB/s | vs Node fs.write | vs dd | CPU s/GB |',
    '|---|---|---|---|---|',
    `| DirectorySink (writePages + flush; defaults) | ${fmtStats(w.sink, 2)} | ${fmtRatio(w.sink?.median, w.node?.median)} | ${fmtRatio(w.sink?.median, w.dd?.median)} | ${fmtStats(cpuPerGb(d.write.sink), 2)} |`,
    `| DirectorySink, writesPerFile 1 | ${fmtStats(w.sink1, 2)} | ${fmtRatio(w.sink1?.median, w.node?.median)} | ${fmtRatio(w.sink1?.median, w.dd?.median)} | ${fmtStats(cpuPerGb(d.write.sink1), 2)} |`,
    `| Node fs.write, 1 MiB, one at a time + fsync | ${fmtStats(w.node, 2)} | 1× | ${fmtRatio(w.node?.median, w.dd?.median)} | ${fmtStats(cpuPerGb(d.write.node), 2)} |`,
    `| dd if=/dev/zero bs=1M conv=fsync | ${fmtStats(w.dd, 2)} | ${fmtRatio(w.dd?.median, w.node?.median)} | 1× | – |`,
    '',
  );
  if (d.sinkStats) {
    const s = d.sinkStats;
    lines.push(`DirectorySink (last run): ${s.writes} writes of ${fmt(s.bytesWritten / s.writes / MiB, 2)} MiB on average, peak ${fmt(s.peakInFlightBytes / MiB, 1)} MiB in flight, peak ${fmt(s.peakBufferedBytes / MiB, 1)} MiB held, ${s.pauses} backpressure pauses, ${s.stagingBuffers} staging buffers.`, '');
  }
  lines.push(`### Reading the saved VM (${fmt(d.bytes / MiB, 0)} MiB)`, '', `SavedVmSource.readPages over every page (${BATCH} pages a call) vs a raw sequential read of the same file (fs.read, 1 MiB, one at a time). "Not cached": the file's pages dropped from the page cache before the run (dd iflag=nocache, posix_fadvise on that file only — a global drop_caches is not available); "cached": the whole file read just before. The cached column says how much of the file fincore found in the page cache before the run.`, '', '| path | page cache | GB/s | vs raw read | CPU s/GB | cached before (MiB) |', '|---|---|---|---|---|---|');
  for (const c of ['uncached', 'cached'] as const) {
    const src = gbps(d.read[c].source);
    const raw = gbps(d.read[c].node);
    const cachedBefore = (ts: Timed[]): string => fmtStats(runStats(ts.map((t) => t.cachedBefore ?? NaN)), 0, 1 / MiB);
    lines.push(
      `| SavedVmSource scan | ${c === 'cached' ? 'cached' : 'not cached'} | ${fmtStats(src, 2)} | ${fmtRatio(src?.median, raw?.median)} | ${fmtStats(cpuPerGb(d.read[c].source), 2)} | ${cachedBefore(d.read[c].source)} |`,
      `| fs.read 1 MiB sequential | ${c === 'cached' ? 'cached' : 'not cached'} | ${fmtStats(raw, 2)} | 1× | ${fmtStats(cpuPerGb(d.read[c].node), 2)} | ${cachedBefore(d.read[c].node)} |`,
    );
  }
  if (d.sourceStats) {
    const s = d.sourceStats;
    lines.push('', `SavedVmSource (last run): ${s.runsRead} runs read ahead, ${s.hits} calls answered at once, ${s.waits} waited, ${s.syncReads} synchronous reads, ${s.ownBuffers} runs without a ring buffer.`);
  }
  return `${lines.join('\n')}\n`;
}

await runPart<SinkBenchData>('sink', 'Guest-memory storage: DirectorySink and SavedVmSource against raw file I/O', { mib: { type: 'string' }, runs: { type: 'string' } }, body);
