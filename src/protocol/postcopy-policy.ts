import { usageError } from '../errors.js';

/**
 * When a source switches from precopy to postcopy.
 *
 * - 'never': precopy only (no POSTCOPY_ADVISE is sent).
 * - 'manual': `SourceSession.startPostcopy()`, called whenever the caller wants
 *   (as libvirt's virDomainMigrateStartPostCopy).
 * - { afterPasses: N }: after N complete precopy passes (libvirt switches after 1).
 * - 'auto': after a pass that did not shrink the dirty set enough to converge
 *   soon: see `autoWantsPostcopy`.
 */
export type PostcopyPolicy = 'never' | 'manual' | 'auto' | { afterPasses: number };

/** Facts about the pass that just ended, for the policy. */
export interface PassOutcome {
  /** Complete passes so far (1 after the first). */
  passes: number;
  /** Pages dirty after this pass's sync (what the next pass would send). */
  dirtyPages: number;
  /** Pages the pass before sent (its dirty set). */
  previousDirtyPages: number;
  /** Expected downtime to send the dirty set at the measured bandwidth, ms. */
  expectedDowntimeMs: number;
  downtimeLimitMs: number;
}

/**
 * 'auto': switch once precopy is not converging. A pass converges when the
 * dirty set it leaves fits the downtime limit; it is making progress while
 * the dirty set shrinks by at least a quarter per pass. After at least one
 * full pass (so bulk memory went by precopy, the seed's lesson), no
 * convergence and no such progress means the guest dirties memory about as
 * fast as the link moves it: more passes only resend it, so switch.
 */
export function autoWantsPostcopy(o: PassOutcome): boolean {
  if (o.passes < 1) return false;
  if (o.expectedDowntimeMs <= o.downtimeLimitMs) return false;
  return o.dirtyPages > 0.75 * o.previousDirtyPages;
}

/** Parses the CLI form: never | manual | auto | after:N. */
export function parsePostcopyPolicy(s: string): PostcopyPolicy {
  if (s === 'never' || s === 'manual' || s === 'auto') return s;
  const m = /^after:(\d+)$/.exec(s);
  if (m) return { afterPasses: Number(m[1]) };
  throw usageError('type', 'bad-postcopy-policy', 'postcopy', `postcopy policy must be never, manual, auto or after:N (got "${s}")`);
}
