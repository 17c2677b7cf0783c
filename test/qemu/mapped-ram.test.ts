/**
 * QEMU 10.0's own saved-VM file (capability mapped-ram) both ways:
 * - a running QEMU source → `qmt receive --format mapped-ram` → a fresh QEMU
 *   loads the file (`migrate-incoming file:`, mapped-ram on): every RAM block
 *   equals the stopped source's, bit for bit, and the guest's invariant holds;
 *   `qmt inspect` of our file reports its blocks and pages;
 * - QEMU saves a stopped guest with `migrate file:` → `qmt inspect` reports
 *   QEMU's own counts (ram.normal, ram.duplicate);
 * - a receive interrupted by SIGINT leaves a file QEMU refuses and
 *   `qmt inspect` calls incomplete; QEMU refuses a cut copy of its own file.
 */
import { copyFile, mkdtemp, readFile, rm, stat, truncate } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, expect, it } from 'vitest';
import { qmt, startQmt, type QmtRun } from '../cli/qmt.js';
import { MiB, firstDifferentPage, pollMigration, readAllRamBlocks, startSource, within } from './destination-helpers.js';
import { checkGuestInvariant, guestRangeOf, startQemu, stopAll, type QemuProcess } from './harness.js';
import { describeWithQemu } from './require-qemu.js';

const MEMORY_MIB = 64;
const GUEST = { startMiB: 1, endMiB: 8, direction: 'up' as const };
const CASE_TIMEOUT_MS = 120_000;

afterAll(async () => {
  await stopAll();
});

/** A fresh paused QEMU with mapped-ram on that loads `file`; resolves once the load ended as `want`. */
async function loadInto(c: Case, name: string, file: string, want: 'completed' | 'failed'): Promise<QemuProcess> {
  const dst = await startQemu({ name, machine: 'q35', memoryMiB: MEMORY_MIB, guest: GUEST, incoming: true, paused: true });
  c.qemus.push(dst);
  await dst.setCapabilities({ 'mapped-ram': true });
  await dst.migrateIncoming(`file:${file}`, { 'exit-on-error': false });
  await dst.waitMigration([want], 60_000);
  return dst;
}

interface InspectJson {
  ok: boolean;
  capabilities: string[];
  pages: { normal: number; zero: number; xbzrle: number };
  ramBlocks: { idstr: string; lengthBytes: number }[];
  mappedRam: { idstr: string; present: number; pages: number }[] | null;
  devices: unknown[];
  error?: { code: string; message: string };
}

async function inspect(file: string): Promise<{ code: number | null; json: InspectJson }> {
  const r = await qmt(['inspect', file, '--json']);
  return { code: r.code, json: JSON.parse(r.stdout) as InspectJson };
}

/** One test's temp directory and what it started, stopped and removed at the end whatever happens. */
interface Case {
  file: string;
  work: string;
  qemus: QemuProcess[];
  runs: QmtRun[];
}

async function inCase(prefix: string, body: (c: Case) => Promise<void>): Promise<void> {
  const work = await mkdtemp(join(tmpdir(), prefix));
  const c: Case = { work, file: join(work, 'vm.mapped-ram'), qemus: [], runs: [] };
  try {
    await body(c);
  } finally {
    for (const r of c.runs) r.child.kill();
    for (const q of c.qemus) await q.stop();
    await rm(work, { recursive: true, force: true });
  }
}

/** `qmt receive --format mapped-ram --out FILE` on a free port, and its URI. */
async function startReceive(c: Case): Promise<{ receive: QmtRun; uri: string }> {
  const receive = startQmt(['receive', '--listen', 'tcp:127.0.0.1:0', '--out', c.file, '--format', 'mapped-ram', '--json', '--progress', 'none']);
  c.runs.push(receive);
  return { receive, uri: (await receive.stderrMatches(/^qmt: listening on (\S+)/m))[1]! };
}

/** The test guest running (three passes done) in a source QEMU. */
async function runningSource(c: Case, name: string): Promise<QemuProcess> {
  const src = await startSource(name, { memoryMiB: MEMORY_MIB, guest: GUEST });
  c.qemus.push(src);
  await src.waitSerialPasses(3, 15_000);
  return src;
}

describeWithQemu('QEMU 10.0 and mapped-ram files', () => {
  it(
    'QEMU → qmt receive --format mapped-ram → a fresh QEMU loads the file: RAM is the stopped source’s, bit for bit',
    () =>
      inCase('qmt-mr-recv-', async (c) => {
        const { receive, uri } = await startReceive(c);
        const src = await runningSource(c, 'mr-src');
        await src.setCapabilities({ events: true });
        await src.setParameters({ 'max-bandwidth': 32 * MiB, 'downtime-limit': 10 });
        await src.migrate(uri);
        // Several passes over the running guest (pages rewritten at the same file offsets), then convergence.
        await pollMigration(src, (m) => (m.ram?.['dirty-sync-count'] ?? 0) >= 3, 'dirty-sync-count >= 3', 40_000);
        await src.setParameters({ 'downtime-limit': 20_000, 'max-bandwidth': 256 * MiB });
        await src.waitMigration(['completed'], 40_000);
        const r = await within(receive.exit, 30_000, 'qmt receive to exit');
        expect(r.code, r.stderr).toBe(0);
        const report = JSON.parse(r.stdout) as { ok: boolean; manifest: { complete: boolean } };
        expect(report.manifest.complete).toBe(true);
        expect((await readFile(c.file)).subarray(0, 4).toString('latin1')).toBe('QEVM');

        const source = await readAllRamBlocks(src);
        const dst = await loadInto(c, 'mr-load', c.file, 'completed');
        const loaded = new Map((await readAllRamBlocks(dst)).map((b) => [b.name, b.data]));
        for (const sb of source) {
          const b = loaded.get(sb.name);
          expect(b, `loaded block ${sb.name}`).toBeDefined();
          const at = firstDifferentPage(sb.data, b!);
          expect(at, `${sb.name}: first differing page at +0x${at.toString(16)}`).toBe(-1);
        }
        const inv = checkGuestInvariant(loaded.get('pc.ram')!, guestRangeOf(src));
        expect(inv.ok, inv.detail).toBe(true);

        const i = await inspect(c.file);
        expect(i.code).toBe(0);
        expect(i.json.capabilities).toEqual(['mapped-ram']);
        expect(i.json.ramBlocks.map((b) => b.idstr)).toEqual(source.map((b) => b.name));
        const isData = (b: Buffer, p: number): boolean => b.subarray(p * 4096, (p + 1) * 4096).some((x) => x !== 0);
        const nonZero = source.reduce((n, b) => n + Array.from({ length: b.usedLength / 4096 }, (_, p) => p).filter((p) => isData(b.data, p)).length, 0);
        // Every non-zero page is in the file; the zero ones are not.
        expect(i.json.pages.normal).toBe(nonZero);
        expect(i.json.pages.normal + i.json.pages.zero).toBe(source.reduce((n, b) => n + b.usedLength / 4096, 0));
        console.log(`[mapped-ram] QEMU → qmt receive --format mapped-ram: ${(await stat(c.file)).size} bytes, ${i.json.pages.normal} pages present, loaded by QEMU bit for bit`);
      }),
    CASE_TIMEOUT_MS,
  );

  it(
    'QEMU’s own mapped-ram save of a stopped guest: qmt inspect has QEMU’s counts; QEMU refuses a cut copy',
    () =>
      inCase('qmt-mr-qemu-', async (c) => {
        const src = await runningSource(c, 'mr-save');
        await src.pauseVm();
        await src.setCapabilities({ 'mapped-ram': true });
        await src.migrate(`file:${c.file}`);
        const info = await src.waitMigration(['completed'], 60_000);
        const i = await inspect(c.file);
        expect(i.code).toBe(0);
        expect(i.json.pages).toEqual({ normal: info.ram?.normal, zero: info.ram?.duplicate, xbzrle: 0 });
        expect(i.json.mappedRam?.length).toBe(i.json.ramBlocks.length);

        const cut = join(c.work, 'cut.mapped-ram');
        await copyFile(c.file, cut);
        await truncate(cut, 3 * MiB);
        await loadInto(c, 'mr-cut', cut, 'failed');
        const t = await inspect(cut);
        expect(t.code).toBe(1);
        expect(t.json.error?.code).toBe('truncated');
      }),
    CASE_TIMEOUT_MS,
  );

  it(
    'an interrupted qmt receive --format mapped-ram leaves a file QEMU refuses and qmt inspect calls incomplete',
    () =>
      inCase('qmt-mr-int-', async (c) => {
        const { receive, uri } = await startReceive(c);
        const src = await runningSource(c, 'mr-int');
        await src.setParameters({ 'max-bandwidth': 2 * MiB, 'downtime-limit': 1 });
        await src.migrate(uri);
        await pollMigration(src, (m) => (m.ram?.transferred ?? 0) > 1 * MiB, '1 MiB sent', 30_000);
        receive.child.kill('SIGINT');
        const r = await within(receive.exit, 30_000, 'qmt receive to exit');
        expect(r.code).toBe(130);
        const report = JSON.parse(r.stdout) as { ok: boolean; manifest: { complete: boolean } | null; error: { code: string } };
        expect(report).toMatchObject({ ok: false, manifest: { complete: false }, error: { code: 'cancelled' } });
        expect((await readFile(c.file)).subarray(0, 4).toString('latin1')).toBe('QMTP');
        await loadInto(c, 'mr-int-load', c.file, 'failed');
        const i = await inspect(c.file);
        expect(i.code).toBe(1);
        expect(i.json.error?.code).toBe('incomplete');
      }),
    CASE_TIMEOUT_MS,
  );
});
