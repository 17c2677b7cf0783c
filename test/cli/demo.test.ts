import { describe, expect, it } from 'vitest';
import { parsePostcopyPolicy } from '../../src/protocol/postcopy-policy.js';
import { formatDemoReport, runDemo } from '../../src/cli/demo.js';

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
  }, 60_000);

  it('precopy only, plain TCP', async () => {
    const r = await runDemo({ sizeMiB: 64, policy: 'never', workload: 'idle', tls: false, preempt: false, log: () => undefined });
    expect(r.memoryIdentical).toBe(true);
    expect(r.postcopy).toBe(false);
    expect(r.faults.count).toBe(0);
  }, 60_000);
});
