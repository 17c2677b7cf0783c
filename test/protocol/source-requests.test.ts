/**
 * The source's answers to page requests, seen from a destination played by
 * hand (our own decoder, our own return-path messages), so that the test
 * controls what a real destination never does: ask for a whole block at once
 * and leave the preempt channel unread.
 */
import { randomFillSync } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { DestinationSession } from '../../src/protocol/destination.js';
import { MigrationError } from '../../src/protocol/errors.js';
import { InMemorySink } from '../../src/protocol/memory.js';
import { InMemorySource } from '../../src/protocol/memory-source.js';
import { SourceSession } from '../../src/protocol/source.js';
import { PreemptDecoder, StreamDecoder } from '../../src/stream/decoder.js';
import { encodeReturnPathMessage } from '../../src/stream/return-path.js';
import type { PreemptRecord, StreamRecord } from '../../src/stream/records.js';
import { MigrationListener } from '../../src/transport/connection.js';

const MiB = 1 << 20;
const PAGE = 4096;

function place(mem: Map<string, Buffer>, seen: Map<string, Uint8Array>, r: StreamRecord | PreemptRecord): void {
  if (r.type !== 'ram-page' && r.type !== 'ram-zero') return;
  const buf = mem.get(r.block)!;
  const page = r.offset / PAGE;
  const count = seen.get(r.block)!;
  count[page]!++;
  if (r.type === 'ram-page') buf.set(r.data, r.offset);
  else buf.fill(0, r.offset, r.offset + PAGE);
}

describe('page requests answered on the preempt channel', () => {
  it('one request for a whole 64 MiB block, preempt unread for a while: memory stays bounded, every page arrives once', async () => {
    const big = Buffer.alloc(64 * MiB);
    for (let p = 0; p < big.length; p += 2 * PAGE) randomFillSync(big, p, PAGE);
    const memory = new InMemorySource(new Map([['big', big]]));
    const listener = await MigrationListener.listen('tcp:127.0.0.1:0');
    const src = new SourceSession({
      to: listener.uri,
      memory,
      machineType: 'pc-q35-10.0',
      devices: [{ idstr: 'timer', instanceId: 0, versionId: 2, data: Buffer.alloc(24, 3) }],
      postcopy: { afterPasses: 0 },
      preempt: true,
      // The background stream crawls: nearly every page must come through the request.
      postcopyBandwidthLimit: MiB / 4,
    });
    let answeredOnPreempt = 0;
    src.on('page-request', (e) => {
      if (e.channel === 'preempt') answeredOnPreempt++;
    });
    src.start();
    const conn = await listener.accept();
    const dec = new StreamDecoder();
    const received = new Map([['big', Buffer.alloc(big.length, 0xee)]]);
    const seen = new Map([['big', new Uint8Array(big.length / PAGE)]]);
    let running!: () => void;
    const isRunning = new Promise<void>((r) => (running = r));
    let eof!: () => void;
    const gotEof = new Promise<void>((r) => (eof = r));
    conn.main.read((chunk) => {
      for (const r of dec.push(chunk)) {
        place(received, seen, r);
        if (r.type === 'command' && r.command.cmd === 'ping') void conn.main.send([encodeReturnPathMessage({ type: 'pong', value: r.command.value })]);
        if (r.type === 'command' && r.command.cmd === 'postcopy-run') running();
        if (r.type === 'eof') eof();
      }
    });
    await isRunning;
    // The whole block in one request, as no QEMU destination would ask.
    await conn.main.send([encodeReturnPathMessage({ type: 'req-pages-id', block: 'big', offset: 0, length: big.length })]);
    // A plain-TCP preempt channel is known by its first page record (it is peeked, not read).
    const preempt = await conn.waitPreempt();
    // Leave the preempt channel unread while the source would queue 64 MiB of answers.
    let peak = 0;
    for (let i = 0; i < 20; i++) {
      await new Promise((r) => setTimeout(r, 50));
      peak = Math.max(peak, src.stats().channels.preempt?.queuedBytes ?? 0);
    }
    const bound = src.stats().channels.preempt!.maxQueuedBytes;
    expect(peak, 'some answers are queued').toBeGreaterThan(0);
    // One page record (header + idstr + page) may go past the bound: send() waits after it.
    expect(peak, 'answers queued in user space stay under the preempt channel bound').toBeLessThanOrEqual(bound + PAGE + 64);
    expect(src.stats().channels.preempt!.peakQueuedBytes).toBeLessThanOrEqual(bound + PAGE + 64);
    const pdec = new PreemptDecoder(dec.ramBlocks);
    preempt.read((chunk) => {
      for (const r of pdec.push(chunk)) place(received, seen, r);
    });
    await gotEof;
    await conn.main.send([encodeReturnPathMessage({ type: 'shut', value: 0 })]);
    const stats = await src.done;
    await conn.close();
    listener.close();
    expect(received.get('big')!.equals(big), 'the destination holds the source memory bit for bit').toBe(true);
    const counts = seen.get('big')!;
    expect(counts.every((c) => c === 1), 'every page arrived exactly once').toBe(true);
    const pages = big.length / PAGE;
    console.log(`[requests] peak preempt queue ${(peak / 1024).toFixed(0)} KiB (bound ${bound / 1024} KiB); ${answeredOnPreempt} of ${pages} pages answered on preempt; ${stats['postcopy-requests']} request(s)`);
    expect(answeredOnPreempt, 'most of the block was answered on the preempt channel').toBeGreaterThan(pages / 2);
  }, 120_000);
});

describe('a destination that never answers', () => {
  it('no PONG 1 before the preempt channel: the source gives up after replyTimeoutMs of silence, typed, nothing left open', async () => {
    const memory = new InMemorySource([{ idstr: 'pc.ram', length: 1 * MiB }]);
    const listener = await MigrationListener.listen('tcp:127.0.0.1:0');
    const before = process.getActiveResourcesInfo().filter((r) => r === 'TCPSocketWrap' || r === 'Timeout').length;
    const src = new SourceSession({
      to: listener.uri,
      memory,
      machineType: 'pc-q35-10.0',
      devices: [],
      postcopy: { afterPasses: 0 },
      preempt: true,
      replyTimeoutMs: 300,
    });
    src.start();
    const conn = await listener.accept();
    conn.main.read(() => undefined); // reads everything, answers nothing
    const e = await src.done.then(
      () => undefined,
      (err: unknown) => err,
    );
    expect(e).toBeInstanceOf(MigrationError);
    expect((e as MigrationError).code).toBe('idle-timeout');
    expect((e as MigrationError).message).toContain('PONG 1');
    expect(src.stats().channels.preempt, 'the preempt channel was never opened').toBeUndefined();
    conn.destroy();
    listener.close();
    await new Promise((r) => setTimeout(r, 100));
    const after = process.getActiveResourcesInfo().filter((r) => r === 'TCPSocketWrap' || r === 'Timeout').length;
    expect(after, 'no socket or timer left').toBeLessThanOrEqual(before);
  }, 30_000);
});

describe('a destination slow to finish', () => {
  for (const postcopy of [false, true]) {
    it(`${postcopy ? 'postcopy' : 'precopy'}: a 1 s flush before SHUT outlasts replyTimeoutMs 200 ms; both complete, no pause`, async () => {
      class SlowSink extends InMemorySink {
        override async flush(): Promise<void> {
          await new Promise((r) => setTimeout(r, 1000));
        }
      }
      const size = 4 * MiB;
      const memory = new InMemorySource([{ idstr: 'pc.ram', length: size }]);
      randomFillSync(memory.memory.get('pc.ram')!);
      const sink = new SlowSink();
      const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, postcopy });
      const src = new SourceSession({
        to: dst.uri,
        memory,
        machineType: 'pc-q35-10.0',
        devices: [],
        postcopy: postcopy ? { afterPasses: 1 } : 'never',
        replyTimeoutMs: 200,
      });
      let paused = 0;
      src.on('paused', () => paused++);
      src.start();
      const [s, d] = await Promise.allSettled([src.done, dst.done]);
      expect(s.status, s.status === 'rejected' ? String(s.reason) : '').toBe('fulfilled');
      expect(d.status, d.status === 'rejected' ? String(d.reason) : '').toBe('fulfilled');
      expect(paused).toBe(0);
      expect(sink.blocks.get('pc.ram')!.equals(memory.memory.get('pc.ram')!)).toBe(true);
    }, 30_000);
  }
});
