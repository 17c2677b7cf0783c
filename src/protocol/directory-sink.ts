import { closeSync, fsyncSync, ftruncateSync, mkdirSync, openSync, readSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { PageBitmap } from '../stream/bitmap.js';
import { TARGET_PAGE_SIZE } from '../stream/constants.js';
import type { RamBlockInfo } from '../stream/records.js';
import type { GuestMemorySink } from './memory.js';

/** A block's idstr as a file name ("/rom@etc/acpi/tables" → "%2From%40etc%2Facpi%2Ftables"). */
export function blockFileName(idstr: string): string {
  return `${encodeURIComponent(idstr)}.bin`;
}

const ZERO = Buffer.alloc(TARGET_PAGE_SIZE);

/**
 * Guest RAM as one sparse file per RAM block (`DIR/<block>.bin`), written with
 * positioned writes so memory use does not depend on guest size. ZERO records
 * on pages never written cost nothing: the file is sparse.
 */
export class DirectorySink implements GuestMemorySink {
  private readonly fds = new Map<string, { fd: number; written: PageBitmap }>();

  constructor(readonly dir: string) {
    mkdirSync(dir, { recursive: true });
  }

  setBlocks(blocks: readonly RamBlockInfo[]): void {
    for (const b of blocks) {
      if (this.fds.has(b.idstr)) continue;
      const fd = openSync(join(this.dir, blockFileName(b.idstr)), 'w+');
      ftruncateSync(fd, b.length);
      this.fds.set(b.idstr, { fd, written: PageBitmap.forBlockLength(b.length) });
    }
  }

  private file(block: string): { fd: number; written: PageBitmap } {
    const f = this.fds.get(block);
    if (!f) throw new Error(`unknown RAM block "${block}"`);
    return f;
  }

  writePage(block: string, offset: number, data: Uint8Array): void {
    const f = this.file(block);
    writeSync(f.fd, data, 0, TARGET_PAGE_SIZE, offset);
    f.written.set(offset / TARGET_PAGE_SIZE);
  }

  zeroPage(block: string, offset: number): void {
    const f = this.file(block);
    if (f.written.has(offset / TARGET_PAGE_SIZE)) writeSync(f.fd, ZERO, 0, TARGET_PAGE_SIZE, offset);
  }

  readPage(block: string, offset: number): Uint8Array {
    const buf = Buffer.alloc(TARGET_PAGE_SIZE);
    readSync(this.file(block).fd, buf, 0, TARGET_PAGE_SIZE, offset);
    return buf;
  }

  async flush(): Promise<void> {
    for (const { fd } of this.fds.values()) fsyncSync(fd);
  }

  async close(): Promise<void> {
    for (const { fd } of this.fds.values()) closeSync(fd);
    this.fds.clear();
  }
}
