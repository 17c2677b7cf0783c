/**
 * What the time goes to: `npm run bench:profile [-- --mib N] [-- --kinds plain,tls] [-- --no-qemu] [-- --no-demo] [-- --threads] [-- --only-threads]`
 * (builds dist/ first when it is missing or older than src/: the `qmt` rows run the built command).
 *
 * One migration of each of our paths with V8's CPU profiler on our processes
 * (`node --cpu-prof --cpu-prof-dir`), QEMU's test guest (data in every page)
 * or the bench's synthetic guest of the same size, loopback:
 *   - QEMU → `qmt receive --out DIR` (the built CLI, saved VM on disk);
 *   - `qmt send --from DIR` (that saved VM) → a waiting QEMU;
 *   - library → library (SourceSession → DestinationSession into memory,
 *     each in a child process of its own, bench/lib/session-peer.ts);
 *   - `qmt demo` (TLS, postcopy after one pass) with and without preempt:
 *     its main thread (the source) and its worker (the destination).
 * Prints, per process, the shares of idle / GC / program (native code
 * outside JS) / JS by origin, and the top functions by self time (built code
 * mapped back to src/ through dist's source maps); writes
 * bench/results/profile.md and profile.json, and keeps the .cpuprofile files
 * (open them in Chrome DevTools or speedscope) under bench/results/profiles/.
 * With --threads (issue 13), per thread, under a Node.js ≥ 26.6
 * (bench/lib/features.ts): `qmt demo --threads on` (preempt), and library ↔
 * library over TLS with 2 multifd channels and threads on — both with
 * `node --cpu-prof`, which writes one profile per thread (every channel
 * worker); a path whose feature the tree lacks is listed as not available.
 * --only-threads: those alone.
 * A profiled run is slower than an unprofiled one (sampling every 1 ms): the
 * times here are context, the figures are bench/REPORT.md's.
 */
import { execFileSync } from 'node:child_process';
import { cp, mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { initPkiDir } from '../src/transport/pki.js';
import { BenchChild, REPO_ROOT } from './lib/child.js';
import { profileHeading, profileMarkdown, summarizeProfiles, type ProfileSummary } from './lib/cpuprofile.js';
import { loadAverage } from './lib/cpu.js';
import { machineInfo, fmt } from './lib/report.js';
import { ensureBuiltCli, startQmtCli } from './lib/qmt-cli.js';
import type { QemuProcess } from './lib/qemu.js';
import type { DestinationRun, SessionCommand, SourceRun } from './lib/session-peer.js';
import { cliHasFlag, multifdUnavailable, threadsNode, threadsUnavailable } from './lib/features.js';
import { RAM_BLOCK } from './lib/synthetic-guest.js';

const MiB = 1024 * 1024;
const SESSION_PEER = fileURLToPath(new URL('./lib/session-peer.ts', import.meta.url));
const OUT = join(REPO_ROOT, 'bench', 'results');

const { values: args } = parseArgs({
  options: {
    mib: { type: 'string', default: '1024' },
    kinds: { type: 'string', default: 'plain,tls' },
    'no-qemu': { type: 'boolean', default: false },
    'no-demo': { type: 'boolean', default: false },
    top: { type: 'string', default: '15' },
    threads: { type: 'boolean', default: false },
    'only-threads': { type: 'boolean', default: false },
  },
});
const mib = Number(args.mib);
const kinds = String(args.kinds)
  .split(',')
  .map((k) => k.trim())
  .filter((k): k is 'plain' | 'tls' => k === 'plain' || k === 'tls');
const topN = Number(args.top);
const log = (line: string): void => void process.stderr.write(`[profile] ${line}\n`);

export interface Profiled {
  /** receive-plain, send-tls, library-plain, demo-preempt, demo-no-preempt …: what the report's rows link to. */
  id: string;
  path: string;
  /** A line under the heading: faults and latency of a demo run. */
  note?: string;
  kind: 'plain' | 'tls';
  seconds: number;
  gbps: number;
  processes: { role: string; summary: ProfileSummary }[];
  error?: string;
}

const work = execFileSync('mktemp', ['-d', '/tmp/qmt-bench-profile-XXXXXX'], { encoding: 'utf8' }).trim();
const children = new Set<BenchChild<SessionCommand>>();
let qemu: typeof import('./lib/qemu.js') | undefined;
const cleanup = async (): Promise<void> => {
  await Promise.allSettled([...children].map((c) => c.stop()));
  await qemu?.stopAll();
  await rm(work, { recursive: true, force: true });
};
for (const sig of ['SIGINT', 'SIGTERM'] as const) {
  process.once(sig, () => {
    void cleanup().finally(() => process.exit(sig === 'SIGINT' ? 130 : 143));
  });
}

function roles(dir: string, label: (s: ProfileSummary, i: number, all: ProfileSummary[]) => string): { role: string; summary: ProfileSummary }[] {
  const all = summarizeProfiles(dir, topN);
  return all.map((s, i) => ({ role: label(s, i, all), summary: s }));
}

async function keepProfiles(dir: string, name: string): Promise<void> {
  const to = join(OUT, 'profiles', name);
  await rm(to, { recursive: true, force: true });
  await mkdir(to, { recursive: true });
  await cp(dir, to, { recursive: true });
}

async function startSource(q: typeof import('./lib/qemu.js'), pkiDir: string): Promise<QemuProcess> {
  const src = await q.startQemuIn(undefined, { name: 'profile-src', memoryMiB: mib, guest: { startMiB: 1, endMiB: mib, direction: 'up' }, extraArgs: q.tlsCredsArgs(pkiDir, 'client') });
  await src.waitSerialPasses(1, 300_000);
  await src.pauseVm();
  await src.setCapabilities({ events: true });
  await src.setParameters({ ...q.UNLIMITED });
  return src;
}

async function profileReceive(q: typeof import('./lib/qemu.js'), src: QemuProcess, pkiDir: string, kind: 'plain' | 'tls', out: string): Promise<Profiled> {
  const dir = join(work, `receive-${kind}`);
  await mkdir(dir, { recursive: true });
  const tls = kind === 'tls';
  const run = startQmtCli(['receive', '--listen', 'tcp:127.0.0.1:0', '--out', out, '--progress', 'none', ...(tls ? ['--tls', pkiDir] : [])], { cpuProfDir: dir });
  const uri = (await run.stderrMatches(/^qmt: listening on (\S+)/m))[1]!;
  await src.setParameters({ 'tls-creds': tls ? 'tls0' : '', 'tls-hostname': tls ? 'localhost' : '' });
  const since = src.qmp.events.length;
  execFileSync('sync');
  await src.migrate(uri);
  const r = await run.exit;
  await q.waitMigrationEvent(src, 'completed', 30_000, since);
  await src.resumeVm();
  await src.pauseVm();
  if (r.code !== 0) throw new Error(`qmt receive exited ${r.code}: ${r.stderr.slice(-1000)}`);
  const setup = q.migrationEventUs(src, 'setup')!;
  const seconds = (r.exitUs - setup) / 1e6;
  await keepProfiles(dir, `receive-${kind}`);
  return {
    id: `receive-${kind}`,
    path: 'QEMU → `qmt receive`',
    kind,
    seconds,
    gbps: (mib * MiB) / seconds / 1e9,
    processes: roles(dir, (s, _i, all) => (s.thread ? `qmt receive, thread ${s.thread}` : all.filter((x) => !x.thread).length > 1 && s.pid === run.child.pid ? 'qmt receive (parent: re-runs itself without TLS 1.3 tickets, waits)' : 'qmt receive')),
  };
}

async function profileSend(q: typeof import('./lib/qemu.js'), pkiDir: string, kind: 'plain' | 'tls', from: string): Promise<Profiled> {
  const dir = join(work, `send-${kind}`);
  await mkdir(dir, { recursive: true });
  const tls = kind === 'tls';
  const dst = await q.startQemuIn(undefined, { name: 'profile-dst', memoryMiB: mib, guest: { startMiB: 1, endMiB: mib, direction: 'up' }, incoming: true, extraArgs: q.tlsCredsArgs(pkiDir, 'server') });
  try {
    await dst.setCapabilities({ events: true });
    await dst.setParameters({ 'tls-creds': tls ? 'tls0' : '' });
    await dst.migrateIncoming('tcp:127.0.0.1:0');
    const uri = `tcp:127.0.0.1:${await q.incomingPort(dst)}`;
    const since = dst.qmp.events.length;
    execFileSync('sync');
    const run = startQmtCli(['send', '--from', from, '--to', uri, '--progress', 'none', ...(tls ? ['--tls', pkiDir, '--tls-hostname', 'localhost'] : [])], { cpuProfDir: dir });
    const r = await run.exit;
    if (r.code !== 0) throw new Error(`qmt send exited ${r.code}: ${r.stderr.slice(-1000)}`);
    await q.waitMigrationEvent(dst, 'completed', 60_000, since);
    const ev = dst.qmp.events.slice(since).filter((e) => e.event === 'MIGRATION');
    const us = (e: (typeof ev)[number] | undefined): number => (e ? e.timestamp.seconds * 1e6 + e.timestamp.microseconds : NaN);
    const seconds = (us(ev.find((e) => (e.data as { status?: string }).status === 'completed')) - us(ev[0])) / 1e6;
    await keepProfiles(dir, `send-${kind}`);
    return { id: `send-${kind}`, path: '`qmt send` → QEMU', kind, seconds, gbps: (mib * MiB) / seconds / 1e9, processes: roles(dir, (s) => (s.thread ? `qmt send, thread ${s.thread}` : 'qmt send')) };
  } finally {
    await dst.stop();
  }
}

async function profileLibrary(pkiDir: string, kind: 'plain' | 'tls'): Promise<Profiled> {
  const bytes = mib * MiB;
  const sdir = join(work, `library-${kind}-source`);
  const ddir = join(work, `library-${kind}-dest`);
  await mkdir(sdir, { recursive: true });
  await mkdir(ddir, { recursive: true });
  const tlsDir = kind === 'tls' ? pkiDir : undefined;
  const src = BenchChild.start<SessionCommand>('source', SESSION_PEER);
  const dst = BenchChild.start<SessionCommand>('dest', SESSION_PEER);
  children.add(src);
  children.add(dst);
  let seconds: number;
  try {
    const [{ uri }] = await Promise.all([
      dst.call<{ uri: string }>({ cmd: 'dest-listen', host: '127.0.0.1', postcopy: false, sink: { kind: 'memory' }, ...(tlsDir ? { tlsDir } : {}) }, 120_000),
      src.call({ cmd: 'source-prepare', memory: { kind: 'pattern', bytes } }, 120_000),
    ]);
    // Profiled: the migration, not the start-up (tsx compiling the sources, the guest's pages filled).
    await Promise.all([src.call({ cmd: 'profile-start' }, 30_000), dst.call({ cmd: 'profile-start' }, 30_000)]);
    const [s, d] = await Promise.all([
      src.call<SourceRun>({ cmd: 'source-migrate', to: uri, policy: 'never', preempt: false, timeoutMs: 300_000, ...(tlsDir ? { tlsDir } : {}) }, 310_000),
      dst.call<DestinationRun>({ cmd: 'dest-wait', timeoutMs: 300_000 }, 310_000),
    ]);
    seconds = (d.completedUs - s.startUs) / 1e6;
    await Promise.all([src.call({ cmd: 'profile-stop', dir: sdir }, 60_000), dst.call({ cmd: 'profile-stop', dir: ddir }, 60_000)]);
  } finally {
    await Promise.all([src.stop(), dst.stop()]);
    children.delete(src);
    children.delete(dst);
  }
  await keepProfiles(sdir, `library-${kind}-source`);
  await keepProfiles(ddir, `library-${kind}-dest`);
  const label = (end: 'source' | 'destination') => (s: ProfileSummary) =>
    s.thread ? `library ${end}, thread ${s.thread}` : end === 'source' ? 'library source (SourceSession, synthetic guest)' : 'library destination (DestinationSession, InMemorySink)';
  return { id: `library-${kind}`, path: 'library → library', kind, seconds, gbps: bytes / seconds / 1e9, processes: [...roles(sdir, label('source')), ...roles(ddir, label('destination'))] };
}

async function profileDemo(preempt: boolean): Promise<Profiled> {
  const dir = join(work, `demo-${preempt ? 'preempt' : 'no-preempt'}`);
  await mkdir(dir, { recursive: true });
  const run = startQmtCli(['demo', '--size', String(mib), '--json', '--progress', 'none', ...(preempt ? [] : ['--no-preempt'])], { cpuProfDir: dir });
  const r = await run.exit;
  if (r.code !== 0) throw new Error(`qmt demo exited ${r.code}: ${r.stderr.slice(-1000)}`);
  const j = JSON.parse(r.stdout) as { migrationMs: number; faults: { count: number; p50Us: number; p99Us: number } };
  await keepProfiles(dir, `demo-${preempt ? 'preempt' : 'no-preempt'}`);
  return {
    id: `demo-${preempt ? 'preempt' : 'no-preempt'}`,
    path: `\`qmt demo\`${preempt ? '' : ' --no-preempt'}`,
    note: `${j.faults.count} faults, p50 ${fmt(j.faults.p50Us / 1000, 1)} ms, p99 ${fmt(j.faults.p99Us / 1000, 1)} ms`,
    kind: 'tls',
    seconds: j.migrationMs / 1000,
    gbps: (mib * MiB) / (j.migrationMs / 1000) / 1e9,
    processes: roles(dir, (s) => (s.thread ? `qmt demo, worker thread ${s.thread} (the destination)` : 'qmt demo, main thread (the source)')),
  };
}

/** Issue 13: `qmt demo --threads on` (preempt), every thread profiled (`--cpu-prof` writes one profile per worker). */
async function profileDemoThreads(): Promise<Profiled> {
  const why = threadsUnavailable() ?? (cliHasFlag('demo', '--threads') ? undefined : 'this build of `qmt demo` has no `--threads`');
  if (why) throw new Error(`not available: ${why}`);
  const dir = join(work, 'demo-preempt-threads');
  await mkdir(dir, { recursive: true });
  const run = startQmtCli(['demo', '--size', String(mib), '--json', '--progress', 'none', '--threads', 'on'], { cpuProfDir: dir, node: threadsNode()!.path });
  const r = await run.exit;
  if (r.code !== 0) throw new Error(`qmt demo --threads on exited ${r.code}: ${r.stderr.slice(-1000)}`);
  const j = JSON.parse(r.stdout) as { migrationMs: number; faults: { count: number; p50Us: number; p99Us: number } };
  await keepProfiles(dir, 'demo-preempt-threads');
  return {
    id: 'demo-preempt-threads',
    path: '`qmt demo --threads on`',
    note: `${j.faults.count} faults, p50 ${fmt(j.faults.p50Us / 1000, 1)} ms, p99 ${fmt(j.faults.p99Us / 1000, 1)} ms`,
    kind: 'tls',
    seconds: j.migrationMs / 1000,
    gbps: (mib * MiB) / (j.migrationMs / 1000) / 1e9,
    processes: roles(dir, (s) => (s.thread ? `qmt demo --threads on, worker thread ${s.thread}` : 'qmt demo --threads on, main thread')),
  };
}

/** Issue 13: library ↔ library, TLS, 2 multifd channels, threads on; each peer under `node --cpu-prof` (one profile per thread, start-up included). */
async function profileLibraryMultifd(pkiDir: string, channels: number): Promise<Profiled> {
  const why = multifdUnavailable('both') ?? threadsUnavailable();
  if (why) throw new Error(`not available: ${why}`);
  const bytes = mib * MiB;
  const id = `library-multifd${channels}-tls-threads`;
  const sdir = join(work, `${id}-source`);
  const ddir = join(work, `${id}-dest`);
  await mkdir(sdir, { recursive: true });
  await mkdir(ddir, { recursive: true });
  const node = threadsNode()!.path;
  const src = BenchChild.start<SessionCommand>('source', SESSION_PEER, [], [], ['--cpu-prof', '--cpu-prof-dir', sdir], node);
  const dst = BenchChild.start<SessionCommand>('dest', SESSION_PEER, [], [], ['--cpu-prof', '--cpu-prof-dir', ddir], node);
  children.add(src);
  children.add(dst);
  let seconds: number;
  try {
    const [{ uri }] = await Promise.all([
      dst.call<{ uri: string }>({ cmd: 'dest-listen', host: '127.0.0.1', postcopy: false, sink: { kind: 'memory', shared: true, prefault: [{ idstr: RAM_BLOCK, length: bytes }] }, tlsDir: pkiDir, multifd: channels, threads: 'on' }, 120_000),
      src.call({ cmd: 'source-prepare', memory: { kind: 'pattern', bytes, shared: true } }, 120_000),
    ]);
    const [s, d] = await Promise.all([
      src.call<SourceRun>({ cmd: 'source-migrate', to: uri, policy: 'never', preempt: false, timeoutMs: 300_000, tlsDir: pkiDir, multifd: channels, threads: 'on' }, 310_000),
      dst.call<DestinationRun>({ cmd: 'dest-wait', timeoutMs: 300_000 }, 310_000),
    ]);
    seconds = (d.completedUs - s.startUs) / 1e6;
  } finally {
    // The profiles are written as each process (and each worker) exits.
    await Promise.all([src.stop(), dst.stop()]);
    children.delete(src);
    children.delete(dst);
  }
  await keepProfiles(sdir, `${id}-source`);
  await keepProfiles(ddir, `${id}-dest`);
  const label = (end: 'source' | 'destination') => (s: ProfileSummary) => (s.thread ? `library ${end}, worker thread ${s.thread}` : `library ${end}, main thread`);
  return { id, path: `library → library, ${channels} multifd channels, threads on`, kind: 'tls', seconds, gbps: bytes / seconds / 1e9, processes: [...roles(sdir, label('source')), ...roles(ddir, label('destination'))] };
}

async function main(): Promise<void> {
  const started = new Date();
  const loadStart = loadAverage();
  const onlyThreads = args['only-threads'] === true;
  if (!args['no-qemu'] || !args['no-demo'] || args.threads || onlyThreads) {
    const problem = ensureBuiltCli(log);
    if (problem) throw new Error(problem);
  }
  const pkiDir = join(work, 'pki');
  await initPkiDir(pkiDir);
  const results: Profiled[] = [];
  const attempt = async (id: string, what: string, f: () => Promise<Profiled>): Promise<void> => {
    log(`${what} …`);
    try {
      const r = await f();
      results.push(r);
      log(`${what}: ${fmt(r.gbps, 2)} GB/s (${fmt(r.seconds, 2)} s, profiled), ${r.processes.length} profile(s)`);
    } catch (e) {
      log(`${what} failed: ${String(e)}`);
      results.push({ id, path: what, kind: id.includes('tls') || id.startsWith('demo') ? 'tls' : 'plain', seconds: NaN, gbps: NaN, processes: [], error: e instanceof Error ? e.message.split('\n')[0]! : String(e) });
    }
  };
  if (!args['no-qemu'] && !onlyThreads) {
    qemu = await import('./lib/qemu.js');
    const why = await qemu.qemuUnavailable();
    if (why) log(`QEMU rows skipped: ${why}`);
    else {
      const q = qemu;
      log(`starting the QEMU source (${mib} MiB, test guest walking all of it once) …`);
      const src = await startSource(q, pkiDir);
      for (const kind of kinds) {
        const saved = join(work, `vm-${kind}`);
        await attempt(`receive-${kind}`, `QEMU → qmt receive, ${kind}`, () => profileReceive(q, src, pkiDir, kind, saved));
        await attempt(`send-${kind}`, `qmt send → QEMU, ${kind}`, () => profileSend(q, pkiDir, kind, saved));
        await rm(saved, { recursive: true, force: true });
      }
      await src.stop();
    }
  }
  if (!onlyThreads) for (const kind of kinds) await attempt(`library-${kind}`, `library → library, ${kind}`, () => profileLibrary(pkiDir, kind));
  if (!args['no-demo'] && !onlyThreads) for (const preempt of [true, false]) await attempt(`demo-${preempt ? 'preempt' : 'no-preempt'}`, `qmt demo${preempt ? '' : ' --no-preempt'}`, () => profileDemo(preempt));
  if (args.threads || onlyThreads) {
    await attempt('demo-preempt-threads', 'qmt demo --threads on', () => profileDemoThreads());
    await attempt('library-multifd2-tls-threads', 'library → library, TLS, 2 multifd channels, threads on', () => profileLibraryMultifd(pkiDir, 2));
  }

  // --only-threads adds its paths to the last full run's (which the issue-12 summary links to), replacing those of the same id.
  let startedAt = started.toISOString();
  if (onlyThreads) {
    try {
      const old = JSON.parse(await readFile(join(OUT, 'profile.json'), 'utf8')) as { startedAt: string; results: (Omit<Profiled, 'processes'> & { processes: ({ role: string } & ProfileSummary)[] })[] };
      const mine = new Set(results.map((r) => r.id));
      const kept = old.results.filter((r) => !mine.has(r.id)).map((r) => ({ ...r, processes: r.processes.map(({ role, ...summary }) => ({ role, summary: summary as ProfileSummary })) }));
      results.unshift(...kept);
      startedAt = old.startedAt;
      log(`kept ${kept.length} path(s) of the run of ${old.startedAt}`);
    } catch {
      // no earlier run
    }
  }
  const m = machineInfo(REPO_ROOT);
  const lines: string[] = [
    '## What the time goes to: CPU profiles',
    '',
    `_Run ${startedAt}${startedAt !== started.toISOString() ? ` (the thread paths: ${started.toISOString()})` : ''}, load average ${loadStart} at the start, ${loadAverage()} at the end; code ${m.revision}; Node ${m.node}; \`npm run bench:profile -- --mib ${mib} --kinds ${kinds.join(',')}\`._`,
    '',
    `One migration per path of a ${fmt(mib)} MiB guest (data in every page) over loopback with V8's CPU profiler (1 ms sampling) on our processes: each \`qmt\` command whole (\`node --cpu-prof\`, start-up included), the library peers around the migration only (the inspector's Profiler, started before the first connection, stopped after completion). Shares of the profiled time: idle (the event loop waiting), GC, program (native code outside any JS frame: libuv, the kernel's side of syscalls made off the JS stack, TLS in OpenSSL when called from native), then JS self time by origin (ours: src/, dist/ and bench/; node internals: the JS of streams, net, tls, fs; native: V8 builtins and Node's C++ bindings called from JS — socket reads and writes, file writes, fsync, crypto). Top functions by self time; built code (dist/) is mapped back to src/ through its source map. Profiles: bench/results/profiles/ (open in Chrome DevTools or speedscope). Profiled runs are slower than unprofiled ones: the times here are context only.`,
    '',
  ];
  for (const r of results) {
    // Stable headings (no figures): the report's summary links to them.
    lines.push(`### ${profileHeading(r)}`, '');
    if (!r.error) lines.push(`${r.note ? `${r.note}; ` : ''}${fmt(r.gbps, 2)} GB/s while profiled (${fmt(r.seconds, 2)} s).`, '');
    if (r.error) lines.push(`Failed: ${r.error}`, '');
    for (const p of r.processes) lines.push(profileMarkdown(p.role, p.summary), '');
  }
  const md = lines.join('\n');
  await mkdir(OUT, { recursive: true });
  await writeFile(join(OUT, 'profile.md'), `${md}\n`);
  await writeFile(join(OUT, 'profile.json'), `${JSON.stringify({ startedAt, mib, kinds, machine: m, results: results.map((r) => ({ ...r, processes: r.processes.map((p) => ({ role: p.role, ...p.summary, file: undefined })) })) }, null, 1)}\n`);
  process.stdout.write(`${md}\n`);
}

try {
  await main();
} finally {
  await cleanup();
}
