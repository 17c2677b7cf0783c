/**
 * The exhaustive variant of the suite's sampled prefix check
 * (test/stream/fixtures.test.ts): every main-channel capture fed byte by byte
 * and ended at every one of its offsets — each end is 'truncated' or, only for
 * the whole stream and a precopy stream cut right after EOF, complete with the
 * right records. Minutes per capture; part of `npm run fuzz`.
 *
 *   node --import tsx test/fuzz/every-prefix.ts [CAPTURE.bin ... | multifd-2 ... | mapped-ram-paused ...]
 *
 * Mapped-ram captures: the file read as if it ended at every offset of its
 * stream parts and bitmaps, and at every page boundary elsewhere (inside a
 * block's pages every cut is the same 'truncated').
 *
 * Multifd captures (test/stream/multifd-capture.ts): every channel ended at
 * every offset, split in two at every offset in splitPackets mode (pieces
 * that are views of the input), and in the default mode at every header byte
 * and around every page boundary (a split inside page data copies the
 * packet; its interior is one parser state, sampled by the suite).
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { MAIN_STREAMS, checkPrefixes, decodeWhole } from '../stream/prefixes.js';
import { MAPPED_RAM_FIXTURES, checkMappedRamPrefixes, eofEnd, loadMappedRam } from '../stream/mapped-ram-fixtures.js';
import { MULTIFD_SCENARIOS, checkChannelPieces, checkChannelPrefixes, checkChannelSplits, loadCapture, type ChannelCapture } from '../stream/multifd-capture.js';

const FIX = join(import.meta.dirname, '..', 'fixtures');
const wanted = process.argv.slice(2);
const isMultifd = (w: string): boolean => (MULTIFD_SCENARIOS as readonly string[]).includes(w);
const isMappedRam = (w: string): boolean => (MAPPED_RAM_FIXTURES as readonly string[]).includes(w);
const unknown = wanted.filter((w) => !MAIN_STREAMS.some((m) => m.file === w) && !isMultifd(w) && !isMappedRam(w));
if (unknown.length > 0) {
  console.error(`every-prefix: not a capture: ${unknown.join(', ')} (one of ${[...MAIN_STREAMS.map((m) => m.file), ...MULTIFD_SCENARIOS, ...MAPPED_RAM_FIXTURES].join(', ')})`);
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
/** Every header byte and both sides of every page boundary of a channel. */
function headersAndPageBoundaries(ch: ChannelCapture): Uint8Array {
  const at = new Uint8Array(ch.bytes.length + 1);
  for (const s of ch.spans) {
    at.fill(1, s.start, s.headerEnd + 1);
    for (let p = s.headerEnd + 4096; p < s.end; p += 4096) at.fill(1, p - 1, p + 2);
  }
  return at;
}

for (const name of MULTIFD_SCENARIOS) {
  if (wanted.length > 0 && !wanted.includes(name)) continue;
  const c = loadCapture(name);
  for (const ch of c.channels) {
    const t0 = performance.now();
    try {
      const all = new Uint8Array(ch.bytes.length + 1).fill(1);
      const { ended, clean } = checkChannelPrefixes(ch, c.blocks, all);
      if (clean !== ch.spans.length) throw new Error(`${clean} prefixes ended cleanly, expected ${ch.spans.length} (after every record)`);
      const pieces = checkChannelPieces(ch, c.blocks, all);
      const splits = checkChannelSplits(ch, c.blocks, headersAndPageBoundaries(ch));
      console.log(`every-prefix: ${ch.file}: ${ended} prefixes ended, ${clean} complete; ${pieces} splits in pieces, ${splits} splits whole; ${((performance.now() - t0) / 1000).toFixed(1)} s`);
    } catch (e) {
      failed++;
      console.error(`every-prefix: ${ch.file}: FAILED: ${e instanceof Error ? e.message : String(e)}`);
    }
  }
}
// Mapped-ram files: every prefix that ends in a stream part or a bitmap, and one per page elsewhere.
for (const name of MAPPED_RAM_FIXTURES) {
  if (wanted.length > 0 && !wanted.includes(name)) continue;
  const c = loadMappedRam(name);
  const t0 = performance.now();
  const at = new Set<number>();
  for (const p of c.streamParts) for (let n = p.start; n <= p.end; n++) at.add(n);
  for (const s of c.skips) for (let n = s.header.bitmapOffset; n <= s.header.bitmapOffset + 8 + s.length / 32768; n++) at.add(n);
  for (let n = 0; n <= c.bytes.length; n += 4096) at.add(n);
  at.add(c.bytes.length);
  try {
    const r = await checkMappedRamPrefixes(c, [...at].sort((a, b) => a - b));
    const eof = eofEnd(c);
    if (r.complete.join() !== [eof, c.bytes.length].join()) throw new Error(`prefixes ${r.complete.join(', ')} read completely, expected ${eof} and ${c.bytes.length}`);
    console.log(`every-prefix: ${name}: ${at.size} prefixes, ${r.errors} errors (${[...r.codes].join(', ')}), ${r.complete.length} complete, ${((performance.now() - t0) / 1000).toFixed(1)} s`);
  } catch (e) {
    failed++;
    console.error(`every-prefix: ${name}: FAILED: ${e instanceof Error ? e.message : String(e)}`);
  }
}
process.exit(failed > 0 ? 1 : 0);
