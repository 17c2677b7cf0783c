/**
 * Our SourceSession restoring a saved VM into a real QEMU 10.0 destination,
 * started like the library migrations so that it runs alongside them: the
 * saved VM "still running" at our source (test/qemu/source-helpers.ts
 * EmulatedGuest: every counter of the test guest's range goes up by one every
 * 50 ms until the switch), postcopy after one pass with preempt, plain TCP.
 * The guest walks its range top-down, against the background stream, so QEMU
 * faults and asks for pages.
 *
 * Checked as test/qemu/source.test.ts does: QEMU completes, the guest runs on
 * there, its invariant holds, every page outside its range equals ours.
 */
import { performance } from 'node:perf_hooks';
import type { LatencySummary } from '../../src/protocol/latency.js';
import type { SavedVmManifest } from '../../src/protocol/saved-vm.js';
import { SourceSession, type SourceStats } from '../../src/protocol/source.js';
import type { QemuProcess } from '../qemu/harness.js';
import { checkDestination, EmulatedGuest, MiB, savedDevices, savedRam, savedVmdesc, startDestination, type DestinationCheck, type GuestSpec } from '../qemu/source-helpers.js';

/** 64 MiB q35, a top-down guest over 32 MiB (as test/qemu/source.test.ts). */
export const QEMU_SPEC: GuestSpec = { memoryMiB: 64, guest: { startMiB: 1, endMiB: 33, direction: 'down' } };
const RANGE = { start: QEMU_SPEC.guest.startMiB * MiB, end: QEMU_SPEC.guest.endMiB * MiB };
const DIRTY_INTERVAL_MS = 50;

export interface QemuOutcome {
  name: string;
  startedAt: number;
  /** Our source completed (QEMU's completion and the guest check come after). */
  endedAt: number;
  source: SourceStats;
  check: DestinationCheck;
  answered: { main: number; preempt: number; mainInFlight: number };
  increments: number;
  latency: { source: LatencySummary };
}

export interface RunningQemuRestore {
  readonly name: string;
  /** Bytes our source has handed to its channels so far. */
  sent(): number;
  readonly done: Promise<QemuOutcome>;
  /** Ends our source now (a run that hung; the QEMU is stopped when `done` settles). */
  cancel(): void;
}

export interface PreparedQemuRestore {
  readonly name: string;
  /** Starts our source towards the waiting QEMU. */
  start(): RunningQemuRestore;
  /** Stops the QEMU (when start() is never called). */
  abandon(): Promise<void>;
}

/** Starts a QEMU destination for the saved VM in `vmDir`, waiting for our source (QEMU takes a moment to start). */
export async function prepareQemuRestore(name: string, vmDir: string, manifest: SavedVmManifest): Promise<PreparedQemuRestore> {
  const { q, uri } = await startDestination(`load-${name}`, QEMU_SPEC, { postcopy: true, preempt: true });
  return { name, start: () => startSource(name, q, uri, vmDir, manifest), abandon: () => stopQuietly(q) };
}

function startSource(name: string, q: QemuProcess, uri: string, vmDir: string, manifest: SavedVmManifest): RunningQemuRestore {
  const guest = new EmulatedGuest(savedRam(vmDir, manifest), 'pc.ram', RANGE);
  const src = new SourceSession({
    to: uri,
    memory: guest.source,
    machineType: manifest.machineType!,
    devices: savedDevices(vmDir, manifest),
    vmdesc: savedVmdesc(vmDir, manifest),
    postcopy: { afterPasses: 1 },
    preempt: true,
    stopVm: () => guest.stop(),
  });
  const answered = { main: 0, preempt: 0, mainInFlight: 0 };
  src.on('page-request', (r) => {
    answered[r.channel]++;
    if (r.reason === 'main-in-flight') answered.mainInFlight++;
  });
  const startedAt = performance.now();
  guest.start(DIRTY_INTERVAL_MS);
  src.start();
  const done = (async (): Promise<QemuOutcome> => {
    try {
      let source: SourceStats;
      try {
        source = await src.done;
      } catch (e) {
        throw new Error(`${name}: ${(e as Error).message}; destination: ${JSON.stringify(await q.queryMigrate().catch(() => undefined))} ${q.stderrTail(500)}`, { cause: e });
      }
      const endedAt = performance.now();
      const check = await checkDestination(q, guest.source.memory.get('pc.ram')!);
      return { name, startedAt, endedAt, source, check, answered, increments: guest.increments, latency: { source: source['postcopy-latency'] } };
    } finally {
      guest.stop();
      src.cancel();
      await stopQuietly(q);
    }
  })();
  return { name, sent: () => src.stats().transferred, done, cancel: () => src.cancel() };
}

async function stopQuietly(q: QemuProcess): Promise<void> {
  await q.stop().catch(() => undefined);
}
