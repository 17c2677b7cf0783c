import { performance } from 'node:perf_hooks';
import { MigrationError } from '../errors.js';
import type { PageTracker } from '../page-tracker.js';

/**
 * Completion: after EOF (postcopy) or the VM description (precopy), wait
 * for requested pages still in flight on the preempt channel, check that
 * RAM is whole, and say why not.
 */

/** How long finish waits for requested pages still in flight on the preempt channel. */
const LATE_PAGES_MS = 5000;

/** Resolves once no page can still come on `link`'s preempt channel, every page is here, or the wait is over. */
/** What waitLatePages reads of a link (Link or ThreadLink). */
export interface LateLink {
  readonly conn: { readonly preemptExpected: boolean };
  readonly preemptEnded: boolean;
  readonly alive: boolean;
}

export async function waitLatePages(link: LateLink, pages: PageTracker, listening: boolean, ramEnded: boolean): Promise<void> {
  const deadline = performance.now() + LATE_PAGES_MS;
  while (listening && ramEnded && pages.missing() > 0 && link.conn.preemptExpected && !link.preemptEnded && link.alive && performance.now() < deadline) {
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
