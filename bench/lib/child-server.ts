/**
 * The child side of {@link BenchChild}: commands arrive as JSON lines on
 * stdin, answers leave as JSON lines on stdout, logs go to stderr. The process
 * exits when stdin closes, on `exit`, on SIGTERM/SIGINT, or after a hard time
 * limit, so that nothing outlives the benchmark.
 */
import { readFileSync } from 'node:fs';
import { createInterface } from 'node:readline';
import type { ChildReply } from './child.js';

export type Handlers = Record<string, (cmd: Record<string, unknown>) => unknown>;

/** CLOCK_MONOTONIC in µs: the same clock in every process of the machine, unlike performance.now(). */
export function monoUs(): number {
  return Number(process.hrtime.bigint() / 1000n);
}

/** Peak resident set (VmHWM) and current resident set (VmRSS) of a process, bytes. */
export function residentSet(pid: number | 'self' = 'self'): { hwm: number; rss: number } | undefined {
  try {
    const s = readFileSync(`/proc/${pid}/status`, 'utf8');
    const kb = (k: string): number => Number(new RegExp(`^${k}:\\s+(\\d+) kB`, 'm').exec(s)?.[1] ?? NaN) * 1024;
    return { hwm: kb('VmHWM'), rss: kb('VmRSS') };
  } catch {
    return undefined;
  }
}

/**
 * Serves `handlers` (by command name) until told to exit. `onExit` releases
 * what the child holds (sockets, sessions) before the process goes.
 */
export function serve(name: string, handlers: Handlers, onExit: () => void = () => undefined, hardLimitMs = 20 * 60 * 1000): void {
  const log = (msg: string): void => void process.stderr.write(`[${name}] ${msg}\n`);
  setTimeout(() => {
    log('hard time limit reached, exiting');
    process.exit(3);
  }, hardLimitMs).unref();

  const reply = (r: ChildReply): void => void process.stdout.write(`${JSON.stringify(r)}\n`);
  let exiting = false;
  const shutdown = (code: number): void => {
    if (exiting) return;
    exiting = true;
    try {
      onExit();
    } catch (e) {
      log(`cleanup: ${String(e)}`);
    }
    // Let the last answer leave, then go, whatever is still open.
    setTimeout(() => process.exit(code), 50);
  };

  const rl = createInterface({ input: process.stdin });
  rl.on('line', (line) => {
    let req: Record<string, unknown> & { id: number; cmd: string };
    try {
      req = JSON.parse(line) as typeof req;
    } catch {
      log(`bad command line: ${line}`);
      return;
    }
    if (req.cmd === 'exit') {
      shutdown(0);
      return;
    }
    const h = handlers[req.cmd];
    if (!h) {
      reply({ id: req.id, ok: false, error: `unknown command ${req.cmd}` });
      return;
    }
    Promise.resolve()
      .then(() => h(req))
      .then(
        (data) => reply({ id: req.id, ok: true, data }),
        (e: unknown) => reply({ id: req.id, ok: false, error: e instanceof Error ? `${e.name}: ${e.message}` : String(e) }),
      );
  });
  rl.on('close', () => shutdown(0));
  process.on('SIGTERM', () => shutdown(143));
  process.on('SIGINT', () => shutdown(130));
}
