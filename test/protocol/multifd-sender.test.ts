/**
 * MultifdChannelSender and MultifdPacketBuilder on their own (no session, no
 * socket: what a worker thread would host): what two senders sharing one
 * packet counter write, decoded back with the codec's MultifdDecoder — the
 * init message (id, UUID), packets with the normal pages' bytes after the
 * header and the zero pages in the zero list, packet numbers drawn from the
 * shared counter in order across channels, SYNC packets with no pages — and
 * the output pulled by the window (`bulkRoom`).
 */
import { randomFillSync } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { MultifdDecoder, type MultifdPacketRecord, type MultifdRecord } from '../../src/stream/multifd.js';
import { MultifdChannelSender, MultifdPacketBuilder, MultifdPacketCounter, type MultifdOutput } from '../../src/protocol/source/multifd.js';

const PAGE = 4096;

/** A MultifdOutput that keeps what was pushed (one group per push) and reports a window. */
class Recorder implements MultifdOutput {
  readonly groups: Uint8Array[][] = [];
  bytes = 0;
  window = 1 << 20;
  push(pieces: readonly Uint8Array[]): number {
    this.groups.push([...pieces]);
    let n = 0;
    for (const p of pieces) n += p.length;
    this.bytes += n;
    return n;
  }
  get bulkRoom(): number {
    return Math.max(0, this.window - this.bytes);
  }
  whenBulkRoom(): Promise<void> {
    return Promise.resolve();
  }
  decode(uuid?: Uint8Array): MultifdRecord[] {
    const d = new MultifdDecoder({ blocks: [{ idstr: 'pc.ram', length: 64 * PAGE, index: 0 }], channels: 2, ...(uuid ? { uuid } : {}) });
    const out: MultifdRecord[] = [];
    for (const g of this.groups) for (const p of g) for (const r of d.push(p)) out.push(r.type === 'multifd-packet' ? { ...r, data: Buffer.from(r.data.subarray(r.start, r.start + r.normal.length * PAGE)), start: 0 } : r);
    d.end();
    return out;
  }
}

describe('MultifdChannelSender', () => {
  it('init, packets with normal bytes and zero lists, SYNC: decoded back field by field; packet numbers shared across channels', () => {
    const mem = Buffer.alloc(64 * PAGE);
    // Pages 0–9: 0, 3, 4 and 9 zero, the rest random.
    for (const p of [1, 2, 5, 6, 7, 8]) randomFillSync(mem, p * PAGE, PAGE);
    const uuid = randomFillSync(new Uint8Array(16));
    const counter = new MultifdPacketCounter();
    const outs = [new Recorder(), new Recorder()];
    const senders = outs.map((o, id) => new MultifdChannelSender(id, o, counter, { uuid }));
    for (const s of senders) s.start();
    const b = new MultifdPacketBuilder();
    b.addRun('pc.ram', 0, 6, mem, 0); // pages 0–5
    b.addRun('pc.ram', 7 * PAGE, 3, mem, 7 * PAGE); // pages 7–9 (6 skipped: not dirty)
    expect(b.size).toBe(9);
    expect(b.room).toBe(128 - 9);
    senders[0]!.sendPacket(b);
    expect(b.size).toBe(0);
    b.addRun('pc.ram', 6 * PAGE, 1, mem, 6 * PAGE);
    senders[1]!.sendPacket(b);
    senders[1]!.sync();
    senders[0]!.sync();

    const r0 = outs[0]!.decode(uuid);
    const r1 = outs[1]!.decode(uuid);
    expect(r0[0]).toMatchObject({ type: 'multifd-init', id: 0 });
    expect(Buffer.from((r0[0] as { uuid: Uint8Array }).uuid)).toEqual(Buffer.from(uuid));
    expect(r1[0]).toMatchObject({ type: 'multifd-init', id: 1 });
    const p0 = r0[1] as MultifdPacketRecord;
    expect(p0).toMatchObject({ type: 'multifd-packet', sync: false, packetNum: 0n, pagesAlloc: 128, block: 'pc.ram', nextPacketSize: 5 * PAGE });
    expect([...p0.normal]).toEqual([1, 2, 5, 7, 8].map((p) => p * PAGE));
    expect([...p0.zero]).toEqual([0, 3, 4, 9].map((p) => p * PAGE));
    expect(Buffer.compare(p0.data, Buffer.concat([1, 2, 5, 7, 8].map((p) => mem.subarray(p * PAGE, (p + 1) * PAGE))))).toBe(0);
    const p1 = r1[1] as MultifdPacketRecord;
    expect(p1).toMatchObject({ packetNum: 1n, block: 'pc.ram' });
    expect([...p1.normal]).toEqual([6 * PAGE]);
    expect(Buffer.compare(p1.data, mem.subarray(6 * PAGE, 7 * PAGE))).toBe(0);
    // SYNC packets: no pages, pages_alloc 0 (as QEMU), numbers go on from the shared counter.
    expect(r1[2]).toMatchObject({ type: 'multifd-packet', sync: true, packetNum: 2n, pagesAlloc: 0, block: '', nextPacketSize: 0 });
    expect(r0[2]).toMatchObject({ type: 'multifd-packet', sync: true, packetNum: 3n });
    expect(senders[0]!.counters).toMatchObject({ packets: 1, syncs: 1, normalPages: 5, zeroPages: 4 });
    // Normal pages go by reference (views of guest memory), one view per stretch of consecutive normal pages.
    const views = outs[0]!.groups[1]!.slice(1);
    expect(views.map((v) => v.length)).toEqual([2 * PAGE, PAGE, 2 * PAGE]);
    expect(views[0]!.buffer).toBe(mem.buffer);
  });

  it('the builder keeps to one block and to its capacity', () => {
    const b = new MultifdPacketBuilder(4);
    const mem = Buffer.alloc(8 * PAGE, 1);
    b.addRun('a', 0, 3, mem, 0);
    expect(() => b.addRun('b', 0, 1, mem, 0)).toThrow(RangeError);
    expect(() => b.addRun('a', 3 * PAGE, 2, mem, 0)).toThrow(RangeError);
    b.addRun('a', 3 * PAGE, 1, mem, 0);
    expect(b.room).toBe(0);
  });

  it('pulled by the window: bulkRoom is the output’s', () => {
    const out = new Recorder();
    out.window = 1000;
    const s = new MultifdChannelSender(0, out, new MultifdPacketCounter());
    s.start();
    expect(s.bulkRoom).toBe(1000 - 64);
    s.sync();
    expect(s.bulkRoom).toBe(0);
  });
});
