/**
 * A threaded SourceSession with multifd (each multifd channel in its own
 * worker thread: socket, TLS, packets, page reads from the shared memory)
 * → DestinationSession over loopback, 2 and 4 channels, plain and TLS, from
 * a guest that keeps rewriting memory: RAM bit for bit, the pages went on
 * the multifd channels, every pass ended with a barrier (setup, each pass,
 * END: the destination counts the SYNCs), every thread ended by itself.
 * Postcopy with preempt after a multifd pass (QEMU 10.1's order). A multifd
 * channel cut in precopy fails the source typed, naming `multifd-N`, and
 * every thread ends.
 */
import { randomFillSync } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DestinationSession, type DestinationResult } from '../../src/protocol/destination.js';
import { MigrationError } from '../../src/protocol/errors.js';
import { InMemorySink } from '../../src/protocol/memory.js';
import { InMemorySource } from '../../src/protocol/memory-source.js';
import type { PageRequestResult } from '../../src/protocol/page-tracker.js';
import { SourceSession, type SourceStats } from '../../src/protocol/source.js';
import { TransportError } from '../../src/transport/errors.js';
import { initPkiDir } from '../../src/transport/pki.js';
import { socketTransferSupported } from '../../src/transport/worker/support.js';
import { FaultRelay } from '../faults/relay.js';
import { leftAfter, resourceSnapshot } from '../support/resources.js';

const MiB = 1 << 20;
const PAGE = 4096;
const RAM = 16 * MiB;
const HOT = { start: 2 * MiB, end: 8 * MiB };

let work: string;
let pkiDir: string;

beforeAll(async () => {
  work = await mkdtemp(join(tmpdir(), 'qmt-threads-mfd-'));
  pkiDir = join(work, 'pki');
  await initPkiDir(pkiDir);
});
afterAll(async () => {
  if (work) await rm(work, { recursive: true, force: true });
});

/** A guest in shared memory: a third of its pages hold data; once started it rewrites 100 random pages of HOT every 10 ms. */
class Workload {
  readonly source: InMemorySource;
  private timer: NodeJS.Timeout | undefined;
  private readonly noise = Buffer.alloc(64);
  /** `full`: every page random (a throughput figure), `ram` bytes of pc.ram. */
  constructor(ram = RAM, full = false) {
    this.source = new InMemorySource(
      [
        { idstr: 'pc.ram', length: ram },
        { idstr: 'pc.bios', length: 256 * 1024 },
      ],
      { shared: true },
    );
    const mem = this.source.memory.get('pc.ram')!;
    if (full) randomFillSync(mem);
    else for (let p = 0; p < ram; p += 3 * PAGE) randomFillSync(mem, p, PAGE);
    randomFillSync(this.source.memory.get('pc.bios')!);
  }
  start(): void {
    this.timer = setInterval(() => {
      for (let i = 0; i < 100; i++) {
        const page = HOT.start + Math.floor(Math.random() * ((HOT.end - HOT.start) / PAGE)) * PAGE;
        randomFillSync(this.noise);
        this.source.write('pc.ram', page + 64 * Math.floor(Math.random() * 64), this.noise);
      }
    }, 10);
  }
  stop(): void {
    clearInterval(this.timer);
  }
}

/** Once the destination runs, it touches pc.ram from the top down, four faults at a time. */
function faultTopDown(dst: DestinationSession, out: PageRequestResult[]): Promise<void> {
  return new Promise((resolve) => {
    dst.once('postcopy-run', () => {
      void (async () => {
        const inFlight = new Set<Promise<void>>();
        for (let off = RAM - PAGE; off >= 0; off -= PAGE) {
          if (dst.hasPage('pc.ram', off)) continue;
          const tracked: Promise<void> = dst
            .requestPage('pc.ram', off)
            .then(
              (r) => {
                if (r.requested) out.push(r);
              },
              () => undefined,
            )
            .then(() => {
              inFlight.delete(tracked);
            });
          inFlight.add(tracked);
          if (inFlight.size >= 4) await Promise.race(inFlight);
          const st = dst.stats().status;
          if (st === 'completed' || st === 'failed') break;
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

async function threadsEnded(stats: () => SourceStats, count: number): Promise<SourceStats['threads']> {
  const deadline = Date.now() + 5000;
  for (;;) {
    const t = stats().threads!;
    if ((t.channels.length === count && t.channels.every((c) => c.ended)) || Date.now() > deadline) return t;
    await new Promise((r) => setTimeout(r, 20));
  }
}

interface Outcome {
  src: SourceSession;
  stats: SourceStats;
  result: DestinationResult;
  guest: Workload;
  sink: InMemorySink;
  demand: PageRequestResult[];
  order: string[];
  ms: number;
}

async function migrate(channels: number, tls: boolean, postcopy: boolean, opts: { bandwidthLimit?: number; guestWrites?: boolean; fullRam?: number } = {}): Promise<Outcome> {
  const sink = new InMemorySink();
  const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, postcopy, multifd: { channels }, idleTimeoutMs: 20_000, ...(tls ? { transport: { tls: { dir: pkiDir } } } : {}) });
  const order: string[] = [];
  dst.on('channel', (c) => order.push(c.role === 'multifd' ? `multifd-${c.stats.id ?? '?'}` : c.role));
  const guest = opts.fullRam ? new Workload(opts.fullRam, true) : new Workload();
  const demand: PageRequestResult[] = [];
  const faulting = postcopy ? faultTopDown(dst, demand) : Promise.resolve();
  const src = new SourceSession({
    to: dst.uri,
    ...(tls ? { transport: { tls: { dir: pkiDir, hostname: 'localhost' } } } : {}),
    memory: guest.source,
    machineType: 'pc-q35-10.0',
    devices: [{ idstr: 'cpu', instanceId: 0, versionId: 12, data: randomFillSync(Buffer.alloc(1851)) }],
    multifd: { channels },
    threads: 'on',
    postcopy: postcopy ? { afterPasses: 1 } : 'never',
    preempt: postcopy,
    ...(opts.bandwidthLimit === undefined ? { bandwidthLimit: 48 * MiB } : opts.bandwidthLimit > 0 ? { bandwidthLimit: opts.bandwidthLimit } : {}),
    postcopyBandwidthLimit: 48 * MiB,
    downtimeLimitMs: 1,
    maxPasses: 3,
    stopVm: () => guest.stop(),
  });
  if (opts.guestWrites !== false) guest.start();
  const t0 = performance.now();
  src.start();
  try {
    const [stats, result] = await Promise.all([src.done, dst.done]);
    const ms = performance.now() - t0;
    await faulting;
    return { src, stats, result, guest, sink, demand, order, ms };
  } finally {
    guest.stop();
    dst.close();
  }
}

function expectIdentical(o: Outcome): void {
  expect(o.stats.status).toBe('completed');
  expect(o.result.complete).toBe(true);
  for (const [name, mem] of o.guest.source.memory) {
    const got = o.sink.blocks.get(name);
    let at = -1;
    if (!got || got.length !== mem.length) at = 0;
    else for (let off = 0; off < mem.length && at < 0; off += PAGE) if (mem.compare(got, off, off + PAGE, off, off + PAGE) !== 0) at = off;
    expect(at, `${name}: first differing page at +0x${at.toString(16)}`).toBe(-1);
  }
}

function expectPagesOnMultifd(stats: SourceStats, channels: number): void {
  const mf = stats.channels.multifd ?? [];
  expect(mf.map((c) => c.id)).toEqual(Array.from({ length: channels }, (_, i) => i));
  for (const c of mf) expect(c.bytesSent, `multifd-${c.id}`).toBeGreaterThan(256 * 1024);
  expect(mf.reduce((n, c) => n + c.bytesSent, 0)).toBeGreaterThan(RAM / 3);
}

describe.skipIf(!socketTransferSupported())('threaded SourceSession with multifd → DestinationSession (Node 26.6+)', () => {
  it.each([2, 4].flatMap((channels) => [false, true].map((tls) => ({ channels, tls }))))(
    'precopy, $channels multifd channels in worker threads (TLS $tls): RAM bit for bit, pages on multifd, a barrier per pass, every thread ended by itself',
    async ({ channels, tls }) => {
      const o = await migrate(channels, tls, false);
      expectIdentical(o);
      expect(o.result.postcopy).toBe(false);
      expectPagesOnMultifd(o.stats, channels);
      expect(o.stats.channels.main!.bytesSent).toBeLessThan(256 * 1024);
      const mf = o.result.stats.multifd!;
      // Counters batched from the workers agree with what the destination received.
      expect({ normal: mf.normal, zero: mf.zero }).toEqual({ normal: o.stats.normal, zero: o.stats.duplicate });
      expect(mf.syncs).toBe(o.stats.passes + 2);
      expect(o.order[0]).toBe('main');
      expect(o.order.slice(1).sort()).toEqual(Array.from({ length: channels }, (_, i) => `multifd-${i}`).sort());
      expect(o.stats.threads?.used).toBe(true);
      const t = await threadsEnded(() => o.src.stats(), channels + 1);
      expect(t!.channels.map((c) => [c.role, c.ended])).toEqual([['main', 'by-itself'], ...Array.from({ length: channels }, () => ['multifd', 'by-itself'])]);
      if (tls) for (const c of o.stats.channels.multifd!) expect(c.tls?.protocol).toBe('TLSv1.3');
    },
    60_000,
  );

  it('postcopy with preempt after a threaded multifd pass (QEMU 10.1 order, TLS): requests answered on preempt, RAM bit for bit', async () => {
    const o = await migrate(2, true, true);
    expectIdentical(o);
    expect(o.result.postcopy).toBe(true);
    expect(o.stats.passes).toBe(1);
    expectPagesOnMultifd(o.stats, 2);
    expect(o.result.stats.multifd!.syncs).toBe(3);
    expect(o.order).toHaveLength(4);
    expect(o.order[0]).toBe('main');
    expect(o.order.slice(1, 3).sort()).toEqual(['multifd-0', 'multifd-1']);
    expect(o.order[3]).toBe('preempt');
    expect(o.demand.length).toBeGreaterThan(0);
    expect(o.stats['requests-answered']['main-no-preempt']).toBe(0);
    const t = await threadsEnded(() => o.src.stats(), 4);
    expect(t!.channels.map((c) => [c.role, c.ended]).sort()).toEqual([['main', 'by-itself'], ['multifd', 'by-itself'], ['multifd', 'by-itself'], ['preempt', 'by-itself']]);
  }, 60_000);

  it('a multifd channel cut in precopy: the source fails typed naming multifd-N, every thread ends, nothing left open', async () => {
    const before = resourceSnapshot();
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink: new InMemorySink(), multifd: { channels: 2 }, idleTimeoutMs: 20_000 });
    dst.done.catch(() => undefined);
    const relay = await FaultRelay.start({ target: dst.uri, maxConnections: 8 });
    const guest = new Workload();
    const src = new SourceSession({ to: relay.uri, memory: guest.source, machineType: 'pc-q35-10.0', devices: [], multifd: { channels: 2 }, threads: 'on', bandwidthLimit: 4 * MiB });
    src.start();
    try {
      // Once pages flow on the multifd channels (connections 1 and 2), cut connection 1.
      for (let i = 0; i < 500; i++) {
        const c = relay.connections[1];
        if (c && c.forwarded.up > 256 * 1024) break;
        await new Promise((r) => setTimeout(r, 20));
      }
      expect(src.stats().status).toBe('active');
      expect(relay.cut((i) => i === 1)).toBe(1);
      const e = await src.done.then(
        () => undefined,
        (x: unknown) => x,
      );
      expect(e).toBeInstanceOf(MigrationError);
      const err = e as MigrationError;
      expect(err.phase).toBe('precopy');
      // Whichever comes first: the cut channel's error (named), or the destination's SHUT after it saw the cut.
      if (err.kind === 'network') {
        expect(err.message).toMatch(/multifd-\d channel/);
        if (err.cause instanceof TransportError) expect(err.cause.channel).toMatch(/^multifd-\d$/);
      } else expect(err.message).toMatch(/the destination reported a failure \(SHUT/);
      expect(src.stats().status).toBe('failed');
      const t = await threadsEnded(() => src.stats(), 3);
      expect(t!.channels.every((c) => c.ended !== undefined), JSON.stringify(t)).toBe(true);
    } finally {
      await relay.close();
      await dst.close();
    }
    expect(await leftAfter(before, 5000)).toEqual([]);
  }, 60_000);

  it('figure: library ↔ library TLS, no bandwidth limit, 1 vs 2 vs 4 threaded multifd channels (printed, not asserted)', async () => {
    const figures: string[] = [];
    for (const channels of [1, 2, 4]) {
      const o = await migrate(channels, true, false, { bandwidthLimit: 0, guestWrites: false, fullRam: 128 * MiB });
      expectIdentical(o);
      const bytes = (o.stats.channels.multifd ?? []).reduce((n, c) => n + c.bytesSent, 0);
      figures.push(`${channels} ch: ${((bytes / (o.ms / 1000)) / 1e9).toFixed(2)} GB/s (${o.ms.toFixed(0)} ms)`);
    }
    console.log(`[threads-mfd] TLS, threads on, 128 MiB random: ${figures.join('; ')}`);
  }, 120_000);
});
