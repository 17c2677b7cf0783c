/**
 * A library migration through the tunnel: SourceSession → TunnelEntry → a
 * fault relay → TunnelExit → DestinationSession, postcopy with preempt after
 * one pass, the destination faulting pages in while the test cuts every hop
 * connection, and then freezes them (a silent link) for less than the outage
 * limit. Neither session may pause or see an error — the tunnel hides the
 * outages — and the destination's memory equals the source's bit for bit.
 */
import { randomFillSync } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DestinationSession } from '../../src/protocol/destination.js';
import { InMemorySink } from '../../src/protocol/memory.js';
import { InMemorySource } from '../../src/protocol/memory-source.js';
import { SourceSession } from '../../src/protocol/source.js';
import { TunnelEntry, TunnelExit } from '../../src/protocol/tunnel/index.js';
import { initPkiDir } from '../../src/transport/pki.js';
import { FaultRelay } from '../faults/relay.js';

const MiB = 1 << 20;
const PAGE = 4096;
const RAM = 24 * MiB;

let pki: string;
beforeAll(async () => {
  pki = await mkdtemp(join(tmpdir(), 'qmt-tunnel-mig-'));
  await initPkiDir(pki);
});
afterAll(async () => {
  await rm(pki, { recursive: true, force: true });
});

describe('a library migration through the tunnel', () => {
  it('postcopy + preempt, the hop cut twice and frozen once: no pause on either side, memory bit for bit', async () => {
    const sink = new InMemorySink();
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, postcopy: true, idleTimeoutMs: 20_000 });
    const exit = await TunnelExit.start({ listen: 'tcp:127.0.0.1:0', to: dst.uri, tls: { dir: pki }, limits: { silenceMs: 500, keepaliveMs: 100 } });
    const relay = await FaultRelay.start({ target: exit.uri, maxConnections: 64 });
    const entry = await TunnelEntry.start({ listen: 'tcp:127.0.0.1:0', to: relay.uri, tls: { dir: pki, hostname: 'localhost' }, limits: { silenceMs: 500, keepaliveMs: 100 }, reconnect: { initialDelayMs: 20, maxDelayMs: 200 } });
    const source = new InMemorySource([{ idstr: 'pc.ram', length: RAM }]);
    const ram = source.memory.get('pc.ram')!;
    for (let p = 0; p < RAM; p += 2 * PAGE) randomFillSync(ram, p, PAGE);
    const noise = Buffer.alloc(16);
    const writer = setInterval(() => {
      for (let i = 0; i < 200; i++) source.write('pc.ram', Math.floor(Math.random() * (RAM / PAGE)) * PAGE + 64, randomFillSync(noise));
    }, 5);
    const paused: string[] = [];
    dst.on('paused', (e) => paused.push(`destination: ${e.error.message}`));
    const src = new SourceSession({
      to: entry.uri,
      memory: source,
      machineType: 'pc-q35-10.0',
      devices: [{ idstr: 'timer', instanceId: 0, versionId: 2, data: Buffer.alloc(24, 1) }],
      postcopy: { afterPasses: 1 },
      preempt: true,
      stopVm: () => clearInterval(writer),
      bandwidthLimit: 48 * MiB,
      postcopyBandwidthLimit: 4 * MiB,
      recovery: { initialDelayMs: 20 },
    });
    src.on('paused', (e) => paused.push(`source: ${e.error.message}`));
    let faults = 0;
    dst.on('postcopy-run', () => {
      void (async () => {
        for (let off = RAM - PAGE; off >= 0; off -= 3 * PAGE) {
          const st = dst.stats().status;
          if (st === 'completed' || st === 'failed') return;
          if (dst.hasPage('pc.ram', off)) continue;
          faults++;
          await dst.requestPage('pc.ram', off).catch(() => undefined);
          await new Promise((r) => setTimeout(r, 2));
        }
      })();
      void (async () => {
        await new Promise((r) => setTimeout(r, 200));
        relay.cut();
        await new Promise((r) => setTimeout(r, 400));
        relay.cut();
        await new Promise((r) => setTimeout(r, 300));
        relay.freeze();
        await new Promise((r) => setTimeout(r, 1200));
        relay.heal();
      })();
    });
    src.start();
    try {
      const [a, b] = await Promise.allSettled([src.done, dst.done]);
      expect(a.status, String((a as PromiseRejectedResult).reason)).toBe('fulfilled');
      expect(b.status, String((b as PromiseRejectedResult).reason)).toBe('fulfilled');
      const es = entry.stats();
      const xs = exit.stats();
      console.log(`[tunnel library] faults ${faults}; entry outages ${es.outages}, replayed ${es.replayedBytes} B; exit outages ${xs.outages}, replayed ${xs.replayedBytes} B; requests ${dst.stats()['postcopy-requests']} p50 ${dst.stats()['postcopy-latency'].p50} µs`);
      expect(paused, 'neither session paused').toEqual([]);
      expect(dst.stats().recoveries).toBe(0);
      expect(es.outages, 'the cuts and the freeze came during the migration').toBeGreaterThanOrEqual(2);
      expect(es.connections.map((c) => c.role)).toEqual(['main', 'preempt']);
      expect(dst.stats()['preempt-pages']).toBeGreaterThan(0);
      expect(sink.blocks.get('pc.ram')!.equals(ram), 'memory bit for bit').toBe(true);
      // Both ends parsed the migration as it passed them: the same requests the destination made.
      for (const m of [es.migrations[0], xs.migrations[0]]) {
        expect(m?.complete).toBe(true);
        expect(m?.postcopy).toBe(true);
        expect(m?.requests.count).toBe(dst.stats()['postcopy-requests']);
        expect(m?.requests.unanswered).toBe(0);
      }
    } finally {
      clearInterval(writer);
      await entry.close();
      await exit.close();
      await relay.close();
      await dst.close();
    }
  }, 60_000);
});
