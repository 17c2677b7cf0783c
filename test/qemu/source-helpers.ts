/**
 * Helpers for test/qemu/source.test.ts: capture a running test guest from a
 * QEMU 10.0 source into a saved VM, start QEMU destinations that wait for
 * `qmt send` / SourceSession, emulate the guest still running at our source,
 * and check a restored guest.
 */
import { readFileSync } from 'node:fs';
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { DestinationSession } from '../../src/protocol/destination.js';
import { DirectorySink } from '../../src/protocol/directory-sink.js';
import { InMemorySource } from '../../src/protocol/memory-source.js';
import { RAM_DIR, writeSavedVm, type SavedVmManifest } from '../../src/protocol/saved-vm.js';
import type { DeviceStateSection } from '../../src/protocol/source.js';
import { TARGET_PAGE_SIZE } from '../../src/stream/constants.js';
import {
  checkGuestInvariant,
  compareGuestRam,
  guestRangeOf,
  incomingPort,
  readGuestRam,
  startQemu,
  type InvariantResult,
  type MigrationInfo,
  type QemuProcess,
  type RamDiff,
} from './harness.js';

export const MiB = 1024 * 1024;

/** What a source and its destination must share: machine, RAM size, guest image. */
export interface GuestSpec {
  memoryMiB: number;
  guest: { startMiB: number; endMiB: number; direction: 'up' | 'down' };
}

/** The TLS server credentials option of a QEMU destination (id tls0). */
function tlsServerArgs(dir: string): string[] {
  return ['-object', `tls-creds-x509,id=tls0,dir=${dir},endpoint=server`];
}

export { incomingPort } from './harness.js';

/**
 * Runs the test guest on a QEMU source and migrates it (precopy) into a
 * DestinationSession writing a saved-VM directory, as `qmt receive` does. The
 * source QEMU is stopped at the end. Returns the manifest.
 */
export async function captureSavedVm(dir: string, spec: GuestSpec, name = 'capture-src'): Promise<SavedVmManifest> {
  await mkdir(dir, { recursive: true });
  const sink = new DirectorySink(join(dir, RAM_DIR));
  const session = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, idleTimeoutMs: 20_000 });
  let src: QemuProcess | undefined;
  try {
    src = await startQemu({ name, machine: 'q35', memoryMiB: spec.memoryMiB, guest: spec.guest });
    // A few passes, so that the range holds non-zero counters.
    await src.waitSerialPasses(3, 15_000);
    // The guest rewrites its range all the time: a generous downtime budget lets precopy converge after one pass.
    await src.setParameters({ 'downtime-limit': 5000 });
    await src.migrate(session.uri);
    await src.waitMigration(['completed'], 30_000);
    const result = await session.done;
    const manifest = await writeSavedVm(dir, result);
    if (!manifest.complete) throw new Error(`capture incomplete: ${JSON.stringify(manifest.error)}`);
    return manifest;
  } finally {
    session.close();
    await sink.close();
    await src?.stop();
  }
}

/** Device sections of a saved VM, as SourceSession takes them. */
export function savedDevices(dir: string, m: SavedVmManifest): DeviceStateSection[] {
  return m.devices.map((d) => ({ sectionId: d.sectionId, idstr: d.idstr, instanceId: d.instanceId, versionId: d.versionId, data: readFileSync(join(dir, d.file)) }));
}

/** The saved VM's VM description, when it has one. */
export function savedVmdesc(dir: string, m: SavedVmManifest): Uint8Array | undefined {
  return m.vmdesc ? readFileSync(join(dir, m.vmdesc)) : undefined;
}

/** Every RAM block of a saved VM, read into memory. */
export function savedRam(dir: string, m: SavedVmManifest): Map<string, Buffer> {
  const out = new Map<string, Buffer>();
  for (const b of m.blocks) {
    const buf = Buffer.alloc(b.length);
    readFileSync(join(dir, b.file)).copy(buf);
    out.set(b.idstr, buf);
  }
  return out;
}

/**
 * The saved guest "still running" at our source: an InMemorySource over the
 * saved RAM whose counter bytes (the first byte of every page of the guest's
 * range) all go up by one every `intervalMs`, until `stop()` (SourceSession's
 * `stopVm`). The same +1 on every page keeps the test guest's invariant.
 */
export class EmulatedGuest {
  readonly source: InMemorySource;
  /** How many times every counter went up. */
  increments = 0;
  private timer: NodeJS.Timeout | undefined;
  private readonly one = Buffer.alloc(1);

  constructor(
    ram: Map<string, Buffer>,
    private readonly block: string,
    private readonly range: { start: number; end: number },
    /** Memory in SharedArrayBuffers (a source with `threads` reads it from its channels' workers). */
    opts: { shared?: boolean } = {},
  ) {
    this.source = new InMemorySource(ram, opts);
  }

  /** One increment of every counter. */
  step(): void {
    const mem = this.source.memory.get(this.block)!;
    for (let off = this.range.start; off < this.range.end; off += TARGET_PAGE_SIZE) {
      this.one[0] = ((mem[off] ?? 0) + 1) & 0xff;
      this.source.write(this.block, off, this.one);
    }
    this.increments++;
  }

  start(intervalMs: number): this {
    this.step();
    this.timer = setInterval(() => this.step(), intervalMs);
    return this;
  }

  stop(): void {
    clearInterval(this.timer);
    this.timer = undefined;
  }

  get running(): boolean {
    return this.timer !== undefined;
  }
}

/**
 * A fresh QEMU destination for a saved VM of `spec` (same machine, RAM and
 * guest image), listening on 127.0.0.1 (port chosen by QEMU) with postcopy
 * (and preempt) and TLS as asked. Returns the QEMU and the URI to send to.
 */
export async function startDestination(
  name: string,
  spec: GuestSpec,
  opts: { postcopy: boolean; preempt: boolean; tlsDir?: string; multifd?: number },
): Promise<{ q: QemuProcess; uri: string }> {
  const q = await startQemu({
    name,
    machine: 'q35',
    memoryMiB: spec.memoryMiB,
    guest: spec.guest,
    incoming: true,
    extraArgs: opts.tlsDir ? tlsServerArgs(opts.tlsDir) : [],
  });
  await q.setCapabilities({
    events: true,
    ...(opts.postcopy ? { 'postcopy-ram': true } : {}),
    ...(opts.preempt ? { 'postcopy-preempt': true } : {}),
    ...(opts.multifd ? { multifd: true } : {}),
  });
  if (opts.tlsDir) await q.setParameters({ 'tls-creds': 'tls0' });
  if (opts.multifd) await q.setParameters({ 'multifd-channels': opts.multifd });
  // Stay alive when the incoming migration fails: its error is part of the report.
  await q.migrateIncoming('tcp:127.0.0.1:0', { 'exit-on-error': false });
  return { q, uri: `tcp:127.0.0.1:${await incomingPort(q)}` };
}

export interface DestinationCheck {
  info: MigrationInfo;
  /** Serial passes seen after completion (the guest runs there). */
  passesAfter: number;
  invariant: InvariantResult;
  /** pc.ram outside the guest's range against `expected` (when given). */
  outside: RamDiff | undefined;
  statuses: string[];
}

/** Statuses QEMU announced through MIGRATION events. */
export function migrationStatuses(q: QemuProcess): string[] {
  return q.qmp.events.filter((e) => e.event === 'MIGRATION').map((e) => String((e.data as { status?: unknown } | undefined)?.status ?? ''));
}

/**
 * Waits for the destination to report `completed`, for the guest to run
 * (two more serial passes), then pauses it and checks its memory: the
 * invariant over the guest's range and, when `expected` pc.ram is given,
 * every page outside the range bit for bit (the guest writes only its range).
 */
export async function checkDestination(q: QemuProcess, expected?: Buffer, timeoutMs = 30_000): Promise<DestinationCheck> {
  const info = await q.waitMigration(['completed'], timeoutMs);
  const base = q.serialPasses();
  const passesAfter = (await q.waitSerialPasses(base + 2, 15_000)) - base;
  await q.pauseVm();
  const range = guestRangeOf(q);
  const mem = await readGuestRam(q, q.memoryMiB * MiB);
  const invariant = checkGuestInvariant(mem, range);
  const outside = expected ? compareGuestRam(mem, expected.subarray(0, mem.length), { skip: [[range.startMiB * MiB, range.endMiB * MiB]] }) : undefined;
  return { info, passesAfter, invariant, outside, statuses: migrationStatuses(q) };
}
