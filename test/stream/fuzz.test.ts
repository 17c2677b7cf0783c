import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it } from 'vitest';
import fc from 'fast-check';
import { PreemptDecoder, ReturnPathDecoder, StreamDecoder, StreamError } from '../../src/stream/index.js';
import { KIND_COUNT, chunksAt, decodeMain, mapMainRecords, mapPreemptRecords, mapReturnPath, mutate, type Mutation } from '../fuzz/mutate.js';

/**
 * Mutated real captures: bit flips, truncations, length fields pushed to
 * extremes, records dropped/duplicated/moved, random splices; fed in random
 * chunks. The decoders may accept or refuse, but the only exception allowed is
 * StreamError, and every run ends. (The long run is `npm run fuzz`,
 * test/fuzz/fuzz-decoder.ts, with the same mutations.)
 */
const FIX = join(import.meta.dirname, '..', 'fixtures');
const main = ['paused-guest.bin', 'postcopy-main.bin', 'xbzrle.bin'].map((f) => {
  const bytes = readFileSync(join(FIX, f));
  return { bytes, map: mapMainRecords(decodeMain(bytes).records) };
});
const preempt = readFileSync(join(FIX, 'preempt-channel.bin'));
const rp = readFileSync(join(FIX, 'preempt-rp.bin'));

function feed(push: (c: Uint8Array) => unknown, end: () => unknown, b: Buffer, cuts: number[]): void {
  try {
    for (const c of chunksAt(b, cuts)) push(c);
    end();
  } catch (e) {
    if (!(e instanceof StreamError)) throw e;
  }
}

const mutations = fc.array(fc.tuple(fc.integer({ min: 0, max: KIND_COUNT - 1 }), fc.nat(), fc.nat()), { minLength: 1, maxLength: 5 }) as fc.Arbitrary<Mutation[]>;
const cuts = fc.array(fc.nat(), { maxLength: 6 });

describe('fuzzing with mutated QEMU captures', () => {
  it('main channel', () => {
    fc.assert(
      fc.property(fc.integer({ min: 0, max: main.length - 1 }), mutations, cuts, (which, muts, cs) => {
        const base = main[which]!;
        const d = new StreamDecoder({ maxDeviceSectionBytes: 1 << 20 });
        feed((c) => d.push(c), () => d.end(), mutate(base.bytes, muts, base.map), cs);
      }),
      { numRuns: 400 },
    );
  });

  it('preempt channel and return path', () => {
    const blocks = new StreamDecoder();
    blocks.push(readFileSync(join(FIX, 'preempt-main.bin')));
    const preemptMap = mapPreemptRecords(new PreemptDecoder(new Map(blocks.ramBlocks)).push(preempt));
    const rpMap = mapReturnPath(new ReturnPathDecoder().push(rp));
    fc.assert(
      fc.property(mutations, cuts, (muts, cs) => {
        const p = new PreemptDecoder(new Map(blocks.ramBlocks));
        feed((c) => p.push(c), () => p.end(), mutate(preempt, muts, preemptMap), cs);
        const r = new ReturnPathDecoder();
        feed((c) => r.push(c), () => r.end(), mutate(rp, muts, rpMap), cs);
      }),
      { numRuns: 400 },
    );
  });
});
