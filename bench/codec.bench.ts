/**
 * Codec throughput (npm run bench:codec [-- --quick] [-- --out DIR] [-- --mib N] [-- --runs N] [-- --stretch P] [-- --chunk B] [-- --batch P]):
 * a stream of N MiB of guest RAM (default 1024), half zero pages and half
 * random pages, alternating in stretches of P pages (default 16; 1 = every
 * other page, the worst case for runs).
 *
 *  (a) decode, landing every page in a preallocated guest-memory buffer, as a
 *      destination does (ZERO pages are memset, PAGE payloads copied): one
 *      record per page, and with `pageRuns` (one record per run);
 *  (b) encode from guest memory with zero-page detection on every page
 *      (pieces for writev, nothing concatenated): one write() per page, and
 *      writePages over batches of B pages (default 256, 1 MiB);
 *
 * each next to Buffer.copy of the same pages, page by page, measured in the
 * same run (and one bulk copy for reference). Prints figures; asserts nothing.
 * Its result is a part like the others (bench/lib/part.ts): <out>/codec.json and .md; --quick: 256 MiB.
 */
import { randomFillSync } from 'node:crypto';
import { getHeapStatistics } from 'node:v8';
import { StreamDecoder, StreamEncoder, isZeroPage, TARGET_PAGE_SIZE, type StreamRecord, type StreamRecordWithRuns } from '../src/stream/index.js';
import { runPart } from './lib/part.js';
import { fmt } from './lib/report.js';
import { fmtRatio, fmtStats, median, runStats, type RunStats } from './lib/stats.js';
import type { CodecData } from './lib/summary.js';

await runPart<CodecData>(
  'codec',
  'Codec throughput',
  {
    mib: { type: 'string' },
    runs: { type: 'string', default: '3' },
    chunk: { type: 'string', default: '262144' },
    stretch: { type: 'string', default: '16' },
    batch: { type: 'string', default: '256' },
  },
  async (ctx) => {
    const values = ctx.options;
    // --quick: a quarter of the stream.
    const mib = Number(values.mib ?? (ctx.quick ? 256 : 1024));
    const MiB = 1024 * 1024;
    const size = mib * MiB;
    const runs = Number(values.runs);
    const chunkSize = Number(values.chunk);
    const pages = size / TARGET_PAGE_SIZE;
    const stretch = Number(values.stretch);
    const batch = Number(values.batch);
    for (const [k, v] of Object.entries({ mib, runs, chunk: chunkSize, stretch, batch })) if (!Number.isInteger(v) || v < 1) throw new Error(`--${k} must be a positive integer, got ${String(values[k])}`);

    /** JS-heap bytes allocated so far (V8's counter, in Node ≥ 26; undefined before). */
    function allocatedBytes(): number | undefined {
      return (getHeapStatistics() as { total_allocated_bytes?: number }).total_allocated_bytes;
    }
    /** Bytes allocated per page by each path, summed over the runs. */
    const allocated: Record<string, number> = {};
    /** CPU seconds (user + system) of each run of each path: on a busy machine steadier than the wall clock. */
    const cpuSeconds: Record<string, number[]> = {};
    function time(fn: () => void, name?: string): number {
      const a0 = allocatedBytes();
      const c0 = process.cpuUsage();
      const t0 = process.hrtime.bigint();
      fn();
      const s = Number(process.hrtime.bigint() - t0) / 1e9;
      const c = process.cpuUsage(c0);
      const a1 = allocatedBytes();
      if (name !== undefined) {
        (cpuSeconds[name] ??= []).push((c.user + c.system) / 1e6);
        if (a0 !== undefined && a1 !== undefined) allocated[name] = (allocated[name] ?? 0) + (a1 - a0) / pages;
      }
      return s;
    }
    const gbps = (bytes: number, s: number) => bytes / s / 1e9;

    // Guest memory: stretches of `stretch` zero pages, then as many random pages.
    const guest = Buffer.alloc(size);
    for (let p = 0; p < pages; p++) if (Math.floor(p / stretch) % 2 === 1) randomFillSync(guest, p * TARGET_PAGE_SIZE, TARGET_PAGE_SIZE);
    const dest = Buffer.alloc(size);
    const ram = { sectionId: 1, idstr: 'ram', instanceId: 0, versionId: 4 } as const;

    function encodePrelude(enc: StreamEncoder): void {
      enc.write({ type: 'header', version: 3 });
      enc.write({ type: 'configuration', machineType: 'pc-q35-10.0' });
      enc.write({ type: 'section', kind: 'start', ...ram });
      enc.write({ type: 'ram-blocks', total: size, blocks: [{ idstr: 'pc.ram', length: size }] });
      enc.write({ type: 'ram-eos' });
      enc.write({ type: 'footer', sectionId: 1 });
      enc.write({ type: 'section', kind: 'end', ...ram });
    }

    function encodeGuest(): Uint8Array[] {
      const enc = new StreamEncoder();
      const out: Uint8Array[] = [];
      encodePrelude(enc);
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

    /** The same stream with writePages over batches of `batch` pages (a source with readPages views). */
    function encodeGuestPages(): Uint8Array[] {
      const enc = new StreamEncoder();
      const out: Uint8Array[] = [];
      encodePrelude(enc);
      for (let p = 0; p < pages; p += batch) {
        const n = Math.min(batch, pages - p);
        enc.writePages('pc.ram', p * TARGET_PAGE_SIZE, n, guest, p * TARGET_PAGE_SIZE);
        for (const piece of enc.take()) out.push(piece);
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

    /** As decodeIntoGuest, with runs: one record per run, the pages copied from the chunk they arrived in. */
    function decodeRunsIntoGuest(): void {
      const d = new StreamDecoder({ pageRuns: true });
      const land = (recs: StreamRecordWithRuns[]) => {
        for (const r of recs) {
          if (r.type === 'ram-pages') {
            const src = r.data;
            let s = r.start;
            let o = r.offset;
            for (let i = 0; i < r.count; i++, s += r.stride, o += TARGET_PAGE_SIZE) dest.set(src.subarray(s, s + TARGET_PAGE_SIZE), o);
          } else if (r.type === 'ram-zeros') dest.fill(0, r.offset, r.offset + r.count * TARGET_PAGE_SIZE);
        }
      };
      for (const c of chunks) land(d.push(c));
      land(d.end());
    }

    /** The decoder alone (records made and dropped): its own cost per page, without the landing copy. */
    function parseOnly(pageRuns: boolean): number {
      const d = pageRuns ? new StreamDecoder({ pageRuns: true }) : new StreamDecoder();
      let n = 0;
      for (const c of chunks) n += d.push(c).length;
      return n + d.end().length;
    }

    function copyPages(): void {
      for (let p = 0; p < pages; p++) {
        const o = p * TARGET_PAGE_SIZE;
        guest.copy(dest, o, o, o + TARGET_PAGE_SIZE);
      }
    }

    const same = (a: readonly Uint8Array[], b: readonly Uint8Array[]) => Buffer.concat(a as Buffer[]).equals(Buffer.concat(b as Buffer[]));
    if (!same(encodeGuestPages(), pieces)) throw new Error('writePages wrote other bytes than write() per page');

    // Warm-up: fault in the destination pages and let the JIT settle before timing.
    copyPages();
    decodeIntoGuest();
    decodeRunsIntoGuest();
    encodeGuest();
    encodeGuestPages();

    const results = {
      copy: [] as number[],
      bulk: [] as number[],
      decode: [] as number[],
      decodeRuns: [] as number[],
      parse: [] as number[],
      parseRuns: [] as number[],
      encode: [] as number[],
      encodePages: [] as number[],
    };
    for (let i = 0; i < runs; i++) {
      results.copy.push(time(copyPages, 'copy'));
      results.bulk.push(time(() => guest.copy(dest), 'bulk'));
      dest.fill(0xee);
      results.decode.push(time(decodeIntoGuest, 'decode'));
      if (!dest.equals(guest)) throw new Error('decoded guest memory differs from the source');
      dest.fill(0xee);
      results.decodeRuns.push(time(decodeRunsIntoGuest, 'decodeRuns'));
      if (!dest.equals(guest)) throw new Error('decoded guest memory (runs) differs from the source');
      results.parse.push(time(() => void parseOnly(false), 'parse'));
      results.parseRuns.push(time(() => void parseOnly(true), 'parseRuns'));
      results.encode.push(time(() => void encodeGuest(), 'encode'));
      results.encodePages.push(time(() => void encodeGuestPages(), 'encodePages'));
    }
    // Mean over the runs; the encode rows include the pieces they return (kept until the run ends).
    const perPage = Object.fromEntries(Object.entries(allocated).map(([k, v]) => [k, Math.round((v / runs) * 10) / 10]));

    // Seconds per run → GB/s of guest RAM per run, and CPU ns per page.
    const st = (key: keyof typeof results): RunStats | undefined => runStats(results[key].map((sec) => gbps(size, sec)));
    const cpuNs = (key: string): number => ((median(cpuSeconds[key] ?? []) ?? NaN) * 1e9) / pages;
    const rows: [string, keyof typeof results][] = [
      ['Buffer.copy, page by page (baseline)', 'copy'],
      ['Buffer.copy, one bulk copy (reference)', 'bulk'],
      ['decode into guest memory', 'decode'],
      ['decode with runs into guest memory', 'decodeRuns'],
      ['decode only, one record per page (no landing)', 'parse'],
      ['decode only, with runs (no landing)', 'parseRuns'],
      ['encode with zero-page detection', 'encode'],
      [`encode with writePages (${batch}-page batches)`, 'encodePages'],
    ];
    const copy = st('copy')?.median;
    const table = [
      `${mib} MiB guest (half zero, half random pages, in stretches of ${stretch}), stream ${(wire.length / MiB).toFixed(0)} MiB in ${chunkSize}-byte chunks, ${runs} runs, Node ${process.version}.`,
      '',
      '| what | GB/s of guest RAM, median (min–max) | ratio to page copy | CPU ns per page | CPU s/GB | ratio (CPU) | JS heap bytes allocated per page |',
      '|---|--:|--:|--:|--:|--:|--:|',
      // s/GB: core-seconds per 10⁹ bytes of guest RAM, as the throughput rows of the other parts (a page is 4,096 bytes).
      ...rows.map(([name, key]) => `| ${name} | ${fmtStats(st(key), 2)} | ${fmtRatio(st(key)?.median, copy)} | ${fmt(cpuNs(key), 0)} | ${fmt(cpuNs(key) / TARGET_PAGE_SIZE, 3)} | ${fmtRatio(cpuNs('copy'), cpuNs(key))} | ${perPage[key] ?? 'n/a (node < 26)'} |`),
    ];
    ctx.log(`done: decode ${fmt(st('decode')?.median ?? NaN, 2)} GB/s, page copy ${fmt(copy ?? NaN, 2)} GB/s`);
    return {
      config: { mib, runs, stretch, chunk: chunkSize, batch, streamBytes: wire.length },
      data: {
        mib,
        runs,
        gbps: { copy: copy ?? NaN, bulk: st('bulk')?.median ?? NaN, decode: st('decode')?.median ?? NaN, encode: st('encode')?.median ?? NaN },
        secondsPerRun: results,
        cpuSeconds,
        allocatedPerPage: perPage,
      },
      markdown: `${table.join('\n')}\n\nIn one process, no I/O: the stream's records land in (or are read from) a preallocated buffer. Ratios are to Buffer.copy of the same pages, page by page, in the same run; CPU is user + system of this process per run (median).`,
    };
  },
);
