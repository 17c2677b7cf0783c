/**
 * The one error formatter of `qmt`: every failure, whatever threw it, becomes
 * one stderr line `qmt: <code>: <what>` and an exit code (2 for a bad
 * invocation, 1 for a failure). Errors are read by shape, not by class: any
 * object with a string `code` (our error classes, Node's system errors,
 * commander's errors) keeps its code, so that a new error class needs no
 * change here and the ESM and CJS builds agree.
 */
import { CommanderError } from 'commander';

/** Exit code of a bad invocation (unknown flag, bad value, missing argument). */
export const EXIT_USAGE = 2;
/** Exit code of a failure (a missing file, a refused connection, a failed migration). */
export const EXIT_FAILURE = 1;

/** A failure the CLI itself detects, with the code it prints. */
export class CliError extends Error {
  override readonly name = 'CliError';
  constructor(
    /** Stable, kebab-case: 'usage', 'not-found', 'is-a-directory', 'exists', ... */
    readonly code: string,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

/** A bad invocation (exit 2): the message names the argument or option. */
export function usageError(message: string): CliError {
  return new CliError('usage', message);
}

/** A failure as printed and as it appears in `--json` (`error`). */
export interface DescribedError {
  code: string;
  message: string;
  /** The migration phase, when the error carries one. */
  phase?: string;
}

/** Node's system error names that users meet on the command line, in the CLI's words. */
const ERRNO_CODES: Record<string, string> = {
  ENOENT: 'not-found',
  EISDIR: 'is-a-directory',
  ENOTDIR: 'not-a-directory',
  EEXIST: 'exists',
  EACCES: 'permission-denied',
  EPERM: 'permission-denied',
  ENOSPC: 'no-space',
  EROFS: 'read-only',
  ECONNREFUSED: 'connect-failed',
  EADDRINUSE: 'address-in-use',
};

function oneLine(s: string): string {
  return s.replace(/\s*\n\s*/g, ' ').trim();
}

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null;
}

/** Commander's `commander.unknownOption` as a sentence without its "error: " prefix. */
function commanderMessage(e: { message: string }): string {
  return oneLine(e.message.replace(/^error: /, ''));
}

/** A commander error that is a bad invocation (not help or version output). */
export function isCommanderUsageError(e: unknown): e is CommanderError {
  return e instanceof CommanderError && e.exitCode !== 0;
}

/** The code, message and phase of any thrown value. */
export function describeError(e: unknown): DescribedError {
  if (e instanceof CommanderError) return { code: 'usage', message: commanderMessage(e) };
  if (!isRecord(e)) return { code: 'error', message: oneLine(String(e)) };
  const message = typeof e.message === 'string' ? e.message : String(e);
  const raw = typeof e.code === 'string' ? e.code : undefined;
  // A system error (errno, syscall): its upper-case name, in the CLI's words.
  const system = raw !== undefined && /^E[A-Z0-9]+$/.test(raw);
  const code = raw === undefined ? 'error' : system ? (ERRNO_CODES[raw] ?? raw.toLowerCase()) : raw;
  let what = message;
  if (system && typeof e.path === 'string') {
    // "ENOENT: no such file or directory, open 'x'" → "x: no such file or directory".
    const m = /^[A-Z0-9]+: ([^,]+)/.exec(message);
    what = `${e.path}: ${m ? m[1] : message}`;
  }
  if (typeof e.channel === 'string' && !what.includes(`${e.channel} channel`)) what = `(${e.channel} channel) ${what}`;
  if (typeof e.offset === 'number' && !/\boffset \d/.test(what)) what = `at offset ${e.offset}: ${what}`;
  const out: DescribedError = { code, message: oneLine(what) };
  if (typeof e.phase === 'string') out.phase = e.phase;
  return out;
}

/** The exit code for a thrown value: 2 for a bad invocation, 1 otherwise. */
export function exitCodeOf(e: unknown): number {
  return describeError(e).code === 'usage' ? EXIT_USAGE : EXIT_FAILURE;
}

/** The one stderr line: `qmt: <code>: <what>\n`. */
export function formatErrorLine(d: DescribedError): string {
  return `qmt: ${d.code}: ${d.message}\n`;
}
