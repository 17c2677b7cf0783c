/**
 * PageFileWriter on its own, with a layout DirectorySink does not use: two
 * blocks side by side in one file, each at its own base (as in a mapped-ram
 * file). Random runs of pages and zeros, writes done by node:fs: the file
 * equals the model at every block's base, and nothing is written outside
 * the blocks' ranges; no two overlapping writes in flight.
 */
import * as fs from 'node:fs';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import fc from 'fast-check';
import { afterAll, describe, expect, it } from 'vitest';
import { PageBitmap } from '../../src/stream/bitmap.js';
import { PageFileWriter, type PositionedWrite } from '../../src/protocol/page-file-writer.js';

const PAGE = 4096;
const root = mkdtempSync(join(tmpdir(), 'qmt-pfw-'));
afterAll(() => rmSync(root, { recursive: true, force: true }));

function pageOf(tag: number): Buffer {
  const b = Buffer.alloc(PAGE);
  for (let i = 0; i < PAGE; i += 4) b.writeUInt32LE((tag * 2654435761 + i) >>> 0, i);
  return b;
}

describe('PageFileWriter', () => {
  it('two blocks in one file at their bases: random pages and zeros land where the layout says, nothing else is touched', async () => {
    const A = { pages: 40, base: 3 * PAGE };
    const B = { pages: 24, base: 3 * PAGE + 40 * PAGE + 5 * PAGE };
    const size = B.base + B.pages * PAGE + 2 * PAGE;
    const op = fc.record({ block: fc.constantFrom(0, 1), page: fc.nat(39), count: fc.integer({ min: 1, max: 9 }), zero: fc.boolean() });
    let n = 0;
    await fc.assert(
      fc.asyncProperty(fc.array(op, { minLength: 1, maxLength: 60 }), async (ops) => {
        const path = join(root, `f${n++}`);
        const fd = fs.openSync(path, 'w+');
        fs.ftruncateSync(fd, size);
        // Bytes outside both blocks: a marker that must survive.
        fs.writeSync(fd, Buffer.alloc(size, 0xee), 0, size, 0);
        const model = [Buffer.alloc(A.pages * PAGE, 0xee), Buffer.alloc(B.pages * PAGE, 0xee)];
        const inflight: { pos: number; len: number }[] = [];
        let overlaps = 0;
        const write: PositionedWrite = (f, buf, off, len, pos, cb) => {
          for (const w of inflight) if (pos < w.pos + w.len && w.pos < pos + len) overlaps++;
          const me = { pos, len };
          inflight.push(me);
          fs.write(f, buf, off, len, pos, (err, k) => {
            inflight.splice(inflight.indexOf(me), 1);
            cb(err, k);
          });
        };
        const w = new PageFileWriter(write, { writeBytes: 4 * PAGE, maxInFlightBytes: 8 * PAGE, writesPerFile: 2 });
        const layout = [A, B];
        const blocks = layout.map((l, i) => w.addBlock({ idstr: `b${i}`, length: l.pages * PAGE, path, fd, base: l.base }, new PageBitmap(l.pages)));
        // The file starts with 0xee everywhere: pages of a block count as written, so that a ZERO writes zeros.
        for (const b of blocks) b.written.setAll();
        let tag = 1;
        for (const o of ops) {
          const l = layout[o.block]!;
          const page = o.page % l.pages;
          const count = Math.min(o.count, l.pages - page);
          if (o.zero) {
            w.zeroPages(blocks[o.block]!, page * PAGE, count);
            model[o.block]!.fill(0, page * PAGE, (page + count) * PAGE);
          } else {
            const src = Buffer.concat(Array.from({ length: count }, () => pageOf(tag++)));
            w.writePages(blocks[o.block]!, page * PAGE, count, src, 0, PAGE);
            src.copy(model[o.block]!, page * PAGE);
          }
          await w.backpressure();
        }
        await w.drained();
        expect(w.failed).toBeUndefined();
        const file = fs.readFileSync(path);
        fs.closeSync(fd);
        expect(overlaps).toBe(0);
        expect(file.subarray(A.base, A.base + A.pages * PAGE).equals(model[0]!)).toBe(true);
        expect(file.subarray(B.base, B.base + B.pages * PAGE).equals(model[1]!)).toBe(true);
        const outside = Buffer.concat([file.subarray(0, A.base), file.subarray(A.base + A.pages * PAGE, B.base), file.subarray(B.base + B.pages * PAGE)]);
        expect(outside.every((x) => x === 0xee)).toBe(true);
      }),
      { numRuns: 40 },
    );
  });
});
