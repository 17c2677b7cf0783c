import { describe, expect, it } from 'vitest';
import { checkMutated, readMutated, sparseCapture } from '../fuzz/mapped-ram-mutate.js';
import { MAPPED_RAM_FIXTURES, loadMappedRam } from './mapped-ram-fixtures.js';

/**
 * Mutated QEMU mapped-ram files (sparse: stream parts and bitmaps, mutated
 * there; see test/fuzz/mapped-ram-mutate.ts): only StreamErrors, inside the
 * file, the same whatever the read size. The long run is
 * `npm run fuzz:mapped-ram` (test/fuzz/fuzz-mapped-ram.ts).
 */
describe.each(MAPPED_RAM_FIXTURES)('fuzzing the mapped-ram reader with %s', (name) => {
  const c = loadMappedRam(name);
  const base = sparseCapture(c);

  it('the unmutated sparse file reads, with the capture’s blocks', async () => {
    const r = await readMutated(base, 4096);
    expect(r.error).toBeUndefined();
    expect(JSON.parse(r.blocks!).map((b: unknown[]) => b[0])).toEqual(c.skips.map((s) => s.idstr));
  });

  it('120 mutated files: typed errors only, independent of the read size', async () => {
    for (let i = 0; i < 120; i++) await checkMutated(base, c, 14, i);
  }, 120_000);
});
