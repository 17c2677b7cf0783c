/**
 * The long run of the mapped-ram reader's fuzzing (the suite runs 120 inputs
 * per capture: test/stream/mapped-ram-fuzz.test.ts).
 *
 *   node --import tsx test/fuzz/fuzz-mapped-ram.ts [--inputs N] [--seed S]
 *
 * Input i of seed s is a pure function of (s, i) (test/fuzz/mapped-ram-mutate.ts);
 * a failure prints the input's seed, index and mutations. Exit status 1 on any failure.
 */
import { performance } from 'node:perf_hooks';
import { MAPPED_RAM_FIXTURES, loadMappedRam } from '../stream/mapped-ram-fixtures.js';
import { checkMutated, sparseCapture } from './mapped-ram-mutate.js';

const arg = (name: string, dflt: number): number => {
  const i = process.argv.indexOf(name);
  return i >= 0 ? Number(process.argv[i + 1]) : dflt;
};
const inputs = arg('--inputs', 20_000);
const seed = arg('--seed', Date.now() % 1_000_000);
let failed = 0;
for (const name of MAPPED_RAM_FIXTURES) {
  const c = loadMappedRam(name);
  const base = sparseCapture(c);
  const t0 = performance.now();
  for (let i = 0; i < inputs; i++) {
    try {
      await checkMutated(base, c, seed, i);
    } catch (e) {
      failed++;
      console.error(`fuzz-mapped-ram: ${name}: seed ${seed} input ${i}: ${e instanceof Error ? e.message : String(e)}`);
      if (failed > 20) process.exit(1);
    }
  }
  console.log(`fuzz-mapped-ram: ${name}: ${inputs} inputs (seed ${seed}), ${failed} failures, ${((performance.now() - t0) / 1000).toFixed(1)} s`);
}
process.exit(failed > 0 ? 1 : 0);
