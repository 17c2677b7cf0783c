import { PageBitmap } from '../stream/bitmap.js';
import { TARGET_PAGE_SIZE } from '../stream/constants.js';
import type { RamBlockInfo } from '../stream/records.js';
import { MigrationError } from './errors.js';

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
  private readonly written = new Map<string, PageBitmap>();

  /** `shared`: back each block with a SharedArrayBuffer, so that another thread can read the RAM. */
  constructor(private readonly opts: { shared?: boolean } = {}) {}

  /** preallocate() was called: the blocks are the destination VM's, and the stream must match them. */
  private preallocated = false;

  /**
   * Sizes the storage for the stream's block list. With preallocated blocks
   * (the destination VM's RAM) the list must name those blocks with those
   * sizes, as QEMU requires ("Length mismatch", "Unknown ramblock"): a
   * mismatch is refused, never silently replaced.
   */
  setBlocks(blocks: readonly RamBlockInfo[]): void {
    if (this.preallocated) {
      for (const b of blocks) {
        const have = this.blocks.get(b.idstr);
        if (!have) {
          throw new MigrationError('unknown-ram-block', 'setup', `RAM block "${b.idstr}" of the stream is not one of the preallocated blocks (${[...this.blocks.keys()].map((k) => `"${k}"`).join(', ')}): cannot accept the migration`);
        }
        if (have.length !== b.length) {
          throw new MigrationError('length-mismatch', 'setup', `RAM block "${b.idstr}": the stream has 0x${b.length.toString(16)} bytes, the preallocated block 0x${have.length.toString(16)} (Length mismatch)`);
        }
      }
      return;
    }
    for (const b of blocks) {
      const have = this.blocks.get(b.idstr);
      if (!have || have.length !== b.length) this.allocate(b.idstr, b.length, false);
    }
  }

  /**
   * Allocates blocks before the migration, as a destination VM's RAM exists
   * before its incoming migration starts; the stream's block list must then
   * name exactly these blocks with these sizes (see setBlocks). `prefault` touches
   * every page now: the kernel's first-touch faults (4 KiB each, several µs
   * apiece on some machines) then cost nothing while the stream arrives —
   * QEMU gets much the same from transparent huge pages on its guest RAM.
   */
  preallocate(blocks: readonly { idstr: string; length: number }[], opts: { prefault?: boolean } = {}): void {
    for (const b of blocks) this.allocate(b.idstr, b.length, opts.prefault ?? false);
    this.preallocated = true;
  }

  private allocate(idstr: string, length: number, prefault: boolean): void {
    const buf = this.opts.shared ? Buffer.from(new SharedArrayBuffer(length)) : Buffer.alloc(length);
    if (prefault) for (let o = 0; o < length; o += TARGET_PAGE_SIZE) buf[o] = 0;
    this.blocks.set(idstr, buf);
    this.written.set(idstr, PageBitmap.forBlockLength(length));
  }

  private block(name: string): Buffer {
    const b = this.blocks.get(name);
    if (!b) throw new Error(`unknown RAM block "${name}"`);
    return b;
  }

  writePage(block: string, offset: number, data: Uint8Array): void {
    this.block(block).set(data, offset);
    this.written.get(block)!.set(offset / TARGET_PAGE_SIZE);
  }

  zeroPage(block: string, offset: number): void {
    const buf = this.block(block);
    if (this.written.get(block)!.has(offset / TARGET_PAGE_SIZE)) buf.fill(0, offset, offset + TARGET_PAGE_SIZE);
  }

  readPage(block: string, offset: number): Uint8Array {
    return this.block(block).subarray(offset, offset + TARGET_PAGE_SIZE);
  }

  async flush(): Promise<void> {}
  async close(): Promise<void> {}
}
