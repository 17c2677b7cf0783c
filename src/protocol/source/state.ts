import type { MigrationError, MigrationPhase } from '../errors.js';
import type { SourceStats } from './stats.js';

/**
 * Where a source migration is: the one state the session holds, from which
 * `status` (QEMU's names) and `phase` (for errors) are derived.
 *
 * - `setup`: connecting (`connected` false) or writing the header, the
 *   configuration and the RAM block list.
 * - `precopy`: pass `pass` (1-based) over the dirty pages, the VM running.
 * - `switchover`: the VM is stopped: last dirty pages and device state
 *   (precopy's end), or discards and the LISTEN package (`listened`: LISTEN is
 *   written, pages are exactly-once and page requests are answered).
 * - `postcopy`: the destination runs the VM; the rest of RAM goes in the
 *   background while requests overtake it.
 * - `paused`: postcopy, the link lost; `since` is when postcopy stopped being
 *   active (a recovery link lost before RESUME_ACK keeps it), `hold` when
 *   `pause()` asked for no attempt before `resume()`.
 * - `recovering`: a new link is exchanging bitmaps (QEMU's postcopy-recover).
 * - `completing`: everything is sent; waiting for the destination's SHUT.
 *   Not in the list: waiting for SHUT is a phase of its own
 *   ('completion') and, after postcopy, a network failure in it still pauses.
 * - `completed`, `failed`: the end (`phase`: where it failed).
 */
export type SourceState =
  | { readonly kind: 'setup'; readonly connected: boolean }
  | { readonly kind: 'precopy'; readonly pass: number }
  | { readonly kind: 'switchover'; readonly listened: boolean }
  | { readonly kind: 'postcopy' }
  | { readonly kind: 'paused'; readonly error: MigrationError; readonly since: number; readonly hold: boolean }
  | { readonly kind: 'recovering'; readonly since: number }
  | { readonly kind: 'completing'; readonly postcopy: boolean }
  | { readonly kind: 'completed' }
  | { readonly kind: 'failed'; readonly error: MigrationError; readonly phase: MigrationPhase };

export function statusOf(s: SourceState): SourceStats['status'] {
  switch (s.kind) {
    case 'setup':
      return s.connected ? 'active' : 'setup';
    case 'precopy':
      return 'active';
    case 'switchover':
      return s.listened ? 'postcopy-active' : 'active';
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

export function phaseOf(s: SourceState): MigrationPhase {
  switch (s.kind) {
    case 'setup':
      return 'setup';
    case 'precopy':
      return 'precopy';
    case 'switchover':
      return 'device-state';
    case 'postcopy':
    case 'paused':
    case 'recovering':
      return 'postcopy';
    case 'completing':
    case 'completed':
      return 'completion';
    case 'failed':
      return s.phase;
  }
}

/** From LISTEN on: pages exactly once, requests answered, a network failure pauses. */
export function isPostcopy(s: SourceState): boolean {
  switch (s.kind) {
    case 'switchover':
      return s.listened;
    case 'postcopy':
    case 'paused':
    case 'recovering':
      return true;
    case 'completing':
      return s.postcopy;
    default:
      return false;
  }
}

/** The migration is over (from the completion's last step on, the destination may close first). */
export function isOver(s: SourceState): boolean {
  return s.kind === 'completed' || s.kind === 'failed';
}
