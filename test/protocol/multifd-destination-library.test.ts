/**
 * The destination's side of multifd library ↔ library: our SourceSession
 * with `multifd` into our DestinationSession with `multifd` — precopy, and
 * postcopy with preempt after a multifd precopy in QEMU 10.1's order (the
 * preempt channel after main and every multifd channel; multifd idle in
 * postcopy). Memory and device state identical; the multifd channels carried
 * the precopy pages.
 */
import { randomFillSync } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readFile } from 'node:fs/promises';
import { readSavedVmManifest } from '../../src/protocol/saved-vm.js';
import { initPkiDir } from '../../src/transport/pki.js';
import { qmt, startQmt } from '../cli/qmt.js';
import { DestinationSession } from '../../src/protocol/destination.js';
import { InMemorySink } from '../../src/protocol/memory.js';
import { InMemorySource } from '../../src/protocol/memory-source.js';
import { SourceSession } from '../../src/protocol/source.js';

const MiB = 1024 * 1024;
const PAGE = 4096;

function guest(): InMemorySource {
  const src = new InMemorySource([
    { idstr: 'pc.ram', length: 16 * MiB },
    { idstr: 'pc.bios', length: 256 * 1024 },
  ]);
  const ram = src.memory.get('pc.ram')!;
  for (let p = 0; p < ram.length; p += 2 * PAGE) randomFillSync(ram, p, PAGE);
  randomFillSync(src.memory.get('pc.bios')!);
  return src;
}

const work = mkdtempSync(join(tmpdir(), 'qmt-mfd-lib-'));
const pki = join(work, 'pki');
beforeAll(async () => {
  await initPkiDir(pki);
});
afterAll(() => rmSync(work, { recursive: true, force: true }));

const DEVICES = [{ idstr: 'cpu', instanceId: 0, versionId: 12, data: randomFillSync(Buffer.alloc(1851)) }];

describe('multifd library ↔ library (destination side)', () => {
  it.each([
    { name: 'precopy, 3 channels, plain', channels: 3, postcopy: false, tls: false },
    { name: 'precopy, 2 channels, TLS', channels: 2, postcopy: false, tls: true },
    // Over TLS the preempt channel qualifies by order (plain: only with its first page).
    { name: 'postcopy with preempt after a multifd pass, 2 channels, TLS (10.1 order)', channels: 2, postcopy: true, tls: true },
  ])('$name: memory identical, pages on the multifd channels', async ({ channels, postcopy, tls }) => {
    const sink = new InMemorySink();
    const transport = tls ? { tls: { dir: pki } } : {};
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, multifd: { channels }, postcopy, idleTimeoutMs: 10_000, transport });
    const roles: string[] = [];
    dst.on('channel', ({ role, stats }) => roles.push(role === 'multifd' ? `multifd-${stats.id}` : role));
    const memory = guest();
    const src = new SourceSession({
      to: dst.uri,
      memory,
      machineType: 'pc-q35-10.0',
      devices: DEVICES,
      multifd: { channels },
      ...(tls ? { transport: { tls: { dir: pki, hostname: 'localhost' } } } : {}),
      ...(postcopy ? { postcopy: { afterPasses: 1 }, preempt: true, downtimeLimitMs: 1, maxPasses: 3 } : {}),
    });
    src.start();
    try {
      const [, result] = await Promise.all([src.done, dst.done]);
      expect(result.complete).toBe(true);
      expect(result.postcopy).toBe(postcopy);
      for (const [name, mem] of memory.memory) expect(sink.blocks.get(name)?.equals(mem), name).toBe(true);
      expect(result.devices.map((d) => d.data)).toEqual(DEVICES.map((d) => d.data));
      const st = result.stats;
      expect(st.multifd?.channels).toBe(channels);
      expect(st.multifd!.normal).toBeGreaterThan(0);
      const expected = ['main', ...Array.from({ length: channels }, (_, i) => `multifd-${i}`)];
      // The preempt channel comes after main and every multifd channel.
      if (postcopy) {
        expect(roles.slice(0, -1).sort()).toEqual(expected.sort());
        expect(roles.at(-1)).toBe('preempt');
      } else {
        expect(roles.sort()).toEqual(expected.sort());
      }
    } finally {
      await dst.close();
    }
  }, 60_000);
});

describe('qmt receive --multifd (the real command, a library source)', () => {
  it('receives a 2-channel multifd migration into a saved VM, RAM bit for bit, --json with the multifd counters', async () => {
    const out = join(work, 'vm-cli');
    const recv = startQmt(['receive', '--listen', 'tcp:127.0.0.1:0', '--out', out, '--multifd', '2', '--json']);
    const uri = (await recv.stderrMatches(/^qmt: listening on (tcp:[\d.]+:\d+), multifd 2 channels/m))[1]!;
    const memory = guest();
    const src = new SourceSession({ to: uri, memory, machineType: 'pc-q35-10.0', devices: DEVICES, multifd: { channels: 2 } });
    src.start();
    await src.done;
    const r = await recv.exit;
    expect(r.code, r.stderr).toBe(0);
    const j = JSON.parse(r.stdout) as { ok: boolean; stats: { multifd: { channels: number; syncs: number; perChannel: { id: number; bytes: number; pages: { normal: number } }[] } } };
    expect(j.ok).toBe(true);
    expect(j.stats.multifd.channels).toBe(2);
    expect(j.stats.multifd.perChannel.map((c) => c.id)).toEqual([0, 1]);
    for (const c of j.stats.multifd.perChannel) expect(c.pages.normal).toBeGreaterThan(0);
    expect(r.stderr).toMatch(/multifd-0 channel connected/);
    const manifest = await readSavedVmManifest(out);
    expect(manifest.complete).toBe(true);
    for (const b of manifest.blocks) expect((await readFile(join(out, b.file))).equals(memory.memory.get(b.idstr)!), b.idstr).toBe(true);
  }, 60_000);

  it('--multifd 0, 256 and x are usage errors (exit code 2)', async () => {
    for (const n of ['0', '256', 'x']) {
      const r = await qmt(['receive', '--listen', 'tcp:127.0.0.1:0', '--out', join(work, `never-${n}`), '--multifd', n]);
      expect(r.code, r.stderr).toBe(2);
      expect(r.stderr).toMatch(/--multifd/);
    }
  }, 60_000);
});
