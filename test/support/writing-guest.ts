/**
 * The guest of the DirectorySink-with-threads tests: shared memory (so that
 * the source's channel threads read it), and a destination that faults it in.
 */
import { randomFillSync } from 'node:crypto';
import type { DestinationSession } from '../../src/protocol/destination.js';
import { InMemorySource } from '../../src/protocol/memory-source.js';

const PAGE = 4096;

/** A guest in shared memory: `ramBytes` of pc.ram with data in a third of its pages, and a BIOS; `start` rewrites 100 random pages every 10 ms until `stop`. */
export function writingGuest(ramBytes: number): { source: InMemorySource; start: () => void; stop: () => void } {
  const source = new InMemorySource(
    [
      { idstr: 'pc.ram', length: ramBytes },
      { idstr: 'pc.bios', length: 256 * 1024 },
    ],
    { shared: true },
  );
  const ram = source.memory.get('pc.ram')!;
  for (let p = 0; p < ramBytes; p += 3 * PAGE) randomFillSync(ram, p, PAGE);
  randomFillSync(source.memory.get('pc.bios')!);
  let timer: NodeJS.Timeout | undefined;
  const noise = Buffer.alloc(64);
  return {
    source,
    start: () => {
      timer = setInterval(() => {
        for (let i = 0; i < 100; i++) source.write('pc.ram', Math.floor(Math.random() * (ramBytes / PAGE)) * PAGE + 64 * Math.floor(Math.random() * 60), randomFillSync(noise));
      }, 10);
    },
    stop: () => clearInterval(timer),
  };
}

/** Once the destination runs, it touches pc.ram (`ramBytes`) from the top down, every 7th page, four faults in flight. */
export function faultTopDown(dst: DestinationSession, ramBytes: number): void {
  dst.once('postcopy-run', () => {
    void (async () => {
      const inFlight = new Set<Promise<unknown>>();
      for (let off = ramBytes - PAGE; off >= 0; off -= 7 * PAGE) {
        if (dst.hasPage('pc.ram', off)) continue;
        const st = dst.stats().status;
        if (st === 'completed' || st === 'failed') break;
        const p: Promise<unknown> = dst.requestPage('pc.ram', off).catch(() => undefined);
        inFlight.add(p);
        void p.then(() => inFlight.delete(p));
        if (inFlight.size >= 4) await Promise.race(inFlight);
      }
    })();
  });
}
