/**
 * Postcopy recovery with the destination's channels in threads: a relay cuts
 * every connection (and then the preempt channel alone) while the guest
 * faults pages in; the destination pauses, its new connection goes to a new
 * worker that continues the old stream (its decoder's state handed over by
 * the old main worker), both sides recover and complete, memory bit for bit,
 * no page placed twice, no worker left. Into shared memory and into a
 * DirectorySink (`qmt receive`'s sink: each worker writes the files, and a
 * failed link's writes are drained before the recovery trusts its bits).
 */
import { randomFillSync } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Worker } from 'node:worker_threads';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readFileSync } from 'node:fs';
import { DestinationSession } from '../../src/protocol/destination.js';
import { DirectorySink, blockFileName } from '../../src/protocol/directory-sink.js';
import { InMemorySink } from '../../src/protocol/memory.js';
import { InMemorySource } from '../../src/protocol/memory-source.js';
import { SourceSession } from '../../src/protocol/source.js';
import type { TransportOptions } from '../../src/transport/connection.js';
import { initPkiDir } from '../../src/transport/pki.js';
import { socketTransferSupported } from '../../src/transport/worker/support.js';
import { FaultRelay } from '../faults/relay.js';

const MiB = 1 << 20;
const PAGE = 4096;
const RAM = 16 * MiB;

let pki: string;
beforeAll(async () => {
  pki = await mkdtemp(join(tmpdir(), 'qmt-threads-recovery-'));
  await initPkiDir(pki);
});
afterAll(async () => {
  await rm(pki, { recursive: true, force: true });
});

async function faultTopDown(dst: DestinationSession): Promise<number> {
  let over = false;
  const end = () => (over = true);
  dst.done.then(end, end);
  let n = 0;
  const inFlight = new Set<Promise<void>>();
  for (let off = RAM - PAGE; off >= 0 && !over; off -= PAGE) {
    if (dst.hasPage('pc.ram', off)) continue;
    const p: Promise<void> = dst.requestPage('pc.ram', off).then(
      () => void inFlight.delete(p),
      () => void inFlight.delete(p),
    );
    n++;
    inFlight.add(p);
    if (inFlight.size >= 4) {
      await Promise.race(inFlight);
      await new Promise((r) => setTimeout(r, 2));
    }
  }
  await Promise.all(inFlight);
  return n;
}

describe.skipIf(!socketTransferSupported())('postcopy recovery with the destination in threads', () => {
  for (const [tls, files] of [
    [false, false],
    [true, false],
    [false, true],
    [true, true],
  ] as const) {
    it(`${tls ? 'TLS' : 'plain'}, ${files ? 'a DirectorySink' : 'shared memory'}: a cut of every channel, then of preempt alone: paused, resumed on new workers, completed, memory bit for bit`, async () => {
      const alive = new Set<Worker>();
      const onWorker = (w: Worker): void => {
        alive.add(w);
        w.once('exit', () => alive.delete(w));
      };
      process.on('worker', onWorker);
      const transport: TransportOptions = tls ? { tls: { dir: pki } } : {};
      const dir = files ? await mkdtemp(join(tmpdir(), 'qmt-threads-recovery-files-')) : undefined;
      const sink = dir ? new DirectorySink(dir) : new InMemorySink({ shared: true });
      const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, postcopy: true, idleTimeoutMs: 20_000, transport, threads: 'on' });
      const relay = await FaultRelay.start({ target: dst.uri, maxConnections: 64 });
      const source = new InMemorySource([{ idstr: 'pc.ram', length: RAM }]);
      const ram = source.memory.get('pc.ram')!;
      for (let p = 0; p < RAM; p += 2 * PAGE) randomFillSync(ram, p, PAGE);
      const noise = Buffer.alloc(16);
      const writer = setInterval(() => {
        for (let i = 0; i < 300; i++) source.write('pc.ram', Math.floor(Math.random() * (RAM / PAGE)) * PAGE + 64, randomFillSync(noise));
      }, 5);
      const src = new SourceSession({
        to: relay.uri,
        transport,
        memory: source,
        machineType: 'pc-q35-10.0',
        devices: [{ idstr: 'timer', instanceId: 0, versionId: 2, data: Buffer.alloc(24, 1) }],
        postcopy: { afterPasses: 1 },
        preempt: true,
        stopVm: () => clearInterval(writer),
        postcopyBandwidthLimit: 4 * MiB,
        recovery: { initialDelayMs: 20, maxDelayMs: 200 },
      });
      let faulting: Promise<number> = Promise.resolve(0);
      let cuts = 0;
      const cut = (preemptOnly: boolean) =>
        setTimeout(() => {
          if (dst.stats().status !== 'postcopy-active') return;
          const last = relay.connections.length - 1;
          if (relay.cut(preemptOnly ? (i) => i === last : () => true) > 0) cuts++;
        }, 150);
      dst.on('postcopy-run', () => {
        faulting = faultTopDown(dst);
        cut(false);
      });
      let resumed = 0;
      dst.on('resumed', () => {
        if (++resumed === 1) cut(true);
      });
      src.start();
      try {
        const [a, b] = await Promise.allSettled([src.done, dst.done]);
        expect(a.status, String((a as PromiseRejectedResult).reason)).toBe('fulfilled');
        expect(b.status, String((b as PromiseRejectedResult).reason)).toBe('fulfilled');
        const requests = await faulting;
        const s = dst.stats();
        console.log(`[threads recovery ${tls ? 'TLS' : 'plain'}${files ? ', files' : ''}] cuts ${cuts}, recoveries ${s.recoveries}, requests ${requests}, preempt pages ${s['preempt-pages']}, p50 ${s['postcopy-latency'].p50} µs`);
        expect(cuts).toBeGreaterThanOrEqual(1);
        expect(s.recoveries).toBe(src.stats().recoveries);
        expect(s.recoveries).toBeGreaterThanOrEqual(1);
        expect(s['placed-twice']).toBe(0);
        expect(s.threads.used).toBe(true);
        if (sink instanceof DirectorySink) {
          await sink.close();
          expect(sink.stats().writes, 'the workers wrote the files, not the session').toBe(0);
          expect(readFileSync(join(dir!, blockFileName('pc.ram'))).equals(ram), 'the file bit for bit').toBe(true);
        } else {
          expect(sink.blocks.get('pc.ram')!.equals(ram), 'memory bit for bit').toBe(true);
        }
        expect(alive.size, 'workers alive after done').toBe(0);
      } finally {
        clearInterval(writer);
        process.off('worker', onWorker);
        await relay.close();
        await dst.close();
        if (dir) await rm(dir, { recursive: true, force: true });
      }
    }, 90_000);
  }
});
