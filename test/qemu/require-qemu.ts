/**
 * Gating of tests that need a real QEMU.
 *
 * Without QEMU (or the binutils that build the test guest) such tests are
 * skipped, unless env REQUIRE_QEMU=1: then the missing tool is reported as a
 * failing test, never as a silent pass or skip.
 */
import { spawnSync } from 'node:child_process';
import { describe, it } from 'vitest';
import { QEMU_BINARY } from './harness.js';

export interface QemuAvailability {
  available: boolean;
  /** `qemu-system-x86_64 --version` first line, when available. */
  version: string | undefined;
  /** Why it is not available. */
  reason: string | undefined;
}

let cached: QemuAvailability | undefined;

function probe(cmd: string, args: string[]): { ok: boolean; out: string } {
  const r = spawnSync(cmd, args, { encoding: 'utf8', timeout: 10_000 });
  if (r.error) return { ok: false, out: r.error.message };
  return { ok: r.status === 0, out: `${r.stdout ?? ''}${r.stderr ?? ''}` };
}

/** Checks (once per process) for the QEMU binary and the guest toolchain (as, ld, objcopy). */
export function qemuAvailability(): QemuAvailability {
  if (cached) return cached;
  const q = probe(QEMU_BINARY, ['--version']);
  if (!q.ok) {
    cached = { available: false, version: undefined, reason: `${QEMU_BINARY} --version failed: ${q.out.trim()}` };
    return cached;
  }
  const version = q.out.split('\n')[0]?.trim();
  for (const tool of ['as', 'ld', 'objcopy']) {
    const t = probe(tool, ['--version']);
    if (!t.ok) {
      cached = { available: false, version, reason: `${tool} (binutils, needed to build the test guest) is missing: ${t.out.trim()}` };
      return cached;
    }
  }
  cached = { available: true, version, reason: undefined };
  return cached;
}

/** True when QEMU and the guest toolchain are usable. */
export function qemuAvailable(): boolean {
  return qemuAvailability().available;
}

/** True when env REQUIRE_QEMU=1 (CI): a missing QEMU must fail the run. */
export function qemuRequired(): boolean {
  return process.env.REQUIRE_QEMU === '1';
}

/**
 * `describe` for tests needing QEMU: runs normally when QEMU is available;
 * otherwise skips the block, or with REQUIRE_QEMU=1 replaces it with a single
 * failing test naming what is missing.
 */
export function describeWithQemu(name: string, fn: () => void): void {
  const a = qemuAvailability();
  if (a.available) {
    describe(name, fn);
  } else if (qemuRequired()) {
    describe(name, () => {
      it('requires QEMU (REQUIRE_QEMU=1)', () => {
        throw new Error(`QEMU is required (REQUIRE_QEMU=1) but unavailable: ${a.reason}`);
      });
    });
  } else {
    describe.skip(`${name} (skipped: ${a.reason})`, fn);
  }
}

/** For scripts: throws if QEMU is unavailable. */
export function assertQemu(): void {
  const a = qemuAvailability();
  if (!a.available) throw new Error(`QEMU unavailable: ${a.reason}`);
}
