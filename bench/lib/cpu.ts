/**
 * CPU accounting from /proc, to show how busy the machine was during a cell
 * and how much of that was the benchmark's own peers (other work on a shared
 * 2-core VM shows up directly in the latency tail).
 */
import { readFileSync } from 'node:fs';

export interface CpuSnapshot {
  /** Jiffies summed over all CPUs. */
  total: number;
  busy: number;
  steal: number;
  /** irq + softirq: network processing (much of it ours) lands here. */
  irq: number;
  /** utime + stime of the watched processes. */
  ours: number;
}

function hostTimes(): { total: number; busy: number; steal: number; irq: number } {
  try {
    const line = readFileSync('/proc/stat', 'utf8').split('\n')[0] ?? '';
    const f = line.trim().split(/\s+/).slice(1).map(Number);
    // user nice system idle iowait irq softirq steal (guest time is already inside user)
    const [user = 0, nice = 0, system = 0, idle = 0, iowait = 0, irq = 0, softirq = 0, steal = 0] = f;
    const total = user + nice + system + idle + iowait + irq + softirq + steal;
    return { total, busy: total - idle - iowait, steal, irq: irq + softirq };
  } catch {
    return { total: 0, busy: 0, steal: 0, irq: 0 };
  }
}

function processTimes(pid: number): number {
  try {
    const s = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // Fields after the command name (which may contain spaces) start at state; utime and stime are the 12th and 13th of them.
    const rest = s.slice(s.lastIndexOf(')') + 2).split(' ');
    return Number(rest[11] ?? 0) + Number(rest[12] ?? 0);
  } catch {
    return 0;
  }
}

/** Clock ticks per second of /proc/<pid>/stat (sysconf(_SC_CLK_TCK); 100 on Linux everywhere in practice). */
const CLK_TCK = 100;

/** utime + stime of a running process, core-seconds (undefined once it is gone). */
export function processCpuSeconds(pid: number | undefined): number | undefined {
  if (pid === undefined) return undefined;
  try {
    readFileSync(`/proc/${pid}/stat`, 'utf8');
  } catch {
    return undefined;
  }
  return processTimes(pid) / CLK_TCK;
}

/** Core-seconds of each process between two readings of {@link processCpuSeconds}. */
export function cpuDelta(before: readonly (number | undefined)[], after: readonly (number | undefined)[]): (number | undefined)[] {
  return before.map((b, i) => {
    const a = after[i];
    return a === undefined || b === undefined ? undefined : a - b;
  });
}

export function cpuSnapshot(pids: readonly (number | undefined)[]): CpuSnapshot {
  const h = hostTimes();
  let ours = 0;
  for (const p of pids) if (p !== undefined) ours += processTimes(p);
  return { ...h, ours };
}

export interface CpuUse {
  /** Percent of the whole machine (all cores = 100). */
  hostBusyPct: number;
  oursPct: number;
  /** Interrupts and softirqs (network processing, ours included). */
  irqPct: number;
  /** Everything else: other processes and steal. */
  otherPct: number;
  stealPct: number;
}

export function cpuUse(a: CpuSnapshot, b: CpuSnapshot): CpuUse | undefined {
  const dt = b.total - a.total;
  if (dt <= 0) return undefined;
  const pct = (x: number): number => Math.round((x / dt) * 1000) / 10;
  const host = pct(b.busy - a.busy);
  const ours = pct(b.ours - a.ours);
  const irq = pct(b.irq - a.irq);
  return { hostBusyPct: host, oursPct: ours, irqPct: irq, otherPct: Math.round((host - ours - irq) * 10) / 10, stealPct: pct(b.steal - a.steal) };
}

export function loadAverage(): string {
  try {
    return readFileSync('/proc/loadavg', 'utf8').trim().split(' ').slice(0, 3).join(' ');
  } catch {
    return '?';
  }
}
