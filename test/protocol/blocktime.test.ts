import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { BlockTime } from '../../src/protocol/blocktime.js';

describe('BlockTime (postcopy-blocktime as QEMU defines it)', () => {
  it("counts QEMU's own example: only the stretch where all three vCPUs wait", () => {
    // migration/postcopy-ram.c's picture: S1 S2 E1 S3 S1 E2 E3 E1 — only S1(second)..E2 has all three down.
    const bt = new BlockTime(3);
    bt.begin(0, 0); // S1
    bt.begin(1, 5); // S2
    bt.end(0, 10); // E1
    bt.begin(2, 20); // S3
    bt.begin(0, 25); // S1: all three down from here
    bt.end(1, 32); // E2: 7 ms of total
    bt.end(2, 40); // E3
    bt.end(0, 50); // E1
    const s = bt.summary(60);
    expect(s.total).toBe(7);
    expect(s.perVcpu).toEqual([10 + 25, 27, 20]);
  });

  it('with one context (the default), every wait is total blocktime', () => {
    const bt = new BlockTime();
    bt.begin(0, 1);
    bt.end(0, 4);
    bt.begin(0, 10);
    expect(bt.summary(12)).toEqual({ total: 5, perVcpu: [5] });
  });

  it('a context that waits on several pages is blocked until the last arrives', () => {
    const bt = new BlockTime(1);
    bt.begin(0, 0);
    bt.begin(0, 2);
    bt.end(0, 3);
    bt.end(0, 9);
    expect(bt.summary(9).total).toBe(9);
  });

  it('declared vCPUs that never fault keep the total at 0', () => {
    const bt = new BlockTime(2);
    bt.begin(0, 0);
    bt.end(0, 100);
    expect(bt.summary(100)).toEqual({ total: 0, perVcpu: [100, 0] });
  });

  it('refuses bad vCPU ids and counts with typed errors', () => {
    expect(() => new BlockTime(0)).toThrow(expect.objectContaining({ code: 'bad-option', option: 'vcpus' }));
    expect(() => new BlockTime(2.5)).toThrow(RangeError);
    const bt = new BlockTime(4);
    expect(() => bt.check(4)).toThrow(expect.objectContaining({ code: 'bad-vcpu', option: 'vcpu' }));
    expect(() => bt.check(-1)).toThrow(RangeError);
    expect(() => bt.check(Number.NaN)).toThrow(TypeError);
    expect(() => new BlockTime().check(4096)).toThrow(expect.objectContaining({ code: 'bad-vcpu' }));
    expect(() => bt.check(3)).not.toThrow();
  });

  // A model that knows nothing of the algorithm: walk time unit by unit and ask who waits.
  const waits = fc.array(fc.record({ vcpu: fc.integer({ min: 0, max: 3 }), at: fc.integer({ min: 0, max: 60 }), len: fc.integer({ min: 0, max: 30 }) }), { maxLength: 25 });

  function feed(bt: BlockTime, ws: { vcpu: number; at: number; len: number }[]): void {
    const events = ws.flatMap((w) => [
      { t: w.at, begin: true, vcpu: w.vcpu },
      { t: w.at + w.len, begin: false, vcpu: w.vcpu },
    ]);
    // Time order; at one instant begins first (a wait of length 0 still has its begin before its end).
    events.sort((a, b) => a.t - b.t || Number(b.begin) - Number(a.begin));
    for (const e of events) {
      if (e.begin) bt.begin(e.vcpu, e.t);
      else bt.end(e.vcpu, e.t);
    }
  }
  const blockedAt = (ws: { vcpu: number; at: number; len: number }[], v: number, t: number) => ws.some((w) => w.vcpu === v && w.at <= t && t < w.at + w.len);

  it('declared vCPUs: total = time during which all of them wait, per vCPU = time each waits (fast-check)', () => {
    fc.assert(
      fc.property(waits, fc.integer({ min: 1, max: 4 }), (ws0, vcpus) => {
        const ws = ws0.filter((w) => w.vcpu < vcpus);
        const bt = new BlockTime(vcpus);
        feed(bt, ws);
        let total = 0;
        const per = Array.from({ length: vcpus }, () => 0);
        for (let t = 0; t < 100; t++) {
          let all = true;
          for (let v = 0; v < vcpus; v++) {
            if (blockedAt(ws, v, t)) per[v]!++;
            else all = false;
          }
          if (all) total++;
        }
        const s = bt.summary(100);
        expect(s.total).toBe(total);
        expect(s.perVcpu).toEqual(per);
      }),
    );
  });

  it('undeclared: "all" is every vCPU seen so far (fast-check)', () => {
    fc.assert(
      fc.property(waits, (ws) => {
        const bt = new BlockTime();
        feed(bt, ws);
        const seenBy = (t: number) => ws.filter((w) => w.at <= t).reduce((m, w) => Math.max(m, w.vcpu + 1), 0);
        let total = 0;
        for (let t = 0; t < 100; t++) {
          const n = seenBy(t);
          let all = n > 0;
          for (let v = 0; v < n && all; v++) all = blockedAt(ws, v, t);
          if (all) total++;
        }
        expect(bt.summary(100).total).toBe(total);
      }),
    );
  });
});
