import { usageError } from '../errors.js';
import { parseEndpoint } from '../transport/endpoint.js';
import type { TransportOptions } from '../transport/connection.js';
import type { PostcopyPolicy } from './postcopy-policy.js';

/**
 * Synchronous checks of the sessions' options, run by their constructors:
 * misuse is refused at the call that makes it, as a TypeError (wrong kind of
 * value, unknown word) or RangeError (a number out of range) with a stable
 * `code` and the `option` path — never a rejection some milliseconds later
 * from deep inside a connect.
 */

/** A `tcp:HOST:PORT` or `unix:PATH` URI. */
export function checkEndpoint(uri: unknown, option: string): void {
  if (typeof uri !== 'string') throw usageError('type', 'bad-endpoint', option, `${option} must be a string (tcp:HOST:PORT or unix:PATH), got ${describe(uri)}`);
  const port = /^tcp:(?:\[[^\]]*\]|[^:]*):(\d+)$/.exec(uri)?.[1];
  if (port !== undefined && Number(port) > 65535) throw usageError('range', 'bad-endpoint', option, `${option}: port ${port} is out of range (0 to 65535) in "${uri}"`);
  try {
    parseEndpoint(uri);
  } catch (e) {
    throw usageError('type', 'bad-endpoint', option, `${option}: ${(e as Error).message}`, e);
  }
}

export function checkPostcopyPolicy(p: unknown, option = 'postcopy'): asserts p is PostcopyPolicy | undefined {
  if (p === undefined || p === 'never' || p === 'manual' || p === 'auto') return;
  if (typeof p === 'object' && p !== null && 'afterPasses' in p) {
    const n = (p as { afterPasses: unknown }).afterPasses;
    if (typeof n !== 'number') throw usageError('type', 'bad-postcopy-policy', `${option}.afterPasses`, `${option}.afterPasses must be a number, got ${describe(n)}`);
    if (!Number.isSafeInteger(n) || n < 0) throw usageError('range', 'bad-postcopy-policy', `${option}.afterPasses`, `${option}.afterPasses must be an integer ≥ 0, got ${n}`);
    return;
  }
  throw usageError('type', 'bad-postcopy-policy', option, `${option} must be 'never', 'manual', 'auto' or { afterPasses: N }, got ${describe(p)}`);
}

/**
 * An optional number: finite, ≥ `min` (default 0; 1 for "positive"), an
 * integer unless `fractional`.
 */
export function checkNumber(v: unknown, option: string, opts: { min?: number; fractional?: boolean } = {}): void {
  if (v === undefined) return;
  if (typeof v !== 'number' || Number.isNaN(v)) throw usageError('type', 'bad-option', option, `${option} must be a number, got ${describe(v)}`);
  const min = opts.min ?? 0;
  if (!Number.isFinite(v) || v < min || (!opts.fractional && !Number.isInteger(v))) {
    throw usageError('range', 'bad-option', option, `${option} must be ${opts.fractional ? 'a number' : 'an integer'} ≥ ${min}, got ${v}`);
  }
}

export function checkSignal(s: unknown, option = 'signal'): void {
  if (s === undefined) return;
  if (typeof s !== 'object' || s === null || typeof (s as AbortSignal).aborted !== 'boolean' || typeof (s as AbortSignal).addEventListener !== 'function') {
    throw usageError('type', 'bad-option', option, `${option} must be an AbortSignal, got ${describe(s)}`);
  }
}

export function checkTransport(t: TransportOptions | undefined, option = 'transport'): void {
  if (t === undefined) return;
  if (typeof t !== 'object' || t === null) throw usageError('type', 'bad-option', option, `${option} must be an object, got ${describe(t)}`);
  checkNumber(t.connectTimeoutMs, `${option}.connectTimeoutMs`, { min: 1 });
  for (const role of ['main', 'preempt', 'multifd'] as const) {
    const c = t[role];
    if (c === undefined) continue;
    checkNumber(c.maxQueuedBytes, `${option}.${role}.maxQueuedBytes`, { min: 1 });
    checkNumber(c.socketBufferBytes, `${option}.${role}.socketBufferBytes`);
    checkNumber(c.bulkWindowBytes, `${option}.${role}.bulkWindowBytes`, { min: 1 });
    checkNumber(c.postcopyNotSentLowat, `${option}.${role}.postcopyNotSentLowat`);
  }
  if (t.tls !== undefined && (typeof t.tls !== 'object' || t.tls === null || typeof t.tls.dir !== 'string')) {
    throw usageError('type', 'bad-option', `${option}.tls.dir`, `${option}.tls.dir must be the path of a credentials directory`);
  }
}

function describe(v: unknown): string {
  if (typeof v === 'string') return `"${v}"`;
  if (v === null || typeof v !== 'object') return String(v);
  try {
    return JSON.stringify(v);
  } catch {
    return Object.prototype.toString.call(v);
  }
}
