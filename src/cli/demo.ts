import { randomFillSync } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir, totalmem } from 'node:os';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { performance } from 'node:perf_hooks';
import { Worker } from 'node:worker_threads';
import type { ThreadMode } from '../transport/worker/support.js';
import type { DestinationStats } from '../protocol/destination.js';
import { Option, type Command } from 'commander';
import type { LatencySummary } from '../protocol/latency.js';
import { InMemorySource } from '../protocol/memory-source.js';
import { parsePostcopyPolicy, type PostcopyPolicy } from '../protocol/postcopy-policy.js';
import { SourceSession, type SourceStats } from '../protocol/source.js';
import { TARGET_PAGE_SIZE } from '../stream/constants.js';
import { initPkiDir } from '../transport/pki.js';
import { asArgParser, intArg } from './args.js';
import type { DemoDestinationData, DemoTouches } from './demo-destination.js';
import { usageError } from './errors.js';
import { latencyJson, sourceStatsJson, threadsJson, type LatencyJson, type SourceStatsJson, type ThreadsJson } from './json.js';
import { Progress, PROGRESS_MODES, type ProgressMode } from './progress.js';
import { run } from './run.js';

const MiB = 1024 * 1024;

/** What the synthetic guest does while it migrates. */
export type Workload = 'video' | 'idle';

export const WORKLOADS: readonly Workload[] = ['video', 'idle'];

/** The largest --size the parser takes; the command also refuses more than the machine holds. */
export const MAX_DEMO_MIB = 1 << 20;

export interface DemoOptions {
  sizeMiB: number;
  policy: PostcopyPolicy;
  workload: Workload;
  tls: boolean;
  preempt: boolean;
  /** Each channel in a worker thread, at both ends (`threads` of both sessions; default 'auto'). */
  threads?: ThreadMode;
  /** Where progress lines go (default stderr, or `progress` when given). */
  log?: (line: string) => void;
  /** A display to keep up to date (bytes sent, pages of the guest). */
  progress?: Progress;
  /** Aborting cancels the migration (runDemo then rejects with 'cancelled'). */
  signal?: AbortSignal;
}

export interface DemoReport {
  guestMiB: number;
  policy: string;
  workload: Workload;
  tls: boolean;
  preempt: boolean;
  totalMs: number;
  /** Source stop → destination running (RUN sent in postcopy, SHUT in precopy). */
  downtimeMs: number | undefined;
  passes: number;
  throughputMBps: number;
  postcopy: boolean;
  faults: LatencySummary;
  /** The destination's postcopy-blocktime (ms): all its vCPUs waited on missing pages at once. */
  blocktimeMs: number;
  /** postcopy-vcpu-blocktime (ms), per vCPU. */
  vcpuBlocktimeMs: number[];
  bytes: { main: number; preempt: number; returnPath: number };
  memoryIdentical: boolean;
  source: SourceStats;
  /** The destination's stats.threads: whether its channels ran in worker threads, and why. */
  destinationThreads: DestinationStats['threads'];
}

/**
 * A synthetic guest like the seed's video-streaming VM: an OS image (a third
 * of the pages hold data, the rest are zero), a hot working set rewritten all
 * the time, and a streaming buffer written front to back at a steady rate.
 */
class SyntheticGuest {
  readonly source: InMemorySource;
  private timer: NodeJS.Timeout | undefined;
  private streamPos = 0;
  readonly hot: { start: number; length: number };
  readonly stream: { start: number; length: number };
  private readonly noise = Buffer.alloc(256);

  constructor(readonly size: number) {
    // Shared memory: with threads the source's channel workers read it directly.
    this.source = new InMemorySource(
      [
        { idstr: 'pc.ram', length: size },
        { idstr: 'pc.bios', length: 256 * 1024 },
      ],
      { shared: true },
    );
    const ram = this.source.memory.get('pc.ram')!;
    for (let p = 0; p < size; p += 3 * TARGET_PAGE_SIZE) randomFillSync(ram, p, TARGET_PAGE_SIZE);
    randomFillSync(this.source.memory.get('pc.bios')!);
    // Both regions stay inside the guest however small it is (--size 1): the hot set in the
    // first half, the streaming buffer in the second half.
    const pageAligned = (n: number): number => Math.max(TARGET_PAGE_SIZE, Math.floor(n / TARGET_PAGE_SIZE) * TARGET_PAGE_SIZE);
    this.hot = { start: Math.floor(size / 8), length: pageAligned(Math.min(size / 4, Math.max(4 * MiB, size / 64))) };
    this.stream = { start: Math.floor(size / 2), length: pageAligned(Math.min(size / 2, Math.max(16 * MiB, size / 8))) };
  }

  /** Runs the workload: every 5 ms, scattered writes in the hot set and a slice of the stream. */
  start(workload: Workload): void {
    if (workload === 'idle') return;
    const streamBytesPerTick = Math.max(TARGET_PAGE_SIZE, Math.floor(this.stream.length / 400)); // the buffer wraps every ~2 s
    let tick = 0;
    this.timer = setInterval(() => {
      // Cheap writes (a tick counter), so that the workload does not eat the CPU the migration needs.
      tick = (tick + 1) & 0xff;
      this.noise.fill(tick);
      for (let i = 0; i < 256; i++) {
        const off = this.hot.start + Math.floor(Math.random() * (this.hot.length / 64)) * 64;
        this.source.write('pc.ram', off, this.noise.subarray(0, 64));
      }
      for (let done = 0; done < streamBytesPerTick; done += this.noise.length) {
        this.source.write('pc.ram', this.stream.start + this.streamPos, this.noise);
        this.streamPos = (this.streamPos + this.noise.length) % this.stream.length;
      }
    }, 5);
  }

  stop(): void {
    clearInterval(this.timer);
  }

}

/** Starts the destination half in a worker thread (the .ts file under tsx, the .js one when built). */
function startDestinationWorker(data: DemoDestinationData): Worker {
  const self = import.meta.url;
  if (!self.endsWith('.ts')) return new Worker(new URL('./demo-destination.js', self), { workerData: data });
  // Running from source (tsx, vitest): the worker registers tsx itself before loading the .ts file,
  // found from here rather than from the working directory (which may have no node_modules).
  const file = new URL('./demo-destination.ts', self).href;
  const tsxApi = pathToFileURL(join(dirname(createRequire(self).resolve('tsx/package.json')), 'dist', 'esm', 'api', 'index.mjs')).href;
  const boot = `import(${JSON.stringify(tsxApi)}).then((api) => { api.register(); return import(${JSON.stringify(file)}); });`;
  return new Worker(boot, { eval: true, workerData: data });
}

type WorkerMessage =
  | { type: 'listening'; uri: string }
  | { type: 'log'; line: string }
  | { type: 'done'; postcopy: boolean; faults: LatencySummary; blocktime: { total: number; perVcpu: number[] }; returnPathBytes: number; blocks: [string, SharedArrayBuffer][]; threads: DestinationStats['threads'] }
  | { type: 'failed'; message: string };

/** A migration of a synthetic guest over the two (TLS) channels on loopback, the destination in a worker thread. */
export async function runDemo(o: DemoOptions): Promise<DemoReport> {
  const log = o.log ?? (o.progress ? (l: string) => o.progress!.log(l) : (l: string) => process.stderr.write(`${l}\n`));
  o.signal?.throwIfAborted();
  const dir = await mkdtemp(join(tmpdir(), 'qmt-demo-'));
  let worker: Worker | undefined;
  try {
    if (o.tls) await initPkiDir(join(dir, 'pki'));
    const transport = o.tls ? { tls: { dir: join(dir, 'pki') } } : {};
    const guest = new SyntheticGuest(o.sizeMiB * MiB);
    worker = startDestinationWorker({ transport, postcopy: o.policy !== 'never', threads: o.threads ?? 'auto' });
    const w = worker;
    const finished = new Promise<Extract<WorkerMessage, { type: 'done' }>>((resolve, reject) => {
      w.on('error', reject);
      w.on('exit', (code) => reject(new Error(`the destination worker exited (${code})`)));
      w.on('message', (m: WorkerMessage) => {
        if (m.type === 'log') log(m.line);
        else if (m.type === 'done') resolve(m);
        else if (m.type === 'failed') reject(new Error(`destination: ${m.message}`));
      });
    });
    finished.catch(() => undefined);
    const uri = await new Promise<string>((resolve, reject) => {
      w.on('message', (m: WorkerMessage) => m.type === 'listening' && resolve(m.uri));
      w.once('error', reject);
    });
    const src = new SourceSession({
      to: uri,
      transport,
      memory: guest.source,
      machineType: 'pc-q35-10.0',
      devices: () => [
        { idstr: 'timer', instanceId: 0, versionId: 2, data: Buffer.alloc(24) },
        { idstr: 'cpu', instanceId: 0, versionId: 12, data: randomFillSync(Buffer.alloc(1851)) },
      ],
      postcopy: o.policy,
      preempt: o.preempt && o.policy !== 'never',
      maxPasses: 10,
      ...(o.threads ? { threads: o.threads } : {}),
      stopVm: () => {
        guest.stop();
        const touches: DemoTouches = { hot: guest.hot, stream: guest.stream };
        w.postMessage({ type: 'touches', touches });
      },
    });
    src.on('pass', (p) => log(`source: pass ${p.pass}: ${p.pagesSent} pages, ${(p.bytes / MiB).toFixed(0)} MiB in ${p.durationMs.toFixed(0)} ms, ${p.dirtyPages} pages dirty again`));
    let phase = 'precopy';
    src.on('stopped', () => {
      phase = 'switchover';
      log('source: VM stopped');
    });
    src.on('postcopy-active', () => {
      phase = 'postcopy';
      log('source: postcopy active');
    });
    const totalPages = (o.sizeMiB * MiB + 256 * 1024) / TARGET_PAGE_SIZE;
    const refresh = (): void => {
      const st = src.stats();
      o.progress?.update({ phase, bytes: st.transferred, done: st.normal + st.duplicate + st.xbzrle, total: totalPages });
    };
    const ticker = o.progress ? setInterval(refresh, 100) : undefined;
    ticker?.unref();
    const cancel = (): void => void src.cancel().catch(() => undefined);
    o.signal?.addEventListener('abort', cancel, { once: true });
    o.signal?.throwIfAborted();
    guest.start(o.workload);
    const t0 = performance.now();
    log(`demo: migrating a ${o.sizeMiB} MiB synthetic guest (${o.workload}) over ${o.tls ? 'two TLS channels' : 'two TCP channels'} on loopback, postcopy ${typeof o.policy === 'object' ? `after ${o.policy.afterPasses} pass(es)` : o.policy}`);
    src.start();
    const [stats, done] = await Promise.all([src.done, finished]).finally(() => {
      o.signal?.removeEventListener('abort', cancel);
      clearInterval(ticker);
    });
    refresh();
    const totalMs = performance.now() - t0;
    guest.stop();
    const received = new Map(done.blocks.map(([name, sab]) => [name, Buffer.from(sab)]));
    let identical = true;
    for (const [name, mem] of guest.source.memory) identical &&= received.get(name)?.equals(mem) ?? false;
    return {
      guestMiB: o.sizeMiB,
      policy: typeof o.policy === 'object' ? `after:${o.policy.afterPasses}` : o.policy,
      workload: o.workload,
      tls: o.tls,
      preempt: o.preempt,
      totalMs: Math.round(totalMs),
      downtimeMs: stats.downtime,
      passes: stats.passes,
      throughputMBps: Math.round(stats.transferred / totalMs / 1000),
      postcopy: done.postcopy,
      faults: done.faults,
      blocktimeMs: done.blocktime.total,
      vcpuBlocktimeMs: done.blocktime.perVcpu,
      bytes: { main: stats.channels.main?.bytesSent ?? 0, preempt: stats.channels.preempt?.bytesSent ?? 0, returnPath: done.returnPathBytes },
      memoryIdentical: identical,
      source: stats,
      destinationThreads: done.threads,
    };
  } finally {
    await worker?.terminate();
    await rm(dir, { recursive: true, force: true });
  }
}

/** `preempt 12, main (in flight) 3, main (no preempt) 0`: the per-reason counts of SourceStats['requests-answered']. */
export function formatAnswered(a: SourceStats['requests-answered']): string {
  return `preempt ${a.preempt}, main (already in flight) ${a['main-in-flight']}, main (no preempt channel) ${a['main-no-preempt']}`;
}

/** `0.0–12.3 ms, median 4.5 ms` of per-vCPU blocktimes. */
function vcpuRange(per: readonly number[]): string {
  if (per.length === 0) return '-';
  const sorted = [...per].sort((a, b) => a - b);
  return `${sorted[0]!.toFixed(1)}–${sorted.at(-1)!.toFixed(1)} ms, median ${sorted[sorted.length >> 1]!.toFixed(1)} ms`;
}

export function formatDemoReport(r: DemoReport): string {
  const ms = (us: number) => `${(us / 1000).toFixed(2)} ms`;
  return [
    '',
    `guest ${r.guestMiB} MiB, workload ${r.workload}, postcopy ${r.policy}${r.preempt ? ' with preempt' : ''}, ${r.tls ? 'TLS' : 'plain TCP'}`,
    `total time      ${r.totalMs} ms (${r.passes} precopy pass${r.passes === 1 ? '' : 'es'}${r.postcopy ? ', then postcopy' : ''})`,
    `throughput      ${r.throughputMBps} MB/s`,
    `downtime        ${r.downtimeMs ?? '-'} ms (source stop → destination running)`,
    `faults          ${r.faults.count}${r.faults.count ? `: p50 ${ms(r.faults.p50)}, p99 ${ms(r.faults.p99)}, max ${ms(r.faults.max)}` : ''}`,
    `blocktime       ${r.blocktimeMs.toFixed(1)} ms (all ${r.vcpuBlocktimeMs.length} vCPUs waiting on pages at once; per vCPU ${vcpuRange(r.vcpuBlocktimeMs)})`,
    `stall           ${r.downtimeMs === undefined ? '-' : `${(r.downtimeMs + r.blocktimeMs).toFixed(1)} ms`} (downtime + blocktime: what the VM feels)`,
    `bytes           main ${r.bytes.main}, preempt ${r.bytes.preempt}, return path ${r.bytes.returnPath}`,
    // Which channel answered each requested page, and why (a page already handed to main before its request is not sent again).
    ...(r.postcopy && r.source['postcopy-requests'] > 0 ? [`requests        ${r.source['postcopy-requests']} sent; answered: ${formatAnswered(r.source['requests-answered'])}`] : []),
    `memory          ${r.memoryIdentical ? 'identical at both ends (bit for bit)' : 'DIFFERS'}`,
    `destination     ${r.destinationThreads.used ? `channels in worker threads (${r.destinationThreads.channels.map((c) => `${c.role} ${c.cpuSeconds.toFixed(2)} s CPU`).join(', ')})` : 'one thread'}: ${r.destinationThreads.why}`,
  ].join('\n');
}

/** The fields of `qmt demo --json` after the envelope (README "JSON output"). */
export interface DemoJson {
  guestMiB: number;
  policy: string;
  workload: Workload;
  tls: boolean;
  preempt: boolean;
  postcopy: boolean;
  passes: number;
  /** Source start → both ends done. */
  migrationMs: number;
  /** Source stop → destination running; null when it was not measured. */
  downtimeMs: number | null;
  /** Bytes sent / migration time, in MB/s (10^6 bytes). */
  throughputMBps: number;
  /** The destination's page faults (request → page placed). */
  faults: LatencyJson;
  /** postcopy-blocktime (ms, as QEMU's): all the destination's vCPUs waited on missing pages at once. */
  blocktimeMs: number;
  /** postcopy-vcpu-blocktime (ms), per vCPU. */
  vcpuBlocktimeMs: number[];
  /** downtimeMs + blocktimeMs: the VM's stall; null when the downtime was not measured. */
  stallMs: number | null;
  /** Bytes each channel carried: main and preempt from the source, the return path from the destination. */
  channels: { mainBytes: number; preemptBytes: number; returnPathBytes: number };
  memoryIdentical: boolean;
  source: SourceStatsJson;
  /** The destination's channels: in worker threads or not, and why. */
  destinationThreads: ThreadsJson;
}

export function demoJson(r: DemoReport): DemoJson {
  return {
    guestMiB: r.guestMiB,
    policy: r.policy,
    workload: r.workload,
    tls: r.tls,
    preempt: r.preempt,
    postcopy: r.postcopy,
    passes: r.passes,
    migrationMs: r.totalMs,
    downtimeMs: r.downtimeMs ?? null,
    throughputMBps: r.throughputMBps,
    faults: latencyJson(r.faults),
    blocktimeMs: r.blocktimeMs,
    vcpuBlocktimeMs: r.vcpuBlocktimeMs,
    stallMs: r.downtimeMs === undefined ? null : Math.round((r.downtimeMs + r.blocktimeMs) * 1000) / 1000,
    channels: { mainBytes: r.bytes.main, preemptBytes: r.bytes.preempt, returnPathBytes: r.bytes.returnPath },
    memoryIdentical: r.memoryIdentical,
    source: sourceStatsJson(r.source),
    destinationThreads: threadsJson(r.destinationThreads),
  };
}

interface DemoCliOptions {
  size: number;
  postcopy: PostcopyPolicy;
  workload: Workload;
  tls: boolean;
  preempt: boolean;
  threads: ThreadMode;
  json?: boolean;
  progress: ProgressMode;
}

export function registerDemoCommand(program: Command): Command {
  return program
    .command('demo')
    .description('migrate a synthetic guest in-process over two TLS channels on loopback (postcopy after one pass)')
    .option('--size <MiB>', `guest RAM in MiB (1..${MAX_DEMO_MIB}; the demo holds it twice)`, intArg('--size', 1, MAX_DEMO_MIB), 1024)
    .addOption(new Option('--postcopy <policy>', 'never | manual | auto | after:N').argParser(asArgParser(parsePostcopyPolicy)).default({ afterPasses: 1 } as PostcopyPolicy, 'after:1'))
    .addOption(new Option('--workload <kind>', 'video (hot set + streaming buffer) | idle').choices([...WORKLOADS]).default('video'))
    .option('--no-tls', 'plain TCP instead of TLS')
    .option('--no-preempt', 'answer page requests on the main channel')
    .addOption(new Option('--threads <mode>', 'each channel in a worker thread, at both ends: on | off | auto (on where this Node can move sockets to threads, 26.6+, with 4 or more cores)').choices(['auto', 'on', 'off']).default('auto'))
    .option('--json', 'print the report as JSON')
    .addOption(new Option('--progress <mode>', 'progress on stderr: a bar on a TTY, plain lines otherwise').choices([...PROGRESS_MODES]).default('auto'))
    .action(
      run('demo', async (ctx, opts: DemoCliOptions) => {
        // Source and destination each hold the whole guest in this process.
        const needMiB = 2 * opts.size;
        const haveMiB = Math.floor(totalmem() / MiB);
        if (needMiB > haveMiB) throw usageError(`--size ${opts.size}: the demo holds the guest twice (${needMiB} MiB), more than this machine's ${haveMiB} MiB of RAM`);
        const progress = new Progress({ mode: opts.progress, stream: ctx.stderr, prefix: '' });
        let report: DemoReport;
        try {
          report = await runDemo({ sizeMiB: opts.size, policy: opts.postcopy, workload: opts.workload, tls: opts.tls, preempt: opts.preempt, threads: opts.threads, progress, signal: ctx.signal });
        } finally {
          progress.stop();
        }
        if (!ctx.json) ctx.stdout.write(`${formatDemoReport(report)}\n`);
        return report.memoryIdentical
          ? { ok: true, json: demoJson(report) }
          : { ok: false, error: { code: 'memory-differs', message: 'the destination memory differs from the source' }, json: demoJson(report) };
      }),
    );
}
