import net from 'node:net';
import type { Worker } from 'node:worker_threads';
import { describe, expect, it } from 'vitest';
import { PageBitmap } from '../../src/stream/bitmap.js';
import { InMemorySource } from '../../src/protocol/memory-source.js';
import { AtomicRing, socketTransferSupported, spawnWorker } from '../../src/transport/worker/index.js';
import type { SelftestTask } from '../../src/transport/worker/selftest-worker.js';

const SELFTEST = 'transport/worker/selftest-worker';

/** Runs one task in a fresh selftest worker and waits for the worker to exit on its own. */
async function inWorker(task: SelftestTask, transfer: readonly (net.Socket | ArrayBuffer)[] = []): Promise<unknown> {
  const w: Worker = spawnWorker(SELFTEST, task, transfer as never);
  const exited = new Promise<number>((resolve) => w.once('exit', resolve));
  const reply = await new Promise<{ ok: boolean; result?: unknown; error?: string }>((resolve, reject) => {
    w.once('message', resolve);
    w.once('error', reject);
  });
  // Nothing keeps a worker alive once its task is done: it exits by itself (no terminate()).
  w.unref();
  await w.terminate();
  await exited;
  if (!reply.ok) throw new Error(reply.error);
  return reply.result;
}

describe('AtomicRing', () => {
  it('keeps order through wraparound, refuses when full, rounds capacity up', () => {
    const ring = AtomicRing.create(5, 2);
    expect(ring.capacity).toBe(8);
    const out = new Float64Array(2);
    let next = 0;
    let expected = 0;
    for (let round = 0; round < 20; round++) {
      while (ring.push([next, next * 0.5])) next++;
      expect(ring.length).toBe(8);
      expect(ring.push([1, 1])).toBe(false);
      for (let k = 0; k < 3 + (round % 5); k++) {
        expect(ring.pop(out)).toBe(true);
        expect([...out]).toEqual([expected, expected * 0.5]);
        expected++;
      }
    }
    while (ring.pop(out)) expected++;
    expect(expected).toBe(next);
    expect(ring.pop(out)).toBe(false);
  });

  it('keeps large numbers exact (byte offsets, times) and reads into Int32Array', () => {
    const ring = AtomicRing.create(4, 3);
    ring.push([2 ** 40 + 4096, 1234.5678, -7]);
    const f = new Float64Array(3);
    ring.pop(f);
    expect([...f]).toEqual([2 ** 40 + 4096, 1234.5678, -7]);
    ring.push([1, 2, 3]);
    const i = new Int32Array(3);
    ring.pop(i);
    expect([...i]).toEqual([1, 2, 3]);
  });

  it('close: push refuses, what was pushed still pops, waiters wake', async () => {
    const ring = AtomicRing.create(4, 1);
    const woke = ring.wait();
    ring.close();
    await woke;
    expect(ring.push([1])).toBe(false);
    const r2 = AtomicRing.create(4, 1);
    r2.push([9]);
    r2.close();
    const out = new Float64Array(1);
    expect(r2.pop(out)).toBe(true);
    expect(out[0]).toBe(9);
    await r2.wait(); // closed: at once
    await r2.room();
  });

  it('wait() resolves when another thread pushes; room() when it pops (a worker producing 20 000 entries into 16 slots)', async () => {
    const ring = AtomicRing.create(16, 3);
    const produced = inWorker({ task: 'ring-produce', sab: ring.sab, count: 20_000 });
    const e = new Float64Array(3);
    let n = 0;
    for (;;) {
      while (ring.pop(e)) {
        expect(e[0]).toBe(n);
        expect(e[2]).toBe(-n);
        n++;
      }
      if (ring.closed && ring.length === 0) break;
      await ring.wait();
    }
    expect(n).toBe(20_000);
    expect(await produced).toBe(20_000);
  });

  it('a worker consumes what this thread produces, in order', async () => {
    const ring = AtomicRing.create(8, 3);
    const consumed = inWorker({ task: 'ring-consume', sab: ring.sab });
    for (let i = 0; i < 5000; ) {
      if (ring.push([i, 2 * i, -i])) i++;
      else await ring.room();
    }
    ring.close();
    expect(await consumed).toEqual({ n: 5000, sum: (5000 * 4999) / 2 });
  });
});

describe('PageBitmap, shared', () => {
  it('loses no bit while a worker sets pages of one parity and this thread clears and claims the other', async () => {
    const pages = 4096;
    const bm = new PageBitmap(pages, { shared: true });
    expect(bm.shared).toBe(true);
    const control = new Int32Array(new SharedArrayBuffer(8));
    const worker = inWorker({ task: 'bitmap-set', sab: bm.buffer, pages, parity: 0, control: control.buffer as SharedArrayBuffer });
    while (Atomics.load(control, 1) === 0) await new Promise((r) => setTimeout(r, 5));
    // Odd pages: set, cleared one by one and by word claims, in a tight loop while the worker sets the even ones in the same words.
    let claimed = 0;
    for (let round = 0; round < 400; round++) {
      for (let p = 1; p < pages; p += 2) bm.set(p);
      for (let p = 1; p < pages / 2; p += 2) bm.clear(p);
      for (let w = pages / 64; w < pages / 32; w++) claimed += popcount(bm.claimWord(w, 0xaaaaaaaa));
    }
    Atomics.store(control, 0, 1);
    expect(await worker).toBeGreaterThan(0);
    expect(claimed).toBeGreaterThan(0);
    // Every even page the worker set is still set: no clear of this thread took one away.
    for (let p = 0; p < pages; p += 2) if (!bm.has(p)) throw new Error(`page ${p} lost`);
    expect(bm.count()).toBe(pages / 2);
  });

  it('claim: exactly one of two claims of a page wins; claimWord returns and clears only the masked bits', () => {
    for (const shared of [false, true]) {
      const bm = new PageBitmap(100, { shared });
      bm.setRange(0, 100);
      expect(bm.claim(40)).toBe(true);
      expect(bm.claim(40)).toBe(false);
      expect(bm.claimWord(1, 0x0000ffff)).toBe(0x0000ffff & ~(1 << 8));
      expect(bm.has(47)).toBe(false);
      expect(bm.has(48)).toBe(true);
      expect(bm.claimWord(0)).toBe(0xffffffff);
      expect(bm.next(0)).toBe(48);
    }
  });

  it('drainInto between shared and plain bitmaps moves every bit once', () => {
    const a = new PageBitmap(200, { shared: true });
    const b = new PageBitmap(200);
    a.setRange(3, 70);
    a.set(199);
    a.drainInto(b);
    expect(a.count()).toBe(0);
    expect(b.count()).toBe(71);
    b.drainInto(a);
    expect(a.count()).toBe(71);
    const c = PageBitmap.attach(200, a.buffer);
    expect(c.has(199)).toBe(true);
    expect(() => new PageBitmap(200).buffer).toThrow(TypeError);
  });
});

describe('InMemorySource, shared', () => {
  it('puts blocks and dirty bitmaps in SharedArrayBuffers (copying given Buffers) that another thread reads', () => {
    const given = Buffer.alloc(8192, 7);
    const src = new InMemorySource(new Map([['pc.ram', given]]), { shared: true });
    const [blk] = src.sharedBlocks()!;
    expect(blk!.memory).toBeInstanceOf(SharedArrayBuffer);
    expect(new Uint8Array(blk!.memory)[100]).toBe(7);
    src.write('pc.ram', 4096, Buffer.from([1, 2, 3]));
    expect(new Uint8Array(blk!.memory)[4096]).toBe(1);
    const dirty = PageBitmap.attach(2, blk!.dirty);
    expect(dirty.has(1)).toBe(true);
    const into = new PageBitmap(2);
    src.syncDirty(new Map([['pc.ram', into]]));
    expect(into.has(1)).toBe(true);
    expect(dirty.has(1)).toBe(false);
    expect(new InMemorySource([{ idstr: 'a', length: 4096 }]).sharedBlocks()).toBeUndefined();
  });
});

describe('spawnWorker', () => {
  it('runs a worker entry from source (tsx inside the worker) with its data', async () => {
    expect(await inWorker({ task: 'echo', value: { a: [1, 2] } })).toEqual({ a: [1, 2] });
  });

  it('socketTransferSupported() agrees with this Node: a connected socket transferred to a worker is served there', async () => {
    const major = Number(process.versions.node.split('.')[0]);
    const minor = Number(process.versions.node.split('.')[1]);
    expect(socketTransferSupported()).toBe(major > 26 || (major === 26 && minor >= 6));
    const server = net.createServer();
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    const port = (server.address() as net.AddressInfo).port;
    const accepted = new Promise<net.Socket>((r) => server.once('connection', r));
    const client = net.connect(port, '127.0.0.1');
    await new Promise((r) => client.once('connect', r));
    const got = new Promise<string>((resolve) => {
      let s = '';
      client.on('data', (d: Buffer) => (s += d.toString()));
      client.on('end', () => resolve(s));
    });
    const sock = await accepted;
    try {
      if (!socketTransferSupported()) {
        // Node 22: the transfer list is refused (DataCloneError); the session falls back before it gets here.
        await expect(inWorker({ task: 'socket', socket: sock, reply: 'w' }, [sock])).rejects.toThrow(/transferList|transfer/i);
        return;
      }
      const served = inWorker({ task: 'socket', socket: sock, reply: 'w' }, [sock]);
      client.write('ping');
      expect(await served).toBe('served');
      expect(await got).toBe('w:ping');
    } finally {
      client.destroy();
      sock.destroy();
      server.close();
    }
  });
});

function popcount(w: number): number {
  let n = 0;
  for (; w !== 0; w &= w - 1) n++;
  return n;
}
