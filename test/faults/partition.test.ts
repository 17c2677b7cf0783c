/**
 * A silent partition in postcopy, library to library: SourceSession →
 * fault relay → DestinationSession. Once the destination runs the VM, the
 * relay freezes: it forwards nothing either way and closes nothing (no FIN,
 * no RST), as a pulled cable or a hung middlebox. Both sessions must find out
 * on their own — the destination from its idle timeout, the source from bytes
 * that stop moving — and pause (not fail); once the partition heals, the
 * source reconnects, both resume, and the destination's memory equals the
 * source's bit for bit, with the guest's page requests that waited across the
 * pause answered. Then `pause()` forced on each side while the link is fine
 * (QEMU's migrate-pause), and pause() where it is not allowed.
 */
import { randomFillSync } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DestinationSession } from '../../src/protocol/destination.js';
import { MigrationError } from '../../src/protocol/errors.js';
import { InMemorySink } from '../../src/protocol/memory.js';
import { InMemorySource } from '../../src/protocol/memory-source.js';
import { SourceSession } from '../../src/protocol/source.js';
import type { TransportOptions } from '../../src/transport/connection.js';
import { initPkiDir } from '../../src/transport/pki.js';
import { leftAfter, resourceSnapshot } from '../support/resources.js';
import { FaultRelay } from './relay.js';

const MiB = 1 << 20;
const PAGE = 4096;
const RAM = 24 * MiB;
/** Both sides' detection window: the destination's idle timeout, the source's replyTimeoutMs. */
const WINDOW_MS = 1500;

let pki: string;
beforeAll(async () => {
  pki = await mkdtemp(join(tmpdir(), 'qmt-partition-'));
  await initPkiDir(pki);
});
afterAll(async () => {
  await rm(pki, { recursive: true, force: true });
});

function guestSource(): { source: InMemorySource; stop: () => void } {
  const source = new InMemorySource([
    { idstr: 'pc.ram', length: RAM },
    { idstr: 'pc.bios', length: 256 * 1024 },
  ]);
  const ram = source.memory.get('pc.ram')!;
  for (let p = 0; p < RAM; p += 2 * PAGE) randomFillSync(ram, p, PAGE);
  randomFillSync(source.memory.get('pc.bios')!);
  const noise = Buffer.alloc(16);
  // A running guest until the switch: pages change under the first pass.
  const timer = setInterval(() => {
    for (let i = 0; i < 200; i++) source.write('pc.ram', Math.floor(Math.random() * (RAM / PAGE)) * PAGE + 64, randomFillSync(noise));
  }, 5);
  return { source, stop: () => clearInterval(timer) };
}

interface Fault {
  start: number;
  end: number;
}

/** The destination's guest: faults pc.ram in from the top down, four at a time, through pauses. */
function faultTopDown(dst: DestinationSession): Promise<Fault[]> {
  let over = false;
  dst.done.then(
    () => (over = true),
    () => (over = true),
  );
  const faults: Fault[] = [];
  return (async () => {
    const inFlight = new Set<Promise<void>>();
    for (let off = RAM - PAGE; off >= 0 && !over; off -= PAGE) {
      if (dst.hasPage('pc.ram', off)) continue;
      const start = performance.now();
      const p: Promise<void> = dst.requestPage('pc.ram', off).then(
        (r) => {
          if (r.requested) faults.push({ start, end: performance.now() });
          inFlight.delete(p);
        },
        () => {
          inFlight.delete(p);
        },
      );
      inFlight.add(p);
      if (inFlight.size >= 4) await Promise.race(inFlight);
    }
    await Promise.all(inFlight);
    return faults;
  })();
}

interface Pair {
  dst: DestinationSession;
  src: SourceSession;
  relay: FaultRelay;
  sink: InMemorySink;
  guest: ReturnType<typeof guestSource>;
  /** Resolves with the destination's answered faults once postcopy runs and the migration ends. */
  faults: Promise<Fault[]>;
  running: Promise<void>;
}

async function pair(opts: { preempt: boolean; tls: boolean; sourceWindowMs?: number; destinationIdleMs?: number }): Promise<Pair> {
  const transport: TransportOptions = opts.tls ? { tls: { dir: pki }, connectTimeoutMs: 2000 } : {};
  const sink = new InMemorySink();
  const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, postcopy: true, idleTimeoutMs: opts.destinationIdleMs ?? WINDOW_MS, transport });
  const relay = await FaultRelay.start({ target: dst.uri, maxConnections: 10_000 });
  const guest = guestSource();
  const src = new SourceSession({
    to: relay.uri,
    transport,
    memory: guest.source,
    machineType: 'pc-q35-10.0',
    devices: [{ idstr: 'timer', instanceId: 0, versionId: 2, data: randomFillSync(Buffer.alloc(24)) }],
    // Postcopy from the start: most of RAM is still to come when the partition does, more than
    // the relay's socket buffers can take (a stream all acknowledged by a hung middlebox is
    // invisible to the source: see stall-watch.ts).
    postcopy: { afterPasses: 0 },
    preempt: opts.preempt,
    stopVm: guest.stop,
    // Slow enough that the background stream still runs when the partition comes.
    postcopyBandwidthLimit: 4 * MiB,
    replyTimeoutMs: opts.sourceWindowMs ?? WINDOW_MS,
    recovery: { initialDelayMs: 20, maxDelayMs: 200 },
  });
  let faults!: Promise<Fault[]>;
  const running = new Promise<void>((resolve) =>
    dst.once('postcopy-run', () => {
      faults = faultTopDown(dst);
      resolve();
    }),
  );
  src.start();
  return { dst, src, relay, sink, guest, running, get faults() { return faults; } };
}

/** Waits for both sessions to settle; memory compared block by block. */
async function settle(p: Pair): Promise<{ memoryEqual: boolean; faults: Fault[]; why: string }> {
  const settled = await Promise.allSettled([p.src.done, p.dst.done]);
  const faults = await p.faults;
  p.guest.stop();
  await p.relay.close();
  const describe = (r: PromiseSettledResult<unknown>) => (r.status === 'fulfilled' ? 'ok' : r.reason instanceof MigrationError ? r.reason.describe() : String(r.reason));
  const why = `source ${describe(settled[0])}, destination ${describe(settled[1])}; relay: ${p.relay.fired.join('; ')}`;
  const memoryEqual = ['pc.ram', 'pc.bios'].every((id) => p.sink.blocks.get(id)?.equals(p.guest.source.memory.get(id)!) ?? false);
  expect(settled.map((s) => s.status), why).toEqual(['fulfilled', 'fulfilled']);
  return { memoryEqual, faults, why };
}

function nextPaused<T extends { once(ev: 'paused', fn: (e: { error: MigrationError; at: number }) => void): unknown }>(s: T): Promise<{ error: MigrationError; at: number }> {
  return new Promise((resolve) => s.once('paused', resolve));
}

/** `p`, or a failure naming what did not happen (and the state then) after `ms`. */
async function within<T>(p: Promise<T>, ms: number, what: () => string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([p, new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`not within ${ms} ms: ${what()}`)), ms)))]);
  } finally {
    clearTimeout(timer);
  }
}

describe('a silent partition in postcopy', () => {
  for (const c of [
    { preempt: true, tls: false },
    { preempt: false, tls: true },
  ]) {
    it(`${c.preempt ? 'with preempt' : 'without preempt'}${c.tls ? ', over TLS' : ''}: both sides pause on silence alone, recover once it heals, memory bit for bit`, async () => {
      const before = resourceSnapshot();
      const p = await pair(c);
      await p.running;
      await sleep(200);
      expect(p.dst.stats().status, 'still in postcopy when the partition comes').toBe('postcopy-active');
      const dstPaused = nextPaused(p.dst);
      const srcPaused = nextPaused(p.src);
      const srcResumed = new Promise<{ pausedMs: number }>((r) => p.src.once('resumed', r));
      const dstResumed = new Promise<{ pausedMs: number }>((r) => p.dst.once('resumed', r));
      const { at: frozenAt, frozen } = p.relay.freeze();
      expect(frozen, 'the relay froze the live channels').toBe(c.preempt ? 2 : 1);
      const [d, s] = await within(Promise.all([dstPaused, srcPaused]), 20_000, () => `both sides paused (destination ${p.dst.stats().status}, source ${p.src.stats().status}; main ${JSON.stringify(p.src.stats().channels.main)})`);
      // Nothing was closed or reset by the relay: each side found the partition by its silence
      // (a close would pause as peer-disconnected, a reset as a transport error).
      expect(p.relay.fired.filter((f) => !/refused \(frozen\)/.test(f))).toEqual([`freeze: ${frozen} connection(s) frozen by the test`]);
      expect(d.error.code, d.error.message).toBe('idle-timeout');
      expect(s.error.code, s.error.message).toBe('idle-timeout');
      expect(p.dst.stats().status).toBe('postcopy-paused');
      const detect = { dst: d.at - frozenAt, src: s.at - frozenAt };
      // Each window runs from the last sign of life, which may precede the freeze by a pacing slice.
      expect(detect.dst).toBeGreaterThan(WINDOW_MS / 2);
      expect(detect.src).toBeGreaterThan(WINDOW_MS / 2);
      const healedAt = performance.now();
      p.relay.heal();
      const [sr, dr] = await within(Promise.all([srcResumed, dstResumed]), 20_000, () => `both sides resumed (destination ${p.dst.stats().status}, source ${p.src.stats().status}; relay ${p.relay.fired.slice(-5).join('; ')})`);
      const resumedAt = performance.now();
      const o = await settle(p);
      // Requests that waited through the pause: asked before it was healed, answered after.
      const across = o.faults.filter((f) => f.start < healedAt && f.end > healedAt).length;
      console.log(
        `[partition] ${JSON.stringify(c)}: detected by the destination after ${detect.dst.toFixed(0)} ms, by the source after ${detect.src.toFixed(0)} ms; ` +
          `healed → resumed ${(resumedAt - healedAt).toFixed(0)} ms; pausedMs source ${sr.pausedMs.toFixed(0)}, destination ${dr.pausedMs.toFixed(0)}; ` +
          `${o.faults.length} faults answered, ${across} of them across the pause; ${o.why}`,
      );
      expect(o.memoryEqual, `memory bit for bit; ${o.why}`).toBe(true);
      expect(p.src.stats().recoveries).toBe(1);
      expect(p.dst.stats().recoveries).toBe(1);
      expect(p.dst.stats()['placed-twice']).toBe(0);
      expect(across, 'requests that waited across the pause were answered after it').toBeGreaterThan(0);
      expect(await leftAfter(before, 3000), 'nothing left open').toEqual([]);
    }, 60_000);
  }

  it('destination pause() while the link is fine: the source reconnects on its own, memory bit for bit', async () => {
    const p = await pair({ preempt: true, tls: false });
    await p.running;
    await sleep(200);
    const srcPaused = nextPaused(p.src);
    const dstPaused = nextPaused(p.dst);
    const resumed = new Promise<{ pausedMs: number }>((r) => p.dst.once('resumed', r));
    const t = performance.now();
    expect(p.dst.pause()).toBeUndefined();
    expect(p.dst.stats().status, 'paused at once').toBe('postcopy-paused');
    expect(() => p.dst.pause(), 'a second pause is a no-op').not.toThrow();
    const d = await dstPaused;
    expect(d.error.code).toBe('paused');
    const s = await srcPaused;
    const r = await resumed;
    const o = await settle(p);
    console.log(`[partition] destination pause(): source paused after ${(s.at - t).toFixed(0)} ms (${s.error.code}), pausedMs ${r.pausedMs.toFixed(0)}; ${o.faults.length} faults answered; ${o.why}`);
    expect(o.memoryEqual, o.why).toBe(true);
    expect(p.dst.stats().recoveries).toBe(1);
    expect(p.src.stats().recoveries).toBe(1);
  }, 60_000);

  it('source pause(): the destination pauses, the source waits for resume() without retrying, then recovers', async () => {
    const p = await pair({ preempt: false, tls: false });
    await p.running;
    await sleep(200);
    const dstPaused = nextPaused(p.dst);
    const srcPaused = nextPaused(p.src);
    let attempts = 0;
    p.src.on('recovering', () => attempts++);
    const resumed = new Promise<{ pausedMs: number }>((r) => p.src.once('resumed', r));
    p.src.pause();
    expect(p.src.stats().status, 'paused at once').toBe('postcopy-paused');
    const s = await srcPaused;
    expect(s.error.code).toBe('paused');
    const d = await dstPaused;
    expect(d.error.code, d.error.message).toBe('peer-disconnected');
    // Long enough for many attempts of the automatic backoff (20 ms → 200 ms): none comes.
    await sleep(1000);
    expect(attempts, 'no reconnection before resume()').toBe(0);
    expect(p.src.stats().status).toBe('postcopy-paused');
    const t = performance.now();
    p.src.resume();
    const r = await resumed;
    const resumeMs = performance.now() - t;
    const o = await settle(p);
    console.log(`[partition] source pause(): resume() → resumed in ${resumeMs.toFixed(0)} ms, pausedMs ${r.pausedMs.toFixed(0)}, ${attempts} attempt(s); ${o.faults.length} faults answered; ${o.why}`);
    expect(attempts).toBe(1);
    expect(o.memoryEqual, o.why).toBe(true);
    expect(p.src.stats().recoveries).toBe(1);
  }, 60_000);

  for (const tls of [false, true]) {
    it(`the partition heals before the destination noticed${tls ? ', over TLS' : ''}: the source's recovery connection is the proof, both recover`, async () => {
      // The defaults have this shape: the source's window (30 s) is shorter than the destination's
      // idle timeout (60 s). Without preempt the recovery connection comes where a preempt channel
      // could: over TLS it qualifies as one by order, over plain TCP it is a 'recovery' stranger.
      const p = await pair({ preempt: false, tls, sourceWindowMs: 800, destinationIdleMs: 30_000 });
      await p.running;
      await sleep(200);
      const srcPaused = nextPaused(p.src);
      const dstPaused = nextPaused(p.dst);
      const resumed = new Promise<{ pausedMs: number }>((r) => p.dst.once('resumed', r));
      const { at } = p.relay.freeze();
      const s = await within(srcPaused, 15_000, () => `the source pauses (${p.src.stats().status})`);
      expect(s.error.code, s.error.message).toBe('idle-timeout');
      expect(p.dst.stats().status, 'the destination has not noticed').toBe('postcopy-active');
      // A new route: nothing of the old connection ever arrives (no FIN, no RST), new ones pass.
      p.relay.heal({ keepFrozen: true });
      const d = await within(dstPaused, 10_000, () => `the destination pauses (${p.dst.stats().status})`);
      expect(d.error.message).toMatch(/the source opened a recovery connection/);
      const r = await within(resumed, 10_000, () => `both resume (destination ${p.dst.stats().status}, source ${p.src.stats().status})`);
      const o = await settle(p);
      console.log(`[partition] healed before the destination noticed${tls ? ' (TLS)' : ''}: source paused after ${(s.at - at).toFixed(0)} ms, destination on its recovery connection ${(d.at - at).toFixed(0)} ms, pausedMs ${r.pausedMs.toFixed(0)}; ${o.why}`);
      expect(o.memoryEqual, o.why).toBe(true);
      expect(p.dst.stats().recoveries).toBe(1);
    }, 60_000);
  }

  it('a slow link in postcopy is not a partition: 256 KiB/s, no pause, memory bit for bit', async () => {
    const sink = new InMemorySink();
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, postcopy: true, idleTimeoutMs: WINDOW_MS });
    // The bottleneck queues a quarter second (see linkBuffer in relay.ts): our bytes wait, ACKs trickle.
    const relay = await FaultRelay.start({ target: dst.uri, connections: [{ up: { bytesPerSecond: 256 * 1024 } }] });
    const source = new InMemorySource([{ idstr: 'pc.ram', length: 2 * MiB }]);
    const ram = source.memory.get('pc.ram')!;
    for (let p = 0; p < ram.length; p += 2 * PAGE) randomFillSync(ram, p, PAGE);
    const src = new SourceSession({ to: relay.uri, memory: source, machineType: 'pc-q35-10.0', devices: [], postcopy: { afterPasses: 0 }, replyTimeoutMs: WINDOW_MS });
    const pauses: string[] = [];
    src.on('paused', (e) => pauses.push(`source: ${e.error.message}`));
    dst.on('paused', (e) => pauses.push(`destination: ${e.error.message}`));
    const t = performance.now();
    src.start();
    const [stats] = await Promise.all([src.done, dst.done]);
    await relay.close();
    const ms = performance.now() - t;
    console.log(`[partition] slow link: ${stats.transferred} bytes in ${ms.toFixed(0)} ms (${((stats.transferred / ms) * 1000 / 1024).toFixed(0)} KiB/s), pauses: ${pauses.join(' | ') || 'none'}`);
    expect(ms, 'the link was the bottleneck for several windows').toBeGreaterThan(2000);
    expect(pauses).toEqual([]);
    expect(sink.blocks.get('pc.ram')!.equals(ram)).toBe(true);
  }, 60_000);

  it('pause() outside postcopy throws invalid-state at once, and the migration goes on', async () => {
    const sink = new InMemorySink();
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, postcopy: true });
    const source = new InMemorySource([{ idstr: 'pc.ram', length: 4 * MiB }]);
    randomFillSync(source.memory.get('pc.ram')!);
    const src = new SourceSession({ to: dst.uri, memory: source, machineType: 'pc-q35-10.0', devices: [], postcopy: 'manual' });
    const code = (f: () => void): string | undefined => {
      try {
        f();
      } catch (e) {
        return e instanceof MigrationError ? `${e.code}: ${e.message}` : String(e);
      }
      return undefined;
    };
    expect(code(() => src.pause())).toMatch(/^invalid-state: pause\(\) needs a running postcopy migration: postcopy has not started/);
    expect(code(() => dst.pause())).toMatch(/^invalid-state: pause\(\) needs a running postcopy migration: the VM does not run here yet/);
    src.start();
    await new Promise((r) => src.once('pass', r));
    expect(code(() => src.pause()), 'in precopy').toMatch(/^invalid-state:/);
    expect(code(() => dst.pause()), 'in precopy').toMatch(/^invalid-state:/);
    const stats = await src.done;
    await dst.done;
    expect(stats.status).toBe('completed');
    expect(sink.blocks.get('pc.ram')!.equals(source.memory.get('pc.ram')!)).toBe(true);
    expect(code(() => src.pause()), 'after the end').toMatch(/^invalid-state: pause\(\) needs a running postcopy migration: the migration is over/);
    expect(code(() => dst.pause()), 'after the end').toMatch(/^invalid-state: pause\(\) needs a running postcopy migration: the migration is over/);
  }, 60_000);
});
