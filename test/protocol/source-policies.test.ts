import { randomFillSync } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { DestinationSession, InMemorySink, InMemorySource, SourceSession, autoWantsPostcopy, parsePostcopyPolicy } from '../../src/index.js';

const MiB = 1 << 20;

/** A guest whose first `hot` bytes are rewritten every 2 ms until it is stopped. */
function busyGuest(size: number, hot: number) {
  const memory = new InMemorySource([{ idstr: 'pc.ram', length: size }]);
  const ram = memory.memory.get('pc.ram')!;
  for (let p = 0; p < size; p += 2 * 4096) randomFillSync(ram, p, 4096);
  const noise = Buffer.alloc(16);
  const timer = setInterval(() => {
    for (let i = 0; i < 512; i++) {
      const off = Math.floor(Math.random() * (hot / 4096)) * 4096 + 100;
      memory.write('pc.ram', off, randomFillSync(noise));
    }
  }, 2);
  return { memory, stop: () => clearInterval(timer) };
}

async function migrate(opts: { postcopy: 'auto' | 'never'; xbzrle?: boolean }) {
  const guest = busyGuest(32 * MiB, 8 * MiB);
  const sink = new InMemorySink();
  const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, postcopy: opts.postcopy !== 'never' });
  const src = new SourceSession({
    to: dst.uri,
    memory: guest.memory,
    machineType: 'pc-q35-10.0',
    devices: [{ idstr: 'timer', instanceId: 0, versionId: 2, data: Buffer.alloc(24, 3) }],
    postcopy: opts.postcopy,
    stopVm: guest.stop,
    // A slow link and a tight downtime budget: the hot set never fits.
    bandwidthLimit: 24 * MiB,
    downtimeLimitMs: 5,
    maxPasses: 6,
    ...(opts.xbzrle ? { xbzrleCacheBytes: 16 * MiB } : {}),
  });
  const passes: number[] = [];
  src.on('pass', (p) => passes.push(p.dirtyPages));
  src.start();
  const [stats, result] = await Promise.all([src.done, dst.done]);
  guest.stop();
  return { stats, result, passes, identical: sink.blocks.get('pc.ram')!.equals(guest.memory.memory.get('pc.ram')!) };
}

describe('SourceSession policies', () => {
  it("'auto' switches to postcopy once a pass stops shrinking the dirty set", async () => {
    const r = await migrate({ postcopy: 'auto' });
    expect(r.result.postcopy).toBe(true);
    expect(r.stats.passes).toBeGreaterThanOrEqual(1);
    expect(r.stats.passes).toBeLessThan(6);
    expect(r.identical).toBe(true);
  }, 60_000);

  it('XBZRLE: pages resent in later passes go as deltas, and memory still matches', async () => {
    const r = await migrate({ postcopy: 'never', xbzrle: true });
    expect(r.result.postcopy).toBe(false);
    expect(r.stats.passes).toBeGreaterThanOrEqual(2);
    expect(r.stats.xbzrle).toBeGreaterThan(0);
    expect(r.result.stats.xbzrle).toBe(r.stats.xbzrle);
    expect(r.identical).toBe(true);
  }, 60_000);

  it('the auto rule and the policy parser', () => {
    const base = { passes: 1, dirtyPages: 1000, previousDirtyPages: 1100, expectedDowntimeMs: 900, downtimeLimitMs: 300 };
    expect(autoWantsPostcopy(base)).toBe(true);
    expect(autoWantsPostcopy({ ...base, passes: 0 })).toBe(false); // never before one full pass
    expect(autoWantsPostcopy({ ...base, expectedDowntimeMs: 200 })).toBe(false); // converging
    expect(autoWantsPostcopy({ ...base, dirtyPages: 500 })).toBe(false); // still shrinking fast
    expect(parsePostcopyPolicy('after:2')).toEqual({ afterPasses: 2 });
    expect(parsePostcopyPolicy('manual')).toBe('manual');
    expect(() => parsePostcopyPolicy('later')).toThrow(/never, manual, auto or after:N/);
  });
});
