/**
 * SourceSession → fault relay → DestinationSession, with the faults chosen by
 * fast-check: connections dropped (RST), stalled, truncated (FIN), a byte
 * corrupted, a slow reader, reordered arrival; on the main channel (both
 * directions: stream and return path) and on the preempt channel; sometimes
 * the caller cancels one side. Precopy, postcopy after one pass, postcopy
 * with preempt; a guest that keeps writing until it is stopped; the
 * destination faults pages in during postcopy.
 *
 * Every run must end: both `done` promises settle within RUN_BOUND_MS, each
 * with success or a MigrationError (code and phase from the documented sets),
 * never an unhandled rejection; a destination that completed holds the
 * source's memory and device state bit for bit (unless a byte of the stream
 * was corrupted on its way: the protocol has no checksum); a source that
 * completed implies a destination that completed; runs without a harmful
 * fault complete. Afterwards no socket or timer is left (process resources
 * compared with those before the run) and the heap stays bounded.
 *
 * Also: a slow link that must not fail a migration, the preempt channel
 * arriving first, and TLS refused at the session level (certificates of
 * another CA).
 */
import { randomFillSync } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { copyFile, mkdir, mkdtemp, rm } from 'node:fs/promises';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DestinationSession, type DestinationResult } from '../../src/protocol/destination.js';
import { MigrationError, type MigrationErrorKind, type MigrationPhase, type SessionErrorCode } from '../../src/protocol/errors.js';
import { InMemorySink } from '../../src/protocol/memory.js';
import { InMemorySource } from '../../src/protocol/memory-source.js';
import { SourceSession, type DeviceStateSection, type SourceStats } from '../../src/protocol/source.js';
import { initPkiDir } from '../../src/transport/pki.js';
import { StreamError } from '../../src/stream/errors.js';
import { TransportError } from '../../src/transport/errors.js';
import type { StrangerEvent } from '../../src/transport/qualify.js';
import { FaultRelay, type ConnectionFaults, type DirectionFaults } from './relay.js';
import { replayParameters } from './replay.js';
import { leftAfter, resourceSnapshot } from '../support/resources.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const PAGE = 4096;
const RAM = 3 * MiB;
const BIOS = 128 * KiB;
const IDLE_MS = 1000;
const REPLY_MS = 3000;
/** A paused destination gives up after this long without a recovery. */
const RECOVERY_MS = 4000;
/** Both `done` promises must settle within this. */
const RUN_BOUND_MS = 15_000;
/** Sockets and timers must be gone this long after both settled. */
const SETTLE_MS = 4000;
const HEAP_LIMIT = 512 * MiB;

const KINDS = new Set<MigrationErrorKind>(['stream', 'network', 'protocol', 'storage', 'cancelled']);
const SESSION_CODES = new Set<SessionErrorCode>(['protocol', 'peer-disconnected', 'idle-timeout', 'accept-timeout', 'storage', 'length-mismatch', 'bad-page-request', 'source-refused', 'cancelled']);
const PHASES = new Set<MigrationPhase>(['setup', 'precopy', 'device-state', 'postcopy', 'completion']);

const unhandled: unknown[] = [];
const onUnhandled = (e: unknown) => unhandled.push(e);
beforeAll(() => {
  process.on('unhandledRejection', onUnhandled);
});
afterAll(() => {
  process.off('unhandledRejection', onUnhandled);
});

// ---- the guest -------------------------------------------------------------------

const DEVICES: DeviceStateSection[] = [
  { idstr: 'timer', instanceId: 0, versionId: 2, data: randomFillSync(Buffer.alloc(24)) },
  { idstr: 'cpu', instanceId: 0, versionId: 12, data: randomFillSync(Buffer.alloc(1851)) },
  { idstr: 'serial', instanceId: 0, versionId: 3, data: randomFillSync(Buffer.alloc(37)) },
];

/** A third of the pages hold data, the rest are zero; until stopped, 32 random pages change every 5 ms. */
class Guest {
  readonly source = new InMemorySource([
    { idstr: 'pc.ram', length: RAM },
    { idstr: 'pc.bios', length: BIOS },
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
      for (let i = 0; i < 32; i++) {
        randomFillSync(this.noise);
        this.source.write('pc.ram', Math.floor(Math.random() * (RAM / PAGE)) * PAGE + 64 * Math.floor(Math.random() * 64), this.noise);
      }
    }, 5);
  }

  stop(): void {
    clearInterval(this.timer);
    this.timer = undefined;
  }
}

/** During postcopy the destination touches up to 48 pages from the top of RAM down, 4 at a time. */
async function faultPages(dst: DestinationSession): Promise<void> {
  const inFlight = new Set<Promise<unknown>>();
  let touched = 0;
  for (let off = RAM - PAGE; off >= 0 && touched < 48; off -= 7 * PAGE) {
    if (dst.stats().status !== 'postcopy-active') break;
    if (dst.hasPage('pc.ram', off)) continue;
    touched++;
    const p: Promise<unknown> = dst.requestPage('pc.ram', off).catch(() => undefined);
    const tracked: Promise<unknown> = p.then(() => inFlight.delete(tracked));
    inFlight.add(tracked);
    if (inFlight.size >= 4) await Promise.race(inFlight);
  }
  await Promise.all(inFlight);
}

// ---- one run ----------------------------------------------------------------------

type Mode = 'precopy' | 'postcopy' | 'postcopy-preempt';

interface Scenario {
  mode: Mode;
  main: ConnectionFaults;
  preempt: ConnectionFaults;
  reorder: boolean;
  /** A guest that does not write (one precopy pass, a stream of a fixed size). */
  quiet?: boolean;
  /** The caller gives up: `SourceSession.cancel()` or `DestinationSession.close()` this long after the start. */
  cancel?: { side: 'source' | 'destination'; afterMs: number };
}

interface RunOutcome {
  source: { ok: true; stats: SourceStats } | { ok: false; error: unknown };
  destination: { ok: true; result: DestinationResult } | { ok: false; error: unknown };
  fired: string[];
  ms: number;
  memoryEqual: boolean;
  devicesEqual: boolean;
  firstDifference: string;
  /** The scenario's cancel came while that side's `done` was still pending. */
  cancelledBeforeSettled: boolean;
  /** Postcopy recoveries the source completed (a cut in postcopy pauses, then resumes). */
  recoveries: number;
  /**
   * The source settled while the destination had no channel: its connection was cut (or
   * corrupted) before its first bytes, so the destination dropped it as a stranger and kept
   * waiting for a real source; the run closed it, as its user would.
   */
  destinationStillWaiting: boolean;
  /** Connections the destination dropped as strangers. */
  strangers: number;
}

/** What may stand behind a MigrationError: nothing, the codec's or the transport's typed error, or a system error (storage). */
function typedCause(c: unknown): boolean {
  if (c === undefined || c instanceof StreamError || c instanceof TransportError || c instanceof MigrationError) return true;
  return typeof (c as NodeJS.ErrnoException | undefined)?.errno === 'number';
}

function describeCause(c: unknown): string {
  return c instanceof Error ? `${c.name}: ${c.message} ${c.stack?.split('\n')[1]?.trim() ?? ''}` : String(c);
}

function describeError(e: unknown): string {
  if (e instanceof MigrationError) return `MigrationError ${e.code}/${e.phase}: ${e.message}`;
  return e instanceof Error ? `${e.name}: ${e.message}` : String(e);
}

function describeOutcome(s: Scenario, o: RunOutcome): string {
  const side = (x: RunOutcome['source'] | RunOutcome['destination']) => (x.ok ? 'completed' : describeError(x.error));
  return [
    `scenario ${JSON.stringify(s)}`,
    `faults fired: ${o.fired.join('; ') || 'none'}`,
    `source: ${side(o.source)}`,
    `destination: ${side(o.destination)}`,
    `${o.ms.toFixed(0)} ms; memory ${o.memoryEqual ? 'equal' : `differs (${o.firstDifference})`}; devices ${o.devicesEqual ? 'equal' : 'differ'}`,
  ].join('\n  ');
}

/** Settles `p` or gives up after `ms` (the timer is cleared either way). */
async function within<T>(p: Promise<T>, ms: number): Promise<{ settled: true; value: PromiseSettledResult<T> } | { settled: false }> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<{ settled: false }>((r) => (timer = setTimeout(() => r({ settled: false }), ms)));
  const settled = p.then(
    (value) => ({ settled: true as const, value: { status: 'fulfilled' as const, value } }),
    (reason: unknown) => ({ settled: true as const, value: { status: 'rejected' as const, reason } }),
  );
  try {
    return await Promise.race([settled, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

function compareMemory(guest: Guest, sink: InMemorySink): string | undefined {
  for (const [name, mem] of guest.source.memory) {
    const got = sink.blocks.get(name);
    if (!got || got.length !== mem.length) return `${name}: ${got ? `${got.length} bytes` : 'missing'}`;
    for (let off = 0; off < mem.length; off += PAGE) {
      if (mem.compare(got, off, off + PAGE, off, off + PAGE) !== 0) return `${name} page +0x${off.toString(16)}`;
    }
  }
  return undefined;
}

async function migrateThroughRelay(s: Scenario): Promise<RunOutcome> {
  const postcopy = s.mode !== 'precopy';
  const sink = new InMemorySink();
  // A cut in postcopy pauses both sessions; the source's new connections come through the
  // relay unharmed (faults apply to the first two), so most such runs recover and complete.
  // Bounded: a recovery that cannot happen ends typed within the run bound.
  const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, postcopy, idleTimeoutMs: IDLE_MS, recovery: { timeoutMs: RECOVERY_MS } });
  const relay = await FaultRelay.start({
    target: dst.uri,
    connections: [s.main, s.preempt],
    maxConnections: 16,
    ...(s.reorder ? { reorder: { holdMs: 300 } } : {}),
  });
  const guest = new Guest();
  const src = new SourceSession({
    to: relay.uri,
    memory: guest.source,
    machineType: 'pc-q35-10.0',
    devices: DEVICES,
    postcopy: postcopy ? { afterPasses: 1 } : 'never',
    preempt: s.mode === 'postcopy-preempt',
    // Two passes at most: the guest dirties pages faster than a 1 ms downtime allows.
    downtimeLimitMs: 1,
    maxPasses: 2,
    // Slow enough that the guest dirties a few hundred pages during the first pass, and
    // that postcopy lasts long enough for the destination's page requests to overtake it.
    bandwidthLimit: 24 * MiB,
    postcopyBandwidthLimit: 2 * MiB,
    replyTimeoutMs: REPLY_MS,
    recovery: { initialDelayMs: 50, maxDelayMs: 400, maxAttempts: 6 },
    transport: { connectTimeoutMs: 5000 },
    stopVm: () => guest.stop(),
  });
  const faulting = new Promise<void>((resolve) => {
    dst.once('postcopy-run', () => void faultPages(dst).then(resolve));
    dst.done.then(
      () => resolve(),
      () => resolve(),
    );
  });
  let channels = 0;
  let strangers = 0;
  let stillWaiting = false;
  dst.on('channel', () => channels++);
  dst.on('stranger', () => strangers++);
  // A destination is not ended by a connection that never became a channel (issue 11 §3).
  // Looked at once the relay has let through what it held back (a stall of the main channel's
  // first bytes): until then the connection is still being judged, neither a channel nor dropped.
  const heldMs = s.main.up?.stall?.ms ?? 0;
  const giveUpWaiting = (): void => {
    setTimeout(() => {
      if (channels > 0) return;
      stillWaiting = dst.stats().status === 'setup';
      dst.close();
    }, 1500 + heldMs);
  };
  src.done.then(giveUpWaiting, giveUpWaiting);
  const t0 = performance.now();
  if (!s.quiet) guest.start();
  src.start();
  const settled = { source: false, destination: false };
  const mark = (side: keyof typeof settled) => () => (settled[side] = true);
  src.done.then(mark('source'), mark('source'));
  dst.done.then(mark('destination'), mark('destination'));
  const cancel = s.cancel;
  let cancelledBeforeSettled = false;
  const cancelTimer =
    cancel &&
    setTimeout(() => {
      cancelledBeforeSettled = !settled[cancel.side];
      if (cancel.side === 'source') src.cancel();
      else dst.close();
    }, cancel.afterMs);
  try {
    const both = await within(Promise.allSettled([src.done, dst.done]), RUN_BOUND_MS);
    const ms = performance.now() - t0;
    if (!both.settled) {
      const state = `source ${src.stats().status} (phase ${src.currentPhase}), destination ${dst.stats().status} (phase ${dst.currentPhase}); relay: ${JSON.stringify(relay.connections)}; fired: ${relay.fired.join('; ')}`;
      throw new Error(`run did not end within ${RUN_BOUND_MS} ms: ${state}`);
    }
    if (both.value.status !== 'fulfilled') throw new Error('allSettled rejected');
    await faulting;
    const [sr, dr] = both.value.value;
    const difference = dr.status === 'fulfilled' ? compareMemory(guest, sink) : undefined;
    const devicesEqual =
      dr.status !== 'fulfilled' ||
      (dr.value.devices.length === DEVICES.length && dr.value.devices.every((d, i) => d.idstr === DEVICES[i]!.idstr && d.instanceId === DEVICES[i]!.instanceId && d.data.equals(DEVICES[i]!.data)));
    return {
      source: sr.status === 'fulfilled' ? { ok: true, stats: sr.value } : { ok: false, error: sr.reason },
      destination: dr.status === 'fulfilled' ? { ok: true, result: dr.value } : { ok: false, error: dr.reason },
      fired: [...relay.fired],
      ms,
      memoryEqual: difference === undefined,
      devicesEqual,
      firstDifference: difference ?? '',
      cancelledBeforeSettled,
      recoveries: src.stats().recoveries,
      destinationStillWaiting: stillWaiting,
      strangers,
    };
  } finally {
    clearTimeout(cancelTimer);
    guest.stop();
    src.cancel(); // no-op once settled
    dst.close();
    // Both peers close their sockets on their own; the relay's sockets follow theirs.
    const deadline = performance.now() + SETTLE_MS;
    while (performance.now() < deadline && relay.connections.some((c) => !c.closed)) await new Promise((r) => setTimeout(r, 20));
    const open = relay.connections.filter((c) => !c.closed);
    await relay.close();
    if (open.length > 0) {
      // Reported by the caller through `lingering`.
      lingering.push(`relay connections still open ${SETTLE_MS} ms after the run (a peer kept its socket): ${JSON.stringify(open)}`);
    }
  }
}

const lingering: string[] = [];

/** The relay faults that cannot stop a migration from completing. */
function harmless(f: DirectionFaults | undefined): boolean {
  if (!f) return true;
  if (f.dropAt !== undefined || f.truncateAt !== undefined || f.corrupt !== undefined) return false;
  if (f.stall && f.stall.ms > IDLE_MS / 2) return false;
  if (f.bytesPerSecond !== undefined && f.bytesPerSecond < 4 * MiB) return false;
  return true;
}

function corruptedStream(o: RunOutcome): boolean {
  return o.fired.some((x) => /up byte \d+ corrupted/.test(x));
}
function corruptedReturnPath(o: RunOutcome): boolean {
  return o.fired.some((x) => /down byte \d+ corrupted/.test(x));
}

/** Runs one scenario and checks every property of the file comment; returns a short line for the log. */
async function checkScenario(s: Scenario, mustComplete = false): Promise<string> {
  const before = resourceSnapshot();
  unhandled.length = 0;
  lingering.length = 0;
  const o = await migrateThroughRelay(s);
  const why = describeOutcome(s, o);
  for (const side of [o.source, o.destination]) {
    if (side.ok) continue;
    expect(side.error, `a typed error\n  ${why}`).toBeInstanceOf(MigrationError);
    const e = side.error as MigrationError;
    expect(KINDS.has(e.kind), `known kind ${e.kind}\n  ${why}`).toBe(true);
    // The specific code: the cause's own (a TransportError's, a StreamError's) or a session's.
    if (e.cause instanceof TransportError || e.cause instanceof StreamError || e.cause instanceof MigrationError) expect(e.code, `the cause's code\n  ${why}`).toBe(e.cause.code);
    else expect(SESSION_CODES.has(e.code as SessionErrorCode), `known code ${e.code}\n  ${why}`).toBe(true);
    expect(PHASES.has(e.phase), `known phase ${e.phase}\n  ${why}`).toBe(true);
    // MigrationError.from turns any unexpected exception into a 'protocol' error: the cause tells them apart.
    expect(typedCause(e.cause), `a typed cause (not an internal exception): ${describeCause(e.cause)}\n  ${why}`).toBe(true);
  }
  if (o.destination.ok && !corruptedStream(o)) {
    expect(o.memoryEqual, `destination completed with the source's memory\n  ${why}`).toBe(true);
    expect(o.devicesEqual, `destination completed with the source's devices\n  ${why}`).toBe(true);
  }
  if (o.source.ok && !corruptedReturnPath(o)) expect(o.destination.ok, `the source completed, so did the destination\n  ${why}`).toBe(true);
  if (o.destinationStillWaiting) {
    // It kept waiting because the only connection it saw was dropped, and it said so.
    expect(o.strangers, `a destination still waiting reported the connection it dropped\n  ${why}`).toBeGreaterThan(0);
  }
  if (s.cancel) {
    // Cancelling a session that has not settled yet ends it as 'cancelled'.
    const cancelled = s.cancel.side === 'source' ? o.source : o.destination;
    if (!cancelled.ok && cancelled.error instanceof MigrationError && o.cancelledBeforeSettled) expect(cancelled.error.code, `cancelled\n  ${why}`).toBe('cancelled');
  }
  const benign = !s.cancel && harmless(s.main.up) && harmless(s.main.down) && (s.mode !== 'postcopy-preempt' || (harmless(s.preempt.up) && harmless(s.preempt.down)));
  if (benign || mustComplete) {
    expect(o.source.ok && o.destination.ok, `no harmful fault: both complete\n  ${why}`).toBe(true);
  }
  // Leaks: wait for the sessions' sockets and timers to go (they may close a little after `done`).
  const left = await leftAfter(before, SETTLE_MS);
  expect(lingering, `sockets kept open by a session\n  ${why}`).toEqual([]);
  expect(left, `resources left after the run (before: ${JSON.stringify([...before])})\n  ${why}`).toEqual([]);
  await new Promise((r) => setImmediate(r));
  expect(unhandled.map(describeError), `unhandled rejections\n  ${why}`).toEqual([]);
  const heap = process.memoryUsage().heapUsed;
  heapMax = Math.max(heapMax, heap);
  expect(heap, 'heap used').toBeLessThan(HEAP_LIMIT);
  const side = (x: RunOutcome['source'] | RunOutcome['destination']) => (x.ok ? 'ok' : x.error instanceof MigrationError ? `${x.error.code}/${x.error.phase}` : 'untyped');
  const recovered = o.recoveries > 0 ? `, ${o.recoveries} postcopy recover${o.recoveries > 1 ? 'ies' : 'y'}` : '';
  const line = `${s.mode}${s.reorder ? '+reorder' : ''}${s.cancel ? `+cancel ${s.cancel.side} at ${s.cancel.afterMs} ms` : ''} [${o.fired.join('; ') || 'no fault fired'}] → source ${side(o.source)}, destination ${side(o.destination)}${recovered} (${o.ms.toFixed(0)} ms)`;
  return o.source.ok && o.destination.ok ? line : `${line}\n      faults ${JSON.stringify({ main: s.main, preempt: s.preempt })}; source: ${o.source.ok ? 'ok' : describeError(o.source.error)}; destination: ${o.destination.ok ? 'ok' : describeError(o.destination.error)}`;
}

let heapMax = 0;

// ---- arbitraries --------------------------------------------------------------------

/** One direction's faults; offsets within `size` bytes (mostly early, where the setup records are). */
function directionFaults(size: number): fc.Arbitrary<DirectionFaults> {
  const at = fc.oneof(fc.integer({ min: 0, max: 64 }), fc.integer({ min: 0, max: Math.min(size, 64 * KiB) }), fc.integer({ min: 0, max: size }));
  return fc.oneof(
    { weight: 2, arbitrary: fc.constant({}) },
    { weight: 1, arbitrary: at.map((n): DirectionFaults => ({ dropAt: n })) },
    { weight: 1, arbitrary: fc.record({ at, ms: fc.oneof(fc.integer({ min: 20, max: 300 }), fc.integer({ min: 300, max: 2500 })) }).map((stall): DirectionFaults => ({ stall })) },
    { weight: 1, arbitrary: at.map((n): DirectionFaults => ({ truncateAt: n })) },
    { weight: 1, arbitrary: fc.record({ at, xor: fc.integer({ min: 1, max: 255 }) }).map((corrupt): DirectionFaults => ({ corrupt })) },
    { weight: 1, arbitrary: fc.constantFrom(512 * KiB, 2 * MiB, 8 * MiB, 32 * MiB).map((bytesPerSecond): DirectionFaults => ({ bytesPerSecond })) },
  );
}

/** Mostly one faulty direction per connection (each run is then about one fault), sometimes both. */
const connectionFaults = (upSize: number, downSize: number): fc.Arbitrary<ConnectionFaults> =>
  fc.oneof(
    { weight: 2, arbitrary: directionFaults(upSize).map((up): ConnectionFaults => ({ up })) },
    { weight: 2, arbitrary: directionFaults(downSize).map((down): ConnectionFaults => ({ down })) },
    { weight: 1, arbitrary: fc.record({ up: directionFaults(upSize), down: directionFaults(downSize) }) },
  );

const scenario: fc.Arbitrary<Scenario> = fc.record({
  mode: fc.constantFrom<Mode>('precopy', 'postcopy', 'postcopy-preempt'),
  main: connectionFaults(1536 * KiB, 600),
  preempt: connectionFaults(64 * KiB, 16).map((c) => ({ up: c.up ?? {} })),
  reorder: fc.boolean().chain((b) => (b ? fc.boolean() : fc.constant(false))), // 1 in 4: a hold adds 300 ms
  cancel: fc.option(fc.record({ side: fc.constantFrom<'source' | 'destination'>('source', 'destination'), afterMs: fc.integer({ min: 0, max: 800 }) }), { freq: 6, nil: undefined }),
});

// Every kind of fault at least once, whatever fast-check draws.
const EXAMPLES: [Scenario][] = [
  [{ mode: 'precopy', main: {}, preempt: {}, reorder: false }],
  [{ mode: 'postcopy-preempt', main: {}, preempt: {}, reorder: true }],
  [{ mode: 'precopy', main: { up: { dropAt: 300 * KiB } }, preempt: {}, reorder: false }],
  [{ mode: 'postcopy', main: { down: { dropAt: 20 } }, preempt: {}, reorder: false }],
  [{ mode: 'precopy', main: { up: { stall: { at: 100 * KiB, ms: 1800 } } }, preempt: {}, reorder: false }],
  [{ mode: 'postcopy', main: { up: { stall: { at: 200 * KiB, ms: 200 } } }, preempt: {}, reorder: false }],
  [{ mode: 'precopy', main: { up: { truncateAt: 50 * KiB } }, preempt: {}, reorder: false }],
  [{ mode: 'postcopy', main: { down: { truncateAt: 8 } }, preempt: {}, reorder: false }],
  [{ mode: 'precopy', main: { up: { corrupt: { at: 30, xor: 0x40 } } }, preempt: {}, reorder: false }],
  [{ mode: 'postcopy', main: { down: { corrupt: { at: 2, xor: 1 } } }, preempt: {}, reorder: false }],
  [{ mode: 'postcopy', main: { up: { bytesPerSecond: 8 * MiB } }, preempt: {}, reorder: false }],
  [{ mode: 'postcopy-preempt', main: {}, preempt: { up: { dropAt: 5000 } }, reorder: false }],
  [{ mode: 'postcopy-preempt', main: {}, preempt: { up: { stall: { at: 0, ms: 2000 } } }, reorder: false }],
  [{ mode: 'postcopy-preempt', main: {}, preempt: { up: { truncateAt: 4200 } }, reorder: false }],
  // Found by fast-check: the magic held back after 3 bytes, the source cancelled before the relay lets it through.
  [{ mode: 'precopy', main: { up: { stall: { at: 3, ms: 2400 } } }, preempt: {}, reorder: false, cancel: { side: 'source', afterMs: 793 } }],
  // Found by fast-check (seed 2023983780, under load): the destination closed while it waited for requested pages
  // on the stalled preempt channel, EOF read; completion.test.ts makes that moment deterministic.
  [{ mode: 'postcopy-preempt', main: { up: {} }, preempt: { up: { stall: { at: 45373, ms: 2491 } } }, reorder: false, cancel: { side: 'destination', afterMs: 799 } }],
];

// ---- the tests ------------------------------------------------------------------------

describe('sessions through a faulty network', () => {
  it('every run ends, typed, without leaks; completed runs are exact', { timeout: 600_000 }, async () => {
    const log: string[] = [];
    const t0 = performance.now();
    await fc.assert(
      fc.asyncProperty(scenario, async (s) => {
        log.push(await checkScenario(s));
      }),
      // FAULT_RUNS=N for a longer soak (about 0.6 s per run); FC_SEED/FC_PATH replay a reported failure (replay.ts).
      { numRuns: EXAMPLES.length + Number(process.env.FAULT_RUNS ?? 20), examples: EXAMPLES, endOnFailure: true, ...replayParameters() },
    );
    console.log(`[faults] ${log.length} runs in ${((performance.now() - t0) / 1000).toFixed(1)} s, heap max ${(heapMax / MiB).toFixed(0)} MiB\n  ${log.join('\n  ')}`);
  });
});

describe('a slow link', () => {
  // The source's wait for SHUT starts once EOF is handed to the kernel, while megabytes are
  // still in socket buffers: it must be a no-progress timeout, not a deadline.
  it('256 KiB/s from source to destination: slow, not a failure — both complete', async () => {
    // One pass of a quiet guest, about 1.1 MB, at 256 KiB/s: some 4.5 s. The destination's idle
    // timer never fires (bytes keep coming); the source must not give up on SHUT (3 s here) while
    // its stream is still on its way.
    const line = await checkScenario({ mode: 'precopy', main: { up: { bytesPerSecond: 256 * KiB } }, preempt: {}, reorder: false, quiet: true }, true);
    console.log(`[faults] ${line}`);
  });
});

describe('connection arrival reordered', () => {
  it('the preempt channel arriving first is not taken for the main channel (its first bytes are no stream magic): dropped and reported, the main channel still taken, the destination fails typed, nothing left open', async () => {
    // What a QEMU source sent on its two connections (it opens the second only after PONG 1,
    // which is why the SourceSession scenarios above never reorder: there the hold times out).
    const fixtures = join(import.meta.dirname, '..', 'fixtures');
    const main = readFileSync(join(fixtures, 'preempt-main.bin'));
    const preempt = readFileSync(join(fixtures, 'preempt-channel.bin'));
    const before = resourceSnapshot();
    unhandled.length = 0;
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink: new InMemorySink(), postcopy: true, idleTimeoutMs: IDLE_MS });
    const strangers: StrangerEvent[] = [];
    const roles: string[] = [];
    dst.on('stranger', (ev) => strangers.push(ev));
    dst.on('channel', (c) => roles.push(c.role));
    const relay = await FaultRelay.start({ target: dst.uri, reorder: { holdMs: 5000 } });
    const port = Number(relay.uri.split(':')[2]);
    const sockets: net.Socket[] = [];
    const open = async (bytes: Buffer) => {
      const s = net.connect(port, '127.0.0.1');
      s.on('error', () => undefined);
      s.on('data', () => undefined);
      sockets.push(s);
      await new Promise((r) => s.once('connect', r));
      s.write(bytes);
    };
    await open(main);
    while (relay.connections.length < 1) await new Promise((r) => setTimeout(r, 5));
    await open(preempt);
    const settled = await within(dst.done, RUN_BOUND_MS);
    for (const s of sockets) s.destroy();
    await relay.close();
    expect(relay.fired).toContain('conn 1 connected onward before conn 0 (reordered)');
    expect(settled.settled, 'the destination settles').toBe(true);
    const r = (settled as { settled: true; value: PromiseSettledResult<DestinationResult> }).value;
    expect(r.status).toBe('rejected');
    const e = (r as PromiseRejectedResult).reason as unknown;
    expect(e, describeError(e)).toBeInstanceOf(MigrationError);
    // QEMU takes roles by order and would read the page records as a bad stream header;
    // here the preempt connection is a stranger, and its pages never come.
    expect(strangers.map((x) => `${x.reason}/${x.error.code}`)).toEqual(['not-migration/not-a-migration-channel']);
    expect(roles).toEqual(['main']);
    expect((e as MigrationError).code, describeError(e)).toBe('protocol');
    expect(describeError(e)).toMatch(/pages never received/);
    const left = await leftAfter(before, SETTLE_MS);
    expect(left, 'nothing left open').toEqual([]);
    expect(unhandled.map(describeError)).toEqual([]);
  });
});

describe('TLS refused at the session level', () => {
  let dir: string;
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'qmt-faults-tls-'));
    await initPkiDir(join(dir, 'a'));
    await initPkiDir(join(dir, 'b'));
    // Trusts the destination's CA, but holds a client certificate of the other CA.
    await mkdir(join(dir, 'mixed'));
    await copyFile(join(dir, 'a', 'ca-cert.pem'), join(dir, 'mixed', 'ca-cert.pem'));
    await copyFile(join(dir, 'b', 'client-cert.pem'), join(dir, 'mixed', 'client-cert.pem'));
    await copyFile(join(dir, 'b', 'client-key.pem'), join(dir, 'mixed', 'client-key.pem'));
  });
  afterAll(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  interface TlsRun {
    source: PromiseSettledResult<SourceStats>;
    /** The destination keeps waiting after a refused connection: this is its end once closed. */
    destination: PromiseSettledResult<DestinationResult>;
    /** Its status after the source had failed and the refusal had been reported. */
    destinationWaiting: string;
    strangers: StrangerEvent[];
    sourceConnected: boolean;
    destinationChannels: number;
    sink: InMemorySink;
    left: string[];
  }

  /** A migration between a destination with credentials `dstDir` and a source with `srcDir`; waits for both and for their sockets. */
  async function tlsRun(dstDir: string, srcDir: string): Promise<TlsRun> {
    const before = resourceSnapshot();
    unhandled.length = 0;
    const sink = new InMemorySink();
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, idleTimeoutMs: IDLE_MS, transport: { tls: { dir: join(dir, dstDir) } } });
    const guest = new Guest();
    const src = new SourceSession({
      to: dst.uri,
      memory: guest.source,
      machineType: 'pc-q35-10.0',
      devices: DEVICES,
      replyTimeoutMs: REPLY_MS,
      transport: { tls: { dir: join(dir, srcDir) }, connectTimeoutMs: 5000 },
    });
    const run = { sourceConnected: false, destinationChannels: 0 };
    const strangers: StrangerEvent[] = [];
    src.on('connected', () => (run.sourceConnected = true));
    dst.on('channel', () => run.destinationChannels++);
    dst.on('stranger', (ev) => strangers.push(ev));
    const t0 = performance.now();
    src.start();
    const srcEnd = await within(Promise.allSettled([src.done]), RUN_BOUND_MS);
    while (strangers.length === 0 && performance.now() - t0 < RUN_BOUND_MS) await new Promise((r) => setTimeout(r, 10));
    const destinationWaiting = dst.stats().status;
    src.cancel();
    dst.close();
    const dstEnd = await within(Promise.allSettled([dst.done]), RUN_BOUND_MS);
    if (!srcEnd.settled || srcEnd.value.status !== 'fulfilled' || !dstEnd.settled || dstEnd.value.status !== 'fulfilled') throw new Error(`the TLS run did not end within ${RUN_BOUND_MS} ms`);
    const [source] = srcEnd.value.value;
    const [destination] = dstEnd.value.value;
    const left = await leftAfter(before, SETTLE_MS);
    await new Promise((r) => setImmediate(r));
    expect(unhandled.map(describeError), 'unhandled rejections').toEqual([]);
    return { source, destination, destinationWaiting, strangers, ...run, sink, left };
  }

  /** The destination's side: one stranger reported with the reason, still waiting, then closed by us. */
  function strangerCause(r: TlsRun): TransportError {
    expect(r.strangers.map((e) => e.reason), 'one refused connection, reported').toEqual(['tls']);
    expect(r.destinationWaiting, 'the destination keeps waiting').toBe('setup');
    expect(r.destination.status).toBe('rejected');
    expect((r.destination as PromiseRejectedResult).reason, 'closed by us').toMatchObject({ code: 'cancelled' });
    return r.strangers[0]!.error;
  }

  function tlsCause(r: PromiseSettledResult<unknown>, name: string): TransportError {
    expect(r.status, `${name} fails`).toBe('rejected');
    const e = (r as PromiseRejectedResult).reason as unknown;
    expect(e, `${name}: ${describeError(e)}`).toBeInstanceOf(MigrationError);
    const m = e as MigrationError;
    expect(m.kind, `${name}: ${m.message}`).toBe('network');
    expect(m.phase, `${name}: ${m.message}`).toBe('setup');
    expect(m.cause, `${name}: cause of ${m.message}`).toBeInstanceOf(TransportError);
    expect(m.code, `${name}: the cause's own code`).toBe((m.cause as TransportError).code);
    return m.cause as TransportError;
  }

  it('certificates from another CA: no session starts, the source fails and the destination reports the stranger, both naming the reason, nothing left open', async () => {
    const r = await tlsRun('a', 'b');
    expect(r.sourceConnected, 'the source never connected').toBe(false);
    expect(r.destinationChannels, 'the destination never accepted a channel').toBe(0);
    expect(r.sink.blocks.size, 'no RAM block was set up').toBe(0);
    expect(r.left, 'nothing left open').toEqual([]);
    const s = tlsCause(r.source, 'source');
    expect(s.code, s.describe()).toBe('tls-unknown-ca');
    // The source refuses the server certificate and drops the connection without a TLS
    // alert: the destination sees a hang-up in mid-handshake. It cannot know the CA was the
    // reason, but it must name a TLS refusal, not a peer that "does not speak TLS" — and it
    // is a stranger: dropped, reported, and the destination keeps waiting.
    const d = strangerCause(r);
    expect(['tls-unknown-ca', 'tls-handshake-failed'], `destination names the reason: ${d.describe()}`).toContain(d.code);
  });

  it('a client certificate from another CA: the destination refuses it, says why, and keeps waiting; nothing left open', async () => {
    const r = await tlsRun('a', 'mixed');
    expect(r.destinationChannels, 'the destination never accepted a channel').toBe(0);
    expect(r.sink.blocks.size, 'no RAM block was set up').toBe(0);
    expect(r.left, 'nothing left open').toEqual([]);
    // TLS 1.3: the client's handshake completes before the server has checked the client
    // certificate, so the source starts sending, then sees the connection close.
    expect(r.source.status, 'source fails').toBe('rejected');
    expect((r.source as PromiseRejectedResult).reason, 'a typed error').toBeInstanceOf(MigrationError);
    const d = strangerCause(r);
    expect(d.code, `destination names the reason: ${d.describe()}`).toBe('tls-unknown-ca');
  });
});
