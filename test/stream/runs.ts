/**
 * Page runs (`pageRuns: true`) back to per-page records, and decoding in
 * either mode with the errors caught, for the tests that compare the modes.
 */
import {
  PreemptDecoder,
  StreamDecoder,
  StreamError,
  TARGET_PAGE_SIZE,
  type KnownBlock,
  type PreemptRecord,
  type RamRunRecord,
  type StreamRecord,
} from '../../src/stream/index.js';

/** The per-page records a run stands for (the records the decoder yields without `pageRuns`). */
export function expandRun(r: RamRunRecord): (StreamRecord & { type: 'ram-page' | 'ram-zero' })[] {
  const out: (StreamRecord & { type: 'ram-page' | 'ram-zero' })[] = [];
  for (let i = 0; i < r.count; i++) {
    const offset = r.offset + i * TARGET_PAGE_SIZE;
    const continued = i === 0 ? r.continued : true;
    if (r.type === 'ram-zeros') out.push({ type: 'ram-zero', block: r.block, offset, continued });
    else {
      const at = r.start + i * r.stride;
      out.push({ type: 'ram-page', block: r.block, offset, continued, data: r.data.subarray(at, at + TARGET_PAGE_SIZE) });
    }
  }
  return out;
}

/** Every run of `records` expanded in place; other records as they are. */
export function expandRuns(records: readonly unknown[]): unknown[] {
  const out: unknown[] = [];
  for (const r of records) {
    const t = (r as { type?: string }).type;
    if (t === 'ram-pages' || t === 'ram-zeros') out.push(...expandRun(r as RamRunRecord));
    else out.push(r);
  }
  return out;
}

export interface Decoded {
  records: unknown[];
  error: { code: string; offset: number } | undefined;
}

interface Pushable {
  push(c: Uint8Array): readonly unknown[];
  end(): unknown;
  readonly error: StreamError | undefined;
}

/** Pushes `chunks` in order, then ends; only a StreamError is caught (recorded with its code and offset). */
export function feedChunks(d: Pushable, chunks: readonly Uint8Array[]): Decoded {
  const records: unknown[] = [];
  let error: StreamError | undefined;
  try {
    for (const c of chunks) records.push(...d.push(c));
    const tail = d.end();
    if (Array.isArray(tail)) records.push(...(tail as unknown[]));
    error = d.error;
  } catch (e) {
    if (!(e instanceof StreamError)) throw e;
    error = e;
  }
  return { records, error: error && { code: error.code, offset: error.offset } };
}

/** Main channel, in either mode. */
export function decodeMainChunks(chunks: readonly Uint8Array[], pageRuns: boolean, opts: { maxDeviceSectionBytes?: number } = {}): Decoded {
  return feedChunks(pageRuns ? new StreamDecoder({ ...opts, pageRuns: true }) : new StreamDecoder(opts), chunks);
}

/** Preempt channel over a copy of `blocks`, in either mode. */
export function decodePreemptChunks(chunks: readonly Uint8Array[], blocks: ReadonlyMap<string, KnownBlock>, pageRuns: boolean): Decoded {
  return feedChunks(pageRuns ? new PreemptDecoder(new Map(blocks), { pageRuns: true }) : new PreemptDecoder(new Map(blocks)), chunks);
}

/** The runs of `records` (to check their shape and that the test did see runs). */
export function runsOf(records: readonly unknown[]): RamRunRecord[] {
  return records.filter((r): r is RamRunRecord => {
    const t = (r as { type?: string }).type;
    return t === 'ram-pages' || t === 'ram-zeros';
  });
}

export type { PreemptRecord };
