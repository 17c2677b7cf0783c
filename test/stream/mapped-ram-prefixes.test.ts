import { describe, expect, it } from 'vitest';
import { Rng } from '../fuzz/mutate.js';
import { MAPPED_RAM_FIXTURES, checkMappedRamPrefixes, eofEnd, loadMappedRam } from './mapped-ram-fixtures.js';

/**
 * A mapped-ram file cut anywhere (a copy that failed, a disk that filled) is
 * a typed error, never a crash. The suite reads a deterministic sample of
 * prefixes; `npm run fuzz:prefixes` reads every prefix of the stream parts
 * and one per page elsewhere (test/fuzz/every-prefix.ts).
 */
describe.each(MAPPED_RAM_FIXTURES)('every prefix of %s', (name) => {
  it('is a StreamError, except the whole file and the file cut after EOF', async () => {
    const c = loadMappedRam(name);
    const rng = new Rng(14, name.length);
    const at = new Set<number>();
    const first = c.streamParts[0]!;
    for (let n = 0; n <= first.end + 64; n++) at.add(n); // header, configuration, first block's entry and its bitmap's start
    for (const s of c.skips) for (let n = s.headerOffset - 40; n <= s.headerOffset + 28; n++) at.add(n); // every block entry and header
    for (const s of c.skips) for (const d of [-1, 0, 1, 4096]) at.add(s.to + d); // where each block's pages end
    for (const s of c.skips) at.add(s.header.bitmapOffset + 8);
    const tail = c.streamParts.at(-1)!;
    for (let i = 0; i < 150; i++) at.add(tail.start + rng.int(tail.end - tail.start)); // the device state
    for (let i = 0; i < 50; i++) at.add(rng.int(c.bytes.length)); // anywhere (mostly pages)
    const eof = eofEnd(c);
    for (const n of [eof - 1, eof, eof + 1, c.bytes.length - 1, c.bytes.length]) at.add(n);
    const r = await checkMappedRamPrefixes(c, [...at].filter((n) => n >= 0 && n <= c.bytes.length).sort((a, b) => a - b));
    expect(r.complete).toEqual([eof, c.bytes.length]);
    expect(r.errors).toBe(at.size - 2);
    expect([...r.codes].sort()).toEqual(['truncated']);
  }, 120_000);
});
