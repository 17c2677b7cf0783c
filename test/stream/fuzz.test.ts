import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it } from 'vitest';
import fc from 'fast-check';
import { PreemptDecoder, ReturnPathDecoder, StreamDecoder, StreamError } from '../../src/stream/index.js';

/**
 * Mutated real captures: bit flips, truncations, length fields pushed to
 * extremes, random splices; fed in random chunks. The decoders may accept or
 * refuse, but the only exception allowed is StreamError, and every run ends.
 */
const FIX = join(import.meta.dirname, '..', 'fixtures');
const main = ['paused-guest.bin', 'postcopy-main.bin', 'xbzrle.bin'].map((f) => readFileSync(join(FIX, f)));
const preempt = readFileSync(join(FIX, 'preempt-channel.bin'));
const rp = readFileSync(join(FIX, 'preempt-rp.bin'));

type Mutation = [kind: number, pos: number, value: number];

function mutate(base: Buffer, muts: Mutation[]): Buffer {
  let b = Buffer.from(base);
  for (const [kind, pos, value] of muts) {
    if (b.length === 0) break;
    const p = pos % b.length;
    switch (kind) {
      case 0: // bit flip
        b[p]! ^= 1 << (value % 8);
        break;
      case 1: // truncation
        b = b.subarray(0, p);
        break;
      case 2: // a be32 length field to an extreme
        if (p + 4 <= b.length) b.writeUInt32BE([0, 1, 0xff, 0xffff, 0x7fffffff, 0xffffffff][value % 6]!, p);
        break;
      case 3: // splice out a range
        b = Buffer.concat([b.subarray(0, p), b.subarray(Math.min(b.length, p + (value % 9000)))]);
        break;
      default: // splice in a copy of another part
        b = Buffer.concat([b.subarray(0, p), b.subarray(value % b.length, (value % b.length) + 64), b.subarray(p)]);
    }
  }
  return b;
}

function feed(push: (c: Uint8Array) => unknown, end: () => unknown, b: Buffer, cuts: number[]): void {
  try {
    let prev = 0;
    for (const c of [...cuts.map((x) => x % (b.length + 1)).sort((x, y) => x - y), b.length]) {
      push(b.subarray(prev, Math.max(prev, c)));
      prev = Math.max(prev, c);
    }
    end();
  } catch (e) {
    if (!(e instanceof StreamError)) throw e;
  }
}

const mutations = fc.array(fc.tuple(fc.integer({ min: 0, max: 4 }), fc.nat(), fc.nat()), { minLength: 1, maxLength: 5 }) as fc.Arbitrary<Mutation[]>;
const cuts = fc.array(fc.nat(), { maxLength: 6 });

describe('fuzzing with mutated QEMU captures', () => {
  it('main channel', () => {
    fc.assert(
      fc.property(fc.integer({ min: 0, max: main.length - 1 }), mutations, cuts, (which, muts, cs) => {
        const d = new StreamDecoder({ maxDeviceSectionBytes: 1 << 20 });
        feed((c) => d.push(c), () => d.end(), mutate(main[which]!, muts), cs);
      }),
      { numRuns: 400 },
    );
  });

  it('preempt channel and return path', () => {
    const blocks = new StreamDecoder();
    blocks.push(readFileSync(join(FIX, 'preempt-main.bin')));
    fc.assert(
      fc.property(mutations, cuts, (muts, cs) => {
        const p = new PreemptDecoder(blocks.ramBlocks);
        feed((c) => p.push(c), () => p.end(), mutate(preempt, muts), cs);
        const r = new ReturnPathDecoder();
        feed((c) => r.push(c), () => r.end(), mutate(rp, muts), cs);
      }),
      { numRuns: 400 },
    );
  });
});
