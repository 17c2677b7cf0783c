/**
 * Parsers and checks of command-line values shared by the commands. A parser
 * throws commander's InvalidArgumentError, which commander turns into
 * "option '--size <MiB>' argument 'abc' is invalid. <why>" — the line names
 * the option and the value; the runner prints it as a usage error (exit 2).
 */
import { stat } from 'node:fs/promises';
import { InvalidArgumentError } from 'commander';
import { parseEndpoint } from '../transport/endpoint.js';
import { CliError } from './errors.js';

/** An integer in [min, max], written in decimal ("0100" is 100; "1e3", "1.5", "" are refused). */
export function intArg(name: string, min: number, max: number): (v: string) => number {
  return (v) => {
    const n = Number(v);
    if (!/^\d+$/.test(v.trim()) || !Number.isSafeInteger(n) || n < min || n > max) {
      throw new InvalidArgumentError(`${name} must be an integer in ${min}..${max}`);
    }
    return n;
  };
}

/** Wraps a parser that throws any error so that commander reports it as an invalid value. */
export function asArgParser<T>(parse: (v: string) => T): (v: string) => T {
  return (v) => {
    try {
      return parse(v);
    } catch (e) {
      if (e instanceof InvalidArgumentError) throw e;
      throw new InvalidArgumentError(e instanceof Error ? e.message : String(e));
    }
  };
}

/**
 * Checks that `path` names a regular file (before any work starts, so that the
 * error names the path rather than a later `open`): 'not-found' or
 * 'is-a-directory' (exit 1), as `cat` does.
 */
export async function checkInputFile(path: string, what = 'input'): Promise<number> {
  let s;
  try {
    s = await stat(path);
  } catch (e) {
    const errno = (e as NodeJS.ErrnoException).code;
    if (errno === 'ENOENT') throw new CliError('not-found', `${path}: no such file (${what})`, { cause: e });
    if (errno === 'ENOTDIR') throw new CliError('not-a-directory', `${path}: a part of the path is not a directory (${what})`, { cause: e });
    throw e;
  }
  if (s.isDirectory()) throw new CliError('is-a-directory', `${path}: is a directory, expected a file (${what})`);
  return s.size;
}

/** Checks that `path` names an existing directory ('not-found' or 'not-a-directory', exit 1). */
export async function checkInputDirectory(path: string, what: string): Promise<void> {
  let s;
  try {
    s = await stat(path);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') throw new CliError('not-found', `${path}: no such directory (${what})`, { cause: e });
    throw e;
  }
  if (!s.isDirectory()) throw new CliError('not-a-directory', `${path}: is a file, expected a directory (${what})`);
}

/** A `tcp:HOST:PORT` or `unix:PATH` URI, checked when the command line is parsed (the value stays the string). */
export function endpointArg(v: string): string {
  try {
    parseEndpoint(v);
  } catch (e) {
    throw new InvalidArgumentError(e instanceof Error ? e.message : String(e));
  }
  return v;
}

/** Checks that `path` is a directory or does not exist yet (it will be created): 'not-a-directory' otherwise. */
export async function checkOutputDirectory(path: string, what: string): Promise<void> {
  const s = await stat(path).catch(() => undefined);
  if (s && !s.isDirectory()) throw new CliError('not-a-directory', `${path}: is a file, expected a directory (${what})`);
}

/** An output file: anything but a directory (an existing file is replaced). */
export async function checkOutputFile(path: string, what: string): Promise<void> {
  const s = await stat(path).catch(() => undefined);
  if (s?.isDirectory()) throw new CliError('is-a-directory', `${path}: is a directory, expected a file (${what})`);
}
