/**
 * The record of one load run (test/load/concurrent.test.ts): per-migration
 * and aggregate throughput, Jain's fairness index, the worst urgent-latency
 * p99, as a JSON-able object and as console lines. Nothing here asserts.
 */
import { cpus } from 'node:os';
import { pagesReceived, pagesSent, type LibraryOutcome } from './library-migration.js';
import { jainIndex, mbps, round, spread } from './metrics.js';
import type { QemuOutcome } from './qemu-restore.js';
import { PAGE } from './dirtying-guest.js';

const MiB = 1024 * 1024;

/** Bytes received per library migration (and sent by the QEMU one) at one moment, ms after the start. */
export interface Sample {
  atMs: number;
  library: number[];
  qemu: number;
}

export interface LoadRunInput {
  library: LibraryOutcome[];
  qemu: QemuOutcome;
  qemuVersion: string | undefined;
  /** performance.now() when every source was started. */
  t0: number;
  /** Samples at t0 and when the first library migration settled: every migration ran in between. */
  window: { start: Sample; end: Sample };
  testMs: number;
}

function libraryRow(o: LibraryOutcome) {
  const ms = o.endedAt - o.startedAt;
  return {
    name: o.spec.name,
    mode: o.spec.mode,
    tls: o.spec.tlsDir !== undefined,
    ramMiB: o.spec.ramMiB,
    ms: round(ms),
    bytesReceived: o.bytesReceived,
    /** Wire bytes. */
    mbps: round(mbps(o.bytesReceived, ms)),
    /** Pages moved × 4 KiB (zero pages cost a few bytes on the wire). */
    ramPagesMBps: round(mbps(pagesReceived(o) * PAGE, ms)),
    passes: o.source.passes,
    downtimeMs: o.source.downtime,
    pagesSent: pagesSent(o),
    pagesReceived: pagesReceived(o),
    requests: o.source['postcopy-requests'],
    answered: o.answered,
    /** Source: request read → the answer's last byte handed to the kernel; destination: request sent → page placed. */
    latencyUs: o.latency,
  };
}

function qemuRow(o: QemuOutcome) {
  const ms = o.endedAt - o.startedAt;
  return {
    name: o.name,
    ms: round(ms),
    bytesSent: o.source.transferred,
    mbps: round(mbps(o.source.transferred, ms)),
    passes: o.source.passes,
    downtimeMs: o.source.downtime,
    requests: o.source['postcopy-requests'],
    answered: o.answered,
    latencyUs: o.latency,
    invariant: o.check.invariant.detail,
  };
}

export type LoadReport = ReturnType<typeof loadReport>;

export function loadReport(r: LoadRunInput) {
  const lib = r.library;
  const first = Math.min(...lib.map((o) => o.startedAt), r.qemu.startedAt);
  const lastLib = Math.max(...lib.map((o) => o.endedAt));
  const allEnd = Math.max(lastLib, r.qemu.endedAt);
  const libBytes = lib.reduce((n, o) => n + o.bytesReceived, 0);
  const allBytes = libBytes + r.qemu.source.transferred;
  const perMigration = lib.map((o) => mbps(o.bytesReceived, o.endedAt - o.startedAt));
  const { start, end } = r.window;
  const windowBytes = end.library.map((b, i) => b - start.library[i]!);
  const worstDst = lib.reduce((w, o) => (o.latency.destination.p99 > w.latency.destination.p99 ? o : w));
  const sourceP99 = [...lib.map((o) => ({ name: o.spec.name, p99: o.latency.source.p99 })), { name: r.qemu.name, p99: r.qemu.latency.source.p99 }];
  return {
    machine: { cpus: cpus().length, node: process.version, qemu: r.qemuVersion ?? null },
    library: lib.map(libraryRow),
    qemu: qemuRow(r.qemu),
    aggregate: {
      /** Wire bytes of the library migrations over first start → last end. */
      libraryMBps: round(mbps(libBytes, lastLib - first)),
      libraryBytes: libBytes,
      libraryMs: round(lastLib - first),
      /** The same with the QEMU restore's bytes and time. */
      allMBps: round(mbps(allBytes, allEnd - first)),
      perMigrationMBps: Object.fromEntries(Object.entries(spread(perMigration)).map(([k, v]) => [k, round(v)])) as { min: number; median: number; max: number },
    },
    fairness: {
      /** Over each library migration's own average throughput. */
      jainThroughput: round(jainIndex(perMigration) ?? 0, 3),
      /** Over the bytes each moved while all were running (the fairest comparison: same interval for all). */
      window: {
        ms: round(end.atMs - start.atMs),
        bytes: windowBytes,
        jainBytes: round(jainIndex(windowBytes) ?? 0, 3),
        qemuBytes: end.qemu - start.qemu,
      },
    },
    urgentLatencyP99Us: {
      worstDestination: { name: worstDst.spec.name, p99: worstDst.latency.destination.p99 },
      worstSource: sourceP99.reduce((w, x) => (x.p99 > w.p99 ? x : w)),
    },
    /** Test start → every migration settled and checked at its destination. */
    testMs: round(r.testMs),
  };
}

/** One line per migration, then the summary. */
export function reportLines(report: LoadReport): string[] {
  const lines = report.library.map(
    (m) =>
      `[load] ${m.name.padEnd(15)} ${String(Math.round(m.ms)).padStart(6)} ms, ${round(m.bytesReceived / MiB)} MiB on the wire → ${m.mbps} MB/s ` +
      `(RAM pages ${m.ramPagesMBps} MB/s), passes ${m.passes}, downtime ${m.downtimeMs} ms, pages sent ${m.pagesSent} / ${m.ramMiB * (MiB / PAGE)}, ` +
      `requests ${m.requests} (preempt ${m.answered.preempt}, main ${m.answered.main}), p99 dst ${m.latencyUs.destination.p99} µs src ${m.latencyUs.source.p99} µs`,
  );
  const q = report.qemu;
  lines.push(
      `[load] ${q.name.padEnd(15)} ${String(Math.round(q.ms)).padStart(6)} ms, ${round(q.bytesSent / MiB)} MiB on the wire → ${q.mbps} MB/s, passes ${q.passes}, ` +
        `downtime ${q.downtimeMs} ms, requests ${q.requests} (preempt ${q.answered.preempt}, main ${q.answered.main}), ` +
        `p50 src ${q.latencyUs.source.p50} µs p99 src ${q.latencyUs.source.p99} µs, ${q.invariant}`,
    );
  const a = report.aggregate;
  const f = report.fairness;
  const u = report.urgentLatencyP99Us;
  lines.push(
    `[load] aggregate ${a.libraryMBps} MB/s library (${round(a.libraryBytes / MiB)} MiB in ${Math.round(a.libraryMs)} ms)` +
      `, ${a.allMBps} MB/s with QEMU; per migration min ${a.perMigrationMBps.min} / median ${a.perMigrationMBps.median} / max ${a.perMigrationMBps.max} MB/s; ` +
      `Jain ${f.jainThroughput} (throughput), ${f.window.jainBytes} (bytes while all ran, ${Math.round(f.window.ms)} ms: ${f.window.bytes.map((b) => round(b / MiB)).join(', ')} MiB); ` +
      `worst urgent p99: destination ${u.worstDestination.p99} µs (${u.worstDestination.name}), source ${u.worstSource.p99} µs (${u.worstSource.name})`,
  );
  return lines;
}
