/**
 * postcopy-blocktime of a DestinationSession, through the public API: vCPU
 * contexts named in requestPage, their waits measured around the calls.
 */
import { randomFillSync } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { DestinationSession, InMemorySink, InMemorySource, SourceSession } from '../../src/index.js';

const PAGE = 4096;
const MiB = 1 << 20;
const PAGES = 1024;
const DEVICES = [{ idstr: 'timer', instanceId: 0, versionId: 2, data: Buffer.alloc(24, 3) }];

function guest(): InMemorySource {
  const buf = Buffer.alloc(PAGES * PAGE);
  randomFillSync(buf);
  return new InMemorySource(new Map([['pc.ram', buf]]));
}

describe('postcopy-blocktime (DestinationSession.stats)', () => {
  it('refuses a bad vcpus option and a vcpu id outside it, typed, at the call', async () => {
    expect(() => DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink: new InMemorySink(), vcpus: 0 })).toThrow(expect.objectContaining({ code: 'bad-option', option: 'vcpus' }));
    const sink = new InMemorySink();
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, postcopy: true, vcpus: 2 });
    const memory = guest();
    const src = new SourceSession({ to: dst.uri, memory, machineType: 'pc-q35-10.0', devices: DEVICES, postcopy: { afterPasses: 0 }, postcopyBandwidthLimit: 8 * MiB });
    const running = new Promise<void>((r) => dst.once('postcopy-run', () => r()));
    src.start();
    await running;
    for (const vcpu of [2, -1, 0.5]) {
      await expect(dst.requestPage('pc.ram', 0, { vcpu }), String(vcpu)).rejects.toMatchObject({ code: 'bad-vcpu', option: 'vcpu' });
    }
    await Promise.all([src.done, dst.done]);
    expect(sink.blocks.get('pc.ram')!.equals(memory.memory.get('pc.ram')!)).toBe(true);
  });

  it('per vCPU: the time each waited; total: only while both waited at once', async () => {
    const sink = new InMemorySink();
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, postcopy: true, vcpus: 2 });
    const memory = guest();
    // A slow background stream from the top: the low pages asked for below are not there yet.
    const src = new SourceSession({ to: dst.uri, memory, machineType: 'pc-q35-10.0', devices: DEVICES, postcopy: { afterPasses: 0 }, postcopyBandwidthLimit: 1 * MiB });
    const running = new Promise<void>((r) => dst.once('postcopy-run', () => r()));
    src.start();
    await running;
    expect(dst.stats()['postcopy-blocktime']).toBe(0);
    const waited = [0, 0];
    const latency = [0, 0];
    const asOne = async (vcpu: number, pages: number[]) => {
      for (const p of pages) {
        if (dst.hasPage('pc.ram', p * PAGE)) continue;
        const t = performance.now();
        const r = await dst.requestPage('pc.ram', p * PAGE, { vcpu });
        waited[vcpu]! += performance.now() - t;
        latency[vcpu]! += r.latencyUs / 1000;
      }
    };
    // vCPU 0 waits alone first (no total), then both wait together.
    await asOne(0, [700]);
    const alone = dst.stats();
    expect(alone['postcopy-blocktime'], 'one of two vCPUs waiting is no VM stall').toBe(0);
    expect(alone['postcopy-vcpu-blocktime'][0]).toBeGreaterThan(0);
    await Promise.all([asOne(0, [600, 601, 602]), asOne(1, [650, 651, 652])]);
    await Promise.all([src.done, dst.done]);
    const s = dst.stats();
    const [b0, b1] = s['postcopy-vcpu-blocktime'] as [number, number];
    expect(s['postcopy-vcpu-blocktime']).toHaveLength(2);
    // Inside requestPage, around the page's wait: no more than the caller saw, no less than request→page.
    for (const [v, b] of [b0, b1].entries()) {
      expect(b, `vcpu ${v}`).toBeLessThanOrEqual(waited[v]! + 0.01);
      expect(b, `vcpu ${v}`).toBeGreaterThanOrEqual(latency[v]! - 0.01);
    }
    expect(s['postcopy-blocktime']).toBeGreaterThan(0);
    expect(s['postcopy-blocktime']).toBeLessThanOrEqual(Math.min(b0, b1 + 0.01));
    expect(sink.blocks.get('pc.ram')!.equals(memory.memory.get('pc.ram')!)).toBe(true);
  });
});
