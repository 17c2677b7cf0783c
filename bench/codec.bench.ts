/**
 * Codec throughput (npm run bench:codec [-- --mib N]): a stream of N MiB of
 * guest RAM (default 1024), half zero pages and half random pages, interleaved.
 *
 *  (a) decode, landing every page in a preallocated guest-memory buffer, as a
 *      destination does (ZERO pages are memset, PAGE payloads copied);
 *  (b) encode from guest memory with zero-page detection on every page
 *      (pieces for writev, nothing concatenated);
 *
 * each next to Buffer.copy of the same pages, page by page, measured in the
 * same run (and one bulk copy for reference). Prints figures; asserts nothing.
 */
import { randomFillSync } from 'node:crypto';
import { parseArgs } from 'node:util';
import { StreamDecoder, StreamEncoder, isZeroPage, TARGET_PAGE_SIZE, type StreamRecord } from '../src/stream/index.js';

const { values } = parseArgs({ options: { mib: { type: 'string', default: '1024' }, runs: { type: 'string', default: '3' }, chunk: { type: 'string', default: '262144' } } });
const MiB = 1024 * 1024;
const size = Number(values.mib) * MiB;
const runs = Number(values.runs);
const chunkSize = Number(values.chunk);
const pages = size / TARGET_PAGE_SIZE;

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)]!;
}
function time(fn: () => void): number {
  const t0 = process.hrtime.bigint();
  fn();
  return Number(process.hrtime.bigint() - t0) / 1e9;
}
const gbps = (bytes: number, s: number) => bytes / s / 1e9;

// Guest memory: even pages zero, odd pages random.
const guest = Buffer.alloc(size);
for (let p = 1; p < pages; p += 2) randomFillSync(guest, p * TARGET_PAGE_SIZE, TARGET_PAGE_SIZE);
const dest = Buffer.alloc(size);
const ram = { sectionId: 1, idstr: 'ram', instanceId: 0, versionId: 4 } as const;

function encodeGuest(): Uint8Array[] {
  const enc = new StreamEncoder();
  const out: Uint8Array[] = [];
  enc.write({ type: 'header', version: 3 });
  enc.write({ type: 'configuration', machineType: 'pc-q35-10.0' });
  enc.write({ type: 'section', kind: 'start', ...ram });
  enc.write({ type: 'ram-blocks', total: size, blocks: [{ idstr: 'pc.ram', length: size }] });
  enc.write({ type: 'ram-eos' });
  enc.write({ type: 'footer', sectionId: 1 });
  enc.write({ type: 'section', kind: 'end', ...ram });
  for (let p = 0; p < pages; p++) {
    const offset = p * TARGET_PAGE_SIZE;
    const page = guest.subarray(offset, offset + TARGET_PAGE_SIZE);
    if (isZeroPage(page)) enc.write({ type: 'ram-zero', block: 'pc.ram', offset, continued: false });
    else enc.write({ type: 'ram-page', block: 'pc.ram', offset, continued: false, data: page });
    if ((p & 1023) === 1023) for (const piece of enc.take()) out.push(piece);
  }
  enc.write({ type: 'ram-eos' });
  enc.write({ type: 'footer', sectionId: 1 });
  enc.write({ type: 'eof' });
  for (const piece of enc.take()) out.push(piece);
  return out;
}

// The wire bytes, cut into socket-sized chunks, for the decoder.
const pieces = encodeGuest();
const wire = Buffer.concat(pieces as Buffer[]);
const chunks: Buffer[] = [];
for (let i = 0; i < wire.length; i += chunkSize) chunks.push(wire.subarray(i, Math.min(wire.length, i + chunkSize)));

function decodeIntoGuest(): void {
  const d = new StreamDecoder();
  const land = (recs: StreamRecord[]) => {
    for (const r of recs) {
      if (r.type === 'ram-page') dest.set(r.data, r.offset);
      else if (r.type === 'ram-zero') dest.fill(0, r.offset, r.offset + TARGET_PAGE_SIZE);
    }
  };
  for (const c of chunks) land(d.push(c));
  land(d.end());
}

function copyPages(): void {
  for (let p = 0; p < pages; p++) {
    const o = p * TARGET_PAGE_SIZE;
    guest.copy(dest, o, o, o + TARGET_PAGE_SIZE);
  }
}

// Warm-up: fault in the destination pages and let the JIT settle before timing.
copyPages();
decodeIntoGuest();
encodeGuest();

const results = { copy: [] as number[], bulk: [] as number[], decode: [] as number[], encode: [] as number[] };
for (let i = 0; i < runs; i++) {
  results.copy.push(time(copyPages));
  results.bulk.push(time(() => guest.copy(dest)));
  dest.fill(0xee);
  results.decode.push(time(decodeIntoGuest));
  if (!dest.equals(guest)) throw new Error('decoded guest memory differs from the source');
  results.encode.push(time(() => void encodeGuest()));
}

const copy = gbps(size, median(results.copy));
const rows: [string, number][] = [
  ['Buffer.copy, page by page (baseline)', copy],
  ['Buffer.copy, one bulk copy (reference)', gbps(size, median(results.bulk))],
  ['decode into guest memory', gbps(size, median(results.decode))],
  ['encode with zero-page detection', gbps(size, median(results.encode))],
];
console.log(`codec throughput: ${values.mib} MiB guest (half zero, half random pages), stream ${(wire.length / MiB).toFixed(0)} MiB in ${chunkSize}-byte chunks, median of ${runs} runs, node ${process.version}`);
console.log('| what | GB/s of guest RAM | ratio to page copy |');
console.log('|---|---:|---:|');
for (const [name, v] of rows) console.log(`| ${name} | ${v.toFixed(2)} | ${(v / copy).toFixed(2)}× |`);
console.log(JSON.stringify({ bench: 'codec', mib: Number(values.mib), runs, results }));
