/**
 * QEMU 10.0 → `qmt tunnel entry` → a fault relay on the hop → `qmt tunnel
 * exit` → QEMU 10.0, the real commands as a user runs them. A 64 MiB guest
 * rewriting 47 MiB migrates in precopy, in postcopy after one pass, and in
 * postcopy with preempt (plain, and with QEMU's own TLS end to end through
 * the tunnel), while the test cuts every hop connection one to three times at
 * random moments: the source QEMU must never pause or fail (the tunnel hides
 * the cuts), the migration completes, and the destination guest runs on with
 * its invariant intact. An outage longer than the tunnel's limit: the tunnel
 * closes the QEMU sides, both QEMUs pause, and QEMU's own recovery through
 * the tunnel (migrate-recover, migrate resume=true) completes. Both commands
 * exit 0 on SIGTERM with their stats, nothing left running.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterAll, beforeAll, expect, it } from 'vitest';
import type { TunnelStats } from '../../src/protocol/tunnel/index.js';
import net from 'node:net';
import tls from 'node:tls';
import { initPkiDir, loadTlsDir, type TlsMaterial } from '../../src/transport/pki.js';
import { startQmt, type QmtRun } from '../cli/qmt.js';
import { FaultRelay } from '../faults/relay.js';
import { checkGuestInvariant, dumpSizeFor, guestRangeOf, migrateBetween, readGuestRam, startQemu, stopAll, type QemuProcess } from './harness.js';
import { describeWithQemu } from './require-qemu.js';

const MiB = 1024 * 1024;
const MEMORY_MIB = 64;
const GUEST = { startMiB: 1, endMiB: 48, direction: 'down' as const };

let pki: string;
let otherPki: TlsMaterial;
beforeAll(async () => {
  pki = await mkdtemp(join(tmpdir(), 'qmt-tunnel-qemu-'));
  await initPkiDir(pki);
  const other = join(pki, 'other-ca');
  await initPkiDir(other);
  otherPki = await loadTlsDir(other, 'client');
});
afterAll(async () => {
  await stopAll();
  await rm(pki, { recursive: true, force: true });
});

function tlsCreds(dir: string, endpoint: 'server' | 'client'): string[] {
  return ['-object', `tls-creds-x509,id=tls0,dir=${dir},endpoint=${endpoint},verify-peer=on`];
}

interface Tunnel {
  entry: QmtRun;
  exit: QmtRun;
  relay: FaultRelay;
  entryUri: string;
  exitUri: string;
  /** Whatever is still running of it, killed (after a failure). */
  kill(): Promise<void>;
  /** SIGTERM to both; their --json stats (exit codes checked). */
  stop(): Promise<{ entry: TunnelStats; exit: TunnelStats; strangers: number; entryStderr: string; exitStderr: string }>;
}

async function startTunnel(to: string, extra: string[] = []): Promise<Tunnel> {
  const exit = startQmt(['tunnel', 'exit', '--listen', 'tcp:127.0.0.1:0', '--to', to, '--tls', pki, '--json', ...extra]);
  const exitUri = (await exit.stderrMatches(/^qmt: tunnel exit listening on (\S+),/m))[1]!;
  const relay = await FaultRelay.start({ target: exitUri, maxConnections: 128 });
  const entry = startQmt(['tunnel', 'entry', '--listen', 'tcp:127.0.0.1:0', '--to', relay.uri, '--tls', pki, '--tls-hostname', 'localhost', '--json', ...extra]);
  const entryUri = (await entry.stderrMatches(/^qmt: tunnel entry listening on (\S+),/m))[1]!;
  return {
    entry,
    exit,
    relay,
    entryUri,
    exitUri,
    async kill() {
      entry.child.kill('SIGKILL');
      exit.child.kill('SIGKILL');
      await relay.close();
    },
    async stop() {
      entry.child.kill('SIGTERM');
      exit.child.kill('SIGTERM');
      const [e, x] = await Promise.all([entry.exit, exit.exit]);
      await relay.close();
      expect(e.code, e.stderr).toBe(0);
      expect(x.code, x.stderr).toBe(0);
      const xj = JSON.parse(x.stdout) as { stats: TunnelStats; strangers: number };
      return { entry: (JSON.parse(e.stdout) as { stats: TunnelStats }).stats, exit: xj.stats, strangers: xj.strangers, entryStderr: e.stderr, exitStderr: x.stderr };
    },
  };
}

interface Case {
  name: string;
  postcopy: boolean;
  preempt: boolean;
  tls: boolean;
  cuts: number;
  /** QEMU's multifd channels (precopy only in 10.0). */
  multifd?: number;
  /** Strangers knock on the exit's port during the migration. */
  strangers?: boolean;
}

const CASES: Case[] = [
  { name: 'precopy', postcopy: false, preempt: false, tls: false, cuts: 2 },
  { name: 'precopy, multifd ×2', postcopy: false, preempt: false, tls: false, cuts: 2, multifd: 2 },
  { name: 'postcopy after one pass', postcopy: true, preempt: false, tls: false, cuts: 1 },
  { name: 'postcopy + preempt, strangers on the exit port', postcopy: true, preempt: true, tls: false, cuts: 3, strangers: true },
  { name: 'postcopy + preempt, QEMU TLS end to end', postcopy: true, preempt: true, tls: true, cuts: 2 },
];

/** A port scan, an HTTP request and a client of another CA on the exit's port. */
function knock(uri: string): void {
  const port = Number(uri.split(':').pop());
  const probe = net.connect(port, '127.0.0.1');
  probe.on('error', () => undefined);
  probe.once('connect', () => probe.destroy());
  const http = net.connect(port, '127.0.0.1');
  http.on('error', () => undefined);
  http.once('connect', () => http.end('GET / HTTP/1.1\r\nHost: x\r\n\r\n'));
  const foreign = tls.connect({ port, host: '127.0.0.1', ca: otherPki.ca, cert: otherPki.cert, key: otherPki.key, rejectUnauthorized: false });
  foreign.on('error', () => undefined);
  setTimeout(() => [probe, http, foreign].forEach((s) => s.destroy()), 3000).unref();
}

const statuses = (q: QemuProcess): string[] => q.qmp.events.filter((e) => e.event === 'MIGRATION').map((e) => String((e.data as { status?: unknown }).status));

async function guestRunsOn(dst: QemuProcess): Promise<void> {
  await dst.waitSerialPasses(dst.serialPasses() + 3, 20_000);
  await dst.pauseVm();
  const inv = checkGuestInvariant(await readGuestRam(dst, dumpSizeFor(dst)), guestRangeOf(dst));
  expect(inv.ok, inv.detail).toBe(true);
}

describeWithQemu('QEMU 10 → qmt tunnel entry → (cut hop) → qmt tunnel exit → QEMU 10', () => {
  it.each(CASES)('$name, $cuts cut(s) of the hop: QEMU never pauses or fails, completes; the guest runs on', async (c) => {
    const [src, dst] = await Promise.all([
      startQemu({ name: `tunnel-src`, memoryMiB: MEMORY_MIB, guest: GUEST, ...(c.tls ? { extraArgs: tlsCreds(pki, 'client') } : {}) }),
      startQemu({ name: `tunnel-dst`, memoryMiB: MEMORY_MIB, guest: GUEST, incoming: true, ...(c.tls ? { extraArgs: tlsCreds(pki, 'server') } : {}) }),
    ]);
    const dstUri = `unix:${join(dst.dir, 'migrate.sock')}`;
    const t = await startTunnel(dstUri);
    let cut = 0;
    let cutting: Promise<void> = Promise.resolve();
    const cutRandomly = async (): Promise<void> => {
      if (c.strangers) knock(t.exitUri);
      for (let i = 0; i < c.cuts; i++) {
        await sleep(250 + Math.floor(Math.random() * 500));
        if (t.relay.cut() > 0) cut++;
      }
    };
    try {
      await src.waitSerialPasses(3, 15_000);
      const result = await migrateBetween(src, dst, {
        uri: dstUri,
        connectUri: t.entryUri,
        // events: MIGRATION events, the source's every status (a pause would be one).
        capabilities: { events: true, ...(c.multifd ? { multifd: true } : {}), ...(c.postcopy ? { 'postcopy-ram': true, ...(c.preempt ? { 'postcopy-preempt': true } : {}) } : {}) },
        ...(c.multifd ? { parameters: { 'multifd-channels': c.multifd } } : {}),
        // Slow enough that the cuts land inside the migration (precopy converges after 3 passes; postcopy lasts seconds).
        sourceParameters: { 'max-bandwidth': 24 * MiB, 'downtime-limit': 1, 'max-postcopy-bandwidth': 12 * MiB, ...(c.tls ? { 'tls-creds': 'tls0', 'tls-hostname': 'localhost' } : {}) },
        ...(c.tls ? { destinationParameters: { 'tls-creds': 'tls0' } } : {}),
        ...(c.postcopy ? { postcopyAfterPasses: 2, onPostcopyStarted: () => void (cutting = cutRandomly()) } : { convergeAfterPasses: 3, beforeMigrate: () => void (cutting = cutRandomly()) }),
        timeoutMs: 90_000,
      });
      await cutting;
      const s = statuses(src);
      expect(s, 'MIGRATION events seen').toContain('completed');
      expect(s, 'the source never paused or failed').not.toContain('postcopy-paused');
      expect(s).not.toContain('failed');
      expect(result.source.status).toBe('completed');
      expect(result.destination?.status).toBe('completed');
      if (c.postcopy) expect(result.postcopyStarted).toBe(true);
      await guestRunsOn(dst);
      const st = await t.stop();
      console.log(`[tunnel ${c.name}] cuts ${cut}; entry: ${st.entry.connections.length} connections, outages ${st.entry.outages}, replayed ${st.entry.replayedBytes} B; exit: outages ${st.exit.outages}, replayed ${st.exit.replayedBytes} B; postcopy requests ${result.source.ram?.['postcopy-requests']}; ${result.durationMs} ms`);
      expect(cut, 'the cuts came while connections were open').toBeGreaterThanOrEqual(1);
      expect(st.entry.outages + st.exit.outages, st.entryStderr).toBeGreaterThanOrEqual(1);
      expect(st.entry.connections.length).toBe(1 + (c.preempt ? 1 : 0) + (c.multifd ?? 0));
      expect(st.exit.connections.map((x) => x.role)).toEqual(st.entry.connections.map((x) => x.role));
      if (c.multifd) expect(st.entry.connections.map((x) => x.role)).toEqual(['main', ...Array<string>(c.multifd).fill('multifd')]);
      expect(st.entry.connections.map((x) => x.state)).not.toContain('failed');
      expect(st.exit.connections.map((x) => x.role)[0]).toBe(c.tls ? 'tls' : 'main');
      expect(st.entry.bytesUp).toBe(st.exit.bytesUp);
      if (c.strangers) {
        expect(st.strangers, 'the probe, the HTTP request and the other CA were dropped').toBe(3);
        expect(st.exitStderr).toMatch(/stranger from 127\.0\.0\.1:\d+ dropped \(tls\)/);
      }
      // Protocol-aware at both ends: each parsed the same migration, and its counts are QEMU's own.
      if (!c.tls) {
        const ram = result.source.ram!;
        for (const [end, m] of [['entry', st.entry.migrations[0]], ['exit', st.exit.migrations[0]]] as const) {
          expect(m, `${end}: a migration parsed`).toBeDefined();
          expect(m!.complete, `${end}: EOF and SHUT 0 seen`).toBe(true);
          expect(m!.parseErrors).toEqual([]);
          expect(m!.main.pages.normal + (m!.preempt?.pages.normal ?? 0) + (m!.multifd?.total.pages.normal ?? 0), `${end}: pages`).toBe(ram.normal);
          expect(m!.requests.count, `${end}: page requests`).toBe(ram['postcopy-requests'] ?? 0);
        }
      } else {
        expect(st.entry.migrations).toEqual([]);
      }
    } finally {
      await t.kill();
      await Promise.all([src.stop(), dst.stop()]);
    }
  }, 150_000);

  it('an outage longer than the limit: the tunnel closes the QEMU sides, both QEMUs pause, and their own recovery through the tunnel completes', async () => {
    const [src, dst] = await Promise.all([
      startQemu({ name: 'tunnel-outage-src', memoryMiB: MEMORY_MIB, guest: GUEST }),
      startQemu({ name: 'tunnel-outage-dst', memoryMiB: MEMORY_MIB, guest: GUEST, incoming: true }),
    ]);
    const dstUri = `unix:${join(dst.dir, 'migrate.sock')}`;
    const t = await startTunnel(dstUri, ['--outage-timeout', '1500', '--silence-timeout', '500']);
    try {
      await src.waitSerialPasses(3, 15_000);
      const caps = { events: true, 'postcopy-ram': true, 'postcopy-preempt': true };
      await dst.setCapabilities(caps);
      await src.setCapabilities(caps);
      await src.setParameters({ 'max-bandwidth': 24 * MiB, 'downtime-limit': 1, 'max-postcopy-bandwidth': 4 * MiB });
      await dst.migrateIncoming(dstUri);
      await sleep(200);
      await src.migrate(t.entryUri);
      for (;;) {
        const m = await src.queryMigrate();
        if ((m.ram?.['dirty-sync-count'] ?? 0) >= 2) break;
        await sleep(20);
      }
      await src.startPostcopy();
      await src.waitMigration(['postcopy-active'], 20_000);
      await sleep(300);
      // A silent partition, longer than the limit.
      t.relay.freeze();
      await src.waitMigration(['postcopy-paused'], 20_000);
      await dst.waitMigration(['postcopy-paused'], 20_000);
      t.relay.heal();
      // QEMU's recovery, through the tunnel again (the exit connects to the same URI).
      await dst.execute('migrate-recover', { uri: dstUri });
      await sleep(200);
      await src.migrate(t.entryUri, { resume: true });
      const info = await src.waitMigration(['completed'], 60_000).catch(async (e: unknown) => {
        t.entry.child.kill('SIGTERM');
        t.exit.child.kill('SIGTERM');
        const [en, ex] = await Promise.all([t.entry.exit, t.exit.exit]);
        const d = await dst.queryMigrate().catch(() => undefined);
        throw new Error(`${(e as Error).message}\nentry: ${en.stderr}\nexit: ${ex.stderr}\ndst: ${d?.status}\nsrc stderr: ${src.stderrTail(600)}\ndst stderr: ${dst.stderrTail(600)}`);
      });
      expect(info.status).toBe('completed');
      await dst.waitMigration(['completed'], 20_000);
      expect(statuses(src)).toContain('postcopy-recover');
      await guestRunsOn(dst);
      const st = await t.stop();
      const failed = st.entry.connections.filter((x) => x.state === 'failed');
      expect(failed.length, 'the first connections gave up at the limit').toBeGreaterThanOrEqual(1);
      expect(failed.every((x) => x.error?.startsWith('outage-timeout'))).toBe(true);
      expect(st.entryStderr).toMatch(/failed: outage-timeout/);
      console.log(`[tunnel outage] entry: ${st.entry.connections.map((x) => `${x.index} ${x.role} ${x.state}`).join(', ')}`);
    } finally {
      await t.kill();
      await Promise.all([src.stop(), dst.stop()]);
    }
  }, 150_000);
});
