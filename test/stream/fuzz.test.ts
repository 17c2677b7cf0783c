import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { PreemptDecoder, ReturnPathDecoder, StreamDecoder, StreamError } from '../../src/stream/index.js';
import { KIND_COUNT, chunksAt, decodeMain, mapMainRecords, mapPreemptRecords, mapReturnPath, mutate, type Mutation } from '../fuzz/mutate.js';
import { sameRecords } from './same-records.js';

/**
 * Mutated real captures: bit flips, truncations, length fields pushed to
 * extremes, records dropped/duplicated/moved, random splices; fed in random
 * chunks. The decoders may accept or refuse, but the only exception allowed is
 * StreamError, every run ends, and the records and the error (code and
 * offset) are the same as with the input pushed whole. (The long run is
 * `npm run fuzz`, test/fuzz/fuzz-decoder.ts, with the same mutations.)
 */
const FIX = join(import.meta.dirname, '..', 'fixtures');
const main = ['paused-guest.bin', 'postcopy-main.bin', 'xbzrle.bin'].map((f) => {
  const bytes = readFileSync(join(FIX, f));
  return { bytes, map: mapMainRecords(decodeMain(bytes).records) };
});
const preempt = readFileSync(join(FIX, 'preempt-channel.bin'));
const rp = readFileSync(join(FIX, 'preempt-rp.bin'));

interface Pushable {
  push(c: Uint8Array): readonly unknown[];
  end(): unknown;
  readonly error: StreamError | undefined;
}

/** Pushes `b` cut at `cuts`, then ends; only a StreamError is caught. */
function feed(d: Pushable, b: Buffer, cuts: readonly number[]): { records: unknown[]; error: StreamError | undefined } {
  const records: unknown[] = [];
  try {
    for (const c of chunksAt(b, cuts)) records.push(...d.push(c));
    const tail = d.end();
    if (Array.isArray(tail)) records.push(...(tail as unknown[]));
  } catch (e) {
    if (!(e instanceof StreamError)) throw e;
    return { records, error: e };
  }
  return { records, error: d.error };
}

/** Decodes `b` chunked and whole: the records and the error must be the same. */
function checkConsistent(make: () => Pushable, b: Buffer, cuts: readonly number[]): void {
  const chunked = feed(make(), b, cuts);
  const whole = feed(make(), b, []);
  const err = (o: { error: StreamError | undefined }) => o.error && { code: o.error.code, offset: o.error.offset };
  expect(err(chunked), 'error, chunked vs whole').toEqual(err(whole));
  expect(chunked.records.length, 'record count, chunked vs whole').toBe(whole.records.length);
  expect(sameRecords(chunked.records, whole.records), 'records, chunked vs whole').toBe(true);
}

const mutations = fc.array(fc.tuple(fc.integer({ min: 0, max: KIND_COUNT - 1 }), fc.nat(), fc.nat()), { minLength: 1, maxLength: 5 }) as fc.Arbitrary<Mutation[]>;
const cuts = fc.array(fc.nat(), { maxLength: 6 });

describe('fuzzing with mutated QEMU captures', () => {
  it('main channel', () => {
    fc.assert(
      fc.property(fc.integer({ min: 0, max: main.length - 1 }), mutations, cuts, (which, muts, cs) => {
        const base = main[which]!;
        checkConsistent(() => new StreamDecoder({ maxDeviceSectionBytes: 1 << 20 }), mutate(base.bytes, muts, base.map), cs);
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
        checkConsistent(() => new PreemptDecoder(new Map(blocks.ramBlocks)), mutate(preempt, muts, preemptMap), cs);
        checkConsistent(() => new ReturnPathDecoder(), mutate(rp, muts, rpMap), cs);
      }),
      { numRuns: 400 },
    );
  });
});
