import { TARGET_PAGE_SIZE } from '../stream/constants.js';
import { encodeXbzrle } from '../stream/xbzrle.js';

/**
 * The source's XBZRLE cache (QEMU's XBZRLE.cache): the last contents sent of
 * recently sent pages, so that a page sent again can go as a delta. Bounded in
 * bytes; the oldest page is evicted first (a Map iterates in insertion order).
 */
export class XbzrleCache {
  private readonly pages = new Map<string, Buffer>();
  private bytes = 0;

  constructor(private readonly capacityBytes: number) {}

  /**
   * What to send for `data`: a delta (Uint8Array, possibly empty when nothing
   * changed) or undefined for "send the page whole" (not cached yet, or the
   * delta would not save at least an eighth of the page). Remembers `data`.
   */
  encode(block: string, page: number, data: Uint8Array): Uint8Array | undefined {
    const key = `${block}\0${page}`;
    const prev = this.pages.get(key);
    const delta = prev ? encodeXbzrle(prev, data, TARGET_PAGE_SIZE - TARGET_PAGE_SIZE / 8) : undefined;
    this.put(key, data);
    return delta;
  }

  /** The page was sent as a ZERO record: a later delta must not start from stale bytes. */
  forget(block: string, page: number): void {
    const key = `${block}\0${page}`;
    if (this.pages.delete(key)) this.bytes -= TARGET_PAGE_SIZE;
  }

  private put(key: string, data: Uint8Array): void {
    if (this.pages.delete(key)) this.bytes -= TARGET_PAGE_SIZE;
    if (this.bytes + TARGET_PAGE_SIZE > this.capacityBytes) {
      const oldest = this.pages.keys().next();
      if (oldest.done) return;
      this.pages.delete(oldest.value);
      this.bytes -= TARGET_PAGE_SIZE;
    }
    this.pages.set(key, Buffer.from(data));
    this.bytes += TARGET_PAGE_SIZE;
  }
}
