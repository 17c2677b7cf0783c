/**
 * SourceSession → DestinationSession, library to library over loopback: an
 * InMemorySource whose "guest" keeps rewriting memory until the switchover
 * (precopy with several passes, with and without XBZRLE; postcopy after 1 and
 * 2 passes, with preempt, and on a manual switch in the middle of the first
 * pass). At the end the destination's RAM equals the source's, bit for bit,
 * and so do the device sections; in postcopy the destination's demand
 * requests were answered (with preempt: every one on the preempt channel, or
 * on main only when it was already in flight there).
 */
import { randomFillSync } from 'node:crypto';
import { performance } from 'node:perf_hooks';
import { describe, expect, it } from 'vitest';
import { DestinationSession, type DestinationResult } from '../../src/protocol/destination.js';
import { InMemorySink } from '../../src/protocol/memory.js';
import { InMemorySource } from '../../src/protocol/memory-source.js';
import type { PostcopyPolicy } from '../../src/protocol/postcopy-policy.js';
import type { PageRequestResult } from '../../src/protocol/page-tracker.js';
import { SourceSession, type AnswerReason, type DeviceStateSection, type SourceStats } from '../../src/protocol/source.js';

const MiB = 1024 * 1024;
const PAGE = 4096;
const RAM = 32 * MiB;
/** The region the workload rewrites: 16 MiB, about 200 pages every 10 ms. */
const HOT = { start: 4 * MiB, end: 20 * MiB };
const BANDWIDTH = 64 * MiB;

/**
 * A guest in memory: a third of its pages hold data, the rest are zero; once
 * started, every 10 ms it changes a few bytes in 200 random pages of HOT
 * (small changes: XBZRLE can encode them), until stopped.
 */
class Workload {
  readonly source: InMemorySource;
  ticks = 0;
  private timer: NodeJS.Timeout | undefined;
  private readonly noise = Buffer.alloc(16);

  constructor() {
    this.source = new InMemorySource([
      { idstr: 'pc.ram', length: RAM },
      { idstr: 'pc.bios', length: 256 * 1024 },
    ]);
    const ram = this.source.memory.get('pc.ram')!;
    for (let p = 0; p < RAM; p += 3 * PAGE) randomFillSync(ram, p, PAGE);
    randomFillSync(this.source.memory.get('pc.bios')!);
  }

  start(): void {
    this.timer = setInterval(() => {
      this.ticks++;
      const pages = (HOT.end - HOT.start) / PAGE;
      for (let i = 0; i < 200; i++) {
        const page = HOT.start + Math.floor(Math.random() * pages) * PAGE;
        randomFillSync(this.noise);
        this.source.write('pc.ram', page + Math.floor(Math.random() * (PAGE / 16)) * 16, this.noise);
      }
    }, 10);
  }

  stop(): void {
    clearInterval(this.timer);
  }
}

const DEVICES: DeviceStateSection[] = [
  { idstr: 'timer', instanceId: 0, versionId: 2, data: randomFillSync(Buffer.alloc(24)) },
  { idstr: 'cpu', instanceId: 0, versionId: 12, data: randomFillSync(Buffer.alloc(1851)) },
  { idstr: 'serial', instanceId: 0, versionId: 3, data: randomFillSync(Buffer.alloc(37)) },
];

interface Case {
  name: string;
  policy: PostcopyPolicy;
  preempt?: boolean;
  xbzrle?: boolean;
  /** Manual: call startPostcopy() this long after start. */
  switchAfterMs?: number;
}

interface Outcome {
  stats: SourceStats;
  result: DestinationResult;
  source: Workload;
  sink: InMemorySink;
  answered: { main: number; preempt: number };
  reasons: Record<AnswerReason, number>;
  demand: PageRequestResult[];
  remainingAtSwitch: number | undefined;
  ms: number;
}

/**
 * Once the destination runs (POSTCOPY_RUN), it touches pc.ram from the top
 * down, against the order of the background stream, four faults in flight
 * at a time, until everything is there or the migration ends.
 */
function faultTopDown(dst: DestinationSession, out: PageRequestResult[]): Promise<void> {
  return new Promise((resolve) => {
    dst.once('postcopy-run', () => {
      void (async () => {
        const inFlight = new Set<Promise<void>>();
        for (let off = RAM - PAGE; off >= 0; off -= PAGE) {
          if (dst.hasPage('pc.ram', off)) continue;
          const p: Promise<void> = dst.requestPage('pc.ram', off).then(
            (r) => {
              if (r.requested) out.push(r);
            },
            () => undefined,
          );
          const tracked = p.then(() => {
            inFlight.delete(tracked);
          });
          inFlight.add(tracked);
          if (inFlight.size >= 4) await Promise.race(inFlight);
          if (dst.stats().status === 'completed' || dst.stats().status === 'failed') break;
        }
        await Promise.all(inFlight);
      })().then(resolve);
    });
    dst.done.then(
      () => resolve(),
      () => resolve(),
    );
  });
}

async function migrate(c: Case): Promise<Outcome> {
  const postcopy = c.policy !== 'never';
  const sink = new InMemorySink();
  // TCP_NODELAY on the return path, as qmt receive: requests go out at once.
  const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, postcopy, idleTimeoutMs: 10_000, transport: { main: { tuning: { noDelay: true } } } });
  const guest = new Workload();
  const demand: PageRequestResult[] = [];
  const faulting = postcopy ? faultTopDown(dst, demand) : Promise.resolve();
  const src = new SourceSession({
    to: dst.uri,
    memory: guest.source,
    machineType: 'pc-q35-10.0',
    devices: DEVICES,
    postcopy: c.policy,
    preempt: c.preempt ?? false,
    bandwidthLimit: BANDWIDTH,
    postcopyBandwidthLimit: BANDWIDTH,
    // Precopy never converges by itself: three passes, then the rest with the VM stopped.
    downtimeLimitMs: 1,
    maxPasses: 3,
    ...(c.xbzrle ? { xbzrleCacheBytes: 16 * MiB } : {}),
    stopVm: () => guest.stop(),
  });
  const answered = { main: 0, preempt: 0 };
  const reasons: Record<AnswerReason, number> = { preempt: 0, 'main-in-flight': 0, 'main-no-preempt': 0 };
  let remainingAtSwitch: number | undefined;
  src.on('page-request', (r) => {
    answered[r.channel]++;
    reasons[r.reason]++;
  });
  src.on('postcopy-active', () => (remainingAtSwitch = src.stats().remaining));
  const t0 = performance.now();
  guest.start();
  src.start();
  const timer = c.switchAfterMs !== undefined ? setTimeout(() => src.startPostcopy(), c.switchAfterMs) : undefined;
  try {
    const [stats, result] = await Promise.all([src.done, dst.done]);
    await faulting;
    return { stats, result, source: guest, sink, answered, reasons, demand, remainingAtSwitch, ms: Math.round(performance.now() - t0) };
  } finally {
    clearTimeout(timer);
    guest.stop();
    dst.close();
  }
}

function firstDifference(a: Buffer, b: Buffer | undefined): number {
  if (!b || a.length !== b.length) return 0;
  for (let off = 0; off < a.length; off += PAGE) if (a.compare(b, off, off + PAGE, off, off + PAGE) !== 0) return off;
  return -1;
}

function expectIdentical(o: Outcome): void {
  expect(o.stats.status).toBe('completed');
  expect(o.result.complete).toBe(true);
  for (const [name, mem] of o.source.source.memory) {
    const at = firstDifference(mem, o.sink.blocks.get(name));
    expect(at, `${name}: first differing page at +0x${at.toString(16)}`).toBe(-1);
  }
  expect(o.result.devices.map((d) => ({ idstr: d.idstr, instanceId: d.instanceId, versionId: d.versionId, data: d.data }))).toEqual(
    DEVICES.map((d) => ({ idstr: d.idstr, instanceId: d.instanceId, versionId: d.versionId, data: Buffer.from(d.data) })),
  );
}

function summary(name: string, o: Outcome): string {
  const l = o.stats['postcopy-latency'];
  return (
    `[source lib] ${name}: ${o.ms} ms, passes ${o.stats.passes}, workload ticks ${o.source.ticks}, downtime ${o.stats.downtime} ms, ` +
    `normal ${o.stats.normal} zero ${o.stats.duplicate} xbzrle ${o.stats.xbzrle}, remaining at switch ${o.remainingAtSwitch === undefined ? '-' : `${o.remainingAtSwitch / PAGE} pages`}, ` +
    `requests ${o.stats['postcopy-requests']} (main ${o.answered.main}, preempt ${o.answered.preempt}), latency p50 ${l.p50} µs p99 ${l.p99} µs`
  );
}

describe('SourceSession → DestinationSession with a guest that keeps writing', () => {
  it.each<Case>([
    { name: 'precopy', policy: 'never' },
    { name: 'precopy with XBZRLE', policy: 'never', xbzrle: true },
  ])('$name: three passes, then the rest with the VM stopped; RAM bit for bit', async (c) => {
    const o = await migrate(c);
    console.log(summary(c.name, o));
    expectIdentical(o);
    expect(o.stats.passes).toBe(3);
    expect(o.result.postcopy).toBe(false);
    expect(o.stats['postcopy-requests']).toBe(0);
    // Later passes resent pages the guest rewrote.
    expect(o.stats.normal + o.stats.xbzrle).toBeGreaterThan(RAM / PAGE / 3);
    if (c.xbzrle) expect(o.stats.xbzrle).toBeGreaterThan(0);
    else expect(o.stats.xbzrle).toBe(0);
  });

  it.each<Case>([
    { name: 'postcopy after 1 pass', policy: { afterPasses: 1 } },
    { name: 'postcopy after 2 passes', policy: { afterPasses: 2 } },
    { name: 'postcopy after 1 pass with preempt', policy: { afterPasses: 1 }, preempt: true },
    { name: 'postcopy on a manual switch in the first pass', policy: 'manual', switchAfterMs: 150 },
  ])('$name: demand requests answered; RAM bit for bit', async (c) => {
    const o = await migrate(c);
    console.log(summary(c.name, o));
    expectIdentical(o);
    expect(o.result.postcopy).toBe(true);
    const passes = typeof c.policy === 'object' ? c.policy.afterPasses : 0;
    expect(o.stats.passes).toBe(passes);
    // The guest ran on: pages dirty again (or never sent) were left for postcopy.
    expect(o.remainingAtSwitch).toBeGreaterThan(0);
    expect(o.demand.length, 'demand requests answered at the destination').toBeGreaterThan(0);
    expect(o.stats['postcopy-requests']).toBeGreaterThan(0);
    expect(o.answered.main + o.answered.preempt).toBeGreaterThan(0);
    expect(o.stats['postcopy-latency'].count).toBe(o.answered.main + o.answered.preempt);
    expect(o.stats['requests-answered']).toEqual(o.reasons);
    if (c.preempt) {
      // On main only pages already handed to it before their request (see Requests in src/protocol/source/requests.ts).
      expect(o.reasons['main-in-flight'], 'requests answered on the main channel').toBe(o.answered.main);
      expect(o.reasons['main-no-preempt']).toBe(0);
      expect(o.reasons.preempt).toBe(o.answered.preempt);
      expect(o.stats.channels.preempt?.bytesSent).toBeGreaterThan(0);
      expect(o.result.stats['preempt-pages']).toBeGreaterThanOrEqual(o.answered.preempt);
    } else {
      expect(o.answered.preempt).toBe(0);
      expect(o.reasons['main-no-preempt']).toBe(o.answered.main);
      expect(o.stats.channels.preempt).toBeUndefined();
      expect(o.result.stats['preempt-pages']).toBe(0);
    }
  });
});
