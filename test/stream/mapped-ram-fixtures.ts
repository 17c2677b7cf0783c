/**
 * The mapped-ram captures of test/fixtures (gzip'd: the files are mostly
 * holes) with their sidecars, and where their stream parts lie.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { gunzipSync } from 'node:zlib';
import { MappedRamFile, bufferReader } from '../../src/protocol/mapped-ram-file.js';
import { StreamDecoder, StreamError } from '../../src/stream/index.js';
import type { MappedRamSkip } from '../../src/stream/ram.js';

const FIX = join(import.meta.dirname, '..', 'fixtures');

export const MAPPED_RAM_FIXTURES = ['mapped-ram-paused', 'mapped-ram-running'] as const;

export interface MappedRamSidecar {
  files: { stream: { name: string; bytes: number; sha256: string } };
  guest: { startMiB: number; endMiB: number; direction: 'up' | 'down'; vmStoppedBeforeMigrate: boolean };
  memoryMiB: number;
  source: { keyStats: Record<string, number | string>; ramBlocks: { name: string; usedLength: number }[] };
}

export interface MappedRamCapture {
  name: string;
  bytes: Buffer;
  sidecar: MappedRamSidecar;
  /** The file's stream parts [start, end): what a positioned reader reads besides bitmaps and pages. */
  streamParts: { start: number; end: number }[];
  /** Every block's skipped region as the decoder reports it. */
  skips: MappedRamSkip[];
}

const cache = new Map<string, MappedRamCapture>();

export function loadMappedRam(name: (typeof MAPPED_RAM_FIXTURES)[number]): MappedRamCapture {
  const hit = cache.get(name);
  if (hit) return hit;
  const bytes = gunzipSync(readFileSync(join(FIX, `${name}.bin.gz`)));
  const sidecar = JSON.parse(readFileSync(join(FIX, `${name}.json`), 'utf8')) as MappedRamSidecar;
  // Pushed in pieces smaller than any skipped region, so that every skip is seen (and jumped).
  const d = new StreamDecoder({ mappedRam: true });
  const skips: MappedRamSkip[] = [];
  const streamParts: { start: number; end: number }[] = [];
  let pos = 0;
  let partStart = 0;
  while (pos < bytes.length) {
    d.push(bytes.subarray(pos, pos + 64));
    pos = Math.min(bytes.length, pos + 64);
    const s = d.skipping;
    if (s && s !== skips.at(-1)) {
      skips.push(s);
      streamParts.push({ start: partStart, end: s.headerOffset + 28 });
      pos = d.jump() ?? pos;
      partStart = s.to;
    }
  }
  d.end();
  streamParts.push({ start: partStart, end: bytes.length });
  const c = { name, bytes, sidecar, streamParts, skips };
  cache.set(name, c);
  return c;
}

/**
 * Reads the first n bytes of the capture as a whole file, for every n in
 * `lengths`: each must fail with a StreamError, except the whole file and
 * the file cut right after EOF (a stream without its VM description), which
 * read completely. Returns how many ended in an error and how many read.
 */
export async function checkMappedRamPrefixes(c: MappedRamCapture, lengths: Iterable<number>): Promise<{ errors: number; complete: number[]; codes: Set<string> }> {
  const complete: number[] = [];
  const codes = new Set<string>();
  let errors = 0;
  for (const n of lengths) {
    try {
      await MappedRamFile.read(bufferReader(c.bytes.subarray(0, n)));
      complete.push(n);
    } catch (e) {
      if (!(e instanceof StreamError)) throw new Error(`prefix ${n}: not a StreamError: ${String(e)}`, { cause: e });
      if (e.offset === undefined || e.offset > n) throw new Error(`prefix ${n}: error offset ${e.offset} past the end`);
      codes.add(e.code);
      errors++;
    }
  }
  return { errors, complete, codes };
}

/** The length of the capture without its VM description (cut right after EOF). */
export function eofEnd(c: MappedRamCapture): number {
  const d = new StreamDecoder({ mappedRam: true });
  const records = [];
  for (const p of c.streamParts) {
    records.push(...d.push(c.bytes.subarray(p.start, p.end)));
    d.jump();
  }
  records.push(...d.end());
  const vmdesc = records.find((r) => r.type === 'vmdesc');
  return c.bytes.length - (vmdesc ? 5 + vmdesc.json.length : 0);
}
