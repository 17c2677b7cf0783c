/**
 * QEMU for the benchmarks, through the test harness (test/qemu/harness.ts):
 * QEMUs optionally started inside a network namespace, TLS credentials,
 * incoming ports, and event times.
 *
 * The harness runs `QEMU_BINARY`, read once when it is loaded; here that is a
 * small wrapper that enters the namespace named by QMT_BENCH_NETNS (if any)
 * before it execs QEMU, so the QEMU keeps the PID the harness tracks.
 */
import { chmodSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import { join } from 'node:path';

const realQemu = process.env.QEMU_BINARY ?? 'qemu-system-x86_64';
const wrapperDir = mkdtempSync(join(os.tmpdir(), 'qmt-bench-qemu-'));
const wrapper = join(wrapperDir, 'qemu');
writeFileSync(
  wrapper,
  `#!/bin/sh\nif [ -n "$QMT_BENCH_NETNS" ]; then exec ip netns exec "$QMT_BENCH_NETNS" "$QMT_BENCH_QEMU" "$@"; fi\nexec "$QMT_BENCH_QEMU" "$@"\n`,
);
chmodSync(wrapper, 0o755);
process.env.QMT_BENCH_QEMU = realQemu;
process.env.QEMU_BINARY = wrapper;
process.on('exit', () => rmSync(wrapperDir, { recursive: true, force: true }));

const harness = await import('../../test/qemu/harness.js');
export const { startQemu, stopAll, migrateBetween, readGuestRam, checkGuestInvariant, checkReadRegion, guestRangeOf, dumpSizeFor, incomingPort } = harness;
export type QemuProcess = import('../../test/qemu/harness.js').QemuProcess;
export type QemuOptions = import('../../test/qemu/harness.js').QemuOptions;
export type MigrationInfo = import('../../test/qemu/harness.js').MigrationInfo;

/** Whether QEMU can run here (the binary answers --version). */
export async function qemuUnavailable(): Promise<string | undefined> {
  const { execFile } = await import('node:child_process');
  return new Promise((resolve) => {
    execFile(realQemu, ['--version'], { timeout: 10_000 }, (err, stdout) => resolve(err ? `${realQemu}: ${err.message.split('\n')[0]}` : stdout.includes('QEMU') ? undefined : `${realQemu}: unexpected --version output`));
  });
}

/** `qemu-system-x86_64 --version`, first line. */
export async function qemuVersion(): Promise<string> {
  const { execFileSync } = await import('node:child_process');
  try {
    return execFileSync(realQemu, ['--version'], { encoding: 'utf8', timeout: 10_000 }).split('\n')[0] ?? '?';
  } catch {
    return '?';
  }
}

/** Starts a QEMU inside network namespace `netns` (or the current one). */
export async function startQemuIn(netns: string | undefined, opts: QemuOptions): Promise<QemuProcess> {
  // The wrapper reads the variable when QEMU is spawned, inside startQemu: start one QEMU at a time.
  if (netns) process.env.QMT_BENCH_NETNS = netns;
  else delete process.env.QMT_BENCH_NETNS;
  try {
    return await startQemu(opts);
  } finally {
    delete process.env.QMT_BENCH_NETNS;
  }
}

/** `-object tls-creds-x509,...` for a QEMU with our PKI directory (id tls0). */
export function tlsCredsArgs(dir: string, endpoint: 'server' | 'client'): string[] {
  return ['-object', `tls-creds-x509,id=tls0,dir=${dir},endpoint=${endpoint},verify-peer=on`];
}


/** Wall-clock µs (QMP timestamp) of the last event `name` received so far that matches, or undefined. */
export function eventUs(q: QemuProcess, name: string, match: (data: Record<string, unknown> | undefined) => boolean = () => true): number | undefined {
  for (let i = q.qmp.events.length - 1; i >= 0; i--) {
    const e = q.qmp.events[i]!;
    if (e.event === name && match(e.data as Record<string, unknown> | undefined)) return e.timestamp.seconds * 1e6 + e.timestamp.microseconds;
  }
  return undefined;
}

/** The MIGRATION event with this status. */
export function migrationEventUs(q: QemuProcess, status: string): number | undefined {
  return eventUs(q, 'MIGRATION', (d) => d?.status === status);
}

/** Waits for a MIGRATION event with `status` (after `since`, an index into the event list). */
export async function waitMigrationEvent(q: QemuProcess, status: string, timeoutMs: number, since = 0): Promise<void> {
  await q.waitEvent('MIGRATION', (e) => (e.data as { status?: unknown } | undefined)?.status === status, timeoutMs, since);
}

/** Parameters that let QEMU send as fast as it can: max-bandwidth far above any link here (QEMU's default is 128 MiB/s). */
export const UNLIMITED = { 'max-bandwidth': 1e15 } as const;
