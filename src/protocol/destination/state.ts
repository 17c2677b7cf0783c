import type { MigrationError, MigrationPhase } from '../errors.js';
import type { Link as SingleLink } from './link.js';
import type { ThreadLink } from './threads/link.js';

/** A connection of the source: its channels on this thread (Link) or in worker threads (ThreadLink). */
export type Link = SingleLink | ThreadLink;
import type { Outage } from './recovery.js';
import type { DestinationStats } from './types.js';

/**
 * Where a DestinationSession is: one of these, and nothing else. `status`
 * (QEMU's names) and `phase` are derived from it.
 *
 * Why a few stream facts live here rather than being read from the decoder:
 * `push()` parses a whole chunk before the session sees its records, so the
 * decoder's own flags (postcopy, advised, inside a package) already describe
 * the end of the chunk while the session is still acting on a record before
 * it. What a record means (a page placed twice, a device state inside the
 * package, a DISCARD before ADVISE) depends on the state at that record: the
 * state union is where that is kept. The configuration is read from the
 * decoder (it never changes after the header).
 */
export type DestinationState =
  /** Listening; no source has connected. */
  | { readonly kind: 'setup' }
  /** Connected, before POSTCOPY_LISTEN. */
  | { readonly kind: 'precopy'; readonly link: Link; phase: MigrationPhase; advised: boolean; inPackage: boolean }
  /** After POSTCOPY_LISTEN. `vmHere`: the package has been read whole, the VM may run here, a network failure pauses. */
  | { readonly kind: 'postcopy'; readonly link: Link; phase: MigrationPhase; inPackage: boolean; vmHere: boolean }
  /** Postcopy, the connection lost: every page and request kept, a listener waits for the source. */
  | { readonly kind: 'paused'; readonly outage: Outage; readonly phase: MigrationPhase }
  /** A recovery connection came; POSTCOPY_RESUME not yet. */
  | { readonly kind: 'recovering'; readonly link: Link; readonly outage: Outage; readonly phase: MigrationPhase }
  /**
   * EOF read. `step`: 'vmdesc' (precopy: the VM description may follow),
   * 'late-pages' (requested pages may still come on the preempt channel),
   * 'flushing' (the sink is made durable; nothing is read any more).
   */
  | { readonly kind: 'completing'; readonly link: Link; readonly postcopy: boolean; step: 'vmdesc' | 'late-pages' | 'flushing' }
  | { readonly kind: 'completed'; readonly link: Link; readonly postcopy: boolean }
  | { readonly kind: 'failed'; readonly link: Link | undefined; readonly error: MigrationError; readonly phase: MigrationPhase; readonly postcopy: boolean };

export function statusOf(s: DestinationState): DestinationStats['status'] {
  switch (s.kind) {
    case 'setup':
      return 'setup';
    case 'precopy':
      return 'active';
    case 'postcopy':
      return 'postcopy-active';
    case 'paused':
      return 'postcopy-paused';
    case 'recovering':
      return 'postcopy-recover';
    case 'completing':
      return s.postcopy ? 'postcopy-active' : 'active';
    case 'completed':
      return 'completed';
    case 'failed':
      return 'failed';
  }
}

export function phaseOf(s: DestinationState): MigrationPhase {
  switch (s.kind) {
    case 'setup':
      return 'setup';
    case 'completing':
    case 'completed':
      return 'completion';
    default:
      return s.phase;
  }
}

/** After POSTCOPY_LISTEN: RAM records follow postcopy's rules, every page must come. */
export function isListening(s: DestinationState): boolean {
  switch (s.kind) {
    case 'postcopy':
    case 'paused':
    case 'recovering':
      return true;
    case 'completing':
    case 'completed':
    case 'failed':
      return s.postcopy;
    default:
      return false;
  }
}

/** The connection in use, if any. */
export function linkOf(s: DestinationState): Link | undefined {
  return 'link' in s ? s.link : undefined;
}

/** The migration has ended or is ending (finish or fail began): no record is acted on any more. */
export function isOver(s: DestinationState): boolean {
  return s.kind === 'completed' || s.kind === 'failed' || (s.kind === 'completing' && s.step !== 'vmdesc');
}
