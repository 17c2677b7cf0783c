/**
 * The seed guest (guest.S with RDEND: a small hot set written every pass, a
 * large read region read every pass and never written) migrated QEMU 10 →
 * QEMU 10 by postcopy at once, with QEMU's own postcopy-blocktime on the
 * destination: the guest runs on there, its hot set keeps the invariant, its
 * read region arrives intact. The bench's seed part (bench/seed-qemu.bench.ts)
 * times the policies; this only checks that the experiment is sound.
 */
import { afterAll, expect, it } from 'vitest';
import { checkGuestInvariant, checkReadRegion, compareGuestRam, migrateBetween, readGuestRam, startQemu, stopAll } from './harness.js';
import { describeWithQemu } from './require-qemu.js';

const MiB = 1024 * 1024;
const GUEST = { startMiB: 1, endMiB: 5, readEndMiB: 96 };
const RAM_MIB = 128;

afterAll(() => stopAll());

describeWithQemu('the seed guest, QEMU → QEMU', () => {
  it('postcopy at once: the destination reports postcopy-blocktime, the guest reads its region intact and keeps its invariant', async () => {
    const src = await startQemu({ name: 'seed-src', memoryMiB: RAM_MIB, guest: GUEST });
    const dst = await startQemu({ name: 'seed-dst', memoryMiB: RAM_MIB, guest: GUEST, incoming: true });
    await src.waitSerialPasses(3, 60_000);
    expect(src.serialLog(), 'the read region holds what the guest wrote').not.toContain('!');
    const res = await migrateBetween(src, dst, {
      capabilities: { 'postcopy-ram': true, 'postcopy-preempt': true },
      destinationCapabilities: { 'postcopy-blocktime': true },
      // A slow background stream: the guest's reads fault on the read region at the destination.
      sourceParameters: { 'max-bandwidth': 8 * MiB, 'max-postcopy-bandwidth': 8 * MiB },
      postcopyAfterPasses: 0,
      timeoutMs: 120_000,
    });
    expect(res.postcopyStarted).toBe(true);
    const d = res.destination!;
    const blocktime = d['postcopy-blocktime'] as number | undefined;
    const perVcpu = d['postcopy-vcpu-blocktime'] as number[] | undefined;
    expect(res.source.ram?.['postcopy-requests'], 'the guest faulted at the destination').toBeGreaterThan(0);
    expect(blocktime, 'QEMU counts blocktime with the capability').toBeGreaterThan(0);
    expect(perVcpu).toHaveLength(1);
    // The total counts only while every vCPU waits, so no vCPU's own blocktime is below it. With one vCPU
    // they are often equal, not always: under CI load QEMU 10.0.2 reported 1641 ms for the vCPU, 934 ms in
    // total. Its total needs smp_cpus_down == the vCPU count, and mark_postcopy_blocktime_begin lowers that
    // count for an already-received page even when it had not raised it (migration/postcopy-ram.c).
    expect(perVcpu![0]).toBeGreaterThanOrEqual(blocktime!);
    const passes = dst.serialPasses();
    await dst.waitSerialPasses(passes + 3, 60_000);
    await dst.pauseVm();
    const mem = await readGuestRam(dst, RAM_MIB * MiB);
    expect(dst.serialLog(), 'no read page was wrong at the destination').not.toContain('!');
    const inv = checkGuestInvariant(mem, GUEST);
    expect(inv.ok, inv.detail).toBe(true);
    const read = checkReadRegion(mem, GUEST.endMiB * MiB, GUEST.readEndMiB * MiB);
    expect(read.ok, read.detail).toBe(true);
    // Outside the hot set, the destination holds the stopped source's memory.
    const srcMem = await readGuestRam(src, RAM_MIB * MiB);
    const diff = compareGuestRam(srcMem, mem, { skip: [[GUEST.startMiB * MiB, GUEST.endMiB * MiB]] });
    expect(diff.equal, `differing pages ${diff.pages.slice(0, 8).map((p) => p.toString(16)).join(',')}`).toBe(true);
  }, 240_000);
});
