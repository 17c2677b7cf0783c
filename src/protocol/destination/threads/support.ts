import { usageError } from '../../../errors.js';
import { socketTransferSupported, socketTransferWhy, tooFewCoresWhy, type ThreadMode } from '../../../transport/worker/support.js';
import { InMemorySink, type GuestMemorySink } from '../../memory.js';

/** Whether a destination runs its channels in worker threads, and why (stats.threads). */
export interface ThreadDecision {
  readonly used: boolean;
  readonly why: string;
}

/** Why `sink` cannot be written from other threads, or undefined when it can. */
function sinkNotShareable(sink: GuestMemorySink): string | undefined {
  if (typeof sink.blockFiles === 'function') return undefined; // files: each worker writes its own pages (DirectorySink)
  if (!(sink instanceof InMemorySink)) return `the sink (${sink.constructor?.name ?? typeof sink}) is neither memory other threads can write nor files they can write (threads need InMemorySink({ shared: true }) or a DirectorySink)`;
  if (!sink.shared) return 'the InMemorySink is not shared: threads need InMemorySink({ shared: true })';
  return undefined;
}

/**
 * `threads` of DestinationOptions, decided at the call: 'on' where threads
 * are impossible is a typed error naming why; 'auto' falls back and says why.
 */
export function decideThreads(mode: ThreadMode | undefined, sink: GuestMemorySink): ThreadDecision {
  const m = mode ?? 'auto';
  if (m !== 'auto' && m !== 'on' && m !== 'off') throw usageError('type', 'bad-option', 'threads', `threads must be 'auto', 'on' or 'off', got ${String(mode)}`);
  if (m === 'off') return { used: false, why: "threads: 'off'" };
  const files = typeof sink.blockFiles === 'function';
  const blocker = !socketTransferSupported() ? socketTransferWhy() : sinkNotShareable(sink);
  // The core count decides 'auto' for every sink, files too (the hang that kept files on one thread was a
  // reset replayed to no one: channel-worker.ts take()).
  const why = blocker ?? (m === 'auto' ? tooFewCoresWhy() : undefined);
  if (why === undefined) {
    if (!files) return { used: true, why: m === 'on' ? "threads: 'on'" : "threads: 'auto' (sockets can move to worker threads, the sink is shared memory)" };
    const where = "each channel's thread writes the pages it decodes into the sink's files";
    return { used: true, why: m === 'on' ? `threads: 'on'; ${where}` : `threads: 'auto' (sockets can move to worker threads; ${where})` };
  }
  if (m === 'on') throw usageError('state', 'threads-unavailable', 'threads', `threads: 'on' is impossible here: ${why}`);
  return { used: false, why: `threads: 'auto' fell back to one thread: ${why}` };
}
