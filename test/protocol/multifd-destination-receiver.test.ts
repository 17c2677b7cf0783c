/**
 * MultifdChannelReceiver and MultifdBarrier alone (no session, no socket:
 * what a worker thread will host): pages land by runs, the same for any
 * chunking; the channel stops at SYNC until released; bad input is a typed
 * error naming the channel.
 */
import { describe, expect, it } from 'vitest';
import { MultifdBarrier, MultifdChannelReceiver, createMultifdReception, type MultifdReceiverOptions } from '../../src/protocol/destination/multifd.js';
import { MigrationError } from '../../src/protocol/errors.js';
import { InMemorySink } from '../../src/protocol/memory.js';
import { MultifdFlag, encodeMultifdInit, encodeMultifdPacketHeader } from '../../src/stream/multifd.js';
import type { KnownBlock } from '../../src/stream/ram.js';

const PAGE = 4096;
const BLOCKS: KnownBlock[] = [
  { idstr: 'pc.ram', length: 32 * PAGE, index: 0 },
  { idstr: 'rom', length: 2 * PAGE, index: 1 },
];

const page = (tag: number): Buffer => Buffer.alloc(PAGE, tag);
function packet(block: string, normal: number[], zero: number[] = [], flags = 0, num = 1): Buffer {
  return Buffer.concat([encodeMultifdPacketHeader({ flags, pagesAlloc: 128, packetNum: BigInt(num), block, normal, zero }), ...normal.map((o) => page(o / PAGE + 1))]);
}
const sync = (): Buffer => Buffer.from(encodeMultifdPacketHeader({ flags: MultifdFlag.SYNC, pagesAlloc: 128, packetNum: 0n, block: '', normal: [], zero: [] }));

function receiver(opts: Partial<MultifdReceiverOptions> = {}, id = 0) {
  const sink = new InMemorySink();
  sink.setBlocks(BLOCKS);
  const runs: [number, number, number][] = [];
  let syncs = 0;
  const rx = new MultifdChannelReceiver(
    {
      channels: 4,
      target: { sink, received: (index, first, count) => runs.push([index, first, count]) },
      onSync: () => {
        syncs++;
      },
      ...opts,
    },
    id,
  );
  rx.setBlocks(BLOCKS);
  return { rx, sink, runs, syncs: () => syncs };
}

/** Pushes `bytes` in pieces cut at `cuts`; every push must complete synchronously (no SYNC hold). */
function pushAll(rx: MultifdChannelReceiver, bytes: Buffer, cuts: number[]): void {
  let at = 0;
  for (const c of [...cuts, bytes.length]) {
    expect(rx.push(bytes.subarray(at, c), () => 'precopy')).toBeUndefined();
    at = c;
  }
}

describe('MultifdChannelReceiver', () => {
  const stream = Buffer.concat([
    encodeMultifdInit(2),
    sync(),
    // Runs: 0–3, then 10, then 5–6 (unsorted, as QEMU's lists may be); zero pages 20–21.
    packet('pc.ram', [0, PAGE, 2 * PAGE, 3 * PAGE, 10 * PAGE, 5 * PAGE, 6 * PAGE], [20 * PAGE, 21 * PAGE]),
    packet('rom', [PAGE]),
    sync(),
  ]);

  it('lands pages by runs into the sink and the received hook, the same at every split point', () => {
    const want = receiver({}, 2);
    pushAll(want.rx, stream, []);
    expect(want.runs).toEqual([
      [0, 0, 4],
      [0, 10, 1],
      [0, 5, 2],
      [0, 20, 2],
      [1, 1, 1],
    ]);
    expect(want.syncs()).toBe(2);
    expect(want.rx.id).toBe(2);
    expect(want.rx.counters).toMatchObject({ packets: 4, syncs: 2, normal: 8, zero: 2, runs: 5, runPages: 10, bytes: stream.length });
    const ram = want.sink.blocks.get('pc.ram')!;
    for (const p of [0, 1, 2, 3, 5, 6, 10]) expect(ram[p * PAGE], `page ${p}`).toBe(p + 1);
    expect(want.sink.blocks.get('rom')![PAGE]).toBe(2);
    for (let cut = 1; cut < stream.length; cut += 97) {
      const r = receiver({}, 2);
      pushAll(r.rx, stream, [cut]);
      expect(r.sink.blocks.get('pc.ram')!.equals(ram), `cut at ${cut}`).toBe(true);
      expect(r.rx.counters.normal).toBe(8);
    }
  });

  it('stops at a SYNC packet until onSync settles, then lands what followed in the same chunk', async () => {
    let release!: () => void;
    const r = receiver({ onSync: () => new Promise<void>((res) => (release = res)) });
    const bytes = Buffer.concat([encodeMultifdInit(0), sync(), packet('pc.ram', [0])]);
    const held = r.rx.push(bytes, () => 'precopy');
    expect(held).toBeInstanceOf(Promise);
    expect(r.rx.heldAtSync).toBe(true);
    expect(r.runs).toEqual([]);
    release();
    await held;
    expect(r.rx.heldAtSync).toBe(false);
    expect(r.runs).toEqual([[0, 0, 1]]);
  });

  it.each([
    ['an unknown block', Buffer.concat([encodeMultifdInit(0), sync(), packet('nope', [0])]), 'unknown-ram-block', /^multifd-0: .*"nope"/],
    ['a page past its block', Buffer.concat([encodeMultifdInit(0), packet('rom', [2 * PAGE])]), 'page-out-of-range', /^multifd-0: /],
    ['an id ≥ channels', Buffer.from(encodeMultifdInit(7)), 'bad-multifd-init', /^multifd-0: .*7/],
    ['another UUID', Buffer.from(encodeMultifdInit(0, new Uint8Array(16).fill(9))), 'bad-multifd-init', /^multifd-0: .*09090909/],
    ['an init naming another channel than identified', Buffer.from(encodeMultifdInit(3)), 'protocol', /^multifd-0: its init message names channel 3/],
    ['a device-state packet', Buffer.concat([encodeMultifdInit(0), Buffer.from(encodeMultifdPacketHeader({ flags: 0x40, pagesAlloc: 128, packetNum: 1n, block: '', normal: [], zero: [] }))]), 'unsupported', /DEVICE_STATE/],
  ])('%s: a MigrationError with the code, naming the channel', (_what, bytes, code, message) => {
    const r = receiver({ uuid: new Uint8Array(16) });
    let e: unknown;
    try {
      r.rx.push(bytes, () => 'precopy');
    } catch (x) {
      e = x;
    }
    expect(e).toBeInstanceOf(MigrationError);
    expect(e).toMatchObject({ code, phase: 'precopy', message: expect.stringMatching(message) });
  });

  it('pages before the block list, and pages refused by beforePages, are typed errors', () => {
    const early = new MultifdChannelReceiver({ channels: 1, target: { sink: new InMemorySink(), received: () => undefined }, onSync: () => undefined }, 0);
    expect(() => early.push(Buffer.concat([encodeMultifdInit(0), packet('pc.ram', [0])]), () => 'setup')).toThrow(expect.objectContaining({ code: 'protocol', message: expect.stringContaining('before the RAM block list') }));
    const r = receiver({
      beforePages: () => {
        throw new MigrationError('protocol', 'postcopy', 'no pages now');
      },
    });
    expect(() => r.rx.push(Buffer.concat([encodeMultifdInit(0), sync(), packet('pc.ram', [0])]), () => 'postcopy')).toThrow(expect.objectContaining({ code: 'protocol', message: 'multifd-0: no pages now (phase: postcopy)' }));
  });

  it('end() inside a packet is truncated; between packets it is fine', () => {
    const r = receiver();
    r.rx.push(Buffer.concat([encodeMultifdInit(0), packet('pc.ram', [0]).subarray(0, 2000)]), () => 'precopy');
    expect(() => r.rx.end('precopy')).toThrow(expect.objectContaining({ code: 'truncated', message: expect.stringContaining('multifd-0') }));
    const ok = receiver();
    ok.rx.push(Buffer.concat([encodeMultifdInit(0), packet('pc.ram', [0])]), () => 'precopy');
    expect(() => ok.rx.end('precopy')).not.toThrow();
    expect(ok.rx.ended).toBe(true);
  });
});

describe('MultifdBarrier', () => {
  it('MULTIFD_FLUSH waits until every channel is at its SYNC, then releases them together', async () => {
    const b = new MultifdBarrier(3);
    const order: string[] = [];
    const a0 = b.arrive().then(() => order.push('c0'));
    const flushed = b.flush()!.then(() => order.push('main'));
    expect(b.flushing).toBe(true);
    const a1 = b.arrive().then(() => order.push('c1'));
    await new Promise((r) => setImmediate(r));
    expect(order).toEqual([]);
    const a2 = b.arrive().then(() => order.push('c2'));
    await Promise.all([a0, a1, a2, flushed]);
    expect(order.sort()).toEqual(['c0', 'c1', 'c2', 'main']);
    expect(b.syncs).toBe(1);
    expect(b.waiting).toBe(0);
    // All already there: no wait at all.
    const held = [b.arrive(), b.arrive(), b.arrive()];
    expect(b.flush()).toBeUndefined();
    await Promise.all(held);
    expect(b.syncs).toBe(2);
  });

  it('fail() rejects everyone waiting and every later wait', async () => {
    const b = new MultifdBarrier(2);
    const a = b.arrive();
    const f = b.flush()!;
    const e = new Error('gone');
    b.fail(e);
    await expect(a).rejects.toBe(e);
    await expect(f).rejects.toBe(e);
    await expect(b.arrive()).rejects.toBe(e);
  });

  it('createMultifdReception: each receiver meets the same barrier', async () => {
    const sink = new InMemorySink();
    sink.setBlocks(BLOCKS);
    const m = createMultifdReception(2, { channels: 2, target: { sink, received: () => undefined } });
    const p0 = m.receivers[0]!.push(Buffer.concat([encodeMultifdInit(0), sync(), packet('pc.ram', [0])]), () => 'precopy');
    expect(m.barrier.waiting).toBe(1);
    expect(m.barrier.flush()).toBeInstanceOf(Promise);
    const p1 = m.receivers[1]!.push(Buffer.concat([encodeMultifdInit(1), sync()]), () => 'precopy');
    // Blocks are set only later here: the page after the SYNC fails for want of them.
    await expect(p0).rejects.toMatchObject({ code: 'protocol' });
    await p1;
    expect(m.barrier.syncs).toBe(1);
  });
});
