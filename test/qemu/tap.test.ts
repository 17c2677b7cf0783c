/**
 * QEMU 10.0 → tap → QEMU 10.0. A 64 MiB guest rewriting 47 MiB top-down
 * (against the background stream, so the destination faults and requests
 * pages) migrates through the tap in postcopy, started after the first pass,
 * with the postcopy bandwidth capped so that postcopy lasts a few seconds:
 * without preempt, with postcopy-preempt, and with preempt over TLS (the tap
 * terminates the source's TLS and originates its own to the destination).
 * Each migration must complete, the destination guest must keep running with
 * its memory invariant intact, and the tap's view must match QEMU's own
 * counters: page requests (`ram.postcopy-requests`) and pages.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { startTap, type TapReport } from '../../src/protocol/tap/index.js';
import { initPkiDir } from '../../src/transport/pki.js';
import { qmt, startQmt } from '../cli/qmt.js';
import { checkGuestInvariant, compareGuestRam, dumpSizeFor, guestRangeOf, migrateBetween, readGuestRam, startQemu, stopAll, type MigrateBetweenResult } from './harness.js';
import { describeWithQemu } from './require-qemu.js';

const MiB = 1024 * 1024;
const MEMORY_MIB = 64;
const GUEST = { startMiB: 1, endMiB: 48, direction: 'down' as const };
/** Precopy cannot converge (1 ms downtime); postcopy's background stream moves ~47 MiB in ~3 s. */
const SOURCE_PARAMETERS = { 'max-bandwidth': 64 * MiB, 'downtime-limit': 1, 'max-postcopy-bandwidth': 16 * MiB };

interface Case {
  name: string;
  preempt: boolean;
  tlsDir?: string;
}

interface Outcome {
  report: TapReport;
  result: MigrateBetweenResult;
}

function tlsCreds(dir: string, endpoint: 'server' | 'client'): string[] {
  return ['-object', `tls-creds-x509,id=tls0,dir=${dir},endpoint=${endpoint},verify-peer=on`];
}

function ms(us: number): string {
  return (us / 1000).toFixed(us < 1000 ? 3 : 1);
}

async function migrateThroughTap(c: Case): Promise<Outcome> {
  const tls = c.tlsDir;
  const [src, dst] = await Promise.all([
    startQemu({ name: `tap-${c.name}-src`, memoryMiB: MEMORY_MIB, guest: GUEST, ...(tls ? { extraArgs: tlsCreds(tls, 'client') } : {}) }),
    startQemu({ name: `tap-${c.name}-dst`, memoryMiB: MEMORY_MIB, guest: GUEST, incoming: true, ...(tls ? { extraArgs: tlsCreds(tls, 'server') } : {}) }),
  ]);
  const dstUri = `unix:${join(dst.dir, 'migrate.sock')}`;
  const tap = await startTap({
    listen: 'tcp:127.0.0.1:0',
    to: dstUri,
    ...(tls ? { tlsIn: tls, tlsOut: tls, tlsHostname: 'localhost' } : {}),
  });
  try {
    await src.waitSerialPasses(3, 15_000); // the guest's range holds non-zero counters
    const ended = tap.sessionEnd(1);
    const result = await migrateBetween(src, dst, {
      uri: dstUri,
      connectUri: tap.uri,
      capabilities: { 'postcopy-ram': true, ...(c.preempt ? { 'postcopy-preempt': true } : {}) },
      sourceParameters: { ...SOURCE_PARAMETERS, ...(tls ? { 'tls-creds': 'tls0', 'tls-hostname': 'localhost' } : {}) },
      ...(tls ? { destinationParameters: { 'tls-creds': 'tls0' } } : {}),
      postcopyAfterPasses: 2,
      timeoutMs: 40_000,
    });
    const report = await Promise.race([
      ended,
      new Promise<never>((_, reject) => setTimeout(() => reject(new Error(`tap session still open: ${JSON.stringify(tap.report()?.connections)}`)), 10_000)),
    ]);

    // The destination guest keeps running, and its memory invariant holds.
    await dst.waitSerialPasses(dst.serialPasses() + 3, 15_000);
    await dst.pauseVm();
    const inv = checkGuestInvariant(await readGuestRam(dst, dumpSizeFor(dst)), guestRangeOf(dst));
    expect(inv.ok, inv.detail).toBe(true);

    const r = report.requests;
    const o = report.overhead;
    console.log(
      `[tap ${c.name}] postcopy-requests ${r.count} (QEMU ${result.source.ram?.['postcopy-requests']}); ` +
        `request→page p50 ${ms(r.latency.all.p50)} ms, p99 ${ms(r.latency.all.p99)} ms, max ${ms(r.latency.all.max)} ms; ` +
        `answered on preempt ${r.answered.preempt}, main ${r.answered.main}, crossed ${r.alreadyForwarded}, unanswered ${r.unanswered}; ` +
        `postcopy ${((report.switchover.eofMs ?? 0) - (report.switchover.postcopyRunMs ?? 0)).toFixed(0)} ms; ` +
        `tap forward delay p50 ${o.forwardDelay.all.p50} µs, p99 ${o.forwardDelay.all.p99} µs, max ${o.forwardDelay.all.max} µs ` +
        `(${o.forwardDelay.all.count} chunks; taken at once p50 ${o.forwardDelayUnqueued.p50} µs, p99 ${o.forwardDelayUnqueued.p99} µs; ` +
        `analysis per chunk p50 ${o.analysisPerChunk.p50} µs, p99 ${o.analysisPerChunk.p99} µs; event loop p99 ${o.eventLoopDelay.p99} µs; paused ${o.backpressure.pausedMs.toFixed(0)} ms); ` +
        `main ${(report.main.bytesPerSecond / MiB).toFixed(1)} MiB/s; migration ${result.durationMs} ms`,
    );
    const passes = (phase: string): number => report.passes.filter((p) => p.phase === phase).length;
    console.log(
      `[tap ${c.name}] RAM PART sections ${report.main.ramParts.precopy} precopy + ${report.main.ramParts.postcopy} postcopy; ` +
        `inferred passes ${passes('precopy')} precopy + ${passes('postcopy')} postcopy (QEMU dirty-sync-count ${result.source.ram?.['dirty-sync-count']}); ` +
        `switchover on the wire ${report.switchover.wireMs} ms; transport errors ${JSON.stringify(report.transportErrors)}`,
    );
    return { report, result };
  } finally {
    await tap.close();
    await Promise.all([src.stop(), dst.stop()]);
  }
}

function checkReport({ report, result }: Outcome, c: Case): void {
  const ram = result.source.ram!;
  expect(result.postcopyStarted).toBe(true);
  expect(result.destination?.status).toBe('completed');
  expect(report.state).toBe('ended');
  expect(report.complete).toBe(true);
  expect(report.postcopy).toBe(true);
  expect(report.parseErrors).toEqual([]);
  expect(report.transportErrors.filter((e) => !e.afterComplete)).toEqual([]);
  // Every request the destination made went through the tap and was answered.
  expect(ram['postcopy-requests']).toBeGreaterThan(0);
  expect(report.requests.count).toBe(ram['postcopy-requests']);
  expect(report.requests.unanswered).toBe(0);
  // Every page QEMU sent, on one channel or the other.
  const pre = report.preempt?.pages ?? { normal: 0, zero: 0, xbzrle: 0 };
  expect(report.main.pages.normal + pre.normal).toBe(ram.normal);
  expect(report.main.pages.zero + pre.zero).toBe(ram.duplicate);
  expect(report.switchover.switchoverStartMs).not.toBeNull();
  expect(report.switchover.postcopyRunMs).toBeGreaterThanOrEqual(report.switchover.switchoverStartMs!);
  if (c.preempt) {
    expect(report.preempt).not.toBeNull();
    expect(report.connections.preempt?.establishedMs).toBeGreaterThan(report.connections.main.establishedMs!);
    expect(report.requests.answered.preempt).toBeGreaterThan(report.requests.answered.main);
    expect(report.requests.answered.preempt).toBeGreaterThan(report.requests.count / 2);
  } else {
    expect(report.preempt).toBeNull();
    expect(report.requests.answered.preempt).toBe(0);
  }
  if (c.tlsDir) {
    expect(report.connections.main.tlsIn?.protocol).toBe('TLSv1.3');
    expect(report.connections.main.tlsOut?.protocol).toBe('TLSv1.3');
    expect(report.connections.preempt?.tlsIn?.protocol).toBe('TLSv1.3');
  }
}

describeWithQemu('tap between two QEMU 10.0 (postcopy, guest walking top-down)', () => {
  let tmp: string;
  let tlsDir: string;

  beforeAll(async () => {
    tmp = await mkdtemp(join(tmpdir(), 'qmt-tap-qemu-'));
    tlsDir = join(tmp, 'pki');
    await initPkiDir(tlsDir);
  });

  afterAll(async () => {
    await stopAll();
    await rm(tmp, { recursive: true, force: true });
  });

  it('postcopy without preempt: completes, the tap counts QEMU\'s requests, all answered on the main channel', async () => {
    const c: Case = { name: 'postcopy', preempt: false };
    checkReport(await migrateThroughTap(c), c);
  });

  it('postcopy with postcopy-preempt: most requests are answered on the preempt channel', async () => {
    const c: Case = { name: 'preempt', preempt: true };
    checkReport(await migrateThroughTap(c), c);
  });

  it('postcopy with preempt over TLS (tls-in from the source, tls-out to the destination)', async () => {
    const c: Case = { name: 'preempt-tls', preempt: true, tlsDir };
    checkReport(await migrateThroughTap(c), c);
  });
});

/**
 * QEMU 10.0 → tap → QEMU 10.0 with multifd (precopy): 2 channels plain and 4
 * channels over TLS (the tap terminates the source's TLS and originates its
 * own; a TLS destination takes channels by order, so the tap must connect
 * main first). The destination is kept paused (-S) so that its RAM can be
 * compared bit for bit with the stopped source's; then it runs on and the
 * guest's invariant holds. The tap's per-channel counts must add up to
 * QEMU's own: ram.normal, ram.duplicate (zero pages travel in the packets'
 * zero lists) and ram.multifd-bytes. The captures are then read back by the
 * real `qmt inspect`.
 */
interface MultifdCase {
  name: string;
  channels: number;
  tlsDir?: string;
}

const MULTIFD_GUEST = { startMiB: 1, endMiB: 9, direction: 'up' as const };
const MULTIFD_MEMORY_MIB = 128;

/**
 * The tap as a library object (plain), or as the real `qmt tap --json` command
 * (TLS: a QEMU source without a return path never reads the TLS 1.3 session
 * tickets of an in-process Node server, and resets its connections at the
 * end; `qmt tap` starts itself with openssl/no-tls13-tickets.cnf).
 */
async function startMultifdTap(c: MultifdCase, to: string, captureDir: string): Promise<{ uri: string; ended: Promise<TapReport>; close(): Promise<void> }> {
  const tls = c.tlsDir;
  if (!tls) {
    const tap = await startTap({ listen: 'tcp:127.0.0.1:0', to, capture: captureDir });
    const ended = tap.sessionEnd(1);
    return { uri: tap.uri, ended, close: async () => void (await tap.close()) };
  }
  const run = startQmt(['tap', '--listen', 'tcp:127.0.0.1:0', '--to', to, '--tls-in', tls, '--tls-out', tls, '--tls-hostname', 'localhost', '--capture', captureDir, '--json']);
  const [, uri] = await run.stderrMatches(/^qmt: tap listening on (tcp:\S+), relaying/m);
  // The command stops by itself after a completed migration, printing its report.
  const ended = run.exit.then((r) => {
    if (r.code !== 0) throw new Error(`qmt tap exited ${r.code}: ${r.stderr}`);
    return (JSON.parse(r.stdout) as { sessions: TapReport[] }).sessions[0]!;
  });
  ended.catch(() => undefined);
  return { uri: uri!, ended, close: async () => void run.child.kill('SIGKILL') };
}

async function multifdThroughTap(c: MultifdCase, captureDir: string): Promise<{ report: TapReport; result: MigrateBetweenResult }> {
  const tls = c.tlsDir;
  const [src, dst] = await Promise.all([
    startQemu({ name: `tap-${c.name}-src`, memoryMiB: MULTIFD_MEMORY_MIB, guest: MULTIFD_GUEST, ...(tls ? { extraArgs: tlsCreds(tls, 'client') } : {}) }),
    startQemu({ name: `tap-${c.name}-dst`, memoryMiB: MULTIFD_MEMORY_MIB, guest: MULTIFD_GUEST, incoming: true, paused: true, ...(tls ? { extraArgs: tlsCreds(tls, 'server') } : {}) }),
  ]);
  const dstUri = `unix:${join(dst.dir, 'migrate.sock')}`;
  let tap: Awaited<ReturnType<typeof startMultifdTap>> | undefined;
  try {
    tap = await startMultifdTap(c, dstUri, captureDir);
    await src.waitSerialPasses(3, 15_000);
    const result = await migrateBetween(src, dst, {
      uri: dstUri,
      connectUri: tap.uri,
      capabilities: { multifd: true },
      parameters: { 'multifd-channels': c.channels },
      ...(tls ? { sourceParameters: { 'tls-creds': 'tls0', 'tls-hostname': 'localhost' }, destinationParameters: { 'tls-creds': 'tls0' } } : {}),
      timeoutMs: 60_000,
    });
    const report = await Promise.race([tap.ended, new Promise<never>((_, reject) => setTimeout(() => reject(new Error('tap session still open 10 s after the migration')), 10_000))]);
    // Bit for bit: the paused destination holds the stopped source's RAM.
    const size = Math.round(MULTIFD_MEMORY_MIB * MiB);
    const [a, b] = await Promise.all([readGuestRam(src, size), readGuestRam(dst, size)]);
    const diff = compareGuestRam(a, b);
    expect(diff.equal, `destination RAM differs in ${diff.count} pages, first at ${diff.pages.map((p) => `0x${p.toString(16)}`).join(', ')}`).toBe(true);
    // Then it runs on, and the guest's memory invariant holds.
    await dst.resumeVm();
    await dst.waitSerialPasses(dst.serialPasses() + 3, 15_000);
    await dst.pauseVm();
    const inv = checkGuestInvariant(await readGuestRam(dst, dumpSizeFor(dst)), guestRangeOf(dst));
    expect(inv.ok, inv.detail).toBe(true);

    const t = report.multifd?.total;
    console.log(
      `[tap ${c.name}] ${t?.channels} multifd channels: ${t?.packets} packets (${t?.syncs} SYNC), ${t?.pages.normal} normal + ${t?.pages.zero} zero pages, ${t?.multifdBytes} bytes ` +
        `(QEMU normal ${result.source.ram?.normal}, duplicate ${result.source.ram?.duplicate}, multifd-bytes ${result.source.ram?.['multifd-bytes']}); ` +
        `per channel ${report.multifd?.channels.map((ch) => `#${ch.id}: ${ch.pages.normal}+${ch.pages.zero} pages, ${(ch.bytesPerSecond / MiB).toFixed(1)} MiB/s`).join('; ')}; ` +
        `main ${report.main.bytes} bytes; migration ${result.durationMs} ms; tap CPU ${report.overhead.processCpu.percentOfOneCore}% of one core`,
    );
    return { report, result };
  } finally {
    await tap?.close();
    await Promise.all([src.stop(), dst.stop()]);
  }
}

function checkMultifdReport({ report, result }: { report: TapReport; result: MigrateBetweenResult }, c: MultifdCase): void {
  const ram = result.source.ram!;
  expect(result.destination?.status).toBe('completed');
  expect(report.state).toBe('ended');
  expect(report.complete).toBe(true);
  expect(report.postcopy).toBe(false);
  expect(report.parseErrors).toEqual([]);
  expect(report.transportErrors.filter((e) => !e.afterComplete)).toEqual([]);
  expect(report.preempt).toBeNull();
  expect(report.connections.preempt).toBeNull();
  // Every channel went through, each its own connection to the destination, opened after main's.
  const m = report.multifd!;
  expect(m.channels).toHaveLength(c.channels);
  expect(m.channels.map((ch) => ch.id).sort((x, y) => x! - y!)).toEqual([...Array(c.channels).keys()]);
  expect(report.connections.multifd).toHaveLength(c.channels);
  for (const conn of report.connections.multifd) expect(conn.establishedMs).toBeGreaterThanOrEqual(report.connections.main.establishedMs!);
  for (const ch of m.channels) {
    expect(ch.parseError).toBeNull();
    // The setup SYNC, and one at the end of every pass; the source wrote one MULTIFD_FLUSH on main per round.
    expect(ch.syncs).toBeGreaterThanOrEqual(2);
    expect(ch.syncs).toBe(report.main.multifdFlushes);
    expect(ch.reverseBytes).toBe(0);
  }
  // With multifd the main channel carries no page: all of QEMU's pages are in the channels' packets.
  expect(report.main.pages).toEqual({ normal: 0, zero: 0, xbzrle: 0 });
  expect(m.total.pages.normal).toBe(ram.normal);
  expect(m.total.pages.zero).toBe(ram.duplicate);
  expect(m.total.multifdBytes).toBe(ram['multifd-bytes']);
  for (const ch of m.channels) expect(ch.multifdBytes).toBe(ch.bytes);
  // Every channel carried pages (QEMU hands packets to whichever channel is free).
  for (const ch of m.channels) expect(ch.pages.normal + ch.pages.zero).toBeGreaterThan(0);
  if (c.tlsDir) {
    expect(report.connections.main.tlsIn?.protocol).toBe('TLSv1.3');
    for (const conn of report.connections.multifd) {
      expect(conn.tlsIn?.protocol).toBe('TLSv1.3');
      expect(conn.tlsOut?.protocol).toBe('TLSv1.3');
    }
  }
}

/** `qmt inspect --json` of every capture file of the session: the multifd totals must be the tap's. */
async function inspectCaptures(report: TapReport, c: MultifdCase): Promise<void> {
  const files = report.capture!.files;
  expect(files.map((f) => f.error)).toEqual(files.map(() => null));
  // Precopy without a return path: main and one file per multifd channel (nothing flowed back).
  const names = files.map((f) => f.name).sort();
  expect(names).toEqual(['main', ...[...Array(c.channels).keys()].map((k) => `multifd-${k}`)].sort());
  const paths = files.map((f) => f.path);
  const r = await qmt(['inspect', '--json', ...paths]);
  expect(r.code, r.stderr).toBe(0);
  const j = JSON.parse(r.stdout) as {
    ok: boolean;
    files: Array<{ kind: string; file: string; bytes: number; id?: number; pages: { normal: number; zero: number } }>;
    multifd: { channels: number; packets: number; syncs: number; pages: { normal: number; zero: number }; multifdBytes: number };
  };
  expect(j.ok).toBe(true);
  expect(j.files.filter((f) => f.kind === 'multifd-channel')).toHaveLength(c.channels);
  expect(j.files.filter((f) => f.kind === 'stream')).toHaveLength(1);
  expect(j.multifd).toEqual(report.multifd!.total);
  for (const f of files) {
    const got = j.files.find((x) => x.file === f.path);
    if (got) expect(got.bytes).toBe(f.bytes);
  }
}

describeWithQemu('tap between two QEMU 10.0 with multifd (precopy)', () => {
  let tmp: string;
  let tlsDir: string;

  beforeAll(async () => {
    tmp = await mkdtemp(join(tmpdir(), 'qmt-tap-multifd-'));
    tlsDir = join(tmp, 'pki');
    await initPkiDir(tlsDir);
  });

  afterAll(async () => {
    await stopAll();
    await rm(tmp, { recursive: true, force: true });
  });

  it('2 channels, plain: memory identical, per-channel pages add up to QEMU\'s stats, the captures inspect to the same', async () => {
    const c: MultifdCase = { name: 'multifd2', channels: 2 };
    const out = await multifdThroughTap(c, join(tmp, c.name));
    checkMultifdReport(out, c);
    await inspectCaptures(out.report, c);
  });

  it('4 channels over TLS (tls-in and tls-out): the same, and every channel is TLS on both sides', async () => {
    const c: MultifdCase = { name: 'multifd4-tls', channels: 4, tlsDir };
    const out = await multifdThroughTap(c, join(tmp, c.name));
    checkMultifdReport(out, c);
    await inspectCaptures(out.report, c);
  });
});
