/**
 * Switchover reaction (part 5 of `npm run bench`; alone: `node --import tsx
 * bench/switchover.bench.ts [--quick] [--runs N] [--no-qemu]`).
 *
 * How soon after the source VM stops the device state is on the wire, and
 * the destination runs: our SourceSession → DestinationSession next to QEMU →
 * QEMU, precopy and postcopy (after one pass), plain TCP on loopback, through
 * a relay that decodes the main channel and notes when SWITCHOVER_START and
 * the first device-state section go by (bench/lib/observer-peer.ts; every row
 * pays the same hop). Guests: 256 MiB, of which 1 MiB is rewritten all the
 * time (the QEMU test guest walking 1–2 MiB; our synthetic guest bumping the
 * same pages every 10 ms), so little RAM is left to send after the stop.
 *
 * Clocks: ours — the source's `stopped` event, the relay and the destination
 * on CLOCK_MONOTONIC; QEMU — the source's STOP and the destination's RESUME
 * QMP events (wall clock, µs) against the relay's wall clock. Prints figures;
 * asserts nothing.
 */
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { PostcopyPolicy } from '../src/protocol/postcopy-policy.js';
import { BenchChild } from './lib/child.js';
import type { Observed, ObserverCommand } from './lib/observer-peer.js';
import { runPart, type PartContext } from './lib/part.js';
import { fmt } from './lib/report.js';
import type { DestinationRun, SessionCommand, SourceRun } from './lib/session-peer.js';
import { fmtRatio, fmtStats, runStats, type RunStats } from './lib/stats.js';

const MiB = 1024 * 1024;
const SESSION_PEER = fileURLToPath(new URL('./lib/session-peer.ts', import.meta.url));
const OBSERVER = fileURLToPath(new URL('./lib/observer-peer.ts', import.meta.url));
const GUEST_MIB = 256;
const RANGE_MIB = 1;

type Impl = 'library' | 'qemu';
type Mode = 'precopy' | 'postcopy';

interface SwitchRun {
  /** Stop → SWITCHOVER_START through the relay, ms. */
  toSwitchoverStartMs: number | undefined;
  /** Stop → the first device-state section through the relay, ms. */
  toFirstDeviceMs: number | undefined;
  /** Stop → destination running, ms. */
  toRunningMs: number | undefined;
  /** Main-channel bytes between SWITCHOVER_START and the first device section (the last RAM). */
  ramAfterStopBytes: number | undefined;
  firstDevice: string | undefined;
}

interface Row {
  impl: Impl;
  mode: Mode;
  runs: SwitchRun[];
  errors: string[];
  toStart?: RunStats;
  toDevice?: RunStats;
  toRunning?: RunStats;
  ram?: RunStats;
}

export interface SwitchoverData {
  rows: Row[];
  qemuSkipped?: string;
}

async function observe(ctx: PartContext, to: string): Promise<{ obs: BenchChild<ObserverCommand>; uri: string }> {
  const obs = ctx.track(BenchChild.start<ObserverCommand>('observer', OBSERVER));
  const { uri } = await obs.call<{ uri: string }>({ cmd: 'observer-start', host: '127.0.0.1', to }, 15_000);
  return { obs, uri };
}

const ms = (a: number | undefined, b: number | undefined): number | undefined => (a === undefined || b === undefined ? undefined : (b - a) / 1000);

async function libraryRun(ctx: PartContext, mode: Mode): Promise<SwitchRun> {
  const src = ctx.track(BenchChild.start<SessionCommand>('source', SESSION_PEER));
  const dst = ctx.track(BenchChild.start<SessionCommand>('dest', SESSION_PEER));
  try {
    const postcopy = mode === 'postcopy';
    const policy: PostcopyPolicy = postcopy ? { afterPasses: 1 } : 'never';
    const [{ uri: dstUri }] = await Promise.all([
      dst.call<{ uri: string }>({ cmd: 'dest-listen', host: '127.0.0.1', postcopy, sink: { kind: 'memory' } }, 30_000),
      src.call({ cmd: 'source-prepare', memory: { kind: 'range', bytes: GUEST_MIB * MiB, rangeBytes: RANGE_MIB * MiB, intervalMs: 10 } }, 60_000),
    ]);
    const { obs, uri } = await observe(ctx, dstUri);
    try {
      const [s, d] = await Promise.all([
        src.call<SourceRun>({ cmd: 'source-migrate', to: uri, policy, preempt: false, timeoutMs: 120_000 }, 130_000),
        dst.call<DestinationRun>({ cmd: 'dest-wait', timeoutMs: 120_000 }, 130_000),
      ]);
      const o = await obs.call<Observed>({ cmd: 'observer-wait', timeoutMs: 10_000 }, 15_000);
      const stop = s.stoppedUs;
      const running = d.postcopy ? d.runUs : d.completedUs;
      return {
        toSwitchoverStartMs: ms(stop, o.switchoverStart?.monoUs),
        toFirstDeviceMs: ms(stop, o.firstDevice?.monoUs),
        toRunningMs: ms(stop, running),
        ramAfterStopBytes: o.firstDevice && o.switchoverStart ? o.firstDevice.byte - o.switchoverStart.byte : undefined,
        firstDevice: o.firstDevice?.idstr,
      };
    } finally {
      await ctx.release(obs);
    }
  } finally {
    await Promise.all([ctx.release(src), ctx.release(dst)]);
  }
}

async function qemuRun(ctx: PartContext, mode: Mode): Promise<SwitchRun> {
  const q = await import('./lib/qemu.js');
  const guest = { startMiB: 1, endMiB: 1 + RANGE_MIB, direction: 'up' as const };
  const src = await q.startQemuIn(undefined, { name: 'switch-src', memoryMiB: GUEST_MIB, guest });
  const dst = await q.startQemuIn(undefined, { name: 'switch-dst', memoryMiB: GUEST_MIB, guest, incoming: true });
  let obs: BenchChild<ObserverCommand> | undefined;
  try {
    await src.waitSerialPasses(3, 15_000);
    // The relay connects upstream only when the source connects: it can start before QEMU listens.
    const dstUri = `unix:${join(dst.dir, 'migrate.sock')}`;
    const o1 = await observe(ctx, dstUri);
    obs = o1.obs;
    const postcopy = mode === 'postcopy';
    await q.migrateBetween(src, dst, {
      uri: dstUri,
      connectUri: o1.uri,
      capabilities: { events: true, ...(postcopy ? { 'postcopy-ram': true } : {}) },
      // Postcopy: precopy must not converge first (1 ms); it switches after the first pass.
      sourceParameters: { ...q.UNLIMITED, ...(postcopy ? { 'downtime-limit': 1 } : {}) },
      ...(postcopy ? { postcopyAfterPasses: 2 } : {}),
      timeoutMs: 60_000,
    });
    const o = await obs.call<Observed>({ cmd: 'observer-wait', timeoutMs: 10_000 }, 15_000);
    const stop = q.eventUs(src, 'STOP');
    const running = q.eventUs(dst, 'RESUME');
    return {
      toSwitchoverStartMs: ms(stop, o.switchoverStart?.wallUs),
      toFirstDeviceMs: ms(stop, o.firstDevice?.wallUs),
      toRunningMs: ms(stop, running),
      ramAfterStopBytes: o.firstDevice && o.switchoverStart ? o.firstDevice.byte - o.switchoverStart.byte : undefined,
      firstDevice: o.firstDevice?.idstr,
    };
  } finally {
    if (obs) await ctx.release(obs);
    await Promise.all([src.stop(), dst.stop()]);
  }
}

const LABEL: Record<Impl, string> = { library: 'library → library', qemu: 'QEMU → QEMU' };

function markdown(d: SwitchoverData, runs: number): string {
  const lines: string[] = [];
  lines.push(
    `${GUEST_MIB} MiB guests of which ${RANGE_MIB} MiB is rewritten all the time; plain TCP over loopback through a decoding relay (same hop for every row); postcopy switches after the first pass. ${runs} runs per row, interleaved; median (min–max), ms.`,
    '',
    '| source → destination | mode | stop → SWITCHOVER_START on the wire | stop → first device-state byte on the wire | vs QEMU | stop → destination running | vs QEMU | RAM sent after the stop (KiB) | first device section |',
    '|---|---|--:|--:|--:|--:|--:|--:|---|',
  );
  for (const r of d.rows) {
    const qemu = d.rows.find((x) => x.impl === 'qemu' && x.mode === r.mode);
    const err = r.errors.length > 0 ? ` (errors: ${r.errors.join('; ')})` : '';
    const base = r.impl === 'qemu' ? '1.00× (baseline)' : undefined;
    lines.push(
      `| ${LABEL[r.impl]}${err} | ${r.mode} | ${fmtStats(r.toStart, 2)} | ${fmtStats(r.toDevice, 2)} | ${base ?? fmtRatio(r.toDevice?.median, qemu?.toDevice?.median)} | ${fmtStats(r.toRunning, 2)} | ${base ?? fmtRatio(r.toRunning?.median, qemu?.toRunning?.median)} | ${fmtStats(r.ram, 0, 1 / 1024)} | ${[...new Set(r.runs.map((x) => x.firstDevice ?? '?'))].join(', ') || '–'} |`,
    );
  }
  lines.push('');
  if (d.qemuSkipped) lines.push(`QEMU rows skipped: ${d.qemuSkipped}.`, '');
  lines.push(
    'Our source reacts to the stop in-process: `stopVm` returns, the `stopped` event fires and the final sections are encoded at once — no polling. The relay notes a record when the chunk that completes it arrives; "first device-state byte" is the chunk carrying the first non-RAM section header after SWITCHOVER_START (postcopy: inside the PACKAGED blob). Destination running: ours — POSTCOPY_RUN arrived (postcopy) or the migration completed (precopy); QEMU — the destination\'s RESUME event. QEMU\'s times are QMP event timestamps (wall clock, µs) against the relay\'s wall clock; ours are CLOCK_MONOTONIC in every process. Lower is better; a ratio below 1× means faster than QEMU.',
  );
  return lines.join('\n');
}

await runPart<SwitchoverData>('switchover', 'Switchover reaction', { runs: { type: 'string' }, 'no-qemu': { type: 'boolean', default: false } }, async (ctx) => {
  const runs = Number(ctx.options.runs ?? 3);
  const data: SwitchoverData = { rows: [] };
  const impls: Impl[] = ['library'];
  if (ctx.options['no-qemu']) data.qemuSkipped = '--no-qemu';
  else {
    const q = await import('./lib/qemu.js');
    const why = await q.qemuUnavailable();
    if (why) data.qemuSkipped = why;
    else {
      impls.push('qemu');
      ctx.onCleanup(() => q.stopAll());
    }
  }
  for (const mode of ['precopy', 'postcopy'] as const) for (const impl of impls) data.rows.push({ impl, mode, runs: [], errors: [] });
  for (let round = 0; round < runs; round++) {
    for (const r of data.rows) {
      try {
        const x = r.impl === 'library' ? await libraryRun(ctx, r.mode) : await qemuRun(ctx, r.mode);
        r.runs.push(x);
        ctx.log(`round ${round + 1}/${runs}: ${r.impl} ${r.mode}: stop → device ${fmt(x.toFirstDeviceMs, 2)} ms, → running ${fmt(x.toRunningMs, 2)} ms`);
      } catch (e) {
        r.errors.push(e instanceof Error ? e.message.split('\n')[0]! : String(e));
        ctx.log(`round ${round + 1}: ${r.impl} ${r.mode} failed: ${String(e)}`);
      }
    }
  }
  const defined = (xs: (number | undefined)[]): number[] => xs.filter((x): x is number => x !== undefined);
  for (const r of data.rows) {
    const set = <K extends keyof Row>(k: K, v: Row[K] | undefined): void => {
      if (v !== undefined) r[k] = v;
    };
    set('toStart', runStats(defined(r.runs.map((x) => x.toSwitchoverStartMs))));
    set('toDevice', runStats(defined(r.runs.map((x) => x.toFirstDeviceMs))));
    set('toRunning', runStats(defined(r.runs.map((x) => x.toRunningMs))));
    set('ram', runStats(defined(r.runs.map((x) => x.ramAfterStopBytes))));
  }
  return { config: { runs, guestMiB: GUEST_MIB, rewrittenMiB: RANGE_MIB, transport: 'plain TCP, loopback, through the decoding relay' }, data, markdown: markdown(data, runs) };
});
