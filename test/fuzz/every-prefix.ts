/**
 * The exhaustive variant of the suite's sampled prefix check
 * (test/stream/fixtures.test.ts): every main-channel capture fed byte by byte
 * and ended at every one of its offsets — each end is 'truncated' or, only for
 * the whole stream and a precopy stream cut right after EOF, complete with the
 * right records. Minutes per capture; part of `npm run fuzz`.
 *
 *   node --import tsx test/fuzz/every-prefix.ts [CAPTURE.bin ...]
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { MAIN_STREAMS, checkPrefixes, decodeWhole } from '../stream/prefixes.js';

const FIX = join(import.meta.dirname, '..', 'fixtures');
const wanted = process.argv.slice(2);
const unknown = wanted.filter((w) => !MAIN_STREAMS.some((m) => m.file === w));
if (unknown.length > 0) {
  console.error(`every-prefix: not a main-channel capture: ${unknown.join(', ')} (one of ${MAIN_STREAMS.map((m) => m.file).join(', ')})`);
  process.exit(2);
}
let failed = 0;
for (const { file, postcopy } of MAIN_STREAMS) {
  if (wanted.length > 0 && !wanted.includes(file)) continue;
  const bytes = readFileSync(join(FIX, file));
  const t0 = performance.now();
  try {
    const { ended, completions } = checkPrefixes(bytes, decodeWhole(bytes), new Uint8Array(bytes.length + 1).fill(1));
    const expected = postcopy ? 1 : 2;
    if (completions !== expected) throw new Error(`${completions} prefixes ended cleanly, expected ${expected}`);
    console.log(`every-prefix: ${file}: ${ended} prefixes ended, ${completions} complete, ${((performance.now() - t0) / 1000).toFixed(1)} s`);
  } catch (e) {
    failed++;
    console.error(`every-prefix: ${file}: FAILED: ${e instanceof Error ? e.message : String(e)}`);
  }
}
process.exit(failed > 0 ? 1 : 0);
