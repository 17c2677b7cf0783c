/**
 * The source's bulk path and its answers to page requests, library to
 * library: the main channel's user-space bytes stay under the pull window
 * (plus one batch) through a whole migration; postcopy bounds the main
 * socket's unsent kernel bytes (TCP_NOTSENT_LOWAT, read back); every answered
 * request says which channel answered it and why, and 'main-in-flight' names
 * only pages handed to main before their request arrived.
 */
import { randomFillSync } from 'node:crypto';
import { performance } from 'node:perf_hooks';
import { describe, expect, it } from 'vitest';
import { DestinationSession } from '../../src/protocol/destination.js';
import { InMemorySink } from '../../src/protocol/memory.js';
import { InMemorySource } from '../../src/protocol/memory-source.js';
import { SourceSession, type AnswerReason } from '../../src/protocol/source.js';
import { StreamDecoder } from '../../src/stream/decoder.js';
import { encodeReturnPathMessage } from '../../src/stream/return-path.js';
import type { StreamRecord } from '../../src/stream/records.js';
import { MigrationListener } from '../../src/transport/connection.js';

const MiB = 1 << 20;
const KiB = 1 << 10;
const PAGE = 4096;
const DEVICES = [{ idstr: 'timer', instanceId: 0, versionId: 2, data: Buffer.alloc(24, 1) }];
/** One batch of the bulk producer (64 pages) with its record headers and a section boundary, generously. */
const BATCH_BYTES = 64 * (PAGE + 64) + 4 * KiB;

function filledGuest(bytes: number): InMemorySource {
  const mem = Buffer.alloc(bytes);
  // Data in every page (no zero pages: the window must hold against full pages).
  randomFillSync(mem);
  return new InMemorySource(new Map([['pc.ram', mem]]));
}

/**
 * A guest memory that notes when each page was read and how often (a read is
 * the page's encoding, handed to a channel in the same turn). No readPages:
 * the per-page path, so that every read is seen.
 */
class TimedSource extends InMemorySource {
  readonly readAt = new Map<number, number>();
  readonly reads = new Map<number, number>();
  override readPage(block: string, offset: number): Uint8Array {
    this.readAt.set(offset, performance.now());
    this.reads.set(offset, (this.reads.get(offset) ?? 0) + 1);
    return super.readPage(block, offset);
  }
  override pageIsZero(): boolean {
    return false; // random data: no zero page, and readPage sees every page
  }
}
Object.defineProperty(TimedSource.prototype, 'readPages', { value: undefined });

/**
 * A destination that reads main slowly (a pause after every chunk), so that
 * the kernel's buffers fill and the source's user space is what holds the
 * rest: decodes the stream, answers PINGs, SHUT 0 after EOF; returns the
 * memory it received.
 */
async function slowReader(): Promise<{ uri: string; done: Promise<Buffer>; close(): void }> {
  const listener = await MigrationListener.listen('tcp:127.0.0.1:0', { main: { tuning: { rcvbuf: 128 * KiB } } });
  const done = listener.accept().then(
    (c) =>
      new Promise<Buffer>((resolve) => {
        const dec = new StreamDecoder();
        let mem = Buffer.alloc(0);
        let n = 0;
        c.main.read((chunk) => {
          for (const r of dec.push(chunk)) {
            if (r.type === 'ram-blocks') mem = Buffer.alloc(r.blocks[0]!.length);
            if (r.type === 'ram-page') mem.set(r.data, r.offset);
            if (r.type === 'command' && r.command.cmd === 'ping') void c.main.send([encodeReturnPathMessage({ type: 'pong', value: r.command.value })]);
            if (r.type === 'eof') {
              void c.main.send([encodeReturnPathMessage({ type: 'shut', value: 0 })]);
              resolve(mem);
            }
          }
          // Every few chunks, a pause: the link is slower than the source.
          return ++n % 4 === 0 ? new Promise<void>((r) => setTimeout(r, 2)) : undefined;
        });
      }),
  );
  return { uri: listener.uri, done, close: () => listener.close() };
}

describe('pull-based bulk: the main channel holds at most the window plus one batch', () => {
  for (const window of [undefined, 64 * KiB]) {
    it(`precopy of 32 MiB with data in every page to a slow reader, bulkWindowBytes ${window ?? 'default'}: peakQueuedBytes ≤ window + batch, reported`, async () => {
      const memory = filledGuest(32 * MiB);
      const dst = await slowReader();
      const src = new SourceSession({
        to: dst.uri,
        memory,
        machineType: 'pc-q35-10.0',
        devices: DEVICES,
        // A small kernel send buffer: the bytes the slow reader has not taken pile up in user space, up to the window.
        transport: { main: { tuning: { sndbuf: 128 * KiB }, ...(window ? { bulkWindowBytes: window } : {}) } },
      });
      src.start();
      const [stats, received] = await Promise.all([src.done, dst.done]);
      dst.close();
      const main = stats.channels.main!;
      const bound = window ?? 256 * KiB;
      console.log(`[bulk] window ${bound / KiB} KiB: peak ${(main.peakQueuedBytes / KiB).toFixed(0)} KiB, ${main.bulkWaits} waits for room, ${(main.bytesSent / MiB).toFixed(0)} MiB sent`);
      expect(main.bulkWindowBytes).toBe(bound);
      expect(main.bytesSent).toBeGreaterThan(32 * MiB);
      // The window was reached (the reader is slow), and never passed by more than a batch.
      expect(main.bulkWaits, 'the producer waited for room').toBeGreaterThan(0);
      expect(main.peakQueuedBytes, 'user-space bytes on main').toBeLessThanOrEqual(bound + BATCH_BYTES);
      expect(received.equals(memory.memory.get('pc.ram')!)).toBe(true);
    }, 120_000);
  }

  it('postcopy: TCP_NOTSENT_LOWAT is set on main at the switch (read back in the stats; configurable), and the window holds', async () => {
    for (const lowat of [undefined, 64 * KiB]) {
      const memory = filledGuest(16 * MiB);
      const sink = new InMemorySink();
      const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, postcopy: true });
      const src = new SourceSession({
        to: dst.uri,
        memory,
        machineType: 'pc-q35-10.0',
        devices: DEVICES,
        postcopy: { afterPasses: 0 },
        ...(lowat ? { transport: { main: { postcopyNotSentLowat: lowat } } } : {}),
      });
      let before: number | undefined;
      let atSwitch: number | undefined;
      src.on('connected', () => (before = src.stats().channels.main?.tuning.notSentLowat));
      src.on('postcopy-active', () => (atSwitch = src.stats().channels.main?.tuning.notSentLowat));
      src.start();
      const [stats] = await Promise.all([src.done, dst.done]);
      const tuning = stats.channels.main!.tuning;
      console.log(`[bulk] postcopy lowat ${lowat ?? 'default'}: before ${before}, at the switch ${atSwitch}; warnings ${tuning.warnings.join('; ') || 'none'}`);
      expect(sink.blocks.get('pc.ram')!.equals(memory.memory.get('pc.ram')!)).toBe(true);
      expect(stats.channels.main!.peakQueuedBytes).toBeLessThanOrEqual(256 * KiB + BATCH_BYTES);
      if (tuning.warnings.some((w) => w.includes('sockopt'))) continue; // no addon: nothing to read back
      expect(before, 'main has no TCP_NOTSENT_LOWAT of its own in precopy').not.toBe(lowat ?? 128 * KiB);
      expect(atSwitch).toBe(lowat ?? 128 * KiB);
    }
  }, 120_000);
});

interface Hand {
  uri: string;
  records: StreamRecord[];
  until(pred: (r: StreamRecord) => boolean): Promise<StreamRecord>;
  ask(block: string, offset: number): Promise<void>;
  shut(): Promise<void>;
  preemptBytes(): number;
  close(): void;
}

/** A destination played by hand: reads main (and preempt), answers PINGs, asks what the test says. */
async function hand(): Promise<Hand> {
  const listener = await MigrationListener.listen('tcp:127.0.0.1:0');
  const records: StreamRecord[] = [];
  const waits: { pred: (r: StreamRecord) => boolean; resolve: (r: StreamRecord) => void }[] = [];
  let preemptBytes = 0;
  const conn = listener.accept();
  void conn.then((c) => {
    const dec = new StreamDecoder();
    c.main.read((chunk) => {
      for (const r of dec.push(chunk)) {
        records.push(r);
        if (r.type === 'command' && r.command.cmd === 'ping') void c.main.send([encodeReturnPathMessage({ type: 'pong', value: r.command.value })]);
        for (const w of [...waits]) {
          if (w.pred(r)) {
            waits.splice(waits.indexOf(w), 1);
            w.resolve(r);
          }
        }
      }
    });
    void c
      .waitPreempt()
      .then((p) => p.read((chunk) => void (preemptBytes += chunk.length)))
      .catch(() => undefined);
  });
  return {
    uri: listener.uri,
    records,
    until: (pred) => {
      const hit = records.find(pred);
      return hit ? Promise.resolve(hit) : new Promise((resolve) => waits.push({ pred, resolve }));
    },
    ask: async (block, offset) => (await conn).main.send([encodeReturnPathMessage({ type: 'req-pages-id', block, offset, length: PAGE })], 'urgent'),
    shut: async () => (await conn).main.send([encodeReturnPathMessage({ type: 'shut', value: 0 })]),
    preemptBytes: () => preemptBytes,
    close: () => listener.close(),
  };
}

describe('per-request answers: which channel and why', () => {
  for (const preempt of [true, false]) {
    const inFlight: AnswerReason = preempt ? 'main-in-flight' : 'main-no-preempt';
    const notSent: AnswerReason = preempt ? 'preempt' : 'main-no-preempt';
    it(`${preempt ? 'with' : 'without'} preempt: a page already on main is '${inFlight}', one not yet sent is '${notSent}'; counted in the stats`, async () => {
      const h = await hand();
      const memory = filledGuest(2 * MiB);
      const src = new SourceSession({
        to: h.uri,
        memory,
        machineType: 'pc-q35-10.0',
        devices: DEVICES,
        postcopy: { afterPasses: 0 },
        preempt,
        // The background stream crawls up from the first page: the last one is far from sent when asked for.
        postcopyBandwidthLimit: MiB,
      });
      const events: { offset: number; channel: string; reason: AnswerReason }[] = [];
      src.on('page-request', (r) => events.push({ offset: r.offset, channel: r.channel, reason: r.reason }));
      src.start();
      const sent = (await h.until((r) => r.type === 'ram-page' && h.records.some((x) => x.type === 'package-end'))) as Extract<StreamRecord, { type: 'ram-page' }>;
      await h.ask('pc.ram', sent.offset);
      const last = 2 * MiB - PAGE;
      await h.ask('pc.ram', last);
      await h.until((r) => r.type === 'eof');
      await h.shut();
      const stats = await src.done;
      h.close();
      expect(events).toContainEqual({ offset: sent.offset, channel: 'main', reason: inFlight });
      expect(events).toContainEqual({ offset: last, channel: preempt ? 'preempt' : 'main', reason: notSent });
      expect(events).toHaveLength(2);
      const want: Record<AnswerReason, number> = { preempt: 0, 'main-in-flight': 0, 'main-no-preempt': 0 };
      want[inFlight]++;
      want[notSent]++;
      expect(stats['requests-answered']).toEqual(want);
      expect(stats['requested-pages-already-sent']).toBe(1);
      // The page not yet sent went once, on the channel that answered it.
      const onMain = h.records.filter((r) => r.type === 'ram-page' && r.offset === last).length;
      expect(onMain, 'the requested page on main').toBe(preempt ? 0 : 1);
      if (preempt) expect(h.preemptBytes()).toBeGreaterThan(PAGE);
    }, 60_000);
  }
});

describe('per-request reasons, library ↔ library with a guest that keeps faulting', () => {
  for (const preempt of [true, false]) {
    it(`${preempt ? 'with' : 'without'} preempt: every answer is ${preempt ? "'preempt' or 'main-in-flight' (only for pages handed to main before the request)" : "'main-no-preempt'"}; RAM bit for bit`, async () => {
      const size = 32 * MiB;
      const buf = Buffer.alloc(size);
      randomFillSync(buf);
      const memory = new TimedSource(new Map([['pc.ram', buf]]));
      const sink = new InMemorySink();
      const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, postcopy: true });
      const src = new SourceSession({ to: dst.uri, memory, machineType: 'pc-q35-10.0', devices: DEVICES, postcopy: { afterPasses: 0 }, preempt, postcopyBandwidthLimit: 32 * MiB });
      const reasons: Record<AnswerReason, number> = { preempt: 0, 'main-in-flight': 0, 'main-no-preempt': 0 };
      const late: string[] = [];
      src.on('page-request', (r) => {
        reasons[r.reason]++;
        expect(r.channel).toBe(r.reason === 'preempt' ? 'preempt' : 'main');
        // An upper bound of the request's arrival (this handler runs after the latency was taken).
        const arrived = performance.now() - r.latencyUs / 1000;
        const read = memory.readAt.get(r.offset);
        // In flight: handed over (read, in the same turn) before the request arrived.
        if (r.reason === 'main-in-flight' && !(read !== undefined && read <= arrived)) late.push(`0x${r.offset.toString(16)} in flight but read at ${read} after arrival ${arrived}`);
      });
      // Fault from the top down, a few at a time, while the background stream goes up.
      dst.once('postcopy-run', () => {
        void (async () => {
          for (let off = size - PAGE; off >= 0; off -= 64 * PAGE) {
            if (dst.stats().status === 'completed') break;
            if (!dst.hasPage('pc.ram', off)) await dst.requestPage('pc.ram', off).catch(() => undefined);
          }
        })();
      });
      src.start();
      const [stats] = await Promise.all([src.done, dst.done]);
      console.log(`[reasons] ${preempt ? 'preempt' : 'no preempt'}: ${JSON.stringify(stats['requests-answered'])}, ${stats['postcopy-requests']} requests, latency p50 ${stats['postcopy-latency'].p50} µs`);
      expect(sink.blocks.get('pc.ram')!.equals(buf)).toBe(true);
      expect(stats['requests-answered']).toEqual(reasons);
      expect(reasons.preempt + reasons['main-in-flight'] + reasons['main-no-preempt']).toBeGreaterThan(0);
      expect(stats['postcopy-latency'].count).toBe(reasons.preempt + reasons['main-in-flight'] + reasons['main-no-preempt']);
      expect(late).toEqual([]);
      // Exactly once after LISTEN (afterPasses 0: every page is read once in all): a page answered on preempt was not also handed to main.
      const twice = [...memory.reads].filter(([, n]) => n !== 1).map(([off, n]) => `0x${off.toString(16)}×${n}`);
      expect(twice, 'pages read more than once').toEqual([]);
      expect(memory.reads.size).toBe(size / PAGE);
      if (preempt) expect(reasons['main-no-preempt']).toBe(0);
      else expect(reasons.preempt + reasons['main-in-flight']).toBe(0);
    }, 120_000);
  }
});
