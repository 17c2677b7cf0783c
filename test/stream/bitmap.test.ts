import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { PageBitmap } from '../../src/stream/bitmap.js';

/** The bitmap against a plain Set of page numbers, under random operations. */
describe('PageBitmap', () => {
  const op = fc.oneof(
    fc.record({ k: fc.constant('set' as const), i: fc.nat(300) }),
    fc.record({ k: fc.constant('clear' as const), i: fc.nat(300) }),
    fc.record({ k: fc.constant('setRange' as const), i: fc.nat(300), n: fc.nat(90) }),
    fc.record({ k: fc.constant('clearRange' as const), i: fc.nat(300), n: fc.nat(90) }),
  );

  it('agrees with a set of page numbers: has, count, next, nextClear, runLength, bytes', () => {
    fc.assert(
      fc.property(fc.integer({ min: 1, max: 300 }), fc.array(op, { maxLength: 40 }), fc.nat(300), (pages, ops, probe) => {
        const bm = new PageBitmap(pages);
        const ref = new Set<number>();
        for (const o of ops) {
          const from = o.i % pages;
          const n = 'n' in o ? o.n : 1;
          for (let p = from; p < Math.min(pages, from + n); p++) {
            if (o.k.startsWith('set')) ref.add(p);
            else ref.delete(p);
          }
          if (o.k === 'set') bm.set(from);
          else if (o.k === 'clear') bm.clear(from);
          else if (o.k === 'setRange') bm.setRange(from, n);
          else bm.clearRange(from, n);
        }
        expect(bm.count()).toBe(ref.size);
        const start = probe % pages;
        const sorted = [...ref].sort((a, b) => a - b);
        expect(bm.next(start)).toBe(sorted.find((p) => p >= start) ?? -1);
        let clear = -1;
        for (let p = start; p < pages; p++) {
          if (!ref.has(p)) {
            clear = p;
            break;
          }
        }
        expect(bm.nextClear(start)).toBe(clear);
        let run = 0;
        while (start + run < pages && ref.has(start + run)) run++;
        expect(bm.runLength(start)).toBe(run);
        // Bounded: nothing at or past `end` is looked at or returned.
        const end = Math.min(pages, start + 1 + (probe % 70));
        const nextBelow = sorted.find((p) => p >= start && p < end) ?? -1;
        expect(bm.next(start, end)).toBe(nextBelow);
        expect(bm.runLength(start, end - start)).toBe(Math.min(run, end - start));
        for (let p = 0; p < pages; p++) {
          expect(bm.has(p)).toBe(ref.has(p));
          // QEMU's wire layout: bit p of byte p >> 3.
          expect(((bm.bytes[p >>> 3]! >> (p & 7)) & 1) === 1).toBe(ref.has(p));
        }
      }),
      { numRuns: 300, seed: 12 },
    );
  });

  it('is sized in whole 64-bit words, as RECV_BITMAP; setAll, complement and wire bytes keep the tail clear', () => {
    const bm = new PageBitmap(70);
    expect(bm.bytes.length).toBe(16);
    bm.setAll();
    expect(bm.count()).toBe(70);
    const wire = new Uint8Array(16).fill(0xff);
    const got = new PageBitmap(70, { bytes: wire });
    expect(got.count()).toBe(70);
    const none = new PageBitmap(70);
    none.assignComplement(got);
    expect(none.count()).toBe(0);
    got.clear(3);
    none.assignComplement(got);
    expect(none.count()).toBe(1);
    expect(none.has(3)).toBe(true);
    expect(() => new PageBitmap(70, { bytes: new Uint8Array(8) })).toThrow(RangeError);
    const shared = new PageBitmap(64, { shared: true });
    expect(shared.words.buffer).toBeInstanceOf(SharedArrayBuffer);
  });
});
