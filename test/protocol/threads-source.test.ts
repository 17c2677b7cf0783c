/**
 * SourceSession with `threads` (each channel in its own worker thread) →
 * DestinationSession, library to library over loopback, a guest that keeps
 * writing: precopy and postcopy with preempt, RAM bit for bit, every
 * requested page answered with its reason; the fallback where threads are
 * impossible (Node 22, memory that is not shared) and the typed error when
 * they are forced there.
 */
import { randomFillSync } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { DestinationSession, type DestinationResult } from '../../src/protocol/destination.js';
import { InMemorySink } from '../../src/protocol/memory.js';
import { InMemorySource } from '../../src/protocol/memory-source.js';
import type { PostcopyPolicy } from '../../src/protocol/postcopy-policy.js';
import type { PageRequestResult } from '../../src/protocol/page-tracker.js';
import { SourceSession, type AnswerReason, type DeviceStateSection, type SourceStats } from '../../src/protocol/source.js';
import { AUTO_THREADS_MIN_CORES, setAvailableCoresForTest, socketTransferSupported } from '../../src/transport/worker/support.js';
import { leftAfter, resourceSnapshot } from '../support/resources.js';

const MiB = 1024 * 1024;
const PAGE = 4096;
const RAM = 24 * MiB;
const HOT = { start: 4 * MiB, end: 12 * MiB };
const threadsPossible = socketTransferSupported();

const DEVICES: DeviceStateSection[] = [
  { idstr: 'timer', instanceId: 0, versionId: 2, data: randomFillSync(Buffer.alloc(24)) },
  { idstr: 'cpu', instanceId: 0, versionId: 12, data: randomFillSync(Buffer.alloc(1851)) },
];

/** A guest in shared memory: a third of its pages hold data; it rewrites 200 random pages of HOT every 10 ms until stopped. */
class Workload {
  readonly source: InMemorySource;
  private timer: NodeJS.Timeout | undefined;
  private readonly noise = Buffer.alloc(16);

  constructor(shared = true) {
    this.source = new InMemorySource(
      [
        { idstr: 'pc.ram', length: RAM },
        { idstr: 'pc.bios', length: 256 * 1024 },
      ],
      { shared },
    );
    const ram = this.source.memory.get('pc.ram')!;
    for (let p = 0; p < RAM; p += 3 * PAGE) randomFillSync(ram, p, PAGE);
    randomFillSync(this.source.memory.get('pc.bios')!);
  }

  start(): void {
    this.timer = setInterval(() => {
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

interface Outcome {
  stats: SourceStats;
  result: DestinationResult;
  guest: Workload;
  sink: InMemorySink;
  answers: Map<string, AnswerReason[]>;
  demand: PageRequestResult[];
}

/** Once the destination runs, it touches pc.ram from the top down (against the background stream), four faults in flight. */
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

async function migrate(policy: PostcopyPolicy, preempt: boolean): Promise<Outcome> {
  const postcopy = policy !== 'never';
  const sink = new InMemorySink();
  const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, postcopy, idleTimeoutMs: 10_000, transport: { main: { tuning: { noDelay: true } } } });
  const guest = new Workload();
  const demand: PageRequestResult[] = [];
  const faulting = postcopy ? faultTopDown(dst, demand) : Promise.resolve();
  const src = new SourceSession({
    to: dst.uri,
    memory: guest.source,
    machineType: 'pc-q35-10.0',
    devices: DEVICES,
    postcopy: policy,
    preempt,
    threads: 'on',
    bandwidthLimit: 48 * MiB,
    postcopyBandwidthLimit: 32 * MiB,
    downtimeLimitMs: 1,
    maxPasses: 3,
    stopVm: () => guest.stop(),
  });
  const answers = new Map<string, AnswerReason[]>();
  src.on('page-request', (r) => {
    const k = `${r.block}+${r.offset}`;
    answers.set(k, [...(answers.get(k) ?? []), r.reason]);
    expect(r.channel).toBe(r.reason === 'preempt' ? 'preempt' : 'main');
  });
  guest.start();
  src.start();
  try {
    const [stats, result] = await Promise.all([src.done, dst.done]);
    await faulting;
    return { stats, result, guest, sink, answers, demand };
  } finally {
    guest.stop();
    dst.close();
  }
}

function expectIdentical(o: Outcome): void {
  expect(o.stats.status).toBe('completed');
  expect(o.result.complete).toBe(true);
  for (const [name, mem] of o.guest.source.memory) {
    const got = o.sink.blocks.get(name)!;
    let at = -1;
    for (let off = 0; off < mem.length && at < 0; off += PAGE) if (mem.compare(got, off, off + PAGE, off, off + PAGE) !== 0) at = off;
    expect(at, `${name}: first differing page at +0x${at.toString(16)}`).toBe(-1);
  }
  expect(o.result.devices.map((d) => Buffer.from(d.data))).toEqual(DEVICES.map((d) => Buffer.from(d.data)));
}

describe.skipIf(!threadsPossible)('SourceSession with threads → DestinationSession (Node 26.6+)', () => {
  it('precopy, three passes over a guest that keeps writing: RAM bit for bit; main ran in a worker thread', async () => {
    const before = resourceSnapshot();
    const o = await migrate('never', false);
    expectIdentical(o);
    expect(o.stats.passes).toBe(3);
    expect(o.stats.threads?.used).toBe(true);
    expect(o.stats.threads?.channels.map((c) => c.role)).toEqual(['main']);
    expect(o.stats.threads!.channels[0]!.threadId).toBeGreaterThan(0);
    // Later passes resent what the guest rewrote; the workers' counters reached the session.
    expect(o.stats.normal).toBeGreaterThan(RAM / PAGE / 3);
    expect(o.stats.transferred).toBeGreaterThan(RAM / 3);
    console.log(`[threads-source] precopy: normal ${o.stats.normal} zero ${o.stats.duplicate}, main thread cpu ${o.stats.threads!.channels[0]!.cpuSeconds.toFixed(3)} s`);
    expect(await leftAfter(before, 2000)).toEqual([]);
  });

  it('postcopy after 1 pass with preempt: RAM bit for bit; every requested page answered once, with its reason', async () => {
    const before = resourceSnapshot();
    const o = await migrate({ afterPasses: 1 }, true);
    expectIdentical(o);
    expect(o.result.postcopy).toBe(true);
    expect(o.stats.threads?.channels.map((c) => c.role).sort()).toEqual(['main', 'preempt']);
    expect(o.demand.length).toBeGreaterThan(0);
    // Every page the destination waited for was answered, exactly once, on preempt or (already handed over) on main.
    for (const d of o.demand) {
      const got = o.answers.get(`pc.ram+${d.offset}`);
      expect(got, `pc.ram+0x${d.offset.toString(16)} answered`).toBeDefined();
      expect(got!.length).toBe(1);
    }
    const reasons = o.stats['requests-answered'];
    expect(reasons['main-no-preempt']).toBe(0);
    expect(reasons.preempt).toBeGreaterThan(0);
    expect(reasons.preempt + reasons['main-in-flight']).toBe([...o.answers.values()].reduce((s, a) => s + a.length, 0));
    expect(o.stats['postcopy-latency'].count).toBe(reasons.preempt + reasons['main-in-flight']);
    expect(o.stats.channels.preempt?.bytesSent).toBeGreaterThan(0);
    const l = o.stats['postcopy-latency'];
    console.log(`[threads-source] postcopy+preempt: requests ${o.stats['postcopy-requests']}, answered ${JSON.stringify(reasons)}, latency p50 ${l.p50} µs p99 ${l.p99} µs`);
    expect(await leftAfter(before, 2000)).toEqual([]);
  });

  it('postcopy without preempt: requests answered inside the main stream (main-no-preempt); RAM bit for bit', async () => {
    const o = await migrate({ afterPasses: 1 }, false);
    expectIdentical(o);
    const reasons = o.stats['requests-answered'];
    expect(reasons.preempt).toBe(0);
    expect(reasons['main-in-flight']).toBe(0);
    expect(reasons['main-no-preempt']).toBeGreaterThan(0);
    for (const d of o.demand) expect(o.answers.get(`pc.ram+${d.offset}`)?.length, `pc.ram+0x${d.offset.toString(16)}`).toBe(1);
  });
});

describe('threads: where they are impossible', () => {
  const opts = (memory: InMemorySource, threads?: 'auto' | 'on' | 'off') => ({ to: 'tcp:127.0.0.1:1', memory, machineType: 'pc-q35-10.0', devices: [], ...(threads ? { threads } : {}) });

  it("'on' with memory that is not shared: a RangeError 'threads-unavailable' at the call, naming why", () => {
    const e = (() => {
      try {
        new SourceSession(opts(new Workload(false).source, 'on'));
      } catch (err) {
        return err as Error & { code?: string; option?: string };
      }
      return undefined;
    })();
    expect(e).toBeInstanceOf(RangeError);
    expect(e?.code).toBe('threads-unavailable');
    expect(e?.option).toBe('threads');
    expect(e?.message).toMatch(threadsPossible ? /not shared/ : /cannot transfer a socket/);
  });

  it.skipIf(threadsPossible)("'on' on a Node that cannot transfer sockets (Node 22): the typed error names the Node version", () => {
    expect(() => new SourceSession(opts(new Workload(true).source, 'on'))).toThrow(expect.objectContaining({ code: 'threads-unavailable', message: expect.stringMatching(/Node 26\.6/) }));
  });

  it("'auto' falls back and says why; 'off' is off; a bad value is refused", async () => {
    const sink = new InMemorySink();
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink });
    const guest = new Workload(false);
    const [stats] = await Promise.all([SourceSession.migrate({ ...opts(guest.source), to: dst.uri }), dst.done]);
    expect(stats.status).toBe('completed');
    expect(sink.blocks.get('pc.ram')!.equals(guest.source.memory.get('pc.ram')!)).toBe(true);
    expect(stats.threads).toEqual({ used: false, why: expect.stringMatching(threadsPossible ? /^auto: the guest memory is not shared/ : /^auto: this Node/), channels: [] });
    expect(new SourceSession(opts(new Workload(true).source, 'off')).stats().threads).toEqual({ used: false, why: "threads: 'off'", channels: [] });
    // Shared memory: 'auto' takes threads with 4 or more cores, stays on one thread with fewer and says so; 'on' ignores the count.
    try {
      setAvailableCoresForTest(AUTO_THREADS_MIN_CORES);
      expect(new SourceSession(opts(new Workload(true).source)).stats().threads?.used).toBe(threadsPossible);
      setAvailableCoresForTest(2);
      expect(new SourceSession(opts(new Workload(true).source)).stats().threads).toEqual({
        used: false,
        why: threadsPossible ? expect.stringMatching(/^auto: 2 cores available: a thread per channel needs 4 or more/) : expect.stringMatching(/^auto: this Node/),
        channels: [],
      });
      if (threadsPossible) expect(new SourceSession(opts(new Workload(true).source, 'on')).stats().threads?.used).toBe(true);
    } finally {
      setAvailableCoresForTest(undefined);
    }
    expect(() => new SourceSession({ ...opts(new Workload(true).source), threads: 'yes' as never })).toThrow(expect.objectContaining({ code: 'bad-option', option: 'threads' }));
  });
});
