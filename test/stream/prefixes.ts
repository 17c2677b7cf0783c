/**
 * "Ending at a prefix is truncated", shared by the sampled check of the test
 * suite (test/stream/fixtures.test.ts) and the exhaustive one of
 * `npm run fuzz:prefixes` (test/fuzz/every-prefix.ts).
 *
 * Ending a stream at offset n means forking a decoder fed the first n bytes
 * and calling end() on the fork. A fork copies the decoder's buffered state,
 * so ending at every one of a capture's ~10^6 offsets costs minutes on a busy
 * machine; the suite ends at a bounded, deterministic sample instead.
 */
import { StreamDecoder, StreamEncoder, StreamError, type StreamRecord } from '../../src/stream/index.js';
import { Rng } from '../fuzz/mutate.js';
import { sameRecords } from './same-records.js';

/** Where each record of `records` ends in the stream, found by re-encoding record by record (CONTINUE as recorded). */
export function recordEnds(records: readonly StreamRecord[]): number[] {
  const enc = new StreamEncoder({ continueMode: 'as-recorded' });
  const ends: number[] = [];
  let offset = 0;
  for (const r of records) {
    enc.write(r);
    offset += enc.take().reduce((s, p) => s + p.length, 0);
    ends.push(offset);
  }
  return ends;
}

/** The main-channel captures of test/fixtures with their sidecars; `postcopy`: the stream has no VM description. */
export const MAIN_STREAMS: readonly { file: string; sidecar: string; postcopy?: boolean }[] = [
  { file: 'paused-guest.bin', sidecar: 'paused-guest.json' },
  { file: 'running-guest.bin', sidecar: 'running-guest.json' },
  { file: 'pc-running.bin', sidecar: 'pc-running.json' },
  { file: 'multiblock.bin', sidecar: 'multiblock.json' },
  { file: 'xbzrle.bin', sidecar: 'xbzrle.json' },
  { file: 'returnpath-main.bin', sidecar: 'returnpath.json' },
  { file: 'postcopy-main.bin', sidecar: 'postcopy.json', postcopy: true },
  { file: 'preempt-main.bin', sidecar: 'preempt.json', postcopy: true },
];

const PAGE = 4096;
const isRam = (r: StreamRecord) => r.type === 'ram-page' || r.type === 'ram-zero' || r.type === 'ram-xbzrle';

/**
 * 1 at every prefix length that ends strictly inside a PAGE record's 4 KiB
 * payload: there the decoder is always in the same state (copying payload).
 */
function pagePayloadInterior(records: readonly StreamRecord[], length: number, ends = recordEnds(records)): Uint8Array {
  const inside = new Uint8Array(length + 1);
  records.forEach((r, i) => {
    if (r.type === 'ram-page') inside.fill(1, ends[i]! - (PAGE - 1), ends[i]!);
  });
  return inside;
}

/** How many prefixes {@link prefixSample} picks at most, besides the structural ones. */
export interface PrefixSampleSize {
  /** Seeded picks among RAM records' ends (and the byte on either side). */
  ramBoundaries: number;
  /** Seeded picks among all other offsets (headers, device state, the VM description, page payloads). */
  anywhere: number;
}

/**
 * A deterministic sample of the offsets at which to end the stream: 0 and the
 * whole length; every end of a record that is not a RAM page (commands,
 * section headers and footers, device state, EOF, the VM description) with the
 * byte before and after it; `size.ramBoundaries` RAM-record ends (±1) and
 * `size.anywhere` offsets anywhere else, drawn from `seed`. Page payloads
 * (one parser state) get 1 pick in 8 of what their share of the bytes would
 * give them.
 */
export function prefixSample(records: readonly StreamRecord[], length: number, seed: number, size: PrefixSampleSize): Uint8Array {
  const pick = new Uint8Array(length + 1);
  const mark = (n: number) => {
    if (n >= 0 && n <= length) pick[n] = 1;
  };
  mark(0);
  mark(length);
  const ends = recordEnds(records);
  const insidePage = pagePayloadInterior(records, length, ends);
  const ramEnds: number[] = [];
  records.forEach((r, i) => {
    const end = ends[i]!;
    if (isRam(r)) {
      ramEnds.push(end);
    } else {
      mark(end - 1);
      mark(end);
      mark(end + 1);
    }
  });
  const rng = new Rng(seed);
  const below = (n: number) => rng.u32() % n;
  for (let i = 0; i < size.ramBoundaries && ramEnds.length > 0; i++) {
    const end = ramEnds[below(ramEnds.length)]!;
    mark(end - 1);
    mark(end);
    mark(end + 1);
  }
  for (let i = 0; i < size.anywhere; ) {
    const n = below(length + 1);
    if (insidePage[n] === 1 && below(8) !== 0) continue;
    mark(n);
    i++;
  }
  return pick;
}

export interface PrefixOutcome {
  /** Prefixes ended. */
  ended: number;
  /** Prefixes whose end() completed (the whole stream; a precopy stream also right after EOF, before the VM description). */
  completions: number;
}

/**
 * Feeds `bytes` to one decoder byte by byte and checks that the records equal
 * `reference`; at every offset n with `endAt[n] === 1` ends a fork there and
 * checks that it either throws StreamError 'truncated' or completes with the
 * reference's records. Throws an Error naming the offset on the first
 * violation.
 */
export function checkPrefixes(bytes: Uint8Array, reference: readonly StreamRecord[], endAt: Uint8Array): PrefixOutcome {
  // Many thousands of expected errors: their stack traces are not needed.
  const stackLimit = Error.stackTraceLimit;
  Error.stackTraceLimit = 0;
  try {
    const master = new StreamDecoder();
    const got: StreamRecord[] = [];
    let ended = 0;
    let completions = 0;
    for (let n = 0; n <= bytes.length; n++) {
      if (endAt[n] === 1) {
        // What if the input ended here? (a fork leaves the master untouched)
        const f = master.fork();
        ended++;
        try {
          const tail = f.end();
          completions++;
          if (!f.complete) throw new Error(`prefix ${n}: end() returned but the stream is not complete`);
          if (!sameRecords([...got, ...tail], reference.slice(0, got.length + tail.length))) throw new Error(`prefix ${n}: wrong records`);
        } catch (e) {
          if (!(e instanceof StreamError)) throw e;
          if (e.code !== 'truncated') throw new Error(`prefix ${n}: ${e.code} instead of truncated (${e.message})`);
        }
      }
      if (n < bytes.length) got.push(...master.push(bytes.subarray(n, n + 1)));
    }
    got.push(...master.end());
    if (!sameRecords(got, reference)) throw new Error('fed byte by byte, the records differ from the stream decoded whole');
    return { ended, completions };
  } finally {
    Error.stackTraceLimit = stackLimit;
  }
}

/** The records of `bytes` pushed whole. */
export function decodeWhole(bytes: Uint8Array): StreamRecord[] {
  const d = new StreamDecoder();
  return [...d.push(bytes), ...d.end()];
}
