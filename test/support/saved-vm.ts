/** Saved-VM directories for tests, as `qmt receive` writes them: block files and a manifest. */
import * as fs from 'node:fs';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { blockFileName } from '../../src/protocol/directory-sink.js';
import { MANIFEST, RAM_DIR, type SavedVmManifest } from '../../src/protocol/saved-vm.js';

const PAGE = 4096;

/** `len` bytes that differ with `seed` and along the buffer (never a zero page). */
export function pattern(len: number, seed: number): Buffer {
  const b = Buffer.alloc(len);
  for (let i = 0; i < len; i += 4) b.writeUInt32LE((seed * 2654435761 + i * 40503) >>> 0, i);
  return b;
}

/** A block of a test saved VM: its bytes, or a sparse file of `length` with `pattern(PAGE, p)` at each page p of `pokes`. */
export interface TestBlock {
  idstr: string;
  data?: Buffer;
  length?: number;
  pokes?: number[];
}

/** Writes a complete saved VM with these RAM blocks (no devices) into `dir`; returns `dir`. */
export function writeTestSavedVm(dir: string, blocks: readonly TestBlock[]): string {
  mkdirSync(join(dir, RAM_DIR), { recursive: true });
  const list: SavedVmManifest['blocks'] = [];
  for (const b of blocks) {
    const file = join(RAM_DIR, blockFileName(b.idstr));
    const length = b.data?.length ?? b.length!;
    if (b.data) writeFileSync(join(dir, file), b.data);
    else {
      const fd = fs.openSync(join(dir, file), 'w');
      fs.ftruncateSync(fd, length);
      for (const p of b.pokes ?? []) fs.writeSync(fd, pattern(PAGE, p), 0, PAGE, p * PAGE);
      fs.closeSync(fd);
    }
    list.push({ idstr: b.idstr, length, file });
  }
  const m: SavedVmManifest = { format: 'qemu-migration-transport/saved-vm', version: 1, complete: true, machineType: 'pc-q35-10.0', capabilities: [], postcopy: false, blocks: list, devices: [], vmdesc: null, stats: null, savedAt: new Date().toISOString() };
  writeFileSync(join(dir, MANIFEST), JSON.stringify(m));
  return dir;
}
