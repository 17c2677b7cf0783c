import { performance } from 'node:perf_hooks';
import { encodeReturnPathMessage } from '../../stream/return-path.js';
import type { DestinationConnection } from '../../transport/connection.js';
import { MigrationError } from '../errors.js';
import type { PageTracker } from '../page-tracker.js';

/**
 * Completion: after EOF (postcopy) or the VM description (precopy), wait
 * for requested pages still in flight on the preempt channel, check that
 * RAM is whole, and say why not.
 */

/** How long finish waits for requested pages still in flight on the preempt channel. */
const LATE_PAGES_MS = 5000;

/** What waitLatePages reads of a link (Link or ThreadLink). */
export interface LateLink {
  readonly conn: { readonly preemptExpected: boolean };
  readonly preemptEnded: boolean;
  readonly alive: boolean;
}

/** Resolves once no page can still come on `link`'s preempt channel, every page is here, or the wait is over. */
export async function waitLatePages(link: LateLink, pages: PageTracker, listening: boolean, ramEnded: boolean, completing: () => boolean): Promise<void> {
  const deadline = performance.now() + LATE_PAGES_MS;
  // `completing`: a close() meanwhile (the session failed as cancelled) ends the wait at once.
  while (listening && ramEnded && pages.missing() > 0 && link.conn.preemptExpected && !link.preemptEnded && link.alive && completing() && performance.now() < deadline) {
    await new Promise((r) => setTimeout(r, 5));
  }
}

/**
 * Throws unless RAM is complete. After LISTEN every page must have come
 * (QEMU's source discards and resends whatever it had not sent cleanly); in
 * precopy a page never sent stays zero.
 */
export function checkRamComplete(pages: PageTracker, listening: boolean, ramEnded: boolean): void {
  if (!listening) return;
  const missing = pages.missing();
  // A source that cannot answer a request ends the stream on purpose (QEMU's protocol has no
  // "refused" message; see SourceSession): EOF after LISTEN without RAM's END section, which
  // every complete postcopy stream has, is that sign.
  if (!ramEnded) {
    throw new MigrationError('source-refused', 'completion', `the source ended the stream before RAM was complete (${missing} pages never received, ${pages.outstanding} request(s) unanswered): it refused a page request`);
  }
  if (missing > 0) throw new MigrationError('protocol', 'completion', `the postcopy stream ended with ${missing} pages never received`);
}

/**
 * Whether the source can know that we completed. It learns it from SHUT 0
 * and closes once it has read it; a link lost around that moment (a reset, a
 * channel that fails, main closed before SHUT 0 left, no close at all) leaves
 * it in doubt — a source that paused then waits for a destination that has
 * ended (see answerCompleted). Fed only by the link that completes.
 */
export class ShutNews {
  private queued = false;
  private doubt = false;
  private closed = false;

  /** SHUT 0 is handed to the main channel: a clean close from now on is the source's answer to it. */
  shutQueued(): void {
    this.queued = true;
  }

  /** A channel of the completing link failed (a reset, a write that failed). */
  lost(): void {
    if (!this.closed) this.doubt = true;
  }

  /** The main channel closed: with an error, or before SHUT 0, a loss; after it, the source read it. */
  mainClosed(error: boolean): void {
    if (this.closed) return;
    if (error || !this.queued || this.doubt) this.doubt = true;
    else this.closed = true;
  }

  /** Nothing says the source read SHUT 0. */
  get inDoubt(): boolean {
    return !this.closed;
  }
}

/** How long a completed destination answers recovery connections when its recovery has no `timeoutMs`. */
export const ANSWER_COMPLETED_MS = 60_000;
/** How long an answered connection may stay open before its source closes it. */
const ANSWERED_CLOSE_MS = 3000;

/** What answerCompleted listens with (a MigrationListener for recovery connections). */
export interface AnswerListener {
  accept(): Promise<DestinationConnection>;
  close(): void;
}

/**
 * After a postcopy completion the source may not know of (ShutNews in
 * doubt): the source then pauses and reconnects to resume, but everything is
 * here already. Every recovery connection is answered with SHUT 0 — what
 * ends its wait for RECV_BITMAP's answer; it completes and closes — until
 * one source closed after reading it, `ms` have passed, or the session is
 * closed (`closed()` true: its listener was closed). `listen` opens a
 * listener for recovery connections at the recovery address; a connection
 * cut before its source read the answer is answered again on the next.
 */
export async function answerCompleted(listen: () => Promise<AnswerListener>, ms: number, closed: () => boolean, onListener: (l: AnswerListener) => void): Promise<void> {
  const deadline = performance.now() + ms;
  const hold = setTimeout(() => undefined, ms); // this wait is the session's: it keeps the process alive
  try {
    while (!closed() && performance.now() < deadline) {
      const listener = await listen();
      onListener(listener);
      if (closed()) {
        listener.close();
        return;
      }
      const left = deadline - performance.now();
      let timer: NodeJS.Timeout | undefined;
      const conn = await Promise.race([
        listener.accept().catch(() => undefined),
        new Promise<undefined>((r) => (timer = setTimeout(() => r(undefined), Math.max(0, left)))),
      ]);
      clearTimeout(timer);
      listener.close();
      if (!conn) return;
      if (await answerOne(conn)) return;
    }
  } finally {
    clearTimeout(hold);
  }
}

/** SHUT 0 on one recovery connection; true once its source closed after reading it (a FIN, no error). */
async function answerOne(conn: DestinationConnection): Promise<boolean> {
  const main = conn.main;
  let error = false;
  main.on('error', () => (error = true));
  const closed = new Promise<void>((r) => (main.isClosed ? r() : main.once('close', () => r())));
  // Its RECV_BITMAP commands are read and dropped: the answer is the same for every block.
  main.read(() => undefined);
  let timer: NodeJS.Timeout | undefined;
  try {
    await main.send([encodeReturnPathMessage({ type: 'shut', value: 0 })], 'urgent');
    await main.flush();
    await Promise.race([closed, new Promise<void>((r) => (timer = setTimeout(r, ANSWERED_CLOSE_MS)))]);
    return main.isClosed && !error;
  } catch {
    return false;
  } finally {
    clearTimeout(timer);
    conn.destroy();
  }
}
