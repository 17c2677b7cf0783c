/**
 * One SourceSession → DestinationSession migration over loopback, started so
 * that several can run at once in one process: a DirtyingGuest at the source,
 * an InMemorySink at the destination, optionally TLS, precopy or postcopy
 * after one pass (with or without preempt). During postcopy the destination
 * faults pages in from the top of RAM down, a few at a time, so that the
 * source gets demand requests while it streams the rest.
 *
 * Prepared first (guest memory filled, destination listening), started
 * later: the load test starts every migration in the same loop turn.
 * `received()` is the destination's byte count at any moment (the load test
 * samples it to see that no migration starves while the others run).
 */
import { performance } from 'node:perf_hooks';
import { DestinationSession, type DestinationResult } from '../../src/protocol/destination.js';
import type { LatencySummary } from '../../src/protocol/latency.js';
import { InMemorySink } from '../../src/protocol/memory.js';
import type { PageRequestResult } from '../../src/protocol/page-tracker.js';
import { SourceSession, type DeviceStateSection, type SourceStats } from '../../src/protocol/source.js';
import type { TransportOptions } from '../../src/transport/connection.js';
import { BLOCK, DirtyingGuest, PAGE } from './dirtying-guest.js';

const MiB = 1024 * 1024;

export type LibraryMode = 'precopy' | 'postcopy' | 'postcopy-preempt';

export interface LibraryMigrationSpec {
  name: string;
  ramMiB: number;
  mode: LibraryMode;
  /** A tls-creds-x509 directory (both ends use it: one CA), or undefined for plain TCP. */
  tlsDir: string | undefined;
  /**
   * Issue 13 (bench/load.bench.ts): both sessions' `threads` option, with guest
   * RAM and the destination's sink in shared memory when not 'off'. Undefined:
   * the library's default, memory not shared.
   */
  threads?: 'auto' | 'on' | 'off';
}

export interface LibraryOutcome {
  spec: LibraryMigrationSpec;
  /** performance.now() at start and when both sides had settled. */
  startedAt: number;
  endedAt: number;
  source: SourceStats;
  destination: DestinationResult;
  /** Bytes the destination received on every channel. */
  bytesReceived: number;
  /** Pages of the block the destination does not hold after completion (must be 0). */
  pagesMissing: number;
  /** The first page whose bytes differ from the source's (-1: identical). */
  firstDifference: number;
  devicesEqual: boolean;
  /** Demand requests the destination made and saw answered. */
  demand: number;
  answered: { main: number; preempt: number; mainInFlight: number };
  /** Source: request read → the answer's last byte handed to the kernel; destination: request sent → page placed. µs. */
  latency: { source: LatencySummary; destination: LatencySummary };
  guestTicks: number;
  /** What each session's stats say of threads (issue 13), when they say anything. */
  threads?: { source: unknown; destination: unknown };
}

export interface PreparedLibraryMigration {
  readonly spec: LibraryMigrationSpec;
  /** Starts the guest and the source (the destination already listens). */
  start(): RunningLibraryMigration;
  /** Closes the destination (when start() is never called). */
  abandon(): void;
}

export interface RunningLibraryMigration {
  readonly spec: LibraryMigrationSpec;
  readonly pages: number;
  /** Bytes the destination has received so far. */
  received(): number;
  /** Both sides' phase and counters, for a failure message. */
  state(): string;
  /** Settles as soon as both sessions have (before the checks of `done`). */
  readonly ended: Promise<void>;
  readonly done: Promise<LibraryOutcome>;
  /** Ends both sessions now (a run that hung). */
  cancel(): void;
}

/** Pages the source sent (PAGE, ZERO and XBZRLE records; resent pages count again). */
export function pagesSent(o: LibraryOutcome): number {
  return o.source.normal + o.source.duplicate + o.source.xbzrle;
}

/** Pages the destination received, counted the same way. */
export function pagesReceived(o: LibraryOutcome): number {
  return o.destination.stats.normal + o.destination.stats.duplicate + o.destination.stats.xbzrle;
}

function devices(seed: number): DeviceStateSection[] {
  const bytes = (n: number) => Buffer.from(Array.from({ length: n }, (_, i) => (i * 31 + seed) & 0xff));
  return [
    { idstr: 'timer', instanceId: 0, versionId: 2, data: bytes(24) },
    { idstr: 'cpu', instanceId: 0, versionId: 12, data: bytes(1851) },
  ];
}

/** While postcopy runs, touches the block from the top down, `inFlight` faults at a time, until every page is here. */
function faultTopDown(dst: DestinationSession, bytes: number, inFlight: number, out: PageRequestResult[]): Promise<void> {
  // Not dst.stats() per page: it summarises the latency histogram each time, far too slow for a loop.
  let settled = false;
  dst.done.then(
    () => (settled = true),
    () => (settled = true),
  );
  return new Promise((resolve) => {
    dst.once('postcopy-run', () => {
      void (async () => {
        const pending = new Set<Promise<void>>();
        for (let off = bytes - PAGE; off >= 0 && !settled; off -= PAGE) {
          if (dst.hasPage(BLOCK, off)) continue;
          const p: Promise<void> = dst.requestPage(BLOCK, off).then(
            (r) => {
              if (r.requested) out.push(r);
            },
            () => undefined,
          );
          const tracked: Promise<void> = p.then(() => {
            pending.delete(tracked);
          });
          pending.add(tracked);
          if (pending.size >= inFlight) await Promise.race(pending);
        }
        await Promise.all(pending);
      })().then(resolve);
    });
    dst.done.then(
      () => resolve(),
      () => resolve(),
    );
  });
}

function firstDifference(a: Buffer, b: Buffer | undefined): number {
  if (!b || a.length !== b.length) return 0;
  for (let off = 0; off < a.length; off += PAGE) if (a.compare(b, off, off + PAGE, off, off + PAGE) !== 0) return off;
  return -1;
}

/**
 * Sets up the guest, the destination (listening) and the source. The guest's
 * hot region is a quarter of its RAM in the upper half, rewritten at about
 * 20 MiB/s; precopy gives up converging after three passes (1 ms downtime
 * budget) and sends the rest with the guest stopped.
 */
export async function prepareLibraryMigration(spec: LibraryMigrationSpec, seed: number): Promise<PreparedLibraryMigration> {
  const ramBytes = spec.ramMiB * MiB;
  const postcopy = spec.mode !== 'precopy';
  const shared = spec.threads !== undefined && spec.threads !== 'off';
  const guest = new DirtyingGuest({ ramBytes, hot: { start: ramBytes / 2, end: ramBytes / 2 + ramBytes / 4 }, pagesPerTick: 50, tickMs: 10, shared });
  const sink = new InMemorySink({ shared });
  // Spread: a tree without the option compiles and ignores it.
  const threads = spec.threads ? { threads: spec.threads } : {};
  const transport: TransportOptions | undefined = spec.tlsDir ? { tls: { dir: spec.tlsDir } } : undefined;
  // TCP_NODELAY on the return path, as qmt receive: requests go out at once.
  const dst = await DestinationSession.listen({
    listen: 'tcp:127.0.0.1:0',
    sink,
    postcopy,
    idleTimeoutMs: 60_000,
    transport: { ...transport, main: { tuning: { noDelay: true } } },
    ...threads,
  });
  const devs = devices(seed);
  const src = new SourceSession({
    to: dst.uri,
    ...(transport ? { transport } : {}),
    memory: guest.source,
    machineType: 'pc-q35-10.0',
    devices: devs,
    postcopy: postcopy ? { afterPasses: 1 } : 'never',
    preempt: spec.mode === 'postcopy-preempt',
    downtimeLimitMs: 1,
    maxPasses: 3,
    stopVm: () => guest.stop(),
    ...threads,
  });
  const demand: PageRequestResult[] = [];
  const faulting = postcopy ? faultTopDown(dst, ramBytes, 4, demand) : Promise.resolve();
  const answered = { main: 0, preempt: 0, mainInFlight: 0 };
  src.on('page-request', (r) => {
    answered[r.channel]++;
    if (r.reason === 'main-in-flight') answered.mainInFlight++;
  });
  const state = (): string =>
    `source ${src.currentPhase} ${JSON.stringify(src.stats())}; destination ${dst.currentPhase} ${JSON.stringify(dst.stats())}; demand answered ${demand.length}`;

  const finish = async (startedAt: number): Promise<LibraryOutcome> => {
    try {
      const [source, destination] = await Promise.all([src.done, dst.done]);
      const endedAt = performance.now();
      await faulting;
      let pagesMissing = 0;
      for (let off = 0; off < ramBytes; off += PAGE) if (!dst.hasPage(BLOCK, off)) pagesMissing++;
      const devicesEqual =
        destination.devices.length === devs.length && destination.devices.every((d, i) => d.idstr === devs[i]!.idstr && d.data.equals(devs[i]!.data));
      return {
        spec,
        startedAt,
        endedAt,
        source,
        destination,
        bytesReceived: destination.stats.transferred,
        pagesMissing,
        firstDifference: firstDifference(guest.ram, sink.blocks.get(BLOCK)),
        devicesEqual,
        demand: demand.length,
        answered,
        latency: { source: source['postcopy-latency'], destination: destination.stats['postcopy-latency'] },
        guestTicks: guest.ticks,
        threads: { source: (source as { threads?: unknown }).threads, destination: (destination.stats as { threads?: unknown }).threads },
      };
    } finally {
      guest.stop();
      src.cancel(); // no-op once settled
      dst.close();
    }
  };
  const start = (): RunningLibraryMigration => {
    const startedAt = performance.now();
    guest.start();
    src.start();
    const ended = Promise.allSettled([src.done, dst.done]).then(() => undefined);
    const cancel = (): void => {
      src.cancel();
      dst.close();
    };
    return { spec, pages: guest.pages, received: () => dst.stats().transferred, state, ended, done: finish(startedAt), cancel };
  };
  const abandon = (): void => {
    dst.done.catch(() => undefined);
    dst.close();
  };
  return { spec, start, abandon };
}
