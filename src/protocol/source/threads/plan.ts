import { usageError } from '../../../errors.js';
import { socketTransferSupported, socketTransferWhy, tooFewCoresWhy, type ThreadMode } from '../../../transport/worker/support.js';
import { InMemorySource } from '../../memory-source.js';
import type { SourceOptions } from '../options.js';

/** Whether a source session runs its channels in worker threads, and why (SourceStats.threads). */
export interface ThreadPlan {
  readonly used: boolean;
  readonly why: string;
}

/** What keeps a session with these options on one thread, or undefined when threads are possible. */
function blocker(o: SourceOptions): string | undefined {
  if (!socketTransferSupported()) return socketTransferWhy();
  const m = o.memory;
  if (m instanceof InMemorySource ? !m.shared : typeof m.blockFiles !== 'function') {
    return 'the guest memory is not shared between threads (an InMemorySource created with { shared: true } is) nor in files each thread can read (a SavedVmSource is)';
  }
  if (o.xbzrleCacheBytes) return 'XBZRLE encodes against a cache on the caller\'s thread';
  return undefined;
}

/**
 * `threads` of SourceOptions: 'auto' (default) uses threads when every
 * condition holds and the machine has the cores for them
 * (AUTO_THREADS_MIN_CORES), and says which failed otherwise; 'on' where one fails is
 * a RangeError (code 'threads-unavailable', option 'threads') at the call.
 */
export function planSourceThreads(o: SourceOptions): ThreadPlan {
  const mode: ThreadMode = o.threads ?? 'auto';
  if (mode === 'off') return { used: false, why: "threads: 'off'" };
  const why = blocker(o) ?? (mode === 'auto' ? tooFewCoresWhy() : undefined);
  if (why === undefined) {
    if (o.memory instanceof InMemorySource) return { used: true, why: mode === 'on' ? "threads: 'on'" : 'auto: sockets can be transferred to worker threads and the guest memory is shared' };
    const files = "each channel's thread reads the pages it sends from the block files";
    return { used: true, why: mode === 'on' ? `threads: 'on'; ${files}` : `auto: sockets can be transferred to worker threads and ${files}` };
  }
  if (mode === 'on') throw usageError('range', 'threads-unavailable', 'threads', `threads: 'on' is not possible: ${why}`);
  return { used: false, why: `auto: ${why}` };
}

export function checkThreadMode(v: unknown): void {
  if (v !== undefined && v !== 'auto' && v !== 'on' && v !== 'off') throw usageError('type', 'bad-option', 'threads', `threads must be 'auto', 'on' or 'off', got ${String(v)}`);
}
