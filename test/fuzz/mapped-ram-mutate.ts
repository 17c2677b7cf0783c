/**
 * Mutated mapped-ram files for the fuzz tests (test/stream/mapped-ram-fuzz.test.ts
 * and the long run, test/fuzz/fuzz-mapped-ram.ts). A 32 MiB guest's file is
 * 40 MB of mostly holes, so an input is a sparse file: the capture's stream
 * parts and bitmaps as segments (the pages read as zeros), mutated there —
 * bit flips, header fields and lengths pushed to extremes, bytes cut out or
 * repeated — and cut or extended at random. Checked per input: reading it
 * throws nothing but a StreamError with an offset inside the file, what it
 * reads does not depend on the read size, and a file that reads lets every
 * page of every block be read.
 */
import { MappedRamFile, type PositionedReader } from '../../src/protocol/mapped-ram-file.js';
import { StreamError } from '../../src/stream/index.js';
import { mappedRamBitmapBytes } from '../../src/stream/mapped-ram.js';
import type { MappedRamCapture } from '../stream/mapped-ram-fixtures.js';
import { Rng } from './mutate.js';

/** A file of `size` bytes that holds `segments` and zeros elsewhere. */
export interface SparseFile {
  size: number;
  segments: { at: number; bytes: Buffer }[];
}

export function sparseReader(f: SparseFile, onRead?: (n: number) => void): PositionedReader {
  return {
    size: f.size,
    read: (into, position) => {
      const n = Math.max(0, Math.min(into.length, f.size - position));
      into.fill(0, 0, n);
      for (const s of f.segments) {
        const from = Math.max(position, s.at);
        const to = Math.min(position + n, s.at + s.bytes.length);
        if (from < to) into.set(s.bytes.subarray(from - s.at, to - s.at), from - position);
      }
      onRead?.(n);
      return Promise.resolve(n);
    },
  };
}

/** The capture as a sparse file: its stream parts and its blocks' bitmaps. */
export function sparseCapture(c: MappedRamCapture): SparseFile {
  const segments = c.streamParts.map((p) => ({ at: p.start, bytes: Buffer.from(c.bytes.subarray(p.start, p.end)) }));
  for (const s of c.skips) {
    const at = s.header.bitmapOffset;
    segments.push({ at, bytes: Buffer.from(c.bytes.subarray(at, at + mappedRamBitmapBytes(s.length))) });
  }
  return { size: c.bytes.length, segments };
}

const EXTREMES = [0n, 1n, 2n, 0xfffn, 0x1000n, 0x100000n, 0x7fff_ffffn, 0xffff_ffffn, 1n << 53n, 0xffff_ffff_ffff_ffffn];

/** Input `index` of run `seed`: a mutated copy of `base`, and the read size to decode it with. */
export function mutatedMappedRam(base: SparseFile, c: MappedRamCapture, seed: number, index: number): { file: SparseFile; chunkBytes: number; what: string[] } {
  const rng = new Rng(seed, index);
  const segments = base.segments.map((s) => ({ at: s.at, bytes: Buffer.from(s.bytes) }));
  let size = base.size;
  const what: string[] = [];
  const n = rng.range(1, 4);
  for (let i = 0; i < n; i++) {
    const seg = rng.pick(segments);
    const r = rng.int(100);
    if (r < 30 && seg.bytes.length > 0) {
      const p = rng.int(seg.bytes.length);
      seg.bytes[p]! ^= 1 << rng.int(8);
      what.push(`flip ${seg.at + p}`);
    } else if (r < 60) {
      // A header field or a block length (the be64 before a header) to an extreme.
      const s = rng.pick(c.skips);
      const field = rng.pick([-8, 0, 4, 12, 20]);
      const at = s.headerOffset + field;
      const holder = segments.find((x) => x.at <= at && at + 8 <= x.at + x.bytes.length);
      if (!holder) continue;
      const v = rng.pick(EXTREMES);
      if (field === 0) holder.bytes.writeUInt32BE(Number(v & 0xffff_ffffn), at - holder.at);
      else holder.bytes.writeBigUInt64BE(v, at - holder.at);
      what.push(`field ${at} = ${v}`);
    } else if (r < 75 && seg.bytes.length > 1) {
      const p = rng.int(seg.bytes.length);
      const len = rng.range(1, Math.min(64, seg.bytes.length - p));
      seg.bytes = rng.chance(0.5) ? Buffer.concat([seg.bytes.subarray(0, p), seg.bytes.subarray(p + len)]) : Buffer.concat([seg.bytes.subarray(0, p + len), seg.bytes.subarray(p)]);
      what.push(`${seg.bytes.length < base.segments.find((b) => b.at === seg.at)!.bytes.length ? 'cut' : 'repeat'} ${len} at ${seg.at + p}`);
    } else if (r < 90) {
      size = rng.int(size + 1);
      what.push(`size ${size}`);
    } else {
      size += rng.range(1, 1 << 20);
      what.push(`size ${size}`);
    }
  }
  const chunkBytes = rng.pick([1 << 20, 65536, 4096, 997, 64]);
  return { file: { size, segments }, chunkBytes, what };
}

export interface MappedRamOutcome {
  error: StreamError | undefined;
  /** Blocks and pages present, when it read. */
  blocks: string | undefined;
}

/** Reads `file` with reads of `chunkBytes` (bitmaps limited to 1 MiB); anything but a StreamError is thrown. */
export async function readMutated(file: SparseFile, chunkBytes: number): Promise<MappedRamOutcome> {
  try {
    const f = await MappedRamFile.read(sparseReader(file), { chunkBytes, maxBitmapBytes: 1 << 20 });
    const page = new Uint8Array(4096);
    for (const b of f.blocks) {
      await f.readPages(b, 0, 1, page);
      await f.readPages(b, b.length - 4096, 1, page);
    }
    return { error: undefined, blocks: JSON.stringify(f.blocks.map((b) => [b.idstr, b.length, b.header, b.present.count()])) };
  } catch (e) {
    if (!(e instanceof StreamError)) throw e;
    if (e.offset === undefined || e.offset < 0 || e.offset > Math.max(file.size, ...file.segments.map((s) => s.at + s.bytes.length))) {
      throw new Error(`StreamError ${e.code} at ${e.offset}, outside the file of ${file.size} bytes: ${e.message}`);
    }
    return { error: e, blocks: undefined };
  }
}

/** One input: read with its read size and with 1 MiB reads; the outcomes must agree. */
export async function checkMutated(base: SparseFile, c: MappedRamCapture, seed: number, index: number): Promise<void> {
  const input = mutatedMappedRam(base, c, seed, index);
  const a = await readMutated(input.file, input.chunkBytes);
  const b = await readMutated(input.file, 1 << 20);
  const sig = (o: MappedRamOutcome): string => (o.error ? `${o.error.code}@${o.error.offset}` : `ok ${o.blocks}`);
  if (sig(a) !== sig(b)) throw new Error(`input ${seed}/${index} (${input.what.join(', ')}): reads of ${input.chunkBytes} bytes give ${sig(a)}, of 1 MiB ${sig(b)}`);
}
