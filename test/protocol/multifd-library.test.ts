/**
 * Multifd library ↔ library: SourceSession → DestinationSession over
 * loopback with 1, 2 and 4 multifd channels, plain and TLS, from a guest that
 * keeps rewriting memory (three precopy passes, then the rest with the VM
 * stopped): the destination's RAM equals the source's bit for bit, the pages
 * went on the multifd channels (main carried none), and every pass ended with
 * a barrier. Then postcopy with preempt after a multifd precopy, in QEMU
 * 10.1's order (QEMU 10.0 refuses multifd with postcopy, so this is tested
 * library ↔ library only): the preempt channel connects after main and every
 * multifd channel, multifd is idle in postcopy, the destination's demand
 * requests are answered on preempt, RAM bit for bit. And the source's
 * refusals of bad multifd input.
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
import type { PostcopyPolicy } from '../../src/protocol/postcopy-policy.js';
import { SourceSession, type DeviceStateSection, type SourceOptions, type SourceStats } from '../../src/protocol/source.js';
import { initPkiDir } from '../../src/transport/pki.js';
import { qmt } from '../cli/qmt.js';
import { FaultRelay } from '../faults/relay.js';

const MiB = 1 << 20;
const PAGE = 4096;
const RAM = 24 * MiB;
const HOT = { start: 4 * MiB, end: 12 * MiB };

let work: string;
let pkiDir: string;

beforeAll(async () => {
  work = await mkdtemp(join(tmpdir(), 'qmt-multifd-lib-'));
  pkiDir = join(work, 'pki');
  await initPkiDir(pkiDir);
});
afterAll(async () => {
  if (work) await rm(work, { recursive: true, force: true });
});

/** A guest in memory: a third of its pages hold data, the rest zero; once started it rewrites 100 random pages of HOT every 10 ms. */
class Workload {
  readonly source = new InMemorySource([
    { idstr: 'pc.ram', length: RAM },
    { idstr: 'pc.bios', length: 256 * 1024 },
  ]);
  private timer: NodeJS.Timeout | undefined;
  private readonly noise = Buffer.alloc(64);
  constructor() {
    const ram = this.source.memory.get('pc.ram')!;
    for (let p = 0; p < RAM; p += 3 * PAGE) randomFillSync(ram, p, PAGE);
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

const DEVICES: DeviceStateSection[] = [
  { idstr: 'timer', instanceId: 0, versionId: 2, data: randomFillSync(Buffer.alloc(24)) },
  { idstr: 'cpu', instanceId: 0, versionId: 12, data: randomFillSync(Buffer.alloc(1851)) },
];

/** Once the destination runs, it touches pc.ram from the top down (against the background stream), four faults at a time. */
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

interface Outcome {
  stats: SourceStats;
  result: DestinationResult;
  guest: Workload;
  sink: InMemorySink;
  demand: PageRequestResult[];
  answered: { main: number; preempt: number };
  /** Connection order the destination saw: channel roles as they qualified. */
  order: string[];
}

async function migrate(channels: number, tls: boolean, policy: PostcopyPolicy, preempt: boolean): Promise<Outcome> {
  const postcopy = policy !== 'never';
  const transport = tls ? { tls: { dir: pkiDir, hostname: 'localhost' } } : {};
  const sink = new InMemorySink();
  const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, postcopy, multifd: { channels }, idleTimeoutMs: 20_000, transport: { ...(tls ? { tls: { dir: pkiDir } } : {}), main: { tuning: { noDelay: true } } } });
  const order: string[] = [];
  dst.on('channel', (c) => order.push(c.role === 'multifd' ? `multifd-${c.stats.id ?? '?'}` : c.role));
  const guest = new Workload();
  const demand: PageRequestResult[] = [];
  const faulting = postcopy ? faultTopDown(dst, demand) : Promise.resolve();
  const src = new SourceSession({
    to: dst.uri,
    transport,
    memory: guest.source,
    machineType: 'pc-q35-10.0',
    devices: DEVICES,
    multifd: { channels },
    postcopy: policy,
    preempt,
    bandwidthLimit: 48 * MiB,
    postcopyBandwidthLimit: 48 * MiB,
    downtimeLimitMs: 1,
    maxPasses: 3,
    stopVm: () => guest.stop(),
  });
  const answered = { main: 0, preempt: 0 };
  src.on('page-request', (r) => answered[r.channel]++);
  guest.start();
  src.start();
  try {
    const [stats, result] = await Promise.all([src.done, dst.done]);
    await faulting;
    return { stats, result, guest, sink, demand, answered, order };
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
  expect(o.result.devices.map((d) => Buffer.from(d.data))).toEqual(DEVICES.map((d) => Buffer.from(d.data)));
}

/** The precopy pages went on the multifd channels, each carried some; main only the records around them. */
function expectPagesOnMultifd(stats: SourceStats, channels: number): void {
  const mf = stats.channels.multifd ?? [];
  expect(mf.map((c) => c.id)).toEqual(Array.from({ length: channels }, (_, i) => i));
  for (const c of mf) expect(c.bytesSent, `multifd-${c.id}`).toBeGreaterThan(MiB / channels);
  expect(mf.reduce((n, c) => n + c.bytesSent, 0)).toBeGreaterThan(RAM / 3);
}

describe('multifd library ↔ library', () => {
  it.each([1, 2, 4].flatMap((channels) => [false, true].map((tls) => ({ channels, tls }))))(
    'precopy with $channels channels (TLS $tls): up to three passes, RAM and devices bit for bit, pages on multifd',
    async ({ channels, tls }) => {
      const o = await migrate(channels, tls, 'never', false);
      expectIdentical(o);
      // Three passes unless the guest dirtied nothing during one (a fast pass on a loaded machine): then it completes sooner.
      expect(o.stats.passes).toBeGreaterThanOrEqual(1);
      expect(o.stats.passes).toBeLessThanOrEqual(3);
      expect(o.result.postcopy).toBe(false);
      expectPagesOnMultifd(o.stats, channels);
      // Main carried no page: a few KiB of records and the device state.
      expect(o.stats.channels.main!.bytesSent).toBeLessThan(256 * 1024);
      // Every page of every pass went in a multifd packet; barriers: setup, each pass, the END section.
      const mf = o.result.stats.multifd!;
      expect({ normal: mf.normal, zero: mf.zero }).toEqual({ normal: o.stats.normal, zero: o.stats.duplicate });
      expect(mf.syncs).toBe(o.stats.passes + 2);
      expect(o.order[0]).toBe('main');
      expect(o.order.slice(1).sort()).toEqual(Array.from({ length: channels }, (_, i) => `multifd-${i}`).sort());
    },
    60_000,
  );

  it.each([false, true])('postcopy with preempt after a multifd pass (QEMU 10.1 order, TLS %s): requests answered on preempt, RAM bit for bit', async (tls) => {
    const o = await migrate(2, tls, { afterPasses: 1 }, true);
    expectIdentical(o);
    expect(o.result.postcopy).toBe(true);
    expect(o.stats.passes).toBe(1);
    expectPagesOnMultifd(o.stats, 2);
    // Barriers: setup, the pass, the switch's (10.1's save_postcopy_prepare); none in postcopy, where pages go on main and preempt.
    const mf = o.result.stats.multifd!;
    expect(mf.syncs).toBe(3);
    expect(mf.normal + mf.zero).toBeLessThan(o.stats.normal + o.stats.duplicate);
    // 10.1's order: main, every multifd channel, then preempt.
    expect(o.order).toHaveLength(4);
    expect(o.order[0]).toBe('main');
    expect(o.order.slice(1, 3).sort()).toEqual(['multifd-0', 'multifd-1']);
    expect(o.order[3]).toBe('preempt');
    expect(o.demand.length, 'demand requests answered').toBeGreaterThan(0);
    expect(o.answered.preempt, 'answers on the preempt channel').toBeGreaterThan(0);
    expect(o.stats['requests-answered']['main-no-preempt']).toBe(0);
    expect(o.stats.channels.preempt!.bytesSent).toBeGreaterThan(0);
  }, 60_000);

  it('postcopy after a multifd pass, the connection cut in postcopy: both recover on main and preempt alone (multifd idle), RAM bit for bit', async () => {
    const sink = new InMemorySink();
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, postcopy: true, multifd: { channels: 2 }, idleTimeoutMs: 20_000 });
    const relay = await FaultRelay.start({ target: dst.uri, maxConnections: 16 });
    const guest = new Workload();
    const src = new SourceSession({
      to: relay.uri,
      memory: guest.source,
      machineType: 'pc-q35-10.0',
      devices: DEVICES,
      multifd: { channels: 2 },
      postcopy: { afterPasses: 1 },
      preempt: true,
      stopVm: () => guest.stop(),
      // Slow enough that postcopy's background stream still runs when the cut comes.
      postcopyBandwidthLimit: 4 * MiB,
      recovery: { initialDelayMs: 20, maxDelayMs: 200 },
    });
    const demand: PageRequestResult[] = [];
    const faulting = faultTopDown(dst, demand);
    let cuts = 0;
    // At once, not after a delay: with demand faults on preempt, postcopy may end within a few ms on a fast machine.
    dst.once('postcopy-run', () => {
      setImmediate(() => {
        if (dst.stats().status === 'postcopy-active') cuts = relay.cut() > 0 ? 1 : 0;
      });
    });
    guest.start();
    src.start();
    try {
      const [stats, result] = await Promise.all([src.done, dst.done]);
      await faulting;
      expect(cuts, 'the cut came during postcopy').toBe(1);
      expectIdentical({ stats, result, guest, sink, demand, answered: { main: 0, preempt: 0 }, order: [] });
      expect(stats.recoveries).toBe(1);
      expect(result.stats.recoveries).toBe(1);
      // The first connection: main, 2 multifd, preempt; the recovery: main and preempt only.
      expect(relay.connections.length).toBe(6);
    } finally {
      guest.stop();
      dst.close();
      await relay.close();
    }
  }, 60_000);
});

function sourceOpts(extra: Partial<SourceOptions>): SourceOptions {
  return { to: 'tcp:127.0.0.1:1', memory: new InMemorySource([{ idstr: 'pc.ram', length: MiB }]), machineType: 'pc-q35-10.0', devices: [], ...extra };
}

describe('multifd: bad input is refused at the call', () => {
  it.each([0, 256, 1.5, -1, Number.NaN])('channels %s: a RangeError naming multifd.channels', (channels) => {
    let e: unknown;
    try {
      new SourceSession(sourceOpts({ multifd: { channels } }));
    } catch (x) {
      e = x;
    }
    expect(e).toBeInstanceOf(RangeError);
    expect(e).toMatchObject({ code: 'bad-option', option: 'multifd.channels' });
    expect((e as Error).message).toMatch(/from 1 to 255/);
  });

  it('channels of the wrong type, a UUID of 15 bytes, multifd with XBZRLE: TypeErrors naming the option', () => {
    const cases: [Partial<SourceOptions>, string][] = [
      [{ multifd: { channels: '4' as unknown as number } }, 'multifd.channels'],
      [{ multifd: null as unknown as { channels: number } }, 'multifd'],
      [{ multifd: { channels: 2, uuid: new Uint8Array(15) } }, 'multifd.uuid'],
      [{ multifd: { channels: 2 }, xbzrleCacheBytes: MiB }, 'multifd'],
      [{ multifd: { channels: 2 }, transport: { multifd: { bulkWindowBytes: 0 } } }, 'transport.multifd.bulkWindowBytes'],
    ];
    for (const [extra, option] of cases) {
      let e: unknown;
      try {
        new SourceSession(sourceOpts(extra));
      } catch (x) {
        e = x;
      }
      expect(e, option).toBeInstanceOf(Error);
      expect(e, option).toMatchObject({ code: 'bad-option', option });
    }
  });

  it('a destination without multifd refuses the channels: the source fails typed naming one, nothing left open', async () => {
    const before = process.getActiveResourcesInfo().filter((r) => r === 'TCPSocketWrap').length;
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink: new InMemorySink(), idleTimeoutMs: 5000 });
    dst.done.catch(() => undefined);
    try {
      const src = new SourceSession({ ...sourceOpts({ multifd: { channels: 2 }, replyTimeoutMs: 5000 }), to: dst.uri });
      src.start();
      const e = await src.done.then(
        () => undefined,
        (x: unknown) => x,
      );
      // Whichever it sees first: its channel dropped (named), or the destination's SHUT 1 after main's MULTIFD_FLUSH it does not expect.
      expect(e).toBeInstanceOf(MigrationError);
      const err = e as MigrationError;
      if (err.kind === 'network') expect(err.message).toMatch(/multifd-\d channel/);
      else expect(err.message).toMatch(/the destination reported a failure \(SHUT/);
      expect(src.stats().status).toBe('failed');
    } finally {
      dst.close();
    }
    for (let i = 0; i < 100 && process.getActiveResourcesInfo().filter((r) => r === 'TCPSocketWrap').length > before; i++) await new Promise((r) => setTimeout(r, 20));
    expect(process.getActiveResourcesInfo().filter((r) => r === 'TCPSocketWrap').length).toBeLessThanOrEqual(before);
  }, 30_000);

  it('qmt send --multifd 0 and 256: usage errors (exit code 2), nothing sent', async () => {
    for (const n of ['0', '256', 'x']) {
      const r = await qmt(['send', '--from', '/nonexistent', '--to', 'tcp:127.0.0.1:1', '--multifd', n]);
      expect(r.code, r.stderr).toBe(2);
      expect(r.stderr).toMatch(new RegExp(`option '--multifd <n>' argument '${n}' is invalid.*from 1 to 255`));
    }
  }, 60_000);
});
