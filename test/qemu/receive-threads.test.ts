/**
 * A running QEMU 10.0 source into the real `qmt receive --threads on`
 * command: each channel's worker writes the pages it decodes into the saved
 * VM's block files itself. Precopy (plain and TLS) and postcopy with preempt
 * (QEMU switches after its first pass; our destination asks for pages with
 * --fault). Each time `qmt receive` exits 0, says its channels ran in
 * threads writing the files, and the saved RAM files equal every RAM block
 * of the stopped source bit for bit.
 */
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { afterAll, expect, it } from 'vitest';
import { readSavedVmManifest } from '../../src/protocol/saved-vm.js';
import { initPkiDir } from '../../src/transport/pki.js';
import { socketTransferSupported } from '../../src/transport/worker/support.js';
import { startQmt } from '../cli/qmt.js';
import { MiB, capabilitiesFor, firstDifferentPage, pollMigration, readAllRamBlocks, startSource, within } from './destination-helpers.js';
import { checkGuestInvariant, guestRangeOf, stopAll, type QemuProcess } from './harness.js';
import { describeWithQemu } from './require-qemu.js';

const MEMORY_MIB = 64;
const GUEST = { startMiB: 1, endMiB: 24, direction: 'down' as const };

afterAll(async () => {
  await stopAll();
});

interface ReceiveJson {
  ok: boolean;
  postcopy?: boolean;
  stats: { threads: { used: boolean; why: string; channels: { role: string; id: number; ended?: string }[] }; channels: { main?: { tls?: { protocol: string } }; preempt?: { bytesSent: number } } };
}

const CASES = [
  { name: 'precopy', tls: false, postcopy: false },
  { name: 'precopy over TLS', tls: true, postcopy: false },
  { name: 'postcopy with preempt, demand faults', tls: false, postcopy: true },
];

describeWithQemu('QEMU 10.0 → qmt receive --threads on: the channel threads write the saved VM', () => {
  it.skipIf(!socketTransferSupported()).each(CASES)(
    '$name: qmt receive exits 0, its channels ran in threads, the saved RAM is the stopped source’s bit for bit',
    async (c) => {
      const work = await mkdtemp(join(tmpdir(), 'qmt-recv-threads-'));
      const pki = join(work, 'pki');
      const out = join(work, 'vm');
      if (c.tls) await initPkiDir(pki);
      const args = ['receive', '--listen', 'tcp:127.0.0.1:0', '--out', out, '--threads', 'on', '--json', '--progress', 'none', '--idle-timeout', '30000'];
      if (c.tls) args.push('--tls', pki);
      if (c.postcopy) args.push('--postcopy', '--fault', 'random', '--fault-rate', '500');
      const receive = startQmt(args);
      let src: QemuProcess | undefined;
      try {
        const uri = (await receive.stderrMatches(/^qmt: listening on (\S+)/m))[1]!;
        src = await startSource(`src-recv-threads-${c.postcopy ? 'pc' : c.tls ? 'tls' : 'plain'}`, { memoryMiB: MEMORY_MIB, guest: GUEST, ...(c.tls ? { tlsDir: pki } : {}) });
        await src.waitSerialPasses(3, 15_000);
        await src.setCapabilities(capabilitiesFor(c.postcopy ? 'preempt' : 'precopy'));
        await src.setParameters({ 'max-bandwidth': 32 * MiB, 'max-postcopy-bandwidth': 16 * MiB, 'downtime-limit': 10 });
        const t0 = performance.now();
        await src.migrate(uri);
        if (c.postcopy) {
          await pollMigration(src, (m) => m.status === 'active' && (m.ram?.['dirty-sync-count'] ?? 0) >= 2, 'dirty-sync-count >= 2', 30_000);
          await src.startPostcopy();
        } else {
          await pollMigration(src, (m) => (m.ram?.['dirty-sync-count'] ?? 0) >= 3, 'dirty-sync-count >= 3', 30_000);
          await src.setParameters({ 'downtime-limit': 20_000, 'max-bandwidth': 256 * MiB });
        }
        const info = await src.waitMigration(['completed'], 40_000);
        const r = await within(receive.exit, 30_000, 'qmt receive to exit');
        expect(r.code, r.stderr).toBe(0);
        expect(r.stderr).not.toMatch(/^\s+at /m);
        const report = JSON.parse(r.stdout) as ReceiveJson;
        expect(report.ok).toBe(true);
        const t = report.stats.threads;
        expect(t.used, t.why).toBe(true);
        expect(t.why).toMatch(/writes the pages it decodes into the sink's files/);
        expect(t.channels.map((x) => x.role).sort()).toEqual(c.postcopy ? ['main', 'preempt'] : ['main']);
        if (c.tls) expect(report.stats.channels.main?.tls?.protocol).toBe('TLSv1.3');
        console.log(`[receive-threads] ${c.name}: ${Math.round(performance.now() - t0)} ms, QEMU status ${info.status}, postcopy requests ${info.ram?.['postcopy-requests'] ?? 0}, threads ${JSON.stringify(t)}`);
        if (c.postcopy) expect(info.ram?.['postcopy-requests'] ?? 0, 'the destination asked for pages').toBeGreaterThan(0);
        // The source is stopped (postmigrate): its memory is the final truth.
        const manifest = await readSavedVmManifest(out);
        expect(manifest.complete).toBe(true);
        const source = await readAllRamBlocks(src);
        for (const sb of source) {
          const b = manifest.blocks.find((x) => x.idstr === sb.name);
          expect(b, `saved block ${sb.name}`).toBeDefined();
          const file = await readFile(join(out, b!.file));
          expect(file.length, `length of ${sb.name}`).toBe(sb.usedLength);
          const at = firstDifferentPage(sb.data, file);
          expect(at, `${sb.name}: first differing page at +0x${at.toString(16)}`).toBe(-1);
          if (sb.name === 'pc.ram') {
            const inv = checkGuestInvariant(file, guestRangeOf(src));
            expect(inv.ok, inv.detail).toBe(true);
          }
        }
      } finally {
        receive.child.kill();
        await src?.stop();
        await rm(work, { recursive: true, force: true });
      }
    },
    120_000,
  );
});
