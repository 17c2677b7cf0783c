import { describe, expect, it } from 'vitest';
import { parsePostcopyPolicy } from '../../src/protocol/postcopy-policy.js';
import { demoJson, formatDemoReport, runDemo } from '../../src/cli/demo.js';

describe('qmt demo (npm start)', () => {
  it('migrates a synthetic guest over two TLS channels with postcopy after one pass, memory identical', async () => {
    const lines: string[] = [];
    const r = await runDemo({ sizeMiB: 128, policy: parsePostcopyPolicy('after:1'), workload: 'video', tls: true, preempt: true, log: (l) => lines.push(l) });
    expect(r.memoryIdentical).toBe(true);
    expect(r.postcopy).toBe(true);
    expect(r.passes).toBe(1);
    // Whether the guest faults depends on how far the background stream got; every fault is one request at the source.
    expect(r.source['postcopy-requests']).toBe(r.faults.count);
    expect(lines.some((l) => l.includes('VM stopped'))).toBe(true);
    expect(formatDemoReport(r)).toMatch(/memory +identical at both ends/);
    // postcopy-blocktime: 16 vCPUs, the all-waiting time within each one's own.
    expect(r.vcpuBlocktimeMs).toHaveLength(16);
    expect(r.blocktimeMs).toBeLessThanOrEqual(Math.min(...r.vcpuBlocktimeMs) + 0.001);
    if (r.faults.count === 0) expect(r.blocktimeMs).toBe(0);
    const json = demoJson(r);
    expect(json.stallMs).toBeCloseTo(r.downtimeMs! + r.blocktimeMs, 3);
    expect(formatDemoReport(r)).toMatch(/stall +[\d.]+ ms \(downtime \+ blocktime/);
  }, 60_000);

  it('postcopy at once: the vCPUs wait, and the stall counts it', async () => {
    const r = await runDemo({ sizeMiB: 64, policy: parsePostcopyPolicy('after:0'), workload: 'video', tls: false, preempt: true, log: () => undefined });
    expect(r.memoryIdentical).toBe(true);
    expect(r.faults.count).toBeGreaterThan(0);
    expect(r.blocktimeMs).toBeGreaterThan(0);
    expect(Math.min(...r.vcpuBlocktimeMs)).toBeGreaterThanOrEqual(r.blocktimeMs - 0.001);
    expect(demoJson(r).stallMs).toBeGreaterThan(r.downtimeMs!);
  }, 60_000);

  it('precopy only, plain TCP', async () => {
    const r = await runDemo({ sizeMiB: 64, policy: 'never', workload: 'idle', tls: false, preempt: false, log: () => undefined });
    expect(r.memoryIdentical).toBe(true);
    expect(r.postcopy).toBe(false);
    expect(r.faults.count).toBe(0);
  }, 60_000);
});
