/**
 * MigrationAnalysis on its own, with chosen arrival times: the same report
 * for any chunking, request latency and channel attribution, requests
 * covering several target pages, requests crossing their page, REQ_PAGES
 * after REQ_PAGES_ID, parse errors per direction, and recovery streams.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { StreamEncoder, PreemptEncoder } from '../../src/stream/encoder.js';
import { encodeReturnPathMessage } from '../../src/stream/return-path.js';
import { MigrationAnalysis, type AnalysisReport, type PageAnsweredEvent, type TapDirection } from '../../src/protocol/tap/analysis.js';

const FIXTURES = join(import.meta.dirname, '..', 'fixtures');
const load = (name: string): Buffer => readFileSync(join(FIXTURES, name));
const MAIN = load('preempt-main.bin');
const RP = load('preempt-rp.bin');
const PRE = load('preempt-channel.bin');
const FACTS = JSON.parse(readFileSync(join(FIXTURES, 'preempt.json'), 'utf8')) as {
  source: { queryMigrate: { ram: { normal: number; duplicate: number; 'postcopy-requests': number } } };
};

function concat(parts: Uint8Array[]): Buffer {
  return Buffer.concat(parts.map((p) => Buffer.from(p.buffer, p.byteOffset, p.length)));
}

/** A deterministic pseudo-random generator (the splits must be reproducible). */
function rng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s * 1664525 + 1013904223) >>> 0;
    return s / 2 ** 32;
  };
}

function feedSplit(a: MigrationAnalysis, dir: TapDirection, bytes: Buffer, t: number, rand: () => number, maxChunk: number): void {
  for (let off = 0; off < bytes.length; ) {
    const n = Math.max(1, Math.floor(rand() * maxChunk));
    a.push(dir, bytes.subarray(off, off + n), t);
    off += n;
  }
}

/** Everything except times and analysis cost. */
function counts(r: AnalysisReport): unknown {
  return {
    main: { ...r.main, chunks: 0, firstByteMs: 0, lastByteMs: 0, bytesPerSecond: 0 },
    rp: { ...r.returnPath, chunks: 0, firstByteMs: 0, lastByteMs: 0, bytesPerSecond: 0 },
    pre: r.preempt && { ...r.preempt, chunks: 0, firstByteMs: 0, lastByteMs: 0, bytesPerSecond: 0 },
    passes: r.passes,
    requests: { count: r.requests.count, answered: r.requests.answered, alreadyForwarded: r.requests.alreadyForwarded, unanswered: r.requests.unanswered },
    complete: r.complete,
    machineType: r.machineType,
  };
}

describe('MigrationAnalysis', () => {
  it('reports the same counts for any chunking (whole, random splits, byte by byte for the return path)', () => {
    const whole = new MigrationAnalysis({ t0: 0 });
    whole.push('main', MAIN, 1);
    whole.push('return-path', RP, 2);
    whole.push('preempt', PRE, 3);
    const ref = counts(whole.report());
    for (const seed of [1, 2, 3]) {
      const rand = rng(seed);
      const a = new MigrationAnalysis({ t0: 0 });
      feedSplit(a, 'main', MAIN, 1, rand, seed === 3 ? 64 : 70_000);
      for (const b of RP) a.push('return-path', Buffer.of(b), 2);
      feedSplit(a, 'preempt', PRE, 3, rand, 5000);
      expect(counts(a.report())).toEqual(ref);
    }
    const r = whole.report();
    const ram = FACTS.source.queryMigrate.ram;
    expect(r.main.pages.normal + r.preempt!.pages.normal).toBe(ram.normal);
    expect(r.main.pages.zero + r.preempt!.pages.zero).toBe(ram.duplicate);
    expect(r.requests.count).toBe(ram['postcopy-requests']);
    expect(r.complete).toBe(true);
  });

  it('times each request to its last page and names the channel; pages that passed before their request are "crossed"', () => {
    const answers: PageAnsweredEvent[] = [];
    const a = new MigrationAnalysis({ t0: 100, hooks: { pageAnswered: (e) => answers.push(e) } });
    // The main channel entirely first (at 100 ms), requests at 101 ms, the preempt channel at 103.5 ms.
    a.push('main', MAIN, 100);
    a.push('return-path', RP, 101);
    a.push('preempt', PRE, 103.5);
    const r = a.report().requests;
    expect(r.count).toBe(FACTS.source.queryMigrate.ram['postcopy-requests']);
    expect(r.unanswered).toBe(0);
    // Only preempt pages can answer now: the main channel's had all gone through before.
    expect(r.answered).toEqual({ main: 0, preempt: answers.length });
    expect(r.alreadyForwarded + r.answered.preempt).toBe(r.count);
    expect(r.answered.preempt).toBeGreaterThan(0);
    // HDR histogram, 3 significant digits: a bucket's value is within 0.1 %.
    expect(r.latency.preempt.count).toBe(r.answered.preempt);
    expect(r.latency.preempt.p50).toBeGreaterThanOrEqual(2500);
    expect(r.latency.preempt.p50).toBeLessThanOrEqual(2503);
    expect(r.latency.preempt.max).toBe(2500); // max is exact
    expect(r.latency.main.count).toBe(0);
    expect(answers.every((e) => e.channel === 'preempt' && e.latencyUs === 2500 && e.atMs === 1)).toBe(true);
  });

  it('a request for several target pages is answered by its last page; REQ_PAGES takes the block of the last REQ_PAGES_ID', () => {
    const a = new MigrationAnalysis({ t0: 0 });
    a.push('main', MAIN.subarray(0, MAIN.length - 1), 0); // through LISTEN, not the EOF
    const base = 16 * 1024 * 1024; // far from the guest's range: never sent after LISTEN
    a.push('return-path', encodeReturnPathMessage({ type: 'req-pages-id', block: 'pc.ram', offset: base, length: 8192 }), 10);
    a.push('return-path', encodeReturnPathMessage({ type: 'req-pages', offset: base + 65536, length: 4096 }), 11);
    const enc = new PreemptEncoder();
    const page = (offset: number) => ({ type: 'ram-page' as const, block: 'pc.ram', offset, continued: false, data: new Uint8Array(4096).fill(7) });
    enc.write(page(base + 4096));
    a.push('preempt', concat(enc.take()), 12);
    expect(a.report().requests).toMatchObject({ count: 2, unanswered: 2 });
    enc.write(page(base));
    a.push('preempt', concat(enc.take()), 15);
    enc.write({ type: 'ram-zero', block: 'pc.ram', offset: base + 65536, continued: true });
    a.push('preempt', concat(enc.take()), 21);
    const r = a.report().requests;
    expect(r).toMatchObject({ count: 2, unanswered: 0, answered: { main: 0, preempt: 2 }, alreadyForwarded: 0 });
    expect(r.latency.all.count).toBe(2);
    expect(r.latency.all.p50 / 5000).toBeCloseTo(1, 2);
    expect(r.latency.all.max / 10_000).toBeCloseTo(1, 2);
    // Some request waited from 10 to 21 ms (the two overlap): blocktime as seen by a one-vCPU guest.
    expect(r.blocktimeMs).toBe(11);
    // A later request for a page already through is "crossed", not timed.
    a.push('return-path', encodeReturnPathMessage({ type: 'req-pages', offset: base, length: 4096 }), 30);
    expect(a.report().requests).toMatchObject({ count: 3, alreadyForwarded: 1, unanswered: 0 });
  });

  it('a parse error stops one direction only, and is reported once with its offset', () => {
    const errors: string[] = [];
    const a = new MigrationAnalysis({ t0: 0, hooks: { parseError: (d, e) => errors.push(`${d}:${e.code}`) } });
    a.push('main', MAIN, 1);
    a.push('preempt', Buffer.from([0, 0, 0, 0, 0, 0, 0x10, 0x01]), 2); // flags FULL (obsolete) — refused
    a.push('preempt', PRE, 3); // ignored now, but counted as bytes
    a.push('return-path', RP, 4);
    const r = a.report();
    expect(errors).toEqual(['preempt:bad-ram-flags']);
    expect(r.parseErrors).toMatchObject([{ direction: 'preempt', code: 'bad-ram-flags', offset: 0, atMs: 2 }]);
    expect(r.preempt?.bytes).toBe(PRE.length + 8);
    expect(r.preempt?.pages.normal).toBe(0);
    expect(r.requests.count).toBe(FACTS.source.queryMigrate.ram['postcopy-requests']);
    expect(r.returnPath.shut).toBe(0);
  });

  it('a new main channel after an interrupted postcopy that starts with a command is decoded as its recovery', () => {
    const first = new MigrationAnalysis({ t0: 0 });
    first.push('main', MAIN.subarray(0, MAIN.length - 1), 0);
    expect(first.report().complete).toBe(false);
    const enc = new StreamEncoder();
    enc.write({ type: 'command', command: { cmd: 'recv-bitmap', block: 'pc.ram' } });
    enc.write({ type: 'command', command: { cmd: 'postcopy-resume' } });
    enc.write({ type: 'eof' });
    const second = new MigrationAnalysis({ t0: 0, previous: first });
    second.push('main', concat(enc.take()), 1);
    second.push('return-path', encodeReturnPathMessage({ type: 'shut', value: 0 }), 2);
    const r = second.report();
    expect(r.kind).toBe('resume');
    expect(r.parseErrors).toEqual([]);
    expect(r.main.commands).toEqual({ 'recv-bitmap': 1, 'postcopy-resume': 1 });
    expect(r.machineType).toBe('pc-q35-10.0');
    expect(r.complete).toBe(true);
    // A fresh migration after it is not a recovery.
    const third = new MigrationAnalysis({ t0: 0, previous: second });
    third.push('main', MAIN, 3);
    expect(third.report()).toMatchObject({ kind: 'migration', complete: false, parseErrors: [] });
  });
});
