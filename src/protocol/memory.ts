import { TARGET_PAGE_SIZE } from '../stream/constants.js';
import type { RamBlockInfo } from '../stream/records.js';

/**
 * Where a destination puts guest RAM. Calls are synchronous on the hot path
 * (one per page): a sink that must do I/O does it with positioned writes, and
 * `flush()` makes everything durable.
 */
export interface GuestMemorySink {
  /** The block list arrived (RAM START section): size the storage. */
  setBlocks(blocks: readonly RamBlockInfo[]): void;
  /** A whole page (TARGET_PAGE_SIZE bytes) at `offset` of `block`. */
  writePage(block: string, offset: number, data: Uint8Array): void;
  /** A ZERO record. */
  zeroPage(block: string, offset: number): void;
  /** The page as currently held (for XBZRLE deltas), copied or viewed. */
  readPage(block: string, offset: number): Uint8Array;
  /** Makes everything written so far durable. */
  flush(): Promise<void>;
  /** Releases resources; the sink is not used afterwards. */
  close(): Promise<void>;
}

/** Guest RAM in memory: one Buffer per block. For tests, demos and small guests. */
export class InMemorySink implements GuestMemorySink {
  readonly blocks = new Map<string, Buffer>();
  /** Pages ever written: a ZERO record on a page still zero-filled costs nothing. */
  private readonly written = new Map<string, Uint8Array>();

  /** `shared`: back each block with a SharedArrayBuffer, so that another thread can read the RAM. */
  constructor(private readonly opts: { shared?: boolean } = {}) {}

  setBlocks(blocks: readonly RamBlockInfo[]): void {
    for (const b of blocks) {
      const have = this.blocks.get(b.idstr);
      if (!have || have.length !== b.length) {
        this.blocks.set(b.idstr, this.opts.shared ? Buffer.from(new SharedArrayBuffer(b.length)) : Buffer.alloc(b.length));
        this.written.set(b.idstr, new Uint8Array(Math.ceil(b.length / TARGET_PAGE_SIZE)));
      }
    }
  }

  private block(name: string): Buffer {
    const b = this.blocks.get(name);
    if (!b) throw new Error(`unknown RAM block "${name}"`);
    return b;
  }

  writePage(block: string, offset: number, data: Uint8Array): void {
    this.block(block).set(data, offset);
    this.written.get(block)![offset / TARGET_PAGE_SIZE] = 1;
  }

  zeroPage(block: string, offset: number): void {
    const buf = this.block(block);
    if (this.written.get(block)![offset / TARGET_PAGE_SIZE] === 1) buf.fill(0, offset, offset + TARGET_PAGE_SIZE);
  }

  readPage(block: string, offset: number): Uint8Array {
    return this.block(block).subarray(offset, offset + TARGET_PAGE_SIZE);
  }

  async flush(): Promise<void> {}
  async close(): Promise<void> {}
}
