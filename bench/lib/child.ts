/**
 * The orchestrator's handle on one benchmark child process: spawn a script
 * (optionally through `ip netns exec`), send it commands as JSON lines with a
 * time limit each, and stop it by its own PID. The child side is
 * bench/lib/child-server.ts.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';

/** The repository root: `--import tsx` is resolved from the working directory. */
export const REPO_ROOT = fileURLToPath(new URL('../../', import.meta.url));

/** One answer line of a child: `{ id, ok, data }` or `{ id, ok: false, error }`. */
export type ChildReply = { id: number; ok: true; data?: unknown } | { id: number; ok: false; error: string };

export class BenchChild<C extends { cmd: string } = { cmd: string }> {
  private nextId = 1;
  private pending = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void; timer: NodeJS.Timeout }>();
  private exited = false;
  private readonly exitPromise: Promise<void>;

  protected constructor(
    readonly name: string,
    private readonly child: ChildProcess,
  ) {
    this.exitPromise = new Promise((resolve) => {
      child.once('exit', (code, signal) => {
        this.exited = true;
        for (const [, p] of this.pending) {
          clearTimeout(p.timer);
          p.reject(new Error(`${name} exited (code ${code}, signal ${signal})`));
        }
        this.pending.clear();
        resolve();
      });
    });
    child.once('error', (e) => process.stderr.write(`${name}: ${e.message}\n`));
    createInterface({ input: child.stdout! }).on('line', (line) => {
      let r: ChildReply;
      try {
        r = JSON.parse(line) as ChildReply;
      } catch {
        process.stderr.write(`${name} (stdout): ${line}\n`);
        return;
      }
      const p = this.pending.get(r.id);
      if (!p) return;
      this.pending.delete(r.id);
      clearTimeout(p.timer);
      if (r.ok) p.resolve(r.data);
      else p.reject(new Error(`${name}: ${r.error}`));
    });
    createInterface({ input: child.stderr! }).on('line', (line) => process.stderr.write(`  ${line}\n`));
  }

  /**
   * Starts `node [...nodeArgs] --import tsx SCRIPT ...args`, inside a namespace when `prefix` is
   * `['ip','netns','exec',NS]`; `nodeArgs` e.g. `--cpu-prof --cpu-prof-dir DIR` (bench/profile.ts).
   */
  static start<C extends { cmd: string }>(name: string, script: string, args: readonly string[] = [], prefix: readonly string[] = [], nodeArgs: readonly string[] = [], node = process.execPath): BenchChild<C> {
    return new BenchChild<C>(name, BenchChild.spawnChild(script, args, prefix, nodeArgs, node));
  }

  /** `node`: the Node.js binary (default this process's; the threaded rows need ≥ 26.6, bench/lib/features.ts). */
  protected static spawnChild(script: string, args: readonly string[], prefix: readonly string[], nodeArgs: readonly string[] = [], node = process.execPath): ChildProcess {
    const argv = [...prefix, node, ...nodeArgs, '--import', 'tsx', script, ...args];
    return spawn(argv[0]!, argv.slice(1), { cwd: REPO_ROOT, stdio: ['pipe', 'pipe', 'pipe'] });
  }

  get pid(): number | undefined {
    return this.child.pid;
  }

  call<T = unknown>(cmd: C, timeoutMs: number): Promise<T> {
    if (this.exited) return Promise.reject(new Error(`${this.name} has exited`));
    const id = this.nextId++;
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new Error(`${this.name}: no answer to "${cmd.cmd}" within ${timeoutMs} ms`));
      }, timeoutMs);
      this.pending.set(id, { resolve: resolve as (v: unknown) => void, reject, timer });
      this.child.stdin!.write(`${JSON.stringify({ ...cmd, id })}\n`);
    });
  }

  /** Asks the child to exit, then SIGTERM, then SIGKILL — always by this child's PID. */
  async stop(): Promise<void> {
    if (this.exited) return;
    try {
      this.child.stdin!.end(`${JSON.stringify({ cmd: 'exit', id: 0 })}\n`);
    } catch {
      // stdin already gone
    }
    const waited = (ms: number): Promise<boolean> =>
      Promise.race([this.exitPromise.then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), ms).unref())]);
    if (await waited(2000)) return;
    this.child.kill('SIGTERM');
    if (await waited(2000)) return;
    this.child.kill('SIGKILL');
    await waited(2000);
  }

  /** For synchronous exit paths: SIGKILL by PID. */
  killNow(): void {
    if (!this.exited) this.child.kill('SIGKILL');
  }
}
