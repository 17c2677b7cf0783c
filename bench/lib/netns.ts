/**
 * A shaped link for the benchmark: two network namespaces joined by a veth
 * pair, addressed with a private /30 that exists only inside them, and a
 * qdisc on the source side's veth. Everything is created under names unique
 * to this process and removed by {@link VethLink.destroy} (deleting the
 * namespaces deletes the veth pair and its qdiscs with them).
 */
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';

const execFileAsync = promisify(execFile);
const CMD_TIMEOUT_MS = 10_000;

/** Prefix of every namespace this benchmark creates: `qmtlat<pid><s|d>`. */
export const NS_PREFIX = 'qmtlat';

/** Runs one command (no shell), with a time limit; resolves with stdout. */
export async function run(cmd: string, args: readonly string[]): Promise<string> {
  const { stdout } = await execFileAsync(cmd, args, { timeout: CMD_TIMEOUT_MS, killSignal: 'SIGKILL', maxBuffer: 1 << 20 });
  return stdout;
}

/** Why a veth link cannot be built here, or undefined when it can. */
export async function vethUnavailable(): Promise<string | undefined> {
  if (process.platform !== 'linux') return 'not Linux';
  if (typeof process.getuid === 'function' && process.getuid() !== 0) return 'not running as root';
  try {
    await run('ip', ['netns', 'list']);
    await run('tc', ['-V']);
  } catch (e) {
    return `ip netns / tc unusable: ${e instanceof Error ? e.message.split('\n')[0] : String(e)}`;
  }
  return undefined;
}

/** Deletes namespaces left by an earlier run of this benchmark whose process is gone. */
export async function removeStaleNamespaces(): Promise<string[]> {
  const out = await run('ip', ['netns', 'list']).catch(() => '');
  const removed: string[] = [];
  for (const line of out.split('\n')) {
    const name = line.split(' ')[0] ?? '';
    const m = new RegExp(`^${NS_PREFIX}(\\d+)[sd]$`).exec(name);
    if (!m) continue;
    const pid = Number(m[1]);
    if (pid === process.pid || isAlive(pid)) continue;
    await run('ip', ['netns', 'del', name]).catch(() => undefined);
    removed.push(name);
  }
  return removed;
}

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/**
 * How the source side's veth is shaped. This kernel has no `prio` (nor fq,
 * fq_codel, drr, ets …) qdisc; what it has: tbf, htb, pfifo_fast, pfifo, bfifo
 * and the u32 classifier.
 */
export type Shaping =
  /** tbf alone: one FIFO (tbf's default bfifo) at the bottleneck. */
  | 'tbf'
  /**
   * tbf root with `pfifo_fast` as its child: three strict-priority bands
   * chosen by skb->priority (SO_PRIORITY) through the same default priomap as
   * `prio` (priority 6 → band 0; 0 and 4 → band 1).
   */
  | 'tbf+pfifo_fast'
  /**
   * htb at the same rate with two leaves: 1:10 (prio 0, 100 Mbit/s assured,
   * may borrow up to the full rate) for packets with DSCP EF (u32 filter on
   * TOS 0xb8), 1:20 (prio 1, the rest) for everything else.
   */
  | 'htb+dscp'
  /** The same htb classes without the filter (everything in 1:20): the control for 'htb+dscp'. */
  | 'htb';

export interface LinkConfig {
  /** tbf rate, e.g. '1gbit'. */
  rate: string;
  burst: string;
  latency: string;
}

export class VethLink {
  readonly nsSrc: string;
  readonly nsDst: string;
  readonly devSrc: string;
  readonly devDst: string;
  readonly addrSrc = '10.199.77.1';
  readonly addrDst = '10.199.77.2';
  readonly prefixLen = 30;
  /** Every command that set up or shaped the link, for the report. */
  readonly log: string[] = [];
  private created = { src: false, dst: false };
  private shaping: Shaping | undefined;

  constructor(readonly config: LinkConfig) {
    this.nsSrc = `${NS_PREFIX}${process.pid}s`;
    this.nsDst = `${NS_PREFIX}${process.pid}d`;
    this.devSrc = `qmt${process.pid}s`;
    this.devDst = `qmt${process.pid}d`;
  }

  private async cmd(args: string[], record = true): Promise<string> {
    if (record) this.log.push(args.join(' '));
    const [c, ...rest] = args;
    return run(c!, rest);
  }

  /** Creates both namespaces and the veth pair directly inside them (nothing appears in the caller's namespace). */
  async create(): Promise<void> {
    await this.cmd(['ip', 'netns', 'add', this.nsSrc]);
    this.created.src = true;
    await this.cmd(['ip', 'netns', 'add', this.nsDst]);
    this.created.dst = true;
    await this.cmd(['ip', 'link', 'add', this.devSrc, 'netns', this.nsSrc, 'type', 'veth', 'peer', 'name', this.devDst, 'netns', this.nsDst]);
    for (const [ns, dev, addr] of [
      [this.nsSrc, this.devSrc, this.addrSrc],
      [this.nsDst, this.devDst, this.addrDst],
    ] as const) {
      await this.cmd(['ip', '-n', ns, 'addr', 'add', `${addr}/${this.prefixLen}`, 'dev', dev]);
      await this.cmd(['ip', '-n', ns, 'link', 'set', 'lo', 'up']);
      await this.cmd(['ip', '-n', ns, 'link', 'set', dev, 'up']);
    }
  }

  /** Replaces the source side's root qdisc; `undefined` removes it (back to the namespace's default). */
  async shape(s: Shaping | undefined): Promise<void> {
    if (this.shaping === s) return;
    const dev = this.devSrc;
    const tc = (...a: string[]): Promise<string> => this.cmd(['ip', 'netns', 'exec', this.nsSrc, 'tc', ...a]);
    if (this.shaping !== undefined) await tc('qdisc', 'del', 'dev', dev, 'root');
    this.shaping = undefined;
    if (s === undefined) return;
    const { rate, burst, latency } = this.config;
    if (s === 'htb' || s === 'htb+dscp') {
      // r2q 1000 keeps each class's quantum (rate / r2q) under htb's 200000-byte warning limit at 1 Gbit/s.
      await tc('qdisc', 'add', 'dev', dev, 'root', 'handle', '1:', 'htb', 'default', '20', 'r2q', '1000');
      await tc('class', 'add', 'dev', dev, 'parent', '1:', 'classid', '1:1', 'htb', 'rate', rate, 'ceil', rate, 'burst', burst, 'cburst', burst);
      await tc('class', 'add', 'dev', dev, 'parent', '1:1', 'classid', '1:10', 'htb', 'rate', '100mbit', 'ceil', rate, 'prio', '0');
      await tc('class', 'add', 'dev', dev, 'parent', '1:1', 'classid', '1:20', 'htb', 'rate', '900mbit', 'ceil', rate, 'prio', '1');
      if (s === 'htb+dscp') await tc('filter', 'add', 'dev', dev, 'parent', '1:', 'protocol', 'ip', 'prio', '1', 'u32', 'match', 'ip', 'dsfield', '0xb8', '0xfc', 'flowid', '1:10');
    } else {
      await tc('qdisc', 'add', 'dev', dev, 'root', 'handle', '1:', 'tbf', 'rate', rate, 'burst', burst, 'latency', latency);
      if (s === 'tbf+pfifo_fast') await tc('qdisc', 'add', 'dev', dev, 'parent', '1:1', 'handle', '10:', 'pfifo_fast');
    }
    this.shaping = s;
  }

  /** `tc -s qdisc show` and `tc -s class show` on the shaped device (htb: bytes per class). */
  async qdiscStats(): Promise<string> {
    const q = await this.cmd(['ip', 'netns', 'exec', this.nsSrc, 'tc', '-s', 'qdisc', 'show', 'dev', this.devSrc], false);
    const c = await this.cmd(['ip', 'netns', 'exec', this.nsSrc, 'tc', '-s', 'class', 'show', 'dev', this.devSrc], false);
    return `${q}${c}`;
  }

  /** A sysctl as seen inside the source namespace. */
  async sysctl(name: string): Promise<string> {
    const out = await this.cmd(['ip', 'netns', 'exec', this.nsSrc, 'sysctl', '-n', name], false).catch(() => '?');
    return out.trim();
  }

  /** `ip netns exec NS` prefix for a command run on one side. */
  execPrefix(side: 'source' | 'dest'): string[] {
    return ['ip', 'netns', 'exec', side === 'source' ? this.nsSrc : this.nsDst];
  }

  /** Removes the namespaces (and with them the veth pair and qdiscs). Never throws. */
  async destroy(): Promise<string[]> {
    const errors: string[] = [];
    for (const [key, ns] of [
      ['src', this.nsSrc],
      ['dst', this.nsDst],
    ] as const) {
      if (!this.created[key]) continue;
      try {
        await run('ip', ['netns', 'del', ns]);
        this.created[key] = false;
      } catch (e) {
        errors.push(`ip netns del ${ns}: ${e instanceof Error ? e.message.split('\n')[0] : String(e)}`);
      }
    }
    this.shaping = undefined;
    return errors;
  }

  /** Synchronous last-resort cleanup for exit paths that cannot wait. */
  destroySync(run: (cmd: string, args: string[]) => void): void {
    if (this.created.src) run('ip', ['netns', 'del', this.nsSrc]);
    if (this.created.dst) run('ip', ['netns', 'del', this.nsDst]);
    this.created = { src: false, dst: false };
  }
}
