/**
 * One side of a library migration, as a child process
 * (`node --import tsx bench/lib/session-peer.ts`): a SourceSession over a
 * synthetic guest or a saved VM, or a DestinationSession into memory or a
 * directory. Driven by bench/lib/child.ts; every time it reports is
 * CLOCK_MONOTONIC in µs (monoUs), comparable across processes.
 */
import { readFileSync, rmSync, writeFileSync } from 'node:fs';
import { Session } from 'node:inspector';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
// The public surface of src/protocol: the sessions' modules may move behind it.
import {
  DestinationSession,
  DirectorySink,
  InMemorySink,
  InMemorySource,
  readSavedVmManifest,
  SavedVmSource,
  SourceSession,
  type DestinationStats,
  type DeviceStateSection,
  type GuestMemorySink,
  type GuestMemorySource,
  type PostcopyPolicy,
  type SourceStats,
} from '../../src/protocol/index.js';
import type { TransportOptions } from '../../src/transport/connection.js';
import { monoUs, residentSet, serve } from './child-server.js';
import type { ThreadMode } from './features.js';
import { createGuest, hashBlocks, sharedSource, MACHINE_TYPE, runVideoAtDestination, VIDEO_VCPUS, syntheticDevices, type BenchGuest, type DestinationWorkloadReport, type GuestSpec } from './synthetic-guest.js';

/** `inMemory`: the saved VM's RAM read into an InMemorySource over SharedArrayBuffers (what channel threads can share) instead of SavedVmSource's file reads. */
export type SourceMemory = GuestSpec | { kind: 'saved-vm'; dir: string; inMemory?: boolean };

export type SessionCommand =
  | { cmd: 'source-prepare'; memory: SourceMemory }
  | {
      cmd: 'source-migrate';
      to: string;
      tlsDir?: string;
      tlsHostname?: string;
      policy: PostcopyPolicy;
      preempt: boolean;
      maxPasses?: number;
      /** Hash guest RAM after the migration (synthetic guests). */
      hash?: boolean;
      timeoutMs: number;
      /** Issue 13: SourceOptions.threads (a tree without it ignores it; the stats then carry no `threads`). */
      threads?: ThreadMode;
      /** Issue 13: SourceOptions.multifd.channels. */
      multifd?: number;
    }
  | {
      cmd: 'dest-listen';
      host: string;
      tlsDir?: string;
      postcopy: boolean;
      sink: { kind: 'memory'; prefault?: { idstr: string; length: number }[]; shared?: boolean } | { kind: 'directory'; dir: string };
      workload?: 'video';
      idleTimeoutMs?: number;
      threads?: ThreadMode;
      multifd?: number;
    }
  | { cmd: 'dest-wait'; timeoutMs: number; hash?: boolean }
  | { cmd: 'rss' }
  /** V8's CPU profiler around the migration only (bench/profile.ts): start, then stop writes DIR/CPU.session.0.<pid>.0.1.cpuprofile. */
  | { cmd: 'profile-start' }
  | { cmd: 'profile-stop'; dir: string };

export interface SourceRun {
  startUs: number;
  stoppedUs: number | undefined;
  postcopyActiveUs: number | undefined;
  doneUs: number;
  stats: SourceStats;
  passes: { pass: number; bytes: number; dirtyPages: number; durationMs: number }[];
  /** Per answered request, arrival → written (µs), as the source measures it. */
  requestLatencyUs: number[];
  hash?: string;
  /** CPU core-seconds the hash took (this process's main thread, after the migration): what a CPU-per-GB figure must leave out. */
  hashCpuS?: number;
}

export interface DestinationRun {
  /** POSTCOPY_RUN arrived (postcopy): the destination runs. */
  runUs: number | undefined;
  /** The migration completed here (precopy: the destination can run now). */
  completedUs: number;
  stats: DestinationStats;
  postcopy: boolean;
  /** Per demand request, sent → page arrived (µs). */
  requestLatencyUs: number[];
  workload?: DestinationWorkloadReport;
  hash?: string;
  /** CPU core-seconds the hash took (this process's main thread, after the migration): what a CPU-per-GB figure must leave out. */
  hashCpuS?: number;
}

/** The hash and the CPU it took. */
function timedHash(f: () => string): { hash: string; hashCpuS: number } {
  const c0 = process.cpuUsage();
  const hash = f();
  const c = process.cpuUsage(c0);
  return { hash, hashCpuS: (c.user + c.system) / 1e6 };
}

const log = (msg: string): void => void process.stderr.write(`[session-peer] ${msg}\n`);
const transport = (tlsDir: string | undefined, hostname?: string): TransportOptions => (tlsDir ? { tls: { dir: tlsDir, ...(hostname ? { hostname } : {}) } } : {});

// ---------------------------------------------------------------------------
// Source
// ---------------------------------------------------------------------------

let memory: GuestMemorySource | undefined;
let guest: BenchGuest | undefined;
let savedDevices: DeviceStateSection[] | undefined;
let savedVmdesc: Uint8Array | undefined;
let machineType = MACHINE_TYPE;
let session: SourceSession | undefined;

/** The saved VM's RAM blocks read into SharedArrayBuffer-backed buffers. */
function sharedMemoryOf(dir: string, manifest: Awaited<ReturnType<typeof readSavedVmManifest>>): InMemorySource {
  const blocks = new Map<string, Buffer>();
  for (const b of manifest.blocks) {
    const buf = Buffer.from(new SharedArrayBuffer(b.length));
    readFileSync(join(dir, b.file)).copy(buf);
    blocks.set(b.idstr, buf);
  }
  return sharedSource(blocks);
}

async function sourcePrepare(m: SourceMemory): Promise<{ prepareMs: number }> {
  const t0 = performance.now();
  if (m.kind === 'saved-vm') {
    const manifest = await readSavedVmManifest(m.dir);
    memory = m.inMemory ? sharedMemoryOf(m.dir, manifest) : await SavedVmSource.open(m.dir);
    machineType = manifest.machineType ?? MACHINE_TYPE;
    savedDevices = manifest.devices.map((d) => ({ sectionId: d.sectionId, idstr: d.idstr, instanceId: d.instanceId, versionId: d.versionId, data: readFileSync(join(m.dir, d.file)) }));
    savedVmdesc = manifest.vmdesc ? readFileSync(join(m.dir, manifest.vmdesc)) : undefined;
  } else {
    guest = createGuest(m);
    memory = guest.source;
  }
  return { prepareMs: Math.round(performance.now() - t0) };
}

async function sourceMigrate(c: Extract<SessionCommand, { cmd: 'source-migrate' }>): Promise<SourceRun> {
  if (!memory) throw new Error('source-prepare first');
  const g = guest;
  const devices = savedDevices ?? syntheticDevices();
  const s = new SourceSession({
    to: c.to,
    transport: transport(c.tlsDir, c.tlsHostname),
    memory,
    machineType,
    devices: () => [...devices, ...(g?.devices() ?? [])],
    ...(savedVmdesc ? { vmdesc: savedVmdesc } : {}),
    postcopy: c.policy,
    preempt: c.preempt,
    ...(c.maxPasses !== undefined ? { maxPasses: c.maxPasses } : {}),
    stopVm: () => g?.stop(),
    // Issue 13's options, spread so that a tree without them still compiles (and ignores them).
    ...(c.threads ? { threads: c.threads } : {}),
    ...(c.multifd ? { multifd: { channels: c.multifd } } : {}),
  });
  session = s;
  let stoppedUs: number | undefined;
  let postcopyActiveUs: number | undefined;
  const passes: SourceRun['passes'] = [];
  const requestLatencyUs: number[] = [];
  s.on('stopped', (e) => (stoppedUs = Number(e.hrtime / 1000n)));
  s.on('postcopy-active', () => (postcopyActiveUs = monoUs()));
  s.on('pass', (p) => passes.push({ pass: p.pass, bytes: p.bytes, dirtyPages: p.dirtyPages, durationMs: Math.round(p.durationMs) }));
  s.on('page-request', (r) => requestLatencyUs.push(Math.round(r.latencyUs)));
  g?.start();
  const startUs = monoUs();
  s.start();
  let timer: NodeJS.Timeout | undefined;
  try {
    const stats = await Promise.race([
      s.done,
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => {
          log(`no completion within ${c.timeoutMs} ms (${s.currentPhase}): cancelling`);
          void s.cancel();
          reject(new Error(`source: no completion within ${c.timeoutMs} ms (${s.currentPhase})`));
        }, c.timeoutMs);
      }),
    ]);
    const doneUs = monoUs();
    const run: SourceRun = { startUs, stoppedUs, postcopyActiveUs, doneUs, stats, passes, requestLatencyUs };
    if (c.hash && g) Object.assign(run, timedHash(() => hashBlocks(g.source.memory)));
    return run;
  } finally {
    clearTimeout(timer);
    g?.stop();
    session = undefined;
  }
}

// ---------------------------------------------------------------------------
// Destination
// ---------------------------------------------------------------------------

let dest: DestinationSession | undefined;
let sink: GuestMemorySink | undefined;
let sinkDir: string | undefined;
let runUs: number | undefined;
let workload: Promise<DestinationWorkloadReport | undefined> = Promise.resolve(undefined);
const destLatency: number[] = [];

async function destListen(c: Extract<SessionCommand, { cmd: 'dest-listen' }>): Promise<{ uri: string }> {
  if (dest) throw new Error('a destination is already listening');
  if (c.sink.kind === 'memory') {
    // Shared (SharedArrayBuffer-backed) RAM: what the destination's channel threads write into directly.
    const mem = new InMemorySink(c.sink.shared ? { shared: true } : undefined);
    // RAM that exists (touched) before the migration, as a VM's does before its incoming migration.
    if (c.sink.prefault) mem.preallocate(c.sink.prefault, { prefault: true });
    sink = mem;
  } else {
    sink = new DirectorySink(c.sink.dir);
  }
  sinkDir = c.sink.kind === 'directory' ? c.sink.dir : undefined;
  const d = await DestinationSession.listen({
    listen: `tcp:${c.host}:0`,
    sink,
    postcopy: c.postcopy,
    idleTimeoutMs: c.idleTimeoutMs ?? 30_000,
    // TCP_NODELAY on the return path, as qmt receive: requests go out at once.
    transport: { ...transport(c.tlsDir), main: { tuning: { noDelay: true } } },
    ...(c.threads ? { threads: c.threads } : {}),
    ...(c.multifd ? { multifd: { channels: c.multifd } } : {}),
    ...(c.workload === 'video' ? { vcpus: VIDEO_VCPUS } : {}),
  });
  dest = d;
  d.on('page-request', (r) => destLatency.push(Math.round(r.latencyUs)));
  d.once('postcopy-run', () => {
    runUs = monoUs();
    if (c.workload === 'video') {
      workload = runVideoAtDestination(d).catch((e: unknown) => {
        log(`destination workload: ${String(e)}`);
        return undefined;
      });
    }
  });
  return { uri: d.uri };
}

async function destWait(c: Extract<SessionCommand, { cmd: 'dest-wait' }>): Promise<DestinationRun> {
  const d = dest;
  if (!d) throw new Error('dest-listen first');
  let timer: NodeJS.Timeout | undefined;
  try {
    const result = await Promise.race([
      d.done,
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error(`destination: no completion within ${c.timeoutMs} ms (${d.currentPhase})`)), c.timeoutMs);
      }),
    ]);
    const completedUs = monoUs();
    const run: DestinationRun = { runUs, completedUs, stats: result.stats, postcopy: result.postcopy, requestLatencyUs: [...destLatency] };
    const w = await workload;
    if (w) run.workload = w;
    if (c.hash && sink instanceof InMemorySink) {
      const blocks = sink.blocks;
      Object.assign(run, timedHash(() => hashBlocks(blocks)));
    }
    return run;
  } finally {
    clearTimeout(timer);
    d.close();
    await sink?.close();
    if (sinkDir) rmSync(sinkDir, { recursive: true, force: true });
  }
}

// ---------------------------------------------------------------------------
// CPU profile of the migration alone (not the start-up, not tsx's loader)
// ---------------------------------------------------------------------------

let profiler: Session | undefined;

function post<T>(s: Session, method: string, params: Record<string, unknown> = {}): Promise<T> {
  return new Promise((resolve, reject) => s.post(method, params, (err, res) => (err ? reject(err) : resolve(res as T))));
}

async function profileStart(): Promise<void> {
  if (profiler) throw new Error('already profiling');
  const s = new Session();
  s.connect();
  profiler = s;
  await post(s, 'Profiler.enable');
  await post(s, 'Profiler.setSamplingInterval', { interval: 1000 });
  await post(s, 'Profiler.start');
}

async function profileStop(dir: string): Promise<{ file: string }> {
  const s = profiler;
  if (!s) throw new Error('not profiling');
  const { profile } = await post<{ profile: unknown }>(s, 'Profiler.stop');
  s.disconnect();
  profiler = undefined;
  const file = join(dir, `CPU.session.0.${process.pid}.0.1.cpuprofile`);
  writeFileSync(file, JSON.stringify(profile));
  return { file };
}

serve(
  'session-peer',
  {
    'source-prepare': (c) => sourcePrepare((c as Extract<SessionCommand, { cmd: 'source-prepare' }>).memory),
    'source-migrate': (c) => sourceMigrate(c as Extract<SessionCommand, { cmd: 'source-migrate' }>),
    'dest-listen': (c) => destListen(c as Extract<SessionCommand, { cmd: 'dest-listen' }>),
    'dest-wait': (c) => destWait(c as Extract<SessionCommand, { cmd: 'dest-wait' }>),
    rss: () => residentSet(),
    'profile-start': () => profileStart(),
    'profile-stop': (c) => profileStop((c as Extract<SessionCommand, { cmd: 'profile-stop' }>).dir),
  },
  () => {
    if (session) log(`exiting while the source runs (${session.currentPhase}): cancelling it`);
    void session?.cancel();
    dest?.close();
    if (sinkDir) rmSync(sinkDir, { recursive: true, force: true });
  },
);
