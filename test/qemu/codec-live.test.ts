import { execFile } from 'node:child_process';
import { readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, expect, it } from 'vitest';
import { describeWithQemu } from './require-qemu.js';
import {
  checkGuestInvariant,
  compareGuestRam,
  dumpSizeFor,
  guestRangeOf,
  readGuestRam,
  startQemu,
  stopAll,
  TCG_DIRTY_SAFE_PAD_MIB,
  type QemuOptions,
  type QemuProcess,
} from './harness.js';

/**
 * The codec against the live binary: a QEMU 10.0 running the test guest
 * migrates to `file:`; `qmt inspect --json` must report QEMU's own page counts
 * and RAM blocks; `qmt recode` of that file, loaded into a fresh QEMU, must
 * give memory identical to the stopped source's, and the guest keeps running.
 */
const run = promisify(execFile);
const ROOT = join(import.meta.dirname, '..', '..');
const CLI = ['--import', 'tsx', join(ROOT, 'src', 'cli', 'main.ts')];

async function qmt(...args: string[]): Promise<{ stdout: string; stderr: string }> {
  return run(process.execPath, [...CLI, ...args], { cwd: ROOT, maxBuffer: 64 << 20 });
}

interface Scenario {
  name: string;
  qemu: QemuOptions;
  noContinue?: boolean;
}

const GUEST = { startMiB: 1, endMiB: 24 };
const SCENARIOS: Scenario[] = [
  { name: 'q35', qemu: { machine: 'q35', memoryMiB: 64, guest: GUEST } },
  { name: 'pc, recoded without CONTINUE', qemu: { machine: 'pc', memoryMiB: 64, guest: GUEST }, noContinue: true },
  // Two NUMA nodes = two RAM blocks besides the ROMs; the guest range spans both.
  { name: 'q35 with two RAM blocks', qemu: { machine: 'q35', numaNodesMiB: [16, 48 + TCG_DIRTY_SAFE_PAD_MIB], guest: GUEST } },
];

afterAll(async () => {
  await stopAll();
});

describeWithQemu('codec against QEMU 10.0', () => {
  it.each(SCENARIOS)('$name: inspect reports QEMU’s counts, recode loads back bit for bit', async ({ qemu, noContinue }) => {
    const src = await startQemu({ name: 'src', ...qemu });
    let dst: QemuProcess | undefined;
    try {
      await src.waitSerialPasses(2, 30_000);
      const file = join(src.dir, 'stream.bin');
      // A bandwidth cap makes several PART sections and passes while the guest
      // runs; after three passes a generous downtime limit lets it converge.
      await src.setParameters({ 'max-bandwidth': 64 << 20 });
      await src.migrate(`file:${file}`);
      for (;;) {
        const m = await src.queryMigrate();
        if (m.status === 'completed' || (m.ram?.['dirty-sync-count'] ?? 0) >= 3) break;
        if (m.status === 'failed') throw new Error(`migration failed: ${m['error-desc']}`);
        await new Promise((r) => setTimeout(r, 20));
      }
      await src.setParameters({ 'downtime-limit': 20_000 });
      const info = await src.waitMigration(['completed'], 60_000);
      const blocks = await src.ramBlocks();

      // 1. inspect: QEMU's own counters and RAM block list.
      const { stdout } = await qmt('inspect', '--json', file);
      const report = JSON.parse(stdout) as {
        bytes: number;
        pages: { normal: number; zero: number };
        ramBlocks: { idstr: string; lengthBytes: number }[];
        machineType: string;
        devices: unknown[];
      };
      expect(report.bytes).toBe((await stat(file)).size);
      expect(report.pages.normal).toBe(info.ram!.normal);
      expect(report.pages.zero).toBe(info.ram!.duplicate);
      expect(report.bytes).toBe(info.ram!.transferred);
      expect(report.ramBlocks.map((b) => [b.idstr, b.lengthBytes]).sort()).toEqual(blocks.map((b) => [b.name, b.usedLength]).sort());
      expect(report.machineType).toMatch(qemu.machine === 'pc' ? /^pc-i440fx-10\.0$/ : /^pc-q35-10\.0$/);
      if (qemu.numaNodesMiB) expect(report.ramBlocks.map((b) => b.idstr)).toEqual(expect.arrayContaining(['ram-node0', 'ram-node1']));

      // 2. recode, then load into a fresh, paused QEMU.
      const out = join(src.dir, 'recoded.bin');
      await qmt('recode', ...(noContinue ? ['--no-continue'] : []), file, out);
      const [orig, recoded] = await Promise.all([readFile(file), readFile(out)]);
      if (noContinue) expect(recoded.length).toBeGreaterThan(orig.length);
      else expect(recoded.equals(orig)).toBe(true);

      dst = await startQemu({ name: 'dst', ...qemu, incoming: true, paused: true });
      await dst.migrateIncoming(`file:${out}`);
      await dst.waitMigration(['completed'], 60_000);

      // 3. memory identical to the stopped source's, invariant holds.
      const size = dumpSizeFor(src);
      const [a, b] = await Promise.all([readGuestRam(src, size), readGuestRam(dst, size)]);
      const diff = compareGuestRam(a, b);
      expect(diff, `first differing pages: ${diff.pages.map((p) => p.toString(16)).join(', ')}`).toMatchObject({ equal: true, count: 0 });
      const inv = checkGuestInvariant(b, guestRangeOf(src));
      expect(inv.ok, inv.detail).toBe(true);

      // 4. the guest keeps running on the destination.
      const before = dst.serialPasses();
      await dst.execute('cont');
      await dst.waitSerialPasses(before + 2, 30_000);
    } finally {
      await Promise.allSettled([src.stop(), dst?.stop()]);
    }
  });

  it('qmt inspect refuses a corrupted capture with one line and exit code 1', async () => {
    const q = await startQemu({ name: 'bad', machine: 'q35', memoryMiB: 32, paused: true });
    try {
      const file = join(q.dir, 'stream.bin');
      await q.migrate(`file:${file}`);
      await q.waitMigration(['completed'], 30_000);
      const bytes = await readFile(file);
      const { writeFile } = await import('node:fs/promises');
      const bad = join(q.dir, 'bad.bin');
      bytes.writeUInt32BE(0xdeadbeef, 0);
      await writeFile(bad, bytes);
      const err = await qmt('inspect', bad).then(
        () => undefined,
        (e: { code: number; stderr: string; stdout: string }) => e,
      );
      expect(err?.code).toBe(1);
      expect(err?.stderr).toBe(`qmt: bad-magic: ${bad} at offset 0: bad magic 0xdeadbeef (expected "QEVM")\n`);
      const truncated = join(q.dir, 'truncated.bin');
      await writeFile(truncated, bytes.subarray(0, 20_000).fill(0x51, 0, 1).fill(0x45, 1, 2).fill(0x56, 2, 3).fill(0x4d, 3, 4));
      const err2 = await qmt('inspect', truncated).then(
        () => undefined,
        (e: { code: number; stderr: string }) => e,
      );
      expect(err2?.code).toBe(1);
      expect(err2?.stderr).toMatch(/^qmt: truncated: .*truncated\.bin at offset \d+: input ended .*\n$/);
      expect(err2?.stderr.split('\n').length).toBe(2);
    } finally {
      await q.stop();
    }
  });
});
