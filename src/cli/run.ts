/**
 * The one runner of every `qmt` command: it owns the process-level concerns
 * (signals, the `--json` envelope, the error line, the exit code) so that a
 * command only does its work and says how it went.
 *
 * - SIGINT/SIGTERM abort `ctx.signal`: the command tears down (closes
 *   sockets, removes temporary files) and returns; the exit code is then
 *   130 (SIGINT) or 143 (SIGTERM) unless the command still succeeded. A
 *   second such signal exits at once (after restoring the cursor a progress
 *   bar hid).
 * - Extra signals (SIGUSR1, SIGUSR2, ...) a command handles while it runs:
 *   `run(name, body, { signals: { SIGUSR1: (ctx) => … } })`, or
 *   `ctx.onSignal('SIGUSR1', fn)` from inside the body, as `qmt receive`
 *   does: `ctx.onSignal('SIGUSR1', () => pause?.())`, `pause` handed over by
 *   `receiveMigration`'s `onPauseReady` once the session exists.
 * - A thrown error or `{ ok: false, error }` becomes one stderr line
 *   `qmt: <code>: <what>` (src/cli/errors.ts) and exit code 2 (usage) or 1;
 *   with `--json`, stdout gets the one JSON object (src/cli/json.ts) either way.
 */
import { constants } from 'node:os';
import { performance } from 'node:perf_hooks';
import type { Command } from 'commander';
import { CliError, describeError, EXIT_FAILURE, EXIT_USAGE, formatErrorLine, type DescribedError } from './errors.js';
import { JSON_SCHEMA_VERSION, stringifyJson, type JsonEnvelope } from './json.js';

/** What a command body gets from the runner. */
export interface CommandContext {
  /** Aborted by SIGINT or SIGTERM (the reason: a CliError 'cancelled'): stop, clean up, return. */
  readonly signal: AbortSignal;
  /** `--json` was given: stdout is reserved for the one JSON object. */
  readonly json: boolean;
  readonly stdout: NodeJS.WriteStream;
  readonly stderr: NodeJS.WriteStream;
  /** Handles `sig` until the command ends (or the returned function is called). */
  onSignal(sig: NodeJS.Signals, handler: () => void): () => void;
}

/** How a command went. */
export interface CommandOutcome {
  ok: boolean;
  /** Why it failed: any thrown value, or an already described error. */
  error?: unknown;
  /** The command's own `--json` fields (after the envelope; must not repeat its keys). */
  json?: object;
}

export interface RunOptions {
  /** Extra signals handled while the command runs. SIGINT/SIGTERM are the runner's. */
  signals?: Partial<Record<NodeJS.Signals, (ctx: CommandContext) => void>>;
  /**
   * After the command ended and printed, exit even if a handle (a socket
   * still closing, a peer that never answers its close) is left: default 2000 ms.
   */
  exitGraceMs?: number;
}

const TEARDOWN_SIGNALS: readonly NodeJS.Signals[] = ['SIGINT', 'SIGTERM'];

/** 128 + the signal number, as a shell reports a process killed by it. */
export function signalExitCode(sig: NodeJS.Signals): number {
  return 128 + (constants.signals[sig] ?? 0);
}

function isDescribed(e: unknown): e is DescribedError {
  return typeof e === 'object' && e !== null && !(e instanceof Error) && typeof (e as DescribedError).code === 'string' && typeof (e as DescribedError).message === 'string';
}

/** Prints the JSON object of a command (`--json`). */
export function writeJson(out: NodeJS.WritableStream, command: string | null, durationMs: number, ok: boolean, error: DescribedError | undefined, body: object = {}): void {
  const envelope: JsonEnvelope = { version: JSON_SCHEMA_VERSION, command, ok, durationMs: Math.round(durationMs), ...(error ? { error } : {}) };
  out.write(`${stringifyJson({ ...envelope, ...stripEnvelope(body) })}\n`);
}

/** The body without the envelope's keys (the envelope's values win, and come first). */
function stripEnvelope(body: object): object {
  const { version: _v, command: _c, ok: _o, durationMs: _d, error: _e, ...rest } = body as Record<string, unknown>;
  return rest;
}

/**
 * Wraps a command body into a commander action. `body` gets the context and
 * commander's action arguments (positional arguments, then the options).
 */
export function run<A extends unknown[]>(name: string, body: (ctx: CommandContext, ...args: A) => Promise<CommandOutcome>, opts: RunOptions = {}): (...args: [...A, Command]) => Promise<void> {
  return async (...args) => {
    const cmd = args[args.length - 1] as Command;
    const json = cmd.opts().json === true;
    const t0 = performance.now();
    const ac = new AbortController();
    // A handler of our own per registration, so that removing one never removes another's.
    const listen = (sig: NodeJS.Signals, handler: () => void): (() => void) => {
      const h = (): void => handler();
      process.on(sig, h);
      return () => void process.off(sig, h);
    };
    const offs: (() => void)[] = [];
    let caught: NodeJS.Signals | undefined;
    for (const sig of TEARDOWN_SIGNALS) {
      offs.push(
        listen(sig, () => {
          if (caught !== undefined) {
            // The second signal: the user does not want to wait for the teardown.
            if (process.stderr.isTTY) process.stderr.write('\x1b[?25h\n');
            process.exit(signalExitCode(sig));
          }
          caught = sig;
          ac.abort(new CliError('cancelled', `interrupted by ${sig}`));
        }),
      );
    }
    const ctx: CommandContext = {
      signal: ac.signal,
      json,
      stdout: process.stdout,
      stderr: process.stderr,
      onSignal: (sig, handler) => {
        const off = listen(sig, handler);
        offs.push(off);
        return off;
      },
    };
    for (const [sig, handler] of Object.entries(opts.signals ?? {}) as [NodeJS.Signals, (c: CommandContext) => void][]) {
      offs.push(listen(sig, () => handler(ctx)));
    }

    let outcome: CommandOutcome;
    try {
      outcome = await body(ctx, ...(args.slice(0, -1) as A));
    } catch (e) {
      outcome = { ok: false, error: e };
    } finally {
      for (const off of offs) off();
    }

    let error: DescribedError | undefined;
    if (!outcome.ok) {
      const e = outcome.error ?? (caught ? { code: 'cancelled', message: `interrupted by ${caught}` } : { code: 'failed', message: `${name} failed` });
      error = isDescribed(e) ? e : describeError(e);
    }
    if (json) writeJson(process.stdout, name, performance.now() - t0, outcome.ok, error, outcome.json);
    // The error line comes last, so that it is the one line a script looks at.
    if (error) process.stderr.write(formatErrorLine(error));
    process.exitCode = outcome.ok ? 0 : caught ? signalExitCode(caught) : error?.code === 'usage' ? EXIT_USAGE : EXIT_FAILURE;
    setTimeout(() => process.exit(), opts.exitGraceMs ?? 2000).unref();
  };
}
