import { TARGET_PAGE_SIZE } from '../../../stream/constants.js';
import type { SourceRun } from '../run.js';
import { Notice, REASONS } from './protocol.js';

/**
 * One notice from a channel worker's ring, on the caller's thread: the
 * counters, the latency histogram and the events the single-thread path
 * has (`page-request` with its reason, `requested-page-already-sent`).
 */
export function onThreadNotice(run: SourceRun, e: Float64Array): void {
  const st = run.ram.blocks[e[1]!];
  if (!st) return;
  switch (e[0]) {
    case Notice.REQUEST:
      run.c.requests++;
      return;
    case Notice.ALREADY_SENT:
      run.c.alreadySent++;
      if (run.listens('requested-page-already-sent')) run.emit('requested-page-already-sent', { block: st.info.idstr, offset: e[2]! * TARGET_PAGE_SIZE });
      return;
    case Notice.ANSWERED: {
      const reason = REASONS[e[3]!]!;
      run.requests.answered(st, e[2]!, reason === 'preempt' ? 'preempt' : 'main', reason, e[4]!);
      return;
    }
    default:
      return;
  }
}
