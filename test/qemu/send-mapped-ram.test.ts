/**
 * The path a user takes with QEMU's own saved-VM file: a running test guest
 * is saved by QEMU 10.0 itself (`migrate file:PATH` with capability
 * mapped-ram, the guest rewriting its range during the save), and that file,
 * unchanged, is restored by the real `qmt send --from FILE` command into fresh
 * QEMU destinations: precopy (with and without threads), a lazy restore
 * (postcopy after:0 with preempt: the VM runs at once, its memory follows on
 * demand), the same over TLS, and a lazy restore whose link is cut in
 * postcopy and recovered through QEMU's `migrate-recover` at the address
 * given to `--recover-to`; and the file `qmt receive --format mapped-ram`
 * wrote of the same guest, restored lazily. Each time: `qmt send` exits 0, the destination
 * completes, the guest keeps running there, its invariant holds, and every
 * page outside the guest's range equals the stopped source's bit for bit.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { afterAll, beforeAll, expect, it } from 'vitest';
import type { JsonEnvelope } from '../../src/cli/json.js';
import type { SendJson } from '../../src/cli/send.js';
import { initPkiDir } from '../../src/transport/pki.js';
import { AUTO_THREADS_MIN_CORES, availableCores, socketTransferSupported } from '../../src/transport/worker/support.js';
import { qmtChildren } from '../cli/qmt.js';
import { FaultRelay } from '../faults/relay.js';
import { readAllRamBlocks } from './destination-helpers.js';
import { startQemu, stopAll } from './harness.js';
import { describeWithQemu } from './require-qemu.js';
import { checkDestination, migrationStatuses, startDestination, type GuestSpec } from './source-helpers.js';

const SPEC: GuestSpec = { memoryMiB: 64, guest: { startMiB: 1, endMiB: 33, direction: 'down' } };

interface Case {
  name: string;
  args: string[];
  postcopy: boolean;
  tls?: boolean;
  /** Cut the link in postcopy and recover it. */
  cut?: boolean;
  /** The file qmt receive --format mapped-ram wrote instead of QEMU's own. */
  ours?: boolean;
}
const THREADS_ON = socketTransferSupported() ? ['--threads', 'on'] : [];
const CASES: Case[] = [
  { name: 'precopy', args: ['--postcopy', 'never'], postcopy: false },
  { name: 'precopy, threads off', args: ['--postcopy', 'never', '--threads', 'off'], postcopy: false },
  // 16 MiB/s: the background stream takes seconds, the guest faults its range in before.
  // Threads forced where Node can move sockets ('auto' keeps 2-core machines on one thread): each
  // channel's thread then reads its pages in the file itself.
  { name: 'lazy: after:0 with preempt', args: ['--postcopy', 'after:0', '--preempt', '--bandwidth', '16M', ...THREADS_ON], postcopy: true },
  { name: 'lazy over TLS', args: ['--postcopy', 'after:0', '--preempt', '--bandwidth', '16M', ...THREADS_ON], postcopy: true, tls: true },
  { name: 'lazy, cut in postcopy, recovered', args: ['--postcopy', 'after:0', '--preempt', '--bandwidth', '4M', ...THREADS_ON], postcopy: true, cut: true },
  { name: 'our file (qmt receive --format mapped-ram), lazy, one thread', args: ['--postcopy', 'after:0', '--preempt', '--bandwidth', '16M', '--threads', 'off'], postcopy: true, ours: true },
];

let work: string;
let file: string;
let pkiDir: string;
let expected: Buffer;
let ourFile: string;
let ourExpected: Buffer;

/** The real `qmt` command (src/cli/main.ts, as users run it), killed at the end if still running. */
const { run: qmt, killAll } = qmtChildren();

/** A port nothing listens on now (the kernel's pick, released): where QEMU will migrate-recover. */
async function freePort(): Promise<number> {
  const srv = createServer();
  await new Promise<void>((res) => srv.listen(0, '127.0.0.1', res));
  const port = (srv.address() as { port: number }).port;
  await new Promise((res) => srv.close(res));
  return port;
}

afterAll(async () => {
  killAll();
  await stopAll();
  if (work) await rm(work, { recursive: true, force: true });
});

describeWithQemu("QEMU 10.0's own mapped-ram file, restored unchanged by qmt send into QEMU 10.0", () => {
  beforeAll(async () => {
    work = await mkdtemp(join(tmpdir(), 'qmt-send-mr-'));
    file = join(work, 'vm.mapped-ram');
    pkiDir = join(work, 'pki');
    await initPkiDir(pkiDir);
    const src = await startQemu({ name: 'mr-save-src', machine: 'q35', memoryMiB: SPEC.memoryMiB, guest: SPEC.guest });
    try {
      await src.waitSerialPasses(3, 15_000);
      // Saved while running (QEMU's live save to a file): a generous downtime budget ends it after a pass.
      await src.setCapabilities({ 'mapped-ram': true });
      await src.setParameters({ 'downtime-limit': 5000 });
      await src.migrate(`file:${file}`);
      const info = await src.waitMigration(['completed'], 60_000);
      expected = (await readAllRamBlocks(src)).find((b) => b.name === 'pc.ram')!.data;
      console.log(`[send-mapped-ram] QEMU saved the running guest: ${info.ram?.normal} normal, ${info.ram?.duplicate} zero pages, ${info['total-time']} ms`);
    } finally {
      await src.stop();
    }
    // The same guest captured over the network by qmt receive into a mapped-ram file.
    ourFile = join(work, 'ours.mapped-ram');
    const receive = qmt(['receive', '--listen', 'tcp:127.0.0.1:0', '--out', ourFile, '--format', 'mapped-ram', '--progress', 'none']);
    const uri = (await receive.stderrMatches(/^qmt: listening on (\S+)/m))[1]!;
    const src2 = await startQemu({ name: 'mr-capture-src', machine: 'q35', memoryMiB: SPEC.memoryMiB, guest: SPEC.guest });
    try {
      await src2.waitSerialPasses(3, 15_000);
      await src2.setParameters({ 'downtime-limit': 5000 });
      await src2.migrate(uri);
      await src2.waitMigration(['completed'], 60_000);
      ourExpected = (await readAllRamBlocks(src2)).find((b) => b.name === 'pc.ram')!.data;
    } finally {
      await src2.stop();
    }
    const r = await receive.exit;
    expect(r.code, r.stderr).toBe(0);
  });

  it.each(CASES)('$name: QEMU completes, the guest runs on, memory consistent', async (c) => {
    const label = c.name.replace(/[^a-z0-9]+/gi, '-');
    const { q, uri } = await startDestination(`dst-mr-${label}`, SPEC, { postcopy: c.postcopy, preempt: c.postcopy, ...(c.tls ? { tlsDir: pkiDir } : {}) });
    const relays: FaultRelay[] = [];
    try {
      let to = uri;
      let recoverPort = 0;
      if (c.cut) {
        // The first connections go through a relay the test cuts; the recovery goes where --recover-to says.
        relays.push(await FaultRelay.start({ target: uri, maxConnections: 2 }));
        to = relays[0]!.uri;
        recoverPort = await freePort();
      }
      const args = ['send', '--from', c.ours ? ourFile : file, '--to', to, ...c.args, '--json', '--progress', 'plain'];
      if (c.tls) args.push('--tls', pkiDir, '--tls-hostname', 'localhost');
      if (c.cut) args.push('--recover-to', `tcp:127.0.0.1:${recoverPort}`);
      const t0 = performance.now();
      const run = qmt(args);
      if (c.cut) {
        await q.waitMigration(['postcopy-active'], 30_000);
        // The guest runs at the destination and faults its pages in through the relay; 4 MiB/s leaves most to send.
        await new Promise((r) => setTimeout(r, 1500));
        expect((await q.queryStatus()).status, 'the guest runs at the destination').toBe('running');
        expect(relays[0]!.cut(() => true), 'connections reset').toBeGreaterThan(0);
        await relays[0]!.close();
        await q.waitMigration(['postcopy-paused'], 15_000);
        await run.stderrMatches(/^qmt: postcopy paused/m);
        await q.execute('migrate-recover', { uri: `tcp:127.0.0.1:${recoverPort}` });
      }
      const hung = setTimeout(() => {
        void q
          .queryMigrate()
          .catch(() => undefined)
          .then((info) => console.log(`[send-mapped-ram] ${label}: hung after 90 s; QEMU ${JSON.stringify(info)}`));
        run.child.kill('SIGINT');
      }, 90_000);
      const { code, stdout, stderr } = await run.exit.finally(() => clearTimeout(hung));
      expect(stderr).not.toMatch(/^\s+at /m);
      expect(code, `${stderr}\nQEMU: ${q.stderrTail(800)}`).toBe(0);
      const report = JSON.parse(stdout) as JsonEnvelope & SendJson;
      expect(report).toMatchObject({ ok: true, format: 'mapped-ram', postcopy: c.postcopy, tls: c.tls ?? false });
      const st = report.stats!;
      const check = await checkDestination(q, c.ours ? ourExpected : expected);
      console.log(
        `[send-mapped-ram] ${label}: ${Math.round(performance.now() - t0)} ms, passes ${st.passes}, downtime ${st.downtimeMs} ms, ` +
          `requests ${st.postcopyRequests} (main ${report.answered.main}, preempt ${report.answered.preempt}), recoveries ${st.recoveries}, ${check.invariant.detail}`,
      );
      expect(check.info.status).toBe('completed');
      expect(check.passesAfter, 'guest passes at the destination after completion').toBeGreaterThanOrEqual(2);
      expect(check.invariant.ok, check.invariant.detail).toBe(true);
      expect(check.outside!.count, 'pages outside the guest range that differ from the stopped source').toBe(0);
      if (c.postcopy) {
        expect(migrationStatuses(q)).toContain('postcopy-active');
        expect(st.postcopyRequests, 'pages the running guest asked for').toBeGreaterThan(0);
        expect(report.answered.preempt).toBeGreaterThan(0);
      } else {
        expect(migrationStatuses(q)).not.toContain('postcopy-active');
        expect(st.passes).toBe(1);
      }
      // Threads: 'on' where asked; 'auto' (no --threads) where Node moves sockets and the machine has the cores.
      const mode = c.args.includes('--threads') ? c.args[c.args.indexOf('--threads') + 1] : 'auto';
      const threaded = mode === 'on' || (mode === 'auto' && socketTransferSupported() && availableCores() >= AUTO_THREADS_MIN_CORES);
      expect(st.threads?.used ?? false, st.threads?.why).toBe(threaded);
      if (c.cut) {
        expect(st.recoveries).toBeGreaterThanOrEqual(1);
        expect(migrationStatuses(q)).toContain('postcopy-recover');
      }
    } finally {
      await Promise.all(relays.map((r) => r.close()));
      await q.stop();
    }
  });
});
