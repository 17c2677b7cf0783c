/**
 * Strangers on the port of a DestinationSession fed by a real QEMU 10.0
 * source over TLS with postcopy-preempt (issue 11 §3): before the source
 * connects, a client that connects and closes, an HTTP request, a TLS client
 * holding a certificate of another CA, and a client that connects and says
 * nothing; between the main and the preempt channel, another TLS client of
 * the other CA. Each is dropped and reported as a 'stranger' with its reason;
 * QEMU's two channels get the roles; the migration completes with the RAM
 * equal, bit for bit, to the stopped source's, and the guest's invariant holds.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, expect, it } from 'vitest';
import { DestinationSession } from '../../src/protocol/destination.js';
import { InMemorySink } from '../../src/protocol/memory.js';
import { initPkiDir } from '../../src/transport/pki.js';
import type { StrangerEvent } from '../../src/transport/qualify.js';
import { playStranger } from '../support/strangers.js';
import { capabilitiesFor, demandTopDown, MiB, nextEvent, pollMigration, startSource, within } from './destination-helpers.js';
import { checkGuestInvariant, compareGuestRam, dumpSizeFor, guestRangeOf, readGuestRam, stopAll, type QemuProcess } from './harness.js';
import { describeWithQemu } from './require-qemu.js';

const GUEST = { startMiB: 1, endMiB: 24, direction: 'down' as const };

afterAll(async () => {
  await stopAll();
});

describeWithQemu('strangers on the port before and during a QEMU 10 migration', () => {
  it('TLS + postcopy-preempt: every stranger dropped and reported, QEMU gets both roles, the migration completes, RAM identical', async () => {
    const tmp = await mkdtemp(join(tmpdir(), 'qmt-qemu-strangers-'));
    const tlsDir = join(tmp, 'pki');
    const otherCa = join(tmp, 'other-ca');
    await initPkiDir(tlsDir);
    await initPkiDir(otherCa);
    const sink = new InMemorySink();
    const session = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, postcopy: true, transport: { tls: { dir: tlsDir } }, idleTimeoutMs: 20_000 });
    const strangers: StrangerEvent[] = [];
    const roles: string[] = [];
    session.on('stranger', (ev) => strangers.push(ev));
    session.on('channel', (c) => roles.push(c.role));
    const port = Number(session.uri.split(':').pop());
    let src: QemuProcess | undefined;
    const silent = await playStranger('silent', port);
    try {
      for (const kind of ['connect-close', 'http', 'tls-foreign-ca'] as const) await playStranger(kind, port, otherCa);
      const until = async (n: number): Promise<void> => {
        const deadline = Date.now() + 10_000;
        while (strangers.length < n && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
      };
      await until(3);
      const seen = strangers.map((e) => `${e.reason}/${e.error.code}`);
      // A connect-and-close is a TLS handshake that never started (or just a close, if that came first).
      expect(['tls/tls-not-tls', 'closed/closed']).toContain(seen[0]);
      expect(seen.slice(1)).toEqual(['tls/tls-not-tls', 'tls/tls-unknown-ca']);
      expect(session.stats().status, 'still waiting for the source').toBe('setup');

      src = await startSource('src-strangers', { memoryMiB: 64, guest: GUEST, tlsDir });
      await src.waitSerialPasses(3, 15_000);
      await src.setCapabilities(capabilitiesFor('preempt'));
      await src.setParameters({ 'max-bandwidth': 32 * MiB, 'max-postcopy-bandwidth': 16 * MiB, 'downtime-limit': 10 });
      await src.migrate(session.uri);
      await pollMigration(src, (m) => m.status === 'active' && (m.ram?.['dirty-sync-count'] ?? 0) >= 2, 'dirty-sync-count >= 2', 20_000);
      expect(roles).toEqual(['main']);
      // The silent client was waiting to qualify: dropped by its timeout or once QEMU's main channel qualified.
      await until(4);
      expect(['extra', 'timeout']).toContain(strangers[3]?.reason);
      // A stranger between the main and the preempt channel.
      await playStranger('tls-foreign-ca', port, otherCa);
      await until(5);
      expect(strangers[4]).toMatchObject({ reason: 'tls', error: { code: 'tls-unknown-ca', channel: 'preempt' } });

      const run = nextEvent(session, 'postcopy-run', 15_000);
      await src.startPostcopy();
      await run;
      const g = guestRangeOf(src);
      const demand = demandTopDown(session, 'pc.ram', g.startMiB * MiB, g.endMiB * MiB);
      await src.waitMigration(['completed'], 30_000);
      const result = await within(session.done, 10_000, 'DestinationSession.done');
      const d = await within(demand, 10_000, 'demand paging');
      expect(result.complete).toBe(true);
      expect(roles).toEqual(['main', 'preempt']);
      expect(result.stats.channels.preempt?.tls?.protocol).toBe('TLSv1.3');
      expect(d.answered.length, 'demand requests answered').toBeGreaterThan(0);
      const sourceMem = await readGuestRam(src, dumpSizeFor(src));
      const main = sink.blocks.get('pc.ram')!;
      const diff = compareGuestRam(sourceMem, main);
      expect(diff, `pages differing: ${diff.pages.slice(0, 8).map((p) => `0x${p.toString(16)}`).join(', ')}`).toMatchObject({ equal: true, count: 0 });
      const inv = checkGuestInvariant(main, g);
      expect(inv.ok, inv.detail).toBe(true);
      expect(strangers).toHaveLength(5);
      console.log(`[strangers qemu] ${strangers.map((e) => `${e.reason}/${e.error.code}${e.error.channel ? `(${e.error.channel})` : ''}`).join(', ')}; ${d.answered.length} demand pages answered; RAM equal`);
    } catch (err) {
      throw new Error(`${(err as Error).message}\n  strangers: ${strangers.map((e) => e.error.describe()).join(' | ')}\n  source stderr: ${src?.stderrTail(500) ?? ''}`, { cause: err });
    } finally {
      silent?.destroy();
      session.close();
      await src?.stop();
      await rm(tmp, { recursive: true, force: true });
    }
  }, 90_000);
});
