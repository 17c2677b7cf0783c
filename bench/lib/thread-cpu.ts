/**
 * CPU time per thread of a set of processes and their descendants, from
 * /proc/PID/task/TID/stat, sampled while a transfer runs (a worker thread
 * that ends with its session is gone by the end: its last sample stands).
 *
 * What the multifd rows need to say how a transfer uses the machine and what
 * it would do on a bigger one: the cores it kept busy (all CPU over the wall
 * time), how many threads did real work, and the busiest thread's share (a
 * serial bottleneck that more cores do not help).
 */
import { readdirSync, readFileSync } from 'node:fs';

const CLK_TCK = 100;

interface ThreadTime {
  pid: number;
  tid: number;
  comm: string;
  /** utime + stime, ticks, at the first and the latest sample. */
  first: number;
  last: number;
  /** Seen at the first sample (its time before then is not ours). */
  atStart: boolean;
}

function statOf(path: string): { comm: string; ppid: number; ticks: number } | undefined {
  try {
    const s = readFileSync(path, 'utf8');
    const open = s.indexOf('(');
    const close = s.lastIndexOf(')');
    const rest = s.slice(close + 2).split(' ');
    return { comm: s.slice(open + 1, close), ppid: Number(rest[1]), ticks: Number(rest[11] ?? 0) + Number(rest[12] ?? 0) };
  } catch {
    return undefined;
  }
}

/** `roots` and every process below them (a `qmt receive --tls` that runs itself again, for one). */
function withDescendants(roots: readonly number[]): number[] {
  const out = new Set(roots);
  let all: { pid: number; ppid: number }[] = [];
  try {
    all = readdirSync('/proc')
      .filter((d) => /^\d+$/.test(d))
      .map((d) => ({ pid: Number(d), ppid: statOf(`/proc/${d}/stat`)?.ppid ?? -1 }));
  } catch {
    return [...out];
  }
  for (let grew = true; grew; ) {
    grew = false;
    for (const p of all) {
      if (!out.has(p.pid) && out.has(p.ppid)) {
        out.add(p.pid);
        grew = true;
      }
    }
  }
  return [...out];
}

export interface ThreadCpuReport {
  /** CPU core-seconds of every process seen (all their threads, ended ones too), over the sampled interval. */
  totalS: number;
  /** Threads seen (OS threads, Node's and QEMU's own included). */
  threads: number;
  /** Threads that used at least 5 % of a core over the interval. */
  busyThreads: number;
  /** The busiest thread: its name (comm) and core-seconds. */
  busiest: { comm: string; cpuS: number } | undefined;
  /** The busiest threads, most first (at most 8): where the CPU went, per thread (Node names a worker's thread after the Worker's `name`, 15 characters). */
  top: { comm: string; cpuS: number }[];
  wallS: number;
}

/** `comm 1.23 s (45 %)` for the busiest threads, or '–'. */
export function topThreads(r: ThreadCpuReport | undefined, n = 5): string {
  if (!r?.top || r.top.length === 0) return '–';
  return r.top
    .slice(0, n)
    .map((t) => `${t.comm} ${t.cpuS.toFixed(2)} s (${r.wallS > 0 ? Math.round((t.cpuS / r.wallS) * 100) : 0} % of a core)`)
    .join(', ');
}

export class ThreadCpuSampler {
  private readonly seen = new Map<string, ThreadTime>();
  /** Per process: /proc/PID/stat's utime + stime, which keeps the time of its threads that have ended (a thread's own file goes with it). */
  private readonly procs = new Map<number, { first: number; last: number }>();
  private readonly timer: NodeJS.Timeout;
  private readonly t0 = performance.now();
  private first = true;

  constructor(
    private readonly roots: () => readonly (number | undefined)[],
    everyMs = 100,
  ) {
    this.sample();
    this.first = false;
    this.timer = setInterval(() => this.sample(), everyMs);
    this.timer.unref();
  }

  private sample(): void {
    const pids = withDescendants(this.roots().filter((p): p is number => p !== undefined));
    for (const pid of pids) {
      const ps = statOf(`/proc/${pid}/stat`);
      if (ps) {
        const had = this.procs.get(pid);
        if (had) had.last = ps.ticks;
        else this.procs.set(pid, { first: this.first ? ps.ticks : 0, last: ps.ticks });
      }
      let tids: string[];
      try {
        tids = readdirSync(`/proc/${pid}/task`);
      } catch {
        continue;
      }
      for (const t of tids) {
        const st = statOf(`/proc/${pid}/task/${t}/stat`);
        if (!st) continue;
        const key = `${pid}/${t}`;
        const had = this.seen.get(key);
        if (had) had.last = st.ticks;
        else this.seen.set(key, { pid, tid: Number(t), comm: st.comm, first: this.first ? st.ticks : 0, last: st.ticks, atStart: this.first });
      }
    }
  }

  /**
   * `notOurs`: core-seconds to leave out of a process's main thread (its
   * thread id is its pid), e.g. a check that ran after the transfer inside
   * the sampled interval.
   */
  stop(notOurs: ReadonlyMap<number, number> = new Map()): ThreadCpuReport {
    this.sample();
    clearInterval(this.timer);
    const wallS = (performance.now() - this.t0) / 1000;
    const per = [...this.seen.values()].map((t) => ({ comm: t.comm, cpuS: Math.max(0, (t.last - t.first) / CLK_TCK - (t.tid === t.pid ? (notOurs.get(t.pid) ?? 0) : 0)) }));
    // Whole processes: their ended threads included (a channel thread that ended between two samples is not lost).
    const totalS = Math.max(
      [...this.procs.entries()].reduce((s, [pid, p]) => s + Math.max(0, (p.last - p.first) / CLK_TCK - (notOurs.get(pid) ?? 0)), 0),
      per.reduce((s, t) => s + t.cpuS, 0),
    );
    const busiest = per.reduce<{ comm: string; cpuS: number } | undefined>((b, t) => (b === undefined || t.cpuS > b.cpuS ? t : b), undefined);
    const top = per.filter((t) => t.cpuS > 0).sort((a, b) => b.cpuS - a.cpuS).slice(0, 8);
    return { totalS, threads: per.length, busyThreads: per.filter((t) => wallS > 0 && t.cpuS / wallS >= 0.05).length, busiest, top, wallS };
  }
}

/**
 * GB/s expected on a host of `cores` cores from what a transfer cost here:
 * limited by all its CPU spread over the cores (cores / core-seconds per GB)
 * and by its busiest thread, which cannot use more than one core
 * (1 / that thread's core-seconds per GB). Assumes the per-GB cost stays as
 * measured (no contention, the same CPU speed) and that the link is not the
 * limit; both ends on the one host, as here.
 */
export function expectedGbps(cores: number, cpuPerGb: number | undefined, busiestPerGb: number | undefined): number | undefined {
  if (cpuPerGb === undefined || !(cpuPerGb > 0)) return undefined;
  const byCores = cores / cpuPerGb;
  const bySerial = busiestPerGb !== undefined && busiestPerGb > 0 ? 1 / busiestPerGb : Infinity;
  return Math.min(byCores, bySerial);
}
