/**
 * Saving and restoring a QEMU VM with the real `qmt` (part `saved` of `npm run
 * bench`; alone: `node --import tsx bench/saved.bench.ts [--quick] [--mib N]
 * [--runs N]`; needs `npm run build`: the rows run dist/cli/main.js, as users do).
 *
 * The test guest (TCG) walks all of its RAM once — data in every page — and
 * pauses; the same source QEMU is then migrated again and again (`cont` +
 * `stop` between). Each round runs every row once, interleaved, with `sync`
 * before each timed run so that the page cache's writeback of a previous
 * row's files does not slow the next:
 *
 *   save:    QEMU → QEMU (plain, TLS), the baseline;
 *            QEMU → `qmt receive --out DIR` (plain, TLS), timed from the
 *            source's MIGRATION `setup` event until `qmt receive` exits (it
 *            fsyncs the saved VM before it exits);
 *            QEMU's own `migrate file:F`, timed from `setup` until the file
 *            is durable (fsync of F after MIGRATION `completed`).
 *   restore: `qmt send --from DIR` → a waiting QEMU (plain, TLS; DIR = this
 *            round's saved VM of the same kind) next to QEMU → QEMU;
 *            QEMU's own `migrate-incoming file:F` of this round's F.
 *   mapped-ram (issue 14, QEMU's saved-VM file format): QEMU →
 *            `qmt receive --format mapped-ram --out F` (durable at exit)
 *            next to QEMU's own mapped-ram `migrate file:` + fsync; QEMU
 *            loading our F next to QEMU loading its own; `qmt send --from`
 *            QEMU's F → a waiting QEMU next to QEMU loading that F.
 *            Timed from the destination's first MIGRATION event (the
 *            connection, or the file opened) to its `completed`; `qmt send`'s
 *            time from its spawn (node start-up included) is shown too.
 *
 * CPU: core-seconds (utime + stime) per GB of guest RAM at each end: QEMUs
 * from /proc/<pid>/stat around the run, `qmt` from its own process.cpuUsage()
 * at exit (every process it runs). Prints figures; asserts nothing.
 */
import { open, rm, mkdir } from 'node:fs/promises';
import { execFileSync } from 'node:child_process';
import { join } from 'node:path';
import { initPkiDir } from '../src/transport/pki.js';
import { processCpuSeconds } from './lib/cpu.js';
import { runPart, type PartContext } from './lib/part.js';
import { builtCliProblem, startQmtCli, wallUs, type QmtCliResult } from './lib/qmt-cli.js';
import { fmt } from './lib/report.js';
import { SAVED_LABEL, savedAims } from './lib/aims.js';
import { fmtRatio, fmtStats, runStats, type RunStats } from './lib/stats.js';
import type { QemuProcess } from './lib/qemu.js';

const MiB = 1024 * 1024;

export type SavedRow = 'qemu-qemu' | 'qemu-receive' | 'file-save' | 'send-qemu' | 'file-restore' | MappedRamRow;
/** Issue 14's rows: QEMU's saved-VM file format (capability mapped-ram), each next to QEMU doing the same. */
export type MappedRamRow = 'mr-receive' | 'mr-file-save' | 'mr-load-ours' | 'mr-file-restore' | 'mr-send-qemu';
/** The baseline of each mapped-ram row: QEMU's own save, or QEMU's own restore of its own file. */
const MR_BASELINE: Record<MappedRamRow, MappedRamRow> = {
  'mr-receive': 'mr-file-save',
  'mr-file-save': 'mr-file-save',
  'mr-load-ours': 'mr-file-restore',
  'mr-file-restore': 'mr-file-restore',
  'mr-send-qemu': 'mr-file-restore',
};
export type Kind = 'plain' | 'tls';

export interface SavedRun {
  seconds: number;
  gbps: number;
  /** Core-seconds of each end (undefined: not measured). */
  cpuSource: number | undefined;
  cpuDest: number | undefined;
  extra?: Record<string, unknown>;
}

export interface SavedVariant {
  row: SavedRow;
  kind: Kind;
  runs: SavedRun[];
  errors: string[];
  stats?: RunStats;
  /** Core-seconds per GB of guest RAM, median over the runs. */
  cpuPerGb?: { source?: number; dest?: number };
}

export interface SavedData {
  guestBytes: number;
  runs: number;
  qemuVersion: string;
  variants: SavedVariant[];
  skipped?: string;
}

/** `sync`: no dirty page cache of a previous row is written back during the next. */
function syncDisks(): void {
  execFileSync('sync', [], { timeout: 300_000 });
}

type Q = typeof import('./lib/qemu.js');

interface Env {
  q: Q;
  ctx: PartContext;
  mib: number;
  pkiDir: string;
  src: QemuProcess;
  guest: { startMiB: number; endMiB: number; direction: 'up' };
}

const firstMigrationEventUs = (q: QemuProcess, since: number): number | undefined => {
  for (let i = since; i < q.qmp.events.length; i++) {
    const e = q.qmp.events[i]!;
    if (e.event === 'MIGRATION') return e.timestamp.seconds * 1e6 + e.timestamp.microseconds;
  }
  return undefined;
};

/** The destination's MIGRATION statuses since `since`, in ms after `t0Us` (wall clock): what the timing starts from. */
const statusesSince = (q: QemuProcess, since: number, t0Us: number): string[] =>
  q.qmp.events
    .slice(since)
    .filter((e) => e.event === 'MIGRATION')
    .map((e) => `${String((e.data as { status?: unknown } | undefined)?.status)}@${Math.round((e.timestamp.seconds * 1e6 + e.timestamp.microseconds - t0Us) / 1000)}ms`);

const eventUsSince = (q: QemuProcess, since: number, status: string): number | undefined => {
  for (let i = since; i < q.qmp.events.length; i++) {
    const e = q.qmp.events[i]!;
    if (e.event === 'MIGRATION' && (e.data as { status?: unknown } | undefined)?.status === status) return e.timestamp.seconds * 1e6 + e.timestamp.microseconds;
  }
  return undefined;
};

async function destinationQemu(env: Env, name: string, tls: boolean): Promise<QemuProcess> {
  const dst = await env.q.startQemuIn(undefined, { name, memoryMiB: env.mib, guest: env.guest, incoming: true, extraArgs: env.q.tlsCredsArgs(env.pkiDir, 'server') });
  await dst.setCapabilities({ events: true });
  await dst.setParameters({ 'tls-creds': tls ? 'tls0' : '' });
  return dst;
}

/** After a migration the source is "paused due to previous migration" until it ran once more. */
async function resetSource(src: QemuProcess): Promise<void> {
  await src.resumeVm();
  await src.pauseVm();
}

async function qemuToQemu(env: Env, tls: boolean): Promise<SavedRun> {
  const { q, src, mib } = env;
  const dst = await destinationQemu(env, 'saved-dst', tls);
  try {
    await src.setParameters({ 'tls-creds': tls ? 'tls0' : '', 'tls-hostname': tls ? 'localhost' : '' });
    await dst.migrateIncoming('tcp:127.0.0.1:0');
    const port = await q.incomingPort(dst);
    const since = src.qmp.events.length;
    const dsince = dst.qmp.events.length;
    syncDisks();
    const c0 = [processCpuSeconds(src.pid), processCpuSeconds(dst.pid)];
    await src.migrate(`tcp:127.0.0.1:${port}`);
    await q.waitMigrationEvent(dst, 'completed', 300_000, dsince);
    await q.waitMigrationEvent(src, 'completed', 60_000, since);
    const c1 = [processCpuSeconds(src.pid), processCpuSeconds(dst.pid)];
    const setup = eventUsSince(src, since, 'setup');
    const done = eventUsSince(dst, dsince, 'completed');
    if (setup === undefined || done === undefined) throw new Error('no MIGRATION setup/completed event');
    const seconds = (done - setup) / 1e6;
    return { seconds, gbps: (mib * MiB) / seconds / 1e9, cpuSource: diff(c0[0], c1[0]), cpuDest: diff(c0[1], c1[1]) };
  } finally {
    await dst.stop();
    await resetSource(src);
  }
}

const diff = (a: number | undefined, b: number | undefined): number | undefined => (a === undefined || b === undefined ? undefined : b - a);
const cliCpu = (r: QmtCliResult): number | undefined => (r.cpu ? r.cpu.userS + r.cpu.systemS : undefined);

async function qemuToReceive(env: Env, tls: boolean, out: string, mappedRam = false): Promise<SavedRun> {
  const { q, src, mib, pkiDir } = env;
  const args = ['receive', '--listen', 'tcp:127.0.0.1:0', '--out', out, '--progress', 'none', '--json', ...(tls ? ['--tls', pkiDir] : []), ...(mappedRam ? ['--format', 'mapped-ram'] : [])];
  const recv = startQmtCli(args);
  try {
    const uri = (await recv.stderrMatches(/^qmt: listening on (\S+)/m))[1]!;
    await src.setParameters({ 'tls-creds': tls ? 'tls0' : '', 'tls-hostname': tls ? 'localhost' : '' });
    const since = src.qmp.events.length;
    syncDisks();
    const c0 = processCpuSeconds(src.pid);
    await src.migrate(uri);
    const r = await withTimeout(recv.exit, 300_000, 'qmt receive');
    const c1 = processCpuSeconds(src.pid);
    if (r.code !== 0) throw new Error(`qmt receive exited ${r.code ?? r.signal}: ${r.stderr.slice(-1500)}`);
    await q.waitMigrationEvent(src, 'completed', 30_000, since);
    const setup = eventUsSince(src, since, 'setup');
    if (setup === undefined) throw new Error('no MIGRATION setup event on the source');
    const seconds = (r.exitUs - setup) / 1e6;
    const report = JSON.parse(r.stdout) as { ok?: boolean; stats?: { transferred?: number } };
    return { seconds, gbps: (mib * MiB) / seconds / 1e9, cpuSource: diff(c0, c1), cpuDest: cliCpu(r), extra: { ok: report.ok, processes: r.cpu?.processes } };
  } finally {
    if (recv.child.exitCode === null && recv.child.signalCode === null) recv.child.kill('SIGKILL');
    await resetSource(src);
  }
}

async function fileSave(env: Env, file: string, mappedRam = false): Promise<SavedRun> {
  const { q, src, mib } = env;
  try {
    await src.setParameters({ 'tls-creds': '', 'tls-hostname': '' });
    if (mappedRam) await src.setCapabilities({ 'mapped-ram': true });
    const since = src.qmp.events.length;
    syncDisks();
    const c0 = processCpuSeconds(src.pid);
    await src.migrate(`file:${file}`);
    await q.waitMigrationEvent(src, 'completed', 300_000, since);
    const fh = await open(file, 'r');
    try {
      await fh.sync();
    } finally {
      await fh.close();
    }
    const durableUs = wallUs();
    const c1 = processCpuSeconds(src.pid);
    const setup = eventUsSince(src, since, 'setup');
    if (setup === undefined) throw new Error('no MIGRATION setup event on the source');
    const seconds = (durableUs - setup) / 1e6;
    const completed = eventUsSince(src, since, 'completed');
    return { seconds, gbps: (mib * MiB) / seconds / 1e9, cpuSource: diff(c0, c1), cpuDest: undefined, extra: { fsyncMs: completed === undefined ? undefined : Math.round((durableUs - completed) / 1000) } };
  } finally {
    // Off again: the other rows migrate over TCP, where mapped-ram is refused.
    if (mappedRam) await src.setCapabilities({ 'mapped-ram': false });
    await resetSource(src);
  }
}

async function sendToQemu(env: Env, tls: boolean, from: string): Promise<SavedRun> {
  const { q, mib, pkiDir } = env;
  const dst = await destinationQemu(env, 'saved-restore', tls);
  try {
    await dst.migrateIncoming('tcp:127.0.0.1:0');
    const uri = `tcp:127.0.0.1:${await q.incomingPort(dst)}`;
    const dsince = dst.qmp.events.length;
    syncDisks();
    const c0 = processCpuSeconds(dst.pid);
    const send = startQmtCli(['send', '--from', from, '--to', uri, '--progress', 'none', '--json', ...(tls ? ['--tls', pkiDir, '--tls-hostname', 'localhost'] : [])]);
    const r = await withTimeout(send.exit, 300_000, 'qmt send');
    if (r.code !== 0) throw new Error(`qmt send exited ${r.code ?? r.signal}: ${r.stderr.slice(-1500)}; QEMU: ${dst.stderrTail(500)}`);
    await q.waitMigrationEvent(dst, 'completed', 60_000, dsince);
    const c1 = processCpuSeconds(dst.pid);
    const first = firstMigrationEventUs(dst, dsince);
    const done = eventUsSince(dst, dsince, 'completed');
    if (first === undefined || done === undefined) throw new Error('no MIGRATION events on the destination');
    const seconds = (done - first) / 1e6;
    return { seconds, gbps: (mib * MiB) / seconds / 1e9, cpuSource: cliCpu(r), cpuDest: diff(c0, c1), extra: { fromSpawnS: (done - send.spawnUs) / 1e6, startupS: (first - send.spawnUs) / 1e6, events: statusesSince(dst, dsince, send.spawnUs), ok: (JSON.parse(r.stdout) as { ok?: boolean }).ok } };
  } finally {
    await dst.stop();
  }
}

async function fileRestore(env: Env, file: string, mappedRam = false): Promise<SavedRun> {
  const { q, mib } = env;
  const dst = await destinationQemu(env, 'saved-file-restore', false);
  try {
    if (mappedRam) await dst.setCapabilities({ 'mapped-ram': true });
    const dsince = dst.qmp.events.length;
    syncDisks();
    const c0 = processCpuSeconds(dst.pid);
    const commandUs = wallUs();
    await dst.migrateIncoming(`file:${file}`);
    await q.waitMigrationEvent(dst, 'completed', 300_000, dsince);
    const c1 = processCpuSeconds(dst.pid);
    const first = firstMigrationEventUs(dst, dsince);
    const done = eventUsSince(dst, dsince, 'completed');
    if (first === undefined || done === undefined) throw new Error('no MIGRATION events on the destination');
    const seconds = (done - first) / 1e6;
    return { seconds, gbps: (mib * MiB) / seconds / 1e9, cpuSource: undefined, cpuDest: diff(c0, c1), extra: { fromCommandS: (done - commandUs) / 1e6, events: statusesSince(dst, dsince, commandUs) } };
  } finally {
    await dst.stop();
  }
}

function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  return Promise.race([
    p.finally(() => clearTimeout(timer)),
    new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${what}: not done within ${ms} ms`)), ms);
    }),
  ]);
}

function markdown(d: SavedData): string {
  const lines: string[] = [];
  const get = (row: SavedRow, kind: Kind): SavedVariant | undefined => d.variants.find((v) => v.row === row && v.kind === kind);
  lines.push(
    `Guest: ${fmt(d.guestBytes / MiB)} MiB, the test guest (TCG) having written every page once, paused; loopback; saved VMs and QEMU's files on the local disk (${fsOf()}); ${d.runs} round${d.runs === 1 ? '' : 's'}, each running every row once (interleaved), \`sync\` before each timed run. GB/s = guest RAM bytes (10⁹) per second. Median (min–max) of the runs; ratios of medians. CPU: core-seconds (user + system) per GB of guest RAM at each end, median of the runs. ${d.qemuVersion}.`,
    '',
  );
  const section = (title: string, rows: [SavedRow, Kind][], timed: string): void => {
    lines.push(`**${title}** — ${timed}`, '');
    lines.push('| transfer | kind | GB/s median (min–max) | runs (GB/s) | vs QEMU → QEMU, same kind | vs QEMU\'s file | CPU s/GB, source end | CPU s/GB, destination end | notes |', '|---|---|--:|---|--:|--:|--:|--:|---|');
    for (const [row, kind] of rows) {
      const v = get(row, kind);
      if (!v) continue;
      const base = get('qemu-qemu', kind)?.stats?.median;
      const file = get(title.startsWith('Save') ? 'file-save' : 'file-restore', 'plain')?.stats?.median;
      const err = v.errors.length > 0 ? ` (errors: ${v.errors.join('; ')})` : '';
      const notes: string[] = [];
      if (row === 'send-qemu') {
        const spawn = runStats(v.runs.map((r) => Number(r.extra?.fromSpawnS)));
        const startup = runStats(v.runs.map((r) => Number(r.extra?.startupS)));
        if (spawn) notes.push(`from spawn ${fmtStats(spawn, 2)} s (start-up ${fmtStats(startup, 0, 1000)} ms)`);
      }
      if (row === 'file-save') {
        const f = runStats(v.runs.map((r) => Number(r.extra?.fsyncMs)));
        if (f) notes.push(`fsync ${fmtStats(f)} ms`);
      }
      if (row === 'qemu-receive' && kind === 'tls') notes.push('`qmt receive --tls` runs itself again (OpenSSL without session tickets): CPU of both processes');
      lines.push(
        `| ${SAVED_LABEL[row]}${err} | ${kind === 'tls' ? 'TLS 1.3' : 'plain TCP'} | ${fmtStats(v.stats, 2)} | ${v.runs.map((r) => fmt(r.gbps, 2)).join(', ')} | ${row === 'qemu-qemu' ? '1.00× (baseline)' : fmtRatio(v.stats?.median, base)} | ${row === 'file-save' || row === 'file-restore' ? '1.00× (baseline)' : kind === 'plain' || row !== 'qemu-qemu' ? fmtRatio(v.stats?.median, file) : '–'} | ${fmt(v.cpuPerGb?.source, 2)} | ${fmt(v.cpuPerGb?.dest, 2)} | ${notes.join('; ')} |`,
      );
    }
    lines.push('');
  };
  section(
    'Save (QEMU source)',
    [
      ['qemu-qemu', 'plain'],
      ['qemu-receive', 'plain'],
      ['file-save', 'plain'],
      ['qemu-qemu', 'tls'],
      ['qemu-receive', 'tls'],
    ],
    "timed from the source's MIGRATION `setup` event to: the destination QEMU's `completed`; `qmt receive` exiting (after its fsync); the fsync of QEMU's file returning.",
  );
  section(
    'Restore (QEMU destination)',
    [
      ['qemu-qemu', 'plain'],
      ['send-qemu', 'plain'],
      ['file-restore', 'plain'],
      ['qemu-qemu', 'tls'],
      ['send-qemu', 'tls'],
    ],
    "timed from the destination's first MIGRATION event (the connection accepted, or the file opened) to its `completed` (QEMU → QEMU: as above). `qmt send` reads the saved VM `qmt receive` wrote in the same round; QEMU reads its own file of the same round; both were just written (in the page cache).",
  );
  const mr: MappedRamRow[] = ['mr-file-save', 'mr-receive', 'mr-file-restore', 'mr-load-ours', 'mr-send-qemu'];
  if (mr.some((r) => get(r, 'plain'))) {
    lines.push(
      "**mapped-ram (QEMU's saved-VM file format, issue 14)** — saves timed as above (to durable); loads from the destination's first MIGRATION event to its `completed`. Each row next to QEMU doing the same job in the same round: QEMU's own mapped-ram save, or QEMU loading its own mapped-ram file. The files were just written (in the page cache); before the loads QEMU loads its own file once, not counted (the first load after the saves was slow for either file).",
      '',
      "| transfer | GB/s median (min–max) | runs (GB/s) | vs QEMU's own | CPU s/GB, source end | CPU s/GB, destination end |",
      '|---|--:|---|--:|--:|--:|',
    );
    for (const row of mr) {
      const v = get(row, 'plain');
      if (!v) continue;
      const base = MR_BASELINE[row];
      const err = v.errors.length > 0 ? ` (errors: ${v.errors.join('; ')})` : '';
      lines.push(`| ${SAVED_LABEL[row]}${err} | ${fmtStats(v.stats, 2)} | ${v.runs.map((r) => fmt(r.gbps, 2)).join(', ')} | ${base === row ? '1.00× (baseline)' : fmtRatio(v.stats?.median, get(base, 'plain')?.stats?.median)} | ${fmt(v.cpuPerGb?.source, 2)} | ${fmt(v.cpuPerGb?.dest, 2)} |`);
    }
    lines.push('');
  }
  lines.push('Aims (issue 12), reported, not asserted:', '');
  for (const a of savedAims(d)) lines.push(`- ${a.what}: ${fmt(a.figure, 2)} vs ${fmt(a.baseline, 2)} GB/s = ${a.ratio === undefined ? '–' : `${fmt(a.ratio, 2)}×`}; aim ≥ ${a.aim}× — ${a.met === undefined ? 'not measured' : a.met ? 'met' : 'missed'}`);
  if (d.skipped) lines.push('', `Skipped: ${d.skipped}.`);
  return lines.join('\n');
}

function fsOf(): string {
  try {
    const [type, source] = execFileSync('findmnt', ['-n', '-o', 'FSTYPE,SOURCE', '-T', process.env.TMPDIR ?? '/tmp'], { encoding: 'utf8', timeout: 5000 }).trim().split(/\s+/);
    return `${type ?? '?'} on ${source ?? '?'}`;
  } catch {
    return '?';
  }
}

await runPart<SavedData>('saved', 'QEMU ↔ qmt: saving and restoring a VM', { mib: { type: 'string' }, runs: { type: 'string' } }, async (ctx) => {
  const mib = Number(ctx.options.mib ?? (ctx.quick ? 256 : 1024));
  const runs = Number(ctx.options.runs ?? (ctx.quick ? 1 : 3));
  const q = await import('./lib/qemu.js');
  const data: SavedData = { guestBytes: mib * MiB, runs, qemuVersion: await q.qemuVersion(), variants: [] };
  const order: [SavedRow, Kind][] = [
    ['qemu-qemu', 'plain'],
    ['qemu-receive', 'plain'],
    ['file-save', 'plain'],
    ['qemu-qemu', 'tls'],
    ['qemu-receive', 'tls'],
    ['send-qemu', 'plain'],
    ['file-restore', 'plain'],
    ['send-qemu', 'tls'],
    // Issue 14: the mapped-ram rows, interleaved with each other (each file is this round's).
    ['mr-file-save', 'plain'],
    ['mr-receive', 'plain'],
    ['mr-file-restore', 'plain'],
    ['mr-load-ours', 'plain'],
    ['mr-send-qemu', 'plain'],
  ];
  for (const [row, kind] of order) data.variants.push({ row, kind, runs: [], errors: [] });
  const why = (await q.qemuUnavailable()) ?? builtCliProblem();
  if (why) {
    data.skipped = why;
    return { config: { mib, runs }, data, markdown: markdown(data) };
  }
  const work = await ctx.tmpDir('saved');
  const pkiDir = join(work, 'pki');
  await initPkiDir(pkiDir);
  ctx.onCleanup(() => q.stopAll());
  const guest = { startMiB: 1, endMiB: mib, direction: 'up' as const };
  ctx.log(`starting the QEMU source (${mib} MiB, test guest walking all of it once) …`);
  const src = await q.startQemuIn(undefined, { name: 'saved-src', memoryMiB: mib, guest, extraArgs: q.tlsCredsArgs(pkiDir, 'client') });
  await src.waitSerialPasses(1, 300_000);
  await src.pauseVm();
  await src.setCapabilities({ events: true });
  await src.setParameters({ ...q.UNLIMITED });
  const env: Env = { q, ctx, mib, pkiDir, src, guest };
  ctx.log('warm-up migration QEMU → QEMU (not counted) …');
  await qemuToQemu(env, false);

  for (let round = 0; round < runs; round++) {
    const dir = join(work, `round-${round}`);
    await mkdir(dir, { recursive: true });
    const saved: Record<Kind, string> = { plain: join(dir, 'vm-plain'), tls: join(dir, 'vm-tls') };
    const file = join(dir, 'qemu.mig');
    const qemuMr = join(dir, 'qemu.mapped-ram');
    const ourMr = join(dir, 'ours.mapped-ram');
    for (const v of data.variants) {
      try {
        // The first 1 GiB load of a round paid seconds of kernel time whichever file it read (2.3 s
        // against 0.15 s for the same file loaded again; not the file): one load first, not counted.
        if (v.row === 'mr-file-restore') await fileRestore(env, qemuMr, true);
        const r =
          v.row === 'mr-file-save'
            ? await fileSave(env, qemuMr, true)
            : v.row === 'mr-receive'
              ? await qemuToReceive(env, false, ourMr, true)
              : v.row === 'mr-file-restore'
                ? await fileRestore(env, qemuMr, true)
                : v.row === 'mr-load-ours'
                  ? await fileRestore(env, ourMr, true)
                  : v.row === 'mr-send-qemu'
                    ? await sendToQemu(env, false, qemuMr)
                    : v.row === 'qemu-qemu'
            ? await qemuToQemu(env, v.kind === 'tls')
            : v.row === 'qemu-receive'
              ? await qemuToReceive(env, v.kind === 'tls', saved[v.kind])
              : v.row === 'file-save'
                ? await fileSave(env, file)
                : v.row === 'send-qemu'
                  ? await sendToQemu(env, v.kind === 'tls', saved[v.kind])
                  : await fileRestore(env, file);
        v.runs.push(r);
        ctx.log(`round ${round + 1}/${runs}: ${v.row} ${v.kind}: ${fmt(r.gbps, 2)} GB/s (${fmt(r.seconds, 2)} s), CPU s source ${fmt(r.cpuSource, 2)} / destination ${fmt(r.cpuDest, 2)}`);
      } catch (e) {
        v.errors.push(e instanceof Error ? e.message.split('\n')[0]! : String(e));
        ctx.log(`round ${round + 1}: ${v.row} ${v.kind} failed: ${String(e)}`);
      }
    }
    await rm(dir, { recursive: true, force: true });
  }
  const gb = (mib * MiB) / 1e9;
  for (const v of data.variants) {
    const s = runStats(v.runs.map((r) => r.gbps));
    if (s) v.stats = s;
    const per = (xs: (number | undefined)[]): number | undefined => runStats(xs.filter((x): x is number => x !== undefined).map((x) => x / gb))?.median;
    const source = per(v.runs.map((r) => r.cpuSource));
    const dest = per(v.runs.map((r) => r.cpuDest));
    v.cpuPerGb = { ...(source !== undefined ? { source } : {}), ...(dest !== undefined ? { dest } : {}) };
  }
  return { config: { mib, runs, host: '127.0.0.1' }, data, markdown: markdown(data) };
});
