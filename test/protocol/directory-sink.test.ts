/**
 * DirectorySink: asynchronous coalesced writes checked against InMemorySink
 * (the model) under random mixes of calls, the bound on bytes in flight seen
 * from the file system's side, typed storage errors, backpressure, readPage
 * of pending writes, and nothing left open after close.
 */
import * as fs from 'node:fs';
import { mkdtempSync, readFileSync, readdirSync, rmSync, symlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import fc from 'fast-check';
import { afterAll, describe, expect, it } from 'vitest';
import { DirectorySink, blockFileName, type DirectorySinkFs } from '../../src/protocol/directory-sink.js';
import { MigrationError, StorageError } from '../../src/protocol/errors.js';
import { InMemorySink } from '../../src/protocol/memory.js';
import { DestinationSession } from '../../src/protocol/destination.js';
import { InMemorySource } from '../../src/protocol/memory-source.js';
import { SourceSession } from '../../src/protocol/source.js';
import { rejection } from '../support/rejection.js';
import { leftAfter, resourceSnapshot } from '../support/resources.js';

const PAGE = 4096;
const root = mkdtempSync(join(tmpdir(), 'qmt-dirsink-'));
afterAll(() => rmSync(root, { recursive: true, force: true }));
let dirs = 0;
const freshDir = (): string => join(root, `d${dirs++}`);

const BLOCKS = [
  { idstr: 'pc.ram', length: 48 * PAGE },
  { idstr: '/rom@etc/acpi/tables', length: 5 * PAGE },
  { idstr: 'pc.bios', length: PAGE },
];

/** A page of bytes that tells pages and versions apart. */
function pageOf(tag: number): Buffer {
  const b = Buffer.alloc(PAGE);
  for (let i = 0; i < PAGE; i += 4) b.writeUInt32LE((tag * 2654435761 + i) >>> 0, i);
  return b;
}

/**
 * node:fs whose writes complete in an order the test picks (they are held,
 * then done — really, with positioned writes — in a shuffled order), and
 * which records bytes in flight at the file system's side and any two
 * overlapping writes of one file in flight at once.
 */
function heldFs(rand: () => number) {
  const held: { fd: number; buf: Uint8Array; off: number; len: number; pos: number; cb: (e: NodeJS.ErrnoException | null, n: number) => void }[] = [];
  const st = { inFlight: 0, peak: 0, overlaps: 0, writes: 0 };
  const io: DirectorySinkFs = {
    openSync: (p, f) => fs.openSync(p, f),
    ftruncateSync: (fd, l) => fs.ftruncateSync(fd, l),
    readSync: (fd, b, o, l, p) => fs.readSync(fd, b, o, l, p),
    write(fd, buf, off, len, pos, cb) {
      for (const h of held) if (h.fd === fd && pos < h.pos + h.len && h.pos < pos + len) st.overlaps++;
      held.push({ fd, buf, off, len, pos, cb });
      st.inFlight += len;
      st.writes++;
      st.peak = Math.max(st.peak, st.inFlight);
    },
    fsync: (fd, cb) => fs.fsync(fd, cb),
    close: (fd, cb) => fs.close(fd, cb),
  };
  /** Completes some held writes (a random choice of them, partly as short writes), later. */
  const step = async (all = false): Promise<void> => {
    await new Promise((r) => setImmediate(r));
    let n = all ? held.length : Math.floor(rand() * (held.length + 1));
    while (n-- > 0 && held.length > 0) {
      const h = held.splice(Math.floor(rand() * held.length), 1)[0]!;
      // Sometimes a short write: the sink must go on where it stopped.
      const len = rand() < 0.2 && h.len > PAGE ? PAGE : h.len;
      const done = fs.writeSync(h.fd, h.buf, h.off, len, h.pos);
      st.inFlight -= h.len;
      h.cb(null, done);
    }
  };
  const drain = async (): Promise<void> => {
    while (held.length > 0) await step(true);
    await new Promise((r) => setImmediate(r));
  };
  return { io, st, step, drain, held };
}

type Op =
  | { op: 'write'; b: number; page: number; count: number; stride: number; start: number; tag: number; seq: boolean }
  | { op: 'zero'; b: number; page: number; count: number; seq: boolean }
  | { op: 'read'; b: number; page: number }
  | { op: 'step' }
  | { op: 'pressure' };

const opArb: fc.Arbitrary<Op> = fc.oneof(
  { weight: 5, arbitrary: fc.record({ op: fc.constant('write' as const), b: fc.nat(2), page: fc.nat(47), count: fc.integer({ min: 1, max: 12 }), stride: fc.constantFrom(PAGE, PAGE + 28, 2 * PAGE), start: fc.nat(40), tag: fc.nat(1000), seq: fc.boolean() }) },
  { weight: 3, arbitrary: fc.record({ op: fc.constant('zero' as const), b: fc.nat(2), page: fc.nat(47), count: fc.integer({ min: 1, max: 10 }), seq: fc.boolean() }) },
  { weight: 2, arbitrary: fc.record({ op: fc.constant('read' as const), b: fc.nat(2), page: fc.nat(47) }) },
  { weight: 2, arbitrary: fc.constant({ op: 'step' as const }) },
  { weight: 1, arbitrary: fc.constant({ op: 'pressure' as const }) },
);

/** The op's pages clipped to the block. */
function clip(b: number, page: number, count: number): { offset: number; count: number } {
  const pages = BLOCKS[b]!.length / PAGE;
  const p = page % pages;
  return { offset: p * PAGE, count: Math.min(count, pages - p) };
}

function filesOf(dir: string): Map<string, Buffer> {
  const m = new Map<string, Buffer>();
  for (const b of BLOCKS) m.set(b.idstr, readFileSync(join(dir, blockFileName(b.idstr))));
  return m;
}

describe('DirectorySink', () => {
  it('random mixes of writePage(s)/zeroPage(s)/readPage across blocks, writes completing out of order and short: files equal InMemorySink byte for byte; bytes in flight never above the bound; no two overlapping writes of a file in flight', async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(opArb, { minLength: 1, maxLength: 60 }), fc.integer({ min: 1, max: 4 }), fc.integer({ min: 1, max: 3 }), fc.nat(), async (ops, writePages, perFile, seed) => {
        let s = seed || 1;
        const rand = (): number => ((s = (s * 1103515245 + 12345) >>> 0) / 2 ** 32);
        const h = heldFs(rand);
        const dir = freshDir();
        const max = writePages * PAGE * 2;
        const sink = new DirectorySink(dir, { writeBytes: writePages * PAGE, maxInFlightBytes: max, writesPerFile: perFile, fs: h.io });
        const model = new InMemorySink();
        sink.setBlocks(BLOCKS);
        model.setBlocks(BLOCKS);
        // `seq`: the op goes on where the previous write or zero of its block ended, as a stream does.
        const after = [0, 0, 0];
        const place = (o: { b: number; page: number; count: number; seq: boolean }): { offset: number; count: number } => {
          const r = clip(o.b, o.seq ? after[o.b]! : o.page, o.count);
          after[o.b] = (r.offset / PAGE + r.count) % (BLOCKS[o.b]!.length / PAGE);
          return r;
        };
        for (const o of ops) {
          if (o.op === 'write') {
            const { offset, count } = place(o);
            const data = Buffer.alloc(o.start + count * o.stride, 0xee);
            for (let i = 0; i < count; i++) pageOf(o.tag + i).copy(data, o.start + i * o.stride);
            const block = BLOCKS[o.b]!.idstr;
            if (count === 1 && o.tag % 2 === 0) {
              const one = data.subarray(o.start, o.start + PAGE);
              sink.writePage(block, offset, one);
              model.writePage(block, offset, one);
            } else {
              sink.writePages(block, offset, count, data, o.start, o.stride);
              model.writePages(block, offset, count, data, o.start, o.stride);
            }
            data.fill(0x55); // the views are valid only during the call
          } else if (o.op === 'zero') {
            const { offset, count } = place(o);
            const block = BLOCKS[o.b]!.idstr;
            if (count === 1) {
              sink.zeroPage(block, offset);
              model.zeroPage(block, offset);
            } else {
              sink.zeroPages(block, offset, count);
              model.zeroPages(block, offset, count);
            }
          } else if (o.op === 'read') {
            const { offset } = clip(o.b, o.page, 1);
            const block = BLOCKS[o.b]!.idstr;
            expect(Buffer.from(sink.readPage(block, offset)).equals(Buffer.from(model.readPage(block, offset))), `readPage ${block} +0x${offset.toString(16)}`).toBe(true);
          } else if (o.op === 'step') {
            await h.step();
          } else {
            const p = sink.backpressure();
            if (p) {
              let settled = false;
              void p.then(() => (settled = true));
              while (!settled) await h.step(true);
            }
            expect(sink.stats().bufferedBytes).toBeLessThanOrEqual(max);
          }
          expect(h.st.inFlight, 'bytes in flight at the file system').toBeLessThanOrEqual(max);
        }
        const flushed = sink.flush();
        await h.drain();
        await flushed;
        const files = filesOf(dir);
        for (const b of BLOCKS) expect(files.get(b.idstr)!.equals(model.blocks.get(b.idstr)!), b.idstr).toBe(true);
        const st = sink.stats();
        expect(h.st.overlaps).toBe(0);
        expect(st.peakInFlightBytes).toBeLessThanOrEqual(max);
        expect(h.st.peak).toBeLessThanOrEqual(max);
        expect(st.bufferedBytes).toBe(0);
        expect(st.inFlightBytes).toBe(0);
        expect(st.fsyncs).toBe(BLOCKS.length);
        await sink.close();
      }),
      { numRuns: 200 },
    );
  });

  it('real files: contiguous pages become writes of writeBytes (1 MiB by default), not one per page; ZERO on pages never written leaves the file sparse', async () => {
    const dir = freshDir();
    const sink = new DirectorySink(dir);
    const pages = 1024; // 4 MiB
    sink.setBlocks([{ idstr: 'pc.ram', length: 2 * pages * PAGE }]);
    const chunk = Buffer.alloc(64 * PAGE);
    for (let p = 0; p < pages; p += 64) {
      for (let i = 0; i < 64; i++) chunk.writeUInt32LE(p + i, i * PAGE);
      sink.writePages('pc.ram', p * PAGE, 64, chunk, 0, PAGE);
      const bp = sink.backpressure();
      if (bp) await bp;
    }
    sink.zeroPages('pc.ram', pages * PAGE, pages); // never written: nothing to do
    await sink.flush();
    const st = sink.stats();
    expect(st.writes).toBe(4);
    expect(st.bytesWritten).toBe(pages * PAGE);
    const file = join(dir, blockFileName('pc.ram'));
    const data = readFileSync(file);
    for (let p = 0; p < pages; p++) expect(data.readUInt32LE(p * PAGE)).toBe(p);
    expect(data.subarray(pages * PAGE).every((b) => b === 0)).toBe(true);
    expect(fs.statSync(file).blocks * 512, 'sparse: the zero half takes no space').toBeLessThanOrEqual(pages * PAGE + (1 << 20));
    await sink.close();
  });

  it('under backpressure the writes stay whole: a 16 MiB stream against a 2 MiB bound is 16 writes of 1 MiB', async () => {
    const sink = new DirectorySink(freshDir(), { maxInFlightBytes: 2 << 20 });
    sink.setBlocks([{ idstr: 'pc.ram', length: 16 << 20 }]);
    const chunk = Buffer.alloc(64 * PAGE, 9);
    for (let off = 0; off < 16 << 20; off += chunk.length) {
      sink.writePages('pc.ram', off, 64, chunk, 0, PAGE);
      const bp = sink.backpressure();
      if (bp) await bp;
    }
    await sink.flush();
    const st = sink.stats();
    expect(st.pauses).toBeGreaterThan(0);
    expect(st.writes).toBe(16);
    expect(st.peakInFlightBytes).toBeLessThanOrEqual(2 << 20);
    await sink.close();
  });

  it('zero and data pages alternating: small holes are filled so that writes stay whole; a long run of zero pages stays a hole', async () => {
    const dir = freshDir();
    const sink = new DirectorySink(dir);
    const pages = 2048;
    sink.setBlocks([{ idstr: 'pc.ram', length: 2 * pages * PAGE }]);
    const model = new InMemorySink();
    model.setBlocks([{ idstr: 'pc.ram', length: 2 * pages * PAGE }]);
    for (let p = 0; p < pages; p++) {
      // Data, then 1, 2 or 3 zero pages: as a guest with sparse data in the first half.
      if (p % 4 === 0) {
        sink.writePage('pc.ram', p * PAGE, pageOf(p));
        model.writePage('pc.ram', p * PAGE, pageOf(p));
      } else if (p % 4 === 1) {
        sink.zeroPage('pc.ram', p * PAGE);
        model.zeroPage('pc.ram', p * PAGE);
      } else if (p % 4 === 2) {
        sink.zeroPages('pc.ram', p * PAGE, 2);
        model.zeroPages('pc.ram', p * PAGE, 2);
        p++;
      }
    }
    sink.zeroPages('pc.ram', pages * PAGE, pages); // the second half: one long run of zero pages
    model.zeroPages('pc.ram', pages * PAGE, pages);
    await sink.flush();
    const st = sink.stats();
    expect(st.writes, `${st.writes} writes for ${pages / 4} data pages`).toBeLessThanOrEqual(Math.ceil((pages * PAGE) / sink.writeBytes) + 1);
    const file = join(dir, blockFileName('pc.ram'));
    expect(readFileSync(file).equals(model.blocks.get('pc.ram')!)).toBe(true);
    expect(fs.statSync(file).blocks * 512, 'the zero half stays a hole').toBeLessThanOrEqual(pages * PAGE + (1 << 20));
    await sink.close();
  });

  it('a hole is filled only with pages never written right after the staged run: a written page there keeps its bytes', async () => {
    const dir = freshDir();
    const sink = new DirectorySink(dir);
    sink.setBlocks([{ idstr: 'pc.ram', length: 64 * PAGE }]);
    // Page 4 is written, then the staged run is page 3 (ending where page 4 begins); a ZERO
    // elsewhere is no hole after it, so page 5 must not fill page 4 with zeros.
    for (const [p, tag] of [[4, 1], [10, 2], [3, 3]] as const) sink.writePage('pc.ram', p * PAGE, pageOf(tag));
    sink.zeroPage('pc.ram', 30 * PAGE);
    sink.writePage('pc.ram', 5 * PAGE, pageOf(4));
    // And a real hole: pages 6 and 7 never written, ZERO, then data at 8: one write of 5..8.
    sink.zeroPages('pc.ram', 6 * PAGE, 2);
    sink.writePage('pc.ram', 8 * PAGE, pageOf(5));
    await sink.flush();
    const f = readFileSync(join(dir, blockFileName('pc.ram')));
    const expected = Buffer.alloc(64 * PAGE);
    for (const [p, tag] of [[4, 1], [10, 2], [3, 3], [5, 4], [8, 5]] as const) pageOf(tag).copy(expected, p * PAGE);
    expect(f.equals(expected)).toBe(true);
    expect(sink.stats().writes, 'pages 4, 10, 3, then 5..8 as one').toBe(4);
    await sink.close();
  });

  it('readPage sees writes still staged or in flight, and a zeroPage of a written page goes through the same pipeline', async () => {
    const h = heldFs(() => 0.5);
    const dir = freshDir();
    const sink = new DirectorySink(dir, { writeBytes: 2 * PAGE, maxInFlightBytes: 8 * PAGE, fs: h.io });
    sink.setBlocks(BLOCKS);
    sink.writePages('pc.ram', 0, 2, Buffer.concat([pageOf(1), pageOf(2)]), 0, PAGE); // a full slab: issued, held
    sink.writePage('pc.ram', 2 * PAGE, pageOf(3)); // staged
    expect(h.held.length).toBe(1);
    expect(Buffer.from(sink.readPage('pc.ram', PAGE)).equals(pageOf(2))).toBe(true);
    expect(Buffer.from(sink.readPage('pc.ram', 2 * PAGE)).equals(pageOf(3))).toBe(true);
    sink.writePage('pc.ram', PAGE, pageOf(9)); // the same page again, while the first is in flight
    expect(Buffer.from(sink.readPage('pc.ram', PAGE)).equals(pageOf(9)), 'the newest write wins').toBe(true);
    sink.zeroPage('pc.ram', 0);
    expect(Buffer.from(sink.readPage('pc.ram', 0)).every((b) => b === 0)).toBe(true);
    const flushed = sink.flush();
    await h.drain();
    await flushed;
    const f = readFileSync(join(dir, blockFileName('pc.ram')));
    expect(f.subarray(0, PAGE).every((b) => b === 0)).toBe(true);
    expect(f.subarray(PAGE, 2 * PAGE).equals(pageOf(9))).toBe(true);
    expect(f.subarray(2 * PAGE, 3 * PAGE).equals(pageOf(3))).toBe(true);
    expect(h.st.overlaps, 'the rewrite waited for the write it overlaps').toBe(0);
    // From the file now (nothing pending).
    expect(Buffer.from(sink.readPage('pc.ram', PAGE)).equals(pageOf(9))).toBe(true);
    await sink.close();
  });

  it('backpressure(): undefined under the bound, a promise above it that settles once the writes are done', async () => {
    const h = heldFs(() => 0.3);
    const sink = new DirectorySink(freshDir(), { writeBytes: 4 * PAGE, maxInFlightBytes: 8 * PAGE, fs: h.io });
    sink.setBlocks(BLOCKS);
    sink.writePages('pc.ram', 0, 4, Buffer.alloc(4 * PAGE, 1), 0, PAGE);
    expect(sink.backpressure()).toBeUndefined();
    sink.writePages('pc.ram', 4 * PAGE, 16, Buffer.alloc(16 * PAGE, 2), 0, PAGE);
    const p = sink.backpressure();
    expect(p).toBeInstanceOf(Promise);
    expect(sink.backpressure(), 'one promise per pause').toBe(p);
    expect(h.st.inFlight).toBeLessThanOrEqual(8 * PAGE);
    let settled = false;
    void p!.then(() => (settled = true));
    await new Promise((r) => setImmediate(r));
    expect(settled, 'not while the writes are held').toBe(false);
    await h.drain();
    await p;
    expect(sink.stats().bufferedBytes).toBeLessThanOrEqual(4 * PAGE);
    expect(sink.stats().pauses).toBe(1);
    const f = sink.flush();
    await h.drain();
    await f;
    await sink.close();
  });

  it('a write that fails (ENOSPC from /dev/full) is a StorageError naming file and position, thrown by the next call and rejecting backpressure() and flush(); no unhandled rejection, no hang', async () => {
    const dir = freshDir();
    fs.mkdirSync(dir, { recursive: true });
    const full = join(dir, blockFileName('pc.ram'));
    symlinkSync('/dev/full', full);
    // /dev/full cannot be truncated (EINVAL): let the sink size it as if it could.
    const io: DirectorySinkFs = { ...nodeFsOps(), ftruncateSync: () => undefined };
    const sink = new DirectorySink(dir, { writeBytes: 4 * PAGE, maxInFlightBytes: 8 * PAGE, fs: io });
    sink.setBlocks(BLOCKS);
    sink.writePage('pc.bios', 0, pageOf(1)); // another file: fine
    sink.writePages('pc.ram', 8 * PAGE, 4, Buffer.alloc(4 * PAGE, 7), 0, PAGE); // a full slab: issued now
    const bp = sink.backpressure();
    expect(bp).toBeUndefined();
    // The failure arrives asynchronously; then every call reports it.
    await expect.poll(() => {
      try {
        sink.writePage('pc.bios', 0, pageOf(2));
        return undefined;
      } catch (e) {
        return e;
      }
    }).toBeInstanceOf(StorageError);
    let e: unknown;
    try {
      sink.zeroPages('pc.ram', 0, 2);
    } catch (x) {
      e = x;
    }
    expect(e).toBeInstanceOf(StorageError);
    expect(e).toMatchObject({ code: 'storage', kind: 'storage', operation: 'write', file: full, position: 8 * PAGE, errno: 'ENOSPC' });
    expect((e as Error).message).toMatch(/write of .*pc\.ram\.bin at byte 0x8000 failed: .*ENOSPC/);
    expect(() => sink.readPage('pc.ram', 0)).toThrow(StorageError);
    await expect(sink.backpressure()).rejects.toBe(e);
    await expect(sink.flush()).rejects.toBe(e);
    expect(sink.stats().fsyncs, 'flush still syncs what reached the files').toBe(BLOCKS.length);
    const me = MigrationError.from(e, 'postcopy');
    expect(me).toMatchObject({ code: 'storage', kind: 'storage', phase: 'postcopy', cause: e });
    await sink.close(); // does not reject for a failure flush() reported
  });

  it('a failure while backpressure() is pending rejects it; a block file that cannot be sized is a StorageError at setBlocks', async () => {
    const h = heldFs(() => 0.5);
    let fail = false;
    const io: DirectorySinkFs = {
      ...h.io,
      write: (fd, buf, off, len, pos, cb) => (fail ? setImmediate(() => cb(Object.assign(new Error('EIO: i/o error, write'), { code: 'EIO' }), 0)) : h.io.write(fd, buf, off, len, pos, cb)),
    };
    const sink = new DirectorySink(freshDir(), { writeBytes: 2 * PAGE, maxInFlightBytes: 4 * PAGE, fs: io });
    sink.setBlocks(BLOCKS);
    sink.writePages('pc.ram', 0, 12, Buffer.alloc(12 * PAGE, 3), 0, PAGE);
    const p = sink.backpressure()!;
    expect(p).toBeInstanceOf(Promise);
    fail = true;
    await h.drain(); // the held writes complete, the next ones fail
    await expect(p).rejects.toMatchObject({ code: 'storage', errno: 'EIO', operation: 'write' });
    await sink.close();

    const dir = freshDir();
    fs.mkdirSync(dir, { recursive: true });
    symlinkSync('/dev/full', join(dir, blockFileName('pc.ram')));
    const s2 = new DirectorySink(dir);
    expect(() => s2.setBlocks(BLOCKS)).toThrow(expect.objectContaining({ code: 'storage', operation: 'truncate' }));
    await s2.close();
  });

  it('bad runs are RangeErrors naming block and offset, before anything is written', async () => {
    const sink = new DirectorySink(freshDir());
    sink.setBlocks(BLOCKS);
    expect(() => sink.writePages('pc.bios', 0, 2, Buffer.alloc(2 * PAGE), 0, PAGE)).toThrow(/pc\.bios.*2 page\(s\) at offset 0x0/);
    expect(() => sink.writePages('pc.ram', 100, 1, Buffer.alloc(PAGE), 0, PAGE)).toThrow(RangeError);
    expect(() => sink.writePages('pc.ram', 0, 2, Buffer.alloc(PAGE + 10), 0, PAGE)).toThrow(/do not lie within the 4106 bytes/);
    expect(() => sink.zeroPages('pc.ram', 47 * PAGE, 2)).toThrow(RangeError);
    expect(() => sink.writePage('nope', 0, Buffer.alloc(PAGE))).toThrow(/unknown RAM block "nope"/);
    expect(sink.stats().bufferedBytes).toBe(0);
    await sink.flush();
    await sink.close();
  });

  it('close() after writes leaves no file descriptor and no handle open', async () => {
    const before = resourceSnapshot();
    const fds = readdirSync('/proc/self/fd').length;
    const sink = new DirectorySink(freshDir());
    sink.setBlocks(BLOCKS);
    expect(readdirSync('/proc/self/fd').length).toBe(fds + BLOCKS.length);
    for (let p = 0; p < 48; p++) sink.writePage('pc.ram', p * PAGE, pageOf(p));
    await sink.flush();
    await sink.close();
    expect(readdirSync('/proc/self/fd').length).toBe(fds);
    expect(await leftAfter(before, 500)).toEqual([]);
    expect(() => sink.writePage('pc.ram', 0, pageOf(0))).toThrow(/after close/);
  });
});

describe('DirectorySink under a DestinationSession', () => {
  const MiB = 1 << 20;
  function guest(bytes: number): InMemorySource {
    const buf = Buffer.alloc(bytes);
    // Data in every other page; the rest zero (ZERO records, sparse in the file).
    for (let off = 0; off < bytes; off += 2 * PAGE) pageOf(off / PAGE).copy(buf, off);
    return new InMemorySource(new Map([['pc.ram', buf]]));
  }

  it('a library migration into a DirectorySink: once done, the file equals the source memory byte for byte, nothing left open', async () => {
    const before = resourceSnapshot();
    const dir = freshDir();
    const sink = new DirectorySink(dir);
    const memory = guest(8 * MiB);
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink });
    const src = new SourceSession({ to: dst.uri, memory, machineType: 'pc-q35-10.0', devices: [] });
    src.start();
    await Promise.all([src.done, dst.done]);
    await sink.close();
    expect(readFileSync(join(dir, blockFileName('pc.ram'))).equals(memory.memory.get('pc.ram')!)).toBe(true);
    expect(sink.stats().writes, 'coalesced: far fewer writes than pages').toBeLessThan(8 * MiB / PAGE / 8);
    expect(await leftAfter(before, 4000)).toEqual([]);
  });

  it('XBZRLE into a DirectorySink: deltas apply to the pages as the sink holds them (staged, in flight or on disk); the file equals the source memory', async () => {
    const dir = freshDir();
    // Slow writes (each done 40 ms late): the deltas of the next pass find their pages still in flight.
    const io: DirectorySinkFs = { ...nodeFsOps(), write: (fd, b, o, l, p, cb) => void setTimeout(() => fs.write(fd, b, o, l, p, cb), 40) };
    const sink = new DirectorySink(dir, { fs: io, writeBytes: 64 * 1024 });
    const memory = guest(4 * MiB);
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink });
    const src = new SourceSession({ to: dst.uri, memory, machineType: 'pc-q35-10.0', devices: [], xbzrleCacheBytes: 8 * MiB, maxPasses: 3, downtimeLimitMs: 1, stopVm: () => undefined });
    // After each pass the guest changes a few bytes of many data pages: the next pass sends them as XBZRLE.
    let round = 0;
    src.on('pass', () => {
      round++;
      for (let off = 0; off < 4 * MiB; off += 8 * PAGE) memory.write('pc.ram', off + 100 + round, Buffer.from([round, 0xaa ^ round]));
    });
    src.start();
    const [stats] = await Promise.all([src.done, dst.done]);
    await sink.close();
    expect(stats.xbzrle, 'XBZRLE pages sent').toBeGreaterThan(0);
    expect(readFileSync(join(dir, blockFileName('pc.ram'))).equals(memory.memory.get('pc.ram')!)).toBe(true);
  });

  it('disk full under a DestinationSession: done rejects with MigrationError storage whose cause names the file; no hang, nothing left open', async () => {
    const before = resourceSnapshot();
    let written = 0;
    const io: DirectorySinkFs = {
      ...nodeFsOps(),
      write: (fd, b, o, l, p, cb) => {
        if (written + l > 2 * MiB) return setImmediate(() => cb(Object.assign(new Error('ENOSPC: no space left on device, write'), { code: 'ENOSPC' }), 0));
        written += l;
        fs.write(fd, b, o, l, p, cb);
      },
    };
    const sink = new DirectorySink(freshDir(), { fs: io });
    // One thread: the sink's own writes go through `io` (with threads each worker writes: directory-sink-threads.test.ts).
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, threads: 'off' });
    const src = new SourceSession({ to: dst.uri, memory: guest(16 * MiB), machineType: 'pc-q35-10.0', devices: [] });
    src.start();
    const e = await rejection(dst.done);
    expect(e).toBeInstanceOf(MigrationError);
    expect(e).toMatchObject({ code: 'storage', kind: 'storage' });
    expect(e.cause).toBeInstanceOf(StorageError);
    expect((e.cause as StorageError).file).toMatch(/pc\.ram\.bin$/);
    expect(e.message).toMatch(/write of .*pc\.ram\.bin at byte 0x[0-9a-f]+ failed: ENOSPC/);
    await src.done.catch(() => undefined);
    await sink.close();
    expect(await leftAfter(before, 4000)).toEqual([]);
  });
});

function nodeFsOps(): DirectorySinkFs {
  return {
    openSync: (p, f) => fs.openSync(p, f),
    ftruncateSync: (fd, l) => fs.ftruncateSync(fd, l),
    readSync: (fd, b, o, l, p) => fs.readSync(fd, b, o, l, p),
    write: (fd, b, o, l, p, cb) => fs.write(fd, b, o, l, p, cb),
    fsync: (fd, cb) => fs.fsync(fd, cb),
    close: (fd, cb) => fs.close(fd, cb),
  };
}
