import type { MigrationError } from '../errors.js';
import type { PausedEvent, ResumedEvent } from '../recovery.js';
import type { AnswerReason, SourceStats } from './stats.js';

export interface SourceEvents {
  connected: [{ uri: string }];
  /** A precopy pass over the dirty pages ended. */
  pass: [{ pass: number; pagesSent: number; bytes: number; dirtyPages: number; durationMs: number }];
  /** The VM was stopped (by stopVm) — emitted before any device state is written. */
  stopped: [{ at: number; hrtime: bigint }];
  'postcopy-active': [];
  /**
   * A requested page was answered: on `channel`, for `reason` (see
   * SourceStats['requests-answered']); `latencyUs` from the request's arrival
   * to the page's last byte handed to the kernel (for a page already in
   * flight: to the last byte of the bulk stream ahead of the request).
   */
  'page-request': [{ block: string; offset: number; channel: 'main' | 'preempt'; reason: AnswerReason; latencyUs: number }];
  /** A requested page had already gone out since LISTEN (see SourceStats['requested-pages-already-sent']): not sent again. */
  'requested-page-already-sent': [{ block: string; offset: number }];
  /** Postcopy: a channel failed; the migration waits for a new connection (state kept). */
  paused: [PausedEvent];
  /** A reconnection attempt starts. */
  recovering: [{ attempt: number; to: string }];
  /** The destination acknowledged the resume (RESUME_ACK); postcopy goes on. */
  resumed: [ResumedEvent];
  completed: [SourceStats];
  failed: [MigrationError];
}


