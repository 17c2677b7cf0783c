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
  block: string;
  offset: number;
  sentAt: number | undefined;
  waiters: ((r: PageRequestResult) => void)[];
  failers: ((e: Error) => void)[];
}

/**
 * Which pages have arrived, and the demand requests waiting for the others.
 * Concurrent requests for one page share one REQ_PAGES; a page that arrives
 * on either channel resolves them, whether it was requested or not.
 */
export class PageTracker {
  private readonly bitmaps = new Map<string, PageBitmap>();
  private readonly pending = new Map<string, Pending>();
  private lastRequestedBlock: string | undefined;
  readonly latency = new LatencyHistogram();
  /** REQ_PAGES/REQ_PAGES_ID messages sent (QEMU's `postcopy-requests`, seen from this side). */
  requestsSent = 0;

  /** `send` writes a return-path message; `canRequest` says whether the source serves requests now (postcopy). */
  constructor(
    private readonly send: (m: ReturnPathMessage) => void,
    private canRequest: boolean = false,
  ) {}

  setBlocks(blocks: readonly RamBlockInfo[]): void {
    for (const b of blocks) if (!this.bitmaps.has(b.idstr)) this.bitmaps.set(b.idstr, PageBitmap.forBlockLength(b.length));
  }

  bitmap(block: string): PageBitmap | undefined {
    return this.bitmaps.get(block);
  }

  has(block: string, offset: number): boolean {
    return this.bitmaps.get(block)?.has(offset / TARGET_PAGE_SIZE) ?? false;
  }

  /** A page landed (on `channel`). */
  received(block: string, offset: number, channel: 'main' | 'preempt', now: number): void {
    const bm = this.bitmaps.get(block);
    if (bm) bm.set(offset / TARGET_PAGE_SIZE);
    if (this.pending.size === 0) return;
    const key = `${block}\0${offset}`;
    const p = this.pending.get(key);
    if (!p) return;
    this.pending.delete(key);
    const latencyUs = p.sentAt === undefined ? 0 : (now - p.sentAt) * 1000;
    if (p.sentAt !== undefined) this.latency.record(latencyUs);
    const r: PageRequestResult = { block, offset, requested: p.sentAt !== undefined, channel, latencyUs };
    for (const w of p.waiters) w(r);
  }

  /** Pages dropped by POSTCOPY_RAM_DISCARD: they will be sent again. */
  discard(block: string, start: number, length: number): void {
    const bm = this.bitmaps.get(block);
    if (!bm) return;
    bm.clearRange(start / TARGET_PAGE_SIZE, Math.ceil(length / TARGET_PAGE_SIZE));
  }

  /** From now on the source answers requests (postcopy listening): send those that waited. */
  enableRequests(now: number): void {
    if (this.canRequest) return;
    this.canRequest = true;
    for (const p of this.pending.values()) this.sendRequest(p, now);
  }

  /** Resolves when the page is present: at once, by the bulk stream, or by a demand request. */
  request(block: string, offset: number, now: number): Promise<PageRequestResult> {
    const aligned = offset - (offset % TARGET_PAGE_SIZE);
    if (!this.bitmaps.has(block)) return Promise.reject(new Error(`unknown RAM block "${block}"`));
    if (this.has(block, aligned)) return Promise.resolve({ block, offset: aligned, requested: false, channel: 'none', latencyUs: 0 });
    const key = `${block}\0${aligned}`;
    let p = this.pending.get(key);
    if (!p) {
      p = { block, offset: aligned, sentAt: undefined, waiters: [], failers: [] };
      this.pending.set(key, p);
      if (this.canRequest) this.sendRequest(p, now);
    }
    const entry = p;
    return new Promise((resolve, reject) => {
      entry.waiters.push(resolve);
      entry.failers.push(reject);
    });
  }

  private sendRequest(p: Pending, now: number): void {
    if (p.sentAt !== undefined) return;
    p.sentAt = now;
    this.requestsSent++;
    this.sendMessage(p);
  }

  private sendMessage(p: Pending): void {
    if (p.block !== this.lastRequestedBlock) {
      this.lastRequestedBlock = p.block;
      this.send({ type: 'req-pages-id', block: p.block, offset: p.offset, length: TARGET_PAGE_SIZE });
    } else {
      this.send({ type: 'req-pages', offset: p.offset, length: TARGET_PAGE_SIZE });
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
    for (const p of this.pending.values()) {
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
    for (const p of this.pending.values()) for (const f of p.failers) f(e);
    this.pending.clear();
  }

  /** Pages of every block not received yet. */
  missing(): number {
    let n = 0;
    for (const bm of this.bitmaps.values()) n += bm.pages - bm.count();
    return n;
  }
}
