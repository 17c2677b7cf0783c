import { TARGET_PAGE_SIZE } from '../stream/constants.js';
import { PageBitmap } from '../stream/bitmap.js';
import type { RamBlockInfo, ReturnPathMessage } from '../stream/records.js';
import { LatencyHistogram } from './latency.js';

/** How a demand request ended. */
export interface PageRequestResult {
  block: string;
  offset: number;
  /** Whether a REQ_PAGES message was actually sent (false: the page was already there or arrived by the bulk stream). */
  requested: boolean;
  /** The channel the page came in on ('none' if it was already there). */
  channel: 'main' | 'preempt' | 'none';
  /** From the request to the page's arrival, in microseconds (0 if it was already there). */
  latencyUs: number;
}

interface Pending {
  readonly block: BlockPages;
  /** Page index in the block. */
  readonly page: number;
  sentAt: number | undefined;
  readonly waiters: ((r: PageRequestResult) => void)[];
  readonly failers: ((e: Error) => void)[];
}

/** One RAM block's pages: which arrived, and the requests waiting in it (created with the first). */
interface BlockPages {
  readonly info: RamBlockInfo;
  readonly received: PageBitmap;
  /** Page index → waiting request; undefined until a request waits in this block. */
  pending: Map<number, Pending> | undefined;
}

/**
 * Which pages have arrived, and the demand requests waiting for the others.
 * Concurrent requests for one page share one REQ_PAGES; a page that arrives
 * on either channel resolves them, whether it was requested or not.
 *
 * Blocks are indexed by their position in the block list (the decoder's
 * `KnownBlock.index`), so that a run of received pages costs one range set
 * on a bitmap and, unless a request waits in that block, nothing else: the
 * bulk path builds no key and does no lookup per page.
 */
export class PageTracker {
  private readonly byName = new Map<string, BlockPages>();
  private readonly byIndex: BlockPages[] = [];
  /** Every waiting request in the order asked (the order they are sent again after a recovery). */
  private readonly pending = new Set<Pending>();
  private lastRequestedBlock: string | undefined;
  readonly latency = new LatencyHistogram();
  /** REQ_PAGES/REQ_PAGES_ID messages sent (QEMU's `postcopy-requests`, seen from this side). */
  requestsSent = 0;

  /** `send` writes a return-path message; `canRequest` says whether the source serves requests now (postcopy). */
  constructor(
    private readonly send: (m: ReturnPathMessage) => void,
    private canRequest: boolean = false,
    /** Received sets in SharedArrayBuffers: channel threads set them (see destination/threads). */
    private readonly shared: boolean = false,
  ) {}

  /** The block list (RAM START): block i of the list is index i. */
  setBlocks(blocks: readonly RamBlockInfo[]): void {
    for (const b of blocks) {
      if (this.byName.has(b.idstr)) continue;
      const pages: BlockPages = { info: b, received: PageBitmap.forBlockLength(b.length, { shared: this.shared }), pending: undefined };
      this.byName.set(b.idstr, pages);
      this.byIndex.push(pages);
    }
  }

  /** The blocks as announced. */
  get blocks(): RamBlockInfo[] {
    return this.byIndex.map((b) => b.info);
  }

  block(name: string): RamBlockInfo | undefined {
    return this.byName.get(name)?.info;
  }

  bitmap(block: string): PageBitmap | undefined {
    return this.byName.get(block)?.received;
  }

  has(block: string, offset: number): boolean {
    return this.byName.get(block)?.received.has(offset / TARGET_PAGE_SIZE) ?? false;
  }

  /** Pages of [first, first + count) of block `index` already received (0 in a correct migration): word by word, not page by page. */
  alreadyReceived(index: number, first: number, count: number): number {
    const bm = this.byIndex[index]?.received;
    return bm ? countSet(bm, first, count) : 0;
  }

  /** A page landed (on `channel`). */
  received(block: string, offset: number, channel: 'main' | 'preempt', now: number): void {
    const b = this.byName.get(block);
    if (b) this.landed(b, offset / TARGET_PAGE_SIZE, 1, channel, now);
  }

  /** `count` consecutive pages of block `index` from page `first` landed (on `channel`). */
  receivedRun(index: number, first: number, count: number, channel: 'main' | 'preempt', now: number): void {
    const b = this.byIndex[index];
    if (b) this.landed(b, first, count, channel, now);
  }

  private landed(b: BlockPages, first: number, count: number, channel: 'main' | 'preempt', now: number): void {
    if (count === 1) b.received.set(first);
    else b.received.setRange(first, count);
    const waiting = b.pending;
    if (waiting === undefined || waiting.size === 0) return;
    if (count === 1) {
      const p = waiting.get(first);
      if (p) this.resolve(p, channel, now);
      return;
    }
    // Few requests wait at a time: walk them rather than the run's pages.
    const end = first + count;
    for (const [page, p] of waiting) if (page >= first && page < end) this.resolve(p, channel, now);
  }

  /**
   * Resolves every waiting request whose page is here: another thread landed
   * pages into the (shared) received set and said so once for the chunk.
   * `channel`: the one that brought them, or a lookup of who brought a page.
   */
  sweep(channel: 'main' | 'preempt' | ((block: string, page: number) => 'main' | 'preempt'), now: number): void {
    for (const p of this.pending) if (p.block.received.has(p.page)) this.resolve(p, typeof channel === 'string' ? channel : channel(p.block.info.idstr, p.page), now);
  }

  private resolve(p: Pending, channel: 'main' | 'preempt', now: number): void {
    p.block.pending!.delete(p.page);
    this.pending.delete(p);
    const latencyUs = p.sentAt === undefined ? 0 : (now - p.sentAt) * 1000;
    if (p.sentAt !== undefined) this.latency.record(latencyUs);
    const r: PageRequestResult = { block: p.block.info.idstr, offset: p.page * TARGET_PAGE_SIZE, requested: p.sentAt !== undefined, channel, latencyUs };
    for (const w of p.waiters) w(r);
  }

  /** Pages dropped by POSTCOPY_RAM_DISCARD: they will be sent again. */
  discard(block: string, start: number, length: number): void {
    const bm = this.byName.get(block)?.received;
    if (!bm) return;
    bm.clearRange(start / TARGET_PAGE_SIZE, Math.ceil(length / TARGET_PAGE_SIZE));
  }

  /** From now on the source answers requests (postcopy listening): send those that waited. */
  enableRequests(now: number): void {
    if (this.canRequest) return;
    this.canRequest = true;
    for (const p of this.pending) this.sendRequest(p, now);
  }

  /** Resolves when the page is present: at once, by the bulk stream, or by a demand request. */
  request(block: string, offset: number, now: number): Promise<PageRequestResult> {
    const aligned = offset - (offset % TARGET_PAGE_SIZE);
    const b = this.byName.get(block);
    if (!b) return Promise.reject(new Error(`unknown RAM block "${block}"`));
    const page = aligned / TARGET_PAGE_SIZE;
    if (b.received.has(page)) return Promise.resolve({ block, offset: aligned, requested: false, channel: 'none', latencyUs: 0 });
    b.pending ??= new Map();
    let p = b.pending.get(page);
    const fresh = !p;
    if (!p) {
      p = { block: b, page, sentAt: undefined, waiters: [], failers: [] };
      b.pending.set(page, p);
      this.pending.add(p);
    }
    const entry = p;
    const answer = new Promise<PageRequestResult>((resolve, reject) => {
      entry.waiters.push(resolve);
      entry.failers.push(reject);
    });
    // Sent once the waiter is in: sending may find the page landed meanwhile (another thread) and resolve it at once.
    if (fresh && this.canRequest) this.sendRequest(entry, now);
    return answer;
  }

  private sendRequest(p: Pending, now: number): void {
    if (p.sentAt !== undefined) return;
    p.sentAt = now;
    this.requestsSent++;
    this.sendMessage(p);
  }

  private sendMessage(p: Pending): void {
    const block = p.block.info.idstr;
    const offset = p.page * TARGET_PAGE_SIZE;
    if (block !== this.lastRequestedBlock) {
      this.lastRequestedBlock = block;
      this.send({ type: 'req-pages-id', block, offset, length: TARGET_PAGE_SIZE });
    } else {
      this.send({ type: 'req-pages', offset, length: TARGET_PAGE_SIZE });
    }
  }

  /** Postcopy paused: requests made from now on wait (the source cannot hear them). */
  suspendRequests(): void {
    this.canRequest = false;
  }

  /**
   * Postcopy resumed on a new connection: every request still waiting goes out
   * (again), the first one naming its block (REQ_PAGES_ID), as QEMU re-sends
   * its outstanding faults after RESUME_ACK. A request keeps its first send
   * time: its latency includes the pause, as the guest's wait does.
   */
  resumeRequests(now: number): void {
    this.canRequest = true;
    this.lastRequestedBlock = undefined;
    for (const p of this.pending) {
      if (p.sentAt === undefined) {
        this.sendRequest(p, now);
        continue;
      }
      this.requestsSent++;
      this.sendMessage(p);
    }
  }

  /** Requests still waiting. */
  get outstanding(): number {
    return this.pending.size;
  }

  /** Fails every waiting request (the session ended). */
  failAll(e: Error): void {
    const all = [...this.pending];
    this.pending.clear();
    for (const b of this.byIndex) b.pending = undefined;
    for (const p of all) for (const f of p.failers) f(e);
  }

  /** Pages of every block not received yet. */
  missing(): number {
    let n = 0;
    for (const b of this.byIndex) n += b.received.pages - b.received.count();
    return n;
  }
}

/** Set bits of `bm` in [first, first + count), 32 at a time. */
function countSet(bm: PageBitmap, first: number, count: number): number {
  const w = bm.words;
  const end = Math.min(first + count, bm.pages);
  let n = 0;
  for (let i = first; i < end; ) {
    const bit = i & 31;
    const take = Math.min(32 - bit, end - i);
    const mask = take === 32 ? 0xffffffff : ((1 << take) - 1) << bit;
    let x = ((w[i >>> 5] as number) & mask) >>> 0;
    // popcount
    x -= (x >>> 1) & 0x55555555;
    x = (x & 0x33333333) + ((x >>> 2) & 0x33333333);
    n += (((x + (x >>> 4)) & 0x0f0f0f0f) * 0x01010101) >>> 24;
    i += take;
  }
  return n;
}
