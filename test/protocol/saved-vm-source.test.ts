/**
 * SavedVmSource: asynchronous read-ahead in runs, pages equal to the files
 * for sequential scans and random reads, reuseAfterBytes kept (views handed
 * out stay intact that long), memory independent of the guest size, typed
 * read errors, and nothing left open after close.
 */
import * as fs from 'node:fs';
import { mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import fc from 'fast-check';
import { afterAll, describe, expect, it } from 'vitest';
import { StorageError } from '../../src/protocol/errors.js';
import { SavedVmSource, type SavedVmSourceFs } from '../../src/protocol/saved-vm-source.js';
import { leftAfter, resourceSnapshot } from '../support/resources.js';
import { pattern, writeTestSavedVm, type TestBlock } from '../support/saved-vm.js';
import { DestinationSession } from '../../src/protocol/destination.js';
import { InMemorySink } from '../../src/protocol/memory.js';
import { SourceSession } from '../../src/protocol/source.js';

const PAGE = 4096;
const KiB = 1024;
const MiB = 1 << 20;
const root = mkdtempSync(join(tmpdir(), 'qmt-savedvm-'));
afterAll(() => rmSync(root, { recursive: true, force: true }));
let dirs = 0;

function savedVm(blocks: TestBlock[]): string {
  return writeTestSavedVm(join(root, `vm${dirs++}`), blocks);
}

/**
 * Views handed out, checked after every later call against their bytes at
 * hand-out while fewer than reuseAfterBytes bytes were handed out since: the
 * promise reuseAfterBytes makes.
 */
class Keeper {
  private readonly kept: { view: Uint8Array; copy: Buffer; at: number; what: string }[] = [];
  private handed = 0;
  constructor(private readonly reuseAfterBytes: number) {}
  add(view: Uint8Array, what: string): void {
    this.handed += view.length;
    this.kept.push({ view, copy: Buffer.from(view), at: this.handed, what });
    this.check();
  }
  check(): void {
    while (this.kept.length > 0 && this.handed - this.kept[0]!.at >= this.reuseAfterBytes) this.kept.shift();
    for (const k of this.kept) if (!Buffer.from(k.view).equals(k.copy)) throw new Error(`${k.what}: a view changed ${this.handed - k.at} bytes later (reuseAfterBytes ${this.reuseAfterBytes})`);
  }
}

const small = { runBytes: 16 * KiB, readAheadRuns: 3, maxReads: 2, reuseAfterBytes: 48 * KiB };

describe('SavedVmSource', () => {
  const ram = pattern(300 * PAGE, 1); // not a multiple of runBytes: a short last run
  const rom = pattern(3 * PAGE, 2);
  const bios = pattern(PAGE, 3);
  const blocks = [
    { idstr: 'pc.ram', data: ram },
    { idstr: '/rom@etc/acpi/tables', data: rom },
    { idstr: 'pc.bios', data: bios },
  ];
  const bytesOf = new Map(blocks.map((b) => [b.idstr, b.data]));

  it('a sequential scan with readPages in batches of any size equals the files; each run is read once, ahead, asynchronously; views stay intact for reuseAfterBytes', async () => {
    const dir = savedVm(blocks);
    // 64 and 300 pages span more runs of 16 KiB than the ring has buffers: those take buffers of their own.
    for (const batch of [1, 3, 4, 7, 13, 64, 300]) {
      const src = await SavedVmSource.open(dir, small);
      const keep = new Keeper(src.reuseAfterBytes);
      for (const b of src.blocks()) {
        for (let off = 0; off < b.length; ) {
          const n = Math.min(batch, (b.length - off) / PAGE);
          const r = src.readPages(b.idstr, off, n);
          const v = r instanceof Promise ? await r : r;
          expect(Buffer.from(v).equals(bytesOf.get(b.idstr)!.subarray(off, off + n * PAGE)), `${b.idstr} +0x${off.toString(16)} ×${n}`).toBe(true);
          keep.add(v, `${b.idstr} +0x${off.toString(16)}`);
          off += n * PAGE;
        }
      }
      const st = src.stats();
      const runs = Math.ceil(ram.length / small.runBytes) + 1 + 1;
      expect(st.runsRead, `batch ${batch}: every run read once`).toBe(runs);
      expect(st.pagesReadAlone + st.syncReads, JSON.stringify(st)).toBe(0);
      if (batch * PAGE <= small.runBytes * 2) expect(st.ownBuffers, JSON.stringify(st)).toBe(0);
      expect(st.hits + st.waits).toBeGreaterThan(0);
      src.close();
      await src.whenClosed();
    }
  });

  it('random reads (readPages, readPage) mixed with a scan equal the files; a single page away from the scan is read alone', async () => {
    const dir = savedVm(blocks);
    const op = fc.oneof(
      fc.record({ k: fc.constant('pages' as const), b: fc.nat(2), page: fc.nat(299), count: fc.integer({ min: 1, max: 40 }) }),
      fc.record({ k: fc.constant('page' as const), b: fc.nat(2), page: fc.nat(299), count: fc.constant(1) }),
      fc.record({ k: fc.constant('scan' as const), b: fc.constant(0), page: fc.constant(0), count: fc.integer({ min: 1, max: 20 }) }),
    );
    await fc.assert(
      fc.asyncProperty(fc.array(op, { minLength: 1, maxLength: 40 }), async (ops) => {
        const src = await SavedVmSource.open(dir, small);
        const keep = new Keeper(src.reuseAfterBytes);
        let scan = 0;
        for (const o of ops) {
          const blk = blocks[o.b]!;
          const pages = blk.data.length / PAGE;
          let page = o.page % pages;
          let count = Math.min(o.count, pages - page);
          if (o.k === 'scan') {
            page = scan;
            count = Math.min(count, pages - scan);
            scan = (scan + count) % pages;
          }
          const r = o.k === 'page' ? src.readPage(blk.idstr, page * PAGE) : src.readPages(blk.idstr, page * PAGE, count);
          const v = r instanceof Promise ? await r : r;
          expect(Buffer.from(v).equals(blk.data.subarray(page * PAGE, (page + count) * PAGE)), `${o.k} ${blk.idstr} page ${page} ×${count}`).toBe(true);
          keep.add(v, `${o.k} ${blk.idstr} page ${page}`);
        }
        src.close();
        await src.whenClosed();
      }),
      { numRuns: 100 },
    );
    const src = await SavedVmSource.open(dir, small);
    for (let p = 0; p < 16; p += 4) await src.readPages('pc.ram', p * PAGE, 4);
    const before = src.stats();
    const far = await src.readPages('pc.ram', 250 * PAGE, 1);
    expect(Buffer.from(far).equals(ram.subarray(250 * PAGE, 251 * PAGE))).toBe(true);
    const after = src.stats();
    expect(after.pagesReadAlone).toBe(before.pagesReadAlone + 1);
    expect(after.bytesRead - before.bytesRead, 'alone: one page, no run, no read-ahead there').toBeLessThanOrEqual(PAGE + 3 * small.runBytes);
    // The scan goes on where it was.
    const next = src.readPages('pc.ram', 16 * PAGE, 4);
    expect(Buffer.from(next instanceof Promise ? await next : next).equals(ram.subarray(16 * PAGE, 20 * PAGE))).toBe(true);
    src.close();
    await src.whenClosed();
  });

  it('readPage alone (a caller without readPages) equals the files with one synchronous read per run, not per page', async () => {
    const dir = savedVm(blocks);
    const src = await SavedVmSource.open(dir, { ...small, readAheadRuns: 0 });
    for (const b of blocks) for (let off = 0; off < b.data.length; off += PAGE) expect(Buffer.from(src.readPage(b.idstr, off)).equals(b.data.subarray(off, off + PAGE))).toBe(true);
    expect(src.stats().syncReads).toBe(Math.ceil(ram.length / small.runBytes) + 2);
    src.close();
    await src.whenClosed();
  });

  it('a lazy restore (postcopy at once, preempt): requested pages are read alone and asynchronously, never with a synchronous read; memory bit for bit', async () => {
    const data = pattern(32 * MiB, 7);
    const dir = savedVm([{ idstr: 'pc.ram', data }]);
    const saved = await SavedVmSource.open(dir);
    const sink = new InMemorySink();
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, postcopy: true });
    // One thread: the SavedVmSource itself reads (with threads each channel's worker reads the files: threads-source-saved-vm.test.ts).
    const src = new SourceSession({ to: dst.uri, memory: saved, machineType: 'pc-q35-10.0', devices: [], postcopy: { afterPasses: 0 }, preempt: true, postcopyBandwidthLimit: 8 * MiB, threads: 'off' });
    let requested = 0;
    // The guest at the destination touches pages from the top down, far from the background scan.
    dst.on('postcopy-run', () => {
      void (async () => {
        for (let off = data.length - PAGE; off >= data.length / 2 && requested < 200; off -= 17 * PAGE) {
          if (dst.hasPage('pc.ram', off)) continue;
          requested++;
          await dst.requestPage('pc.ram', off).catch(() => undefined);
        }
      })();
    });
    src.start();
    const stats = await src.done;
    await dst.done;
    const st = saved.stats();
    saved.close();
    expect(requested, 'the guest faulted').toBeGreaterThan(20);
    expect(stats['requests-answered'].preempt, JSON.stringify(stats['requests-answered'])).toBeGreaterThan(0);
    expect(st.pagesReadAlone, JSON.stringify(st)).toBeGreaterThan(0);
    expect(st.syncReads, `no synchronous read on the urgent path: ${JSON.stringify(st)}`).toBe(0);
    expect(sink.blocks.get('pc.ram')!.equals(data)).toBe(true);
  });

  it('a 1 GiB sparse saved VM scanned in full: resident memory grows by less than 64 MiB, whatever the guest size', async () => {
    const length = 1024 * MiB;
    const pokes = [0, 1, 77777, length / PAGE - 1];
    const dir = savedVm([{ idstr: 'pc.ram', length, pokes }]);
    const src = await SavedVmSource.open(dir);
    global.gc?.();
    const rss0 = process.memoryUsage().rss;
    let peak = rss0;
    let nonzero = 0;
    const batch = 64;
    for (let off = 0, i = 0; off < length; off += batch * PAGE, i++) {
      const r = src.readPages('pc.ram', off, batch);
      const v = r instanceof Promise ? await r : r;
      for (let p = 0; p < batch; p++) if (v[p * PAGE] !== 0 || v[p * PAGE + 4] !== 0) nonzero++;
      if (i % 256 === 0) peak = Math.max(peak, process.memoryUsage().rss);
    }
    peak = Math.max(peak, process.memoryUsage().rss);
    expect(nonzero).toBe(pokes.length);
    expect(src.stats().bytesRead).toBe(length);
    expect(peak - rss0, `RSS grew ${((peak - rss0) / MiB).toFixed(1)} MiB`).toBeLessThan(64 * MiB);
    src.close();
    await src.whenClosed();
  }, 120_000);

  it('a failed read is a StorageError naming file and position (thrown, or the promise rejects); a failed read-ahead nobody asks for rejects nothing; a later request reads again', async () => {
    const dir = savedVm(blocks);
    let failAt: number | undefined = 2 * small.runBytes;
    const io: SavedVmSourceFs = {
      openSync: (p, f) => fs.openSync(p, f),
      readSync: (fd, b, o, l, p) => fs.readSync(fd, b, o, l, p),
      read: (fd, b, o, l, p, cb) => (failAt !== undefined && p <= failAt && failAt < p + l ? setImmediate(() => cb(Object.assign(new Error('EIO: i/o error, read'), { code: 'EIO' }), 0)) : fs.read(fd, b, o, l, p, cb)),
      close: (fd, cb) => fs.close(fd, cb),
    };
    const src = await SavedVmSource.open(dir, { ...small, fs: io });
    const first = src.readPages('pc.ram', 0, 4); // reads ahead runs 1..3: run 2 fails, unasked
    expect(Buffer.from(first instanceof Promise ? await first : first).equals(ram.subarray(0, 4 * PAGE))).toBe(true);
    await new Promise((r) => setTimeout(r, 20));
    let err: unknown;
    try {
      const r = src.readPages('pc.ram', 2 * small.runBytes, 4);
      if (r instanceof Promise) await r;
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(StorageError);
    expect(err).toMatchObject({ code: 'storage', operation: 'read', errno: 'EIO', position: 2 * small.runBytes });
    expect((err as StorageError).file).toMatch(/pc\.ram\.bin$/);
    failAt = undefined;
    const again = src.readPages('pc.ram', 2 * small.runBytes, 4);
    expect(Buffer.from(again instanceof Promise ? await again : again).equals(ram.subarray(2 * small.runBytes, 2 * small.runBytes + 4 * PAGE))).toBe(true);
    failAt = 250 * PAGE;
    await expect(src.readPages('pc.ram', 250 * PAGE, 1)).rejects.toMatchObject({ code: 'storage', position: 250 * PAGE });
    src.close();
    await src.whenClosed();
  });

  it('close() with reads in flight closes every file once they are done: no descriptor, no handle left', async () => {
    const dir = savedVm(blocks);
    const before = resourceSnapshot();
    const fds = readdirSync('/proc/self/fd').length;
    const src = await SavedVmSource.open(dir, small);
    expect(readdirSync('/proc/self/fd').length).toBe(fds + blocks.length);
    const r = src.readPages('pc.ram', 0, 4);
    expect(src.stats().readsInFlight).toBeGreaterThan(0);
    src.close();
    expect(src.stats().openFiles, 'not while reads are in flight').toBe(blocks.length);
    if (r instanceof Promise) expect(Buffer.from(await r).equals(ram.subarray(0, 4 * PAGE))).toBe(true);
    await src.whenClosed();
    expect(src.stats().openFiles).toBe(0);
    expect(readdirSync('/proc/self/fd').length).toBe(fds);
    expect(await leftAfter(before, 500)).toEqual([]);
    expect(() => src.readPages('pc.ram', 0, 1)).toThrow(/after close/);
  });
});
