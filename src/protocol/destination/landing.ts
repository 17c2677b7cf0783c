import { TARGET_PAGE_SIZE } from '../../stream/constants.js';
import type { PreemptRecordWithRuns, RamRunRecord, StreamRecordWithRuns } from '../../stream/records.js';
import { applyXbzrle } from '../../stream/xbzrle.js';
import type { GuestMemorySink } from '../memory.js';
import type { PageTracker } from '../page-tracker.js';
import type { DestinationCounters } from './stats.js';

const PAGE = TARGET_PAGE_SIZE;

/**
 * Where pages land, whichever channel brought them (main in precopy and
 * postcopy, preempt in postcopy): into the sink, the received bitmap and the
 * counters, resolving the requests that wait for them. The decoders yield
 * runs of consecutive pages (`pageRuns`): a run is one sink call, one range
 * on the bitmap and a handful of counter additions, whatever its length;
 * only XBZRLE pages come one by one.
 */
export class PageLanding {
  /** The sink takes runs (writePages/zeroPages); else each page is a call of its own. */
  private readonly runs: boolean;

  constructor(
    private readonly sink: GuestMemorySink,
    private readonly pages: PageTracker,
    private readonly counts: DestinationCounters,
  ) {
    this.runs = typeof sink.writePages === 'function' && typeof sink.zeroPages === 'function';
  }

  /**
   * Lands `r` if it carries pages; false otherwise. `listening`: after
   * POSTCOPY_LISTEN, when a page that is already here is one placed twice.
   */
  land(r: StreamRecordWithRuns | PreemptRecordWithRuns, channel: 'main' | 'preempt', listening: boolean, now: number): boolean {
    switch (r.type) {
      case 'ram-pages':
      case 'ram-zeros':
        this.landRun(r, channel, listening, now);
        return true;
      case 'ram-xbzrle': {
        const sink = this.sink;
        const page = Buffer.from(sink.readPage(r.block, r.offset));
        applyXbzrle(page, r.encoded);
        sink.writePage(r.block, r.offset, page);
        this.counts.xbzrle++;
        if (listening && this.pages.has(r.block, r.offset)) this.counts.placedTwice++;
        this.counted(1, channel);
        this.pages.received(r.block, r.offset, channel, now);
        return true;
      }
      default:
        return false;
    }
  }

  private landRun(r: RamRunRecord, channel: 'main' | 'preempt', listening: boolean, now: number): void {
    const sink = this.sink;
    const n = r.count;
    if (r.type === 'ram-pages') {
      if (this.runs) sink.writePages!(r.block, r.offset, n, r.data, r.start, r.stride);
      else for (let i = 0, s = r.start; i < n; i++, s += r.stride) sink.writePage(r.block, r.offset + i * PAGE, r.data.subarray(s, s + PAGE));
      this.counts.normal += n;
    } else {
      if (this.runs) sink.zeroPages!(r.block, r.offset, n);
      else for (let i = 0; i < n; i++) sink.zeroPage(r.block, r.offset + i * PAGE);
      this.counts.duplicate += n;
    }
    const index = r.handle.index;
    const first = r.offset / PAGE;
    if (listening) this.counts.placedTwice += this.pages.alreadyReceived(index, first, n);
    this.counted(n, channel);
    this.pages.receivedRun(index, first, n, channel, now);
  }

  private counted(n: number, channel: 'main' | 'preempt'): void {
    const c = this.counts;
    if (channel === 'preempt') c.preempt += n;
    c.iterationPages += n;
    c.runs++;
    c.runPages += n;
  }
}
