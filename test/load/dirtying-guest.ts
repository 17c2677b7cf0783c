/**
 * A synthetic guest for load tests: one RAM block in memory, a third of its
 * pages random data and the rest zero; once started, every `tickMs` it
 * rewrites a few bytes in `pagesPerTick` random pages of its hot region
 * (through InMemorySource.write, so they are dirty for the next pass), until
 * stopped (SourceSession's `stopVm`).
 */
import { randomFillSync } from 'node:crypto';
import { InMemorySource } from '../../src/protocol/memory-source.js';

export const PAGE = 4096;
export const BLOCK = 'pc.ram';

export interface DirtyingGuestOptions {
  ramBytes: number;
  /** Byte range the guest rewrites. */
  hot: { start: number; end: number };
  pagesPerTick: number;
  tickMs: number;
  /** RAM and dirty bitmap in SharedArrayBuffers: what the source's channel threads read directly (issue 13). */
  shared?: boolean;
}

export class DirtyingGuest {
  readonly source: InMemorySource;
  /** Timer ticks so far (each dirtied `pagesPerTick` pages). */
  ticks = 0;
  private timer: NodeJS.Timeout | undefined;
  private readonly noise = Buffer.alloc(16);

  constructor(private readonly opts: DirtyingGuestOptions) {
    if (opts.ramBytes % PAGE !== 0 || opts.hot.start % PAGE !== 0 || opts.hot.end > opts.ramBytes || opts.hot.start >= opts.hot.end) {
      throw new Error(`bad guest layout: ${JSON.stringify(opts)}`);
    }
    this.source = new InMemorySource([{ idstr: BLOCK, length: opts.ramBytes }], { shared: opts.shared === true });
    const ram = this.ram;
    for (let p = 0; p < opts.ramBytes; p += 3 * PAGE) randomFillSync(ram, p, PAGE);
  }

  get ram(): Buffer {
    return this.source.memory.get(BLOCK)!;
  }

  get pages(): number {
    return this.opts.ramBytes / PAGE;
  }

  start(): this {
    const { hot, pagesPerTick, tickMs } = this.opts;
    const hotPages = (hot.end - hot.start) / PAGE;
    this.timer = setInterval(() => {
      this.ticks++;
      for (let i = 0; i < pagesPerTick; i++) {
        const page = hot.start + Math.floor(Math.random() * hotPages) * PAGE;
        randomFillSync(this.noise);
        this.source.write(BLOCK, page + Math.floor(Math.random() * (PAGE / 16)) * 16, this.noise);
      }
    }, tickMs);
    return this;
  }

  stop(): void {
    clearInterval(this.timer);
    this.timer = undefined;
  }
}
