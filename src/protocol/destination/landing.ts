import type { PreemptRecord, StreamRecord } from '../../stream/records.js';
import { applyXbzrle } from '../../stream/xbzrle.js';
import type { GuestMemorySink } from '../memory.js';
import type { PageTracker } from '../page-tracker.js';
import type { DestinationCounters } from './stats.js';

/**
 * Where pages land, whichever channel brought them (main in precopy and
 * postcopy, preempt in postcopy): into the sink, the received bitmap and the
 * counters, resolving the requests that wait for them.
 */
export class PageLanding {
  constructor(
    private readonly sink: GuestMemorySink,
    private readonly pages: PageTracker,
    private readonly counts: DestinationCounters,
  ) {}

  /**
   * Lands `r` if it carries a page; false otherwise. `listening`: after
   * POSTCOPY_LISTEN, when a page that is already here is one placed twice.
   */
  land(r: StreamRecord | PreemptRecord, channel: 'main' | 'preempt', listening: boolean, now: number): boolean {
    const sink = this.sink;
    const c = this.counts;
    switch (r.type) {
      case 'ram-page':
        sink.writePage(r.block, r.offset, r.data);
        c.normal++;
        break;
      case 'ram-zero':
        sink.zeroPage(r.block, r.offset);
        c.duplicate++;
        break;
      case 'ram-xbzrle': {
        const page = Buffer.from(sink.readPage(r.block, r.offset));
        applyXbzrle(page, r.encoded);
        sink.writePage(r.block, r.offset, page);
        c.xbzrle++;
        break;
      }
      default:
        return false;
    }
    if (listening && this.pages.has(r.block, r.offset)) c.placedTwice++;
    if (channel === 'preempt') c.preempt++;
    c.iterationPages++;
    c.runs++;
    c.runPages++;
    this.pages.received(r.block, r.offset, channel, now);
    return true;
  }
}

