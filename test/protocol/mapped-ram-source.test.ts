/**
 * QEMU's mapped-ram file as a migration source (SavedVmSource.fromMappedRam):
 * pages are read at their slots, a page whose bit is clear is zero without
 * being read — even when its slot holds old bytes, as QEMU leaves them when
 * a page it wrote in one pass is zero in a later one — and a run with no
 * page present reads nothing. On one thread and with threads (each channel's
 * worker reads its pages in the file), precopy and postcopy at once with
 * preempt: the destination's RAM is the file's, bit for bit.
 */
import { mkdtempSync, openSync, rmSync, writeFileSync, writeSync, closeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DestinationSession } from '../../src/protocol/destination.js';
import { MappedRamFile, type MappedRamBlock } from '../../src/protocol/mapped-ram-file.js';
import { MappedRamSink } from '../../src/protocol/mapped-ram-sink.js';
import { InMemorySink } from '../../src/protocol/memory.js';
import type { PostcopyPolicy } from '../../src/protocol/postcopy-policy.js';
import { SavedVmSource } from '../../src/protocol/saved-vm-source.js';
import { SourceSession } from '../../src/protocol/source.js';
import { socketTransferSupported } from '../../src/transport/worker/support.js';
import { loadMappedRam } from '../stream/mapped-ram-fixtures.js';

const PAGE = 4096;
const MiB = 1 << 20;
const root = mkdtempSync(join(tmpdir(), 'qmt-mr-source-'));
afterAll(() => rmSync(root, { recursive: true, force: true }));

let path: string;
let file: MappedRamFile;
/** Every block's RAM as the file defines it: a present page's slot, zeros for the rest. */
const want = new Map<string, Buffer>();
/** Pages of pc.ram whose bit is clear and whose slot holds old bytes (written below). */
const stale: number[] = [];
let presentBytes = 0;

function pcRam(): MappedRamBlock {
  return file.blocks.find((b) => b.idstr === 'pc.ram')!;
}

beforeAll(async () => {
  const capture = loadMappedRam('mapped-ram-running');
  path = join(root, 'vm.mapped-ram');
  writeFileSync(path, capture.bytes);
  file = await MappedRamFile.open(path);
  const ram = pcRam();
  // Old bytes in the slots of some absent pages: two alone, and a run of four next to a present page.
  const firstSet = ram.present.next(0);
  const absent = [ram.present.nextClear(0), ram.present.nextClear(firstSet)];
  const afterRun = ram.present.nextClear(firstSet);
  for (let p = afterRun; p < afterRun + 4; p++) if (!ram.present.has(p)) absent.push(p);
  const fd = openSync(path, 'r+');
  for (const p of new Set(absent)) {
    writeSync(fd, Buffer.alloc(PAGE, 0xa5), 0, PAGE, ram.header.pagesOffset + p * PAGE);
    stale.push(p);
  }
  closeSync(fd);
  for (const b of file.blocks) {
    const mem = Buffer.alloc(b.length);
    for (let p = b.present.next(0); p >= 0; p = b.present.next(p + 1)) {
      capture.bytes.copy(mem, p * PAGE, b.header.pagesOffset + p * PAGE, b.header.pagesOffset + (p + 1) * PAGE);
      presentBytes += PAGE;
    }
    want.set(b.idstr, mem);
  }
  await file.close();
  expect(stale.length).toBeGreaterThanOrEqual(4);
});

function firstDifference(a: Buffer, b: Uint8Array): number {
  for (let off = 0; off < a.length; off += PAGE) if (a.compare(b, off, off + PAGE, off, off + PAGE) !== 0) return off;
  return -1;
}

describe('SavedVmSource.fromMappedRam', () => {
  it('reads runs equal to the file, absent pages zero even where their slot holds old bytes, and only the present spans', async () => {
    const src = SavedVmSource.fromMappedRam(path, file, { runBytes: MiB });
    try {
      expect(src.blocks().map((b) => b.idstr)).toEqual(file.blocks.map((b) => b.idstr));
      for (const b of file.blocks) {
        const got = Buffer.alloc(b.length);
        for (let off = 0; off < b.length; off += MiB) {
          const count = Math.min(MiB, b.length - off) / PAGE;
          got.set(await src.readPages(b.idstr, off, count), off);
        }
        const at = firstDifference(want.get(b.idstr)!, got);
        expect(at, `${b.idstr}: first differing page at +0x${at.toString(16)}`).toBe(-1);
      }
      const st = src.stats();
      // One descriptor for every block of the one file.
      expect(st.openFiles).toBe(1);
      // Present pages are read; of pc.ram's 32 MiB (247 pages present) the absent runs are not.
      expect(st.bytesRead).toBeGreaterThanOrEqual(presentBytes);
      expect(st.bytesRead, `${st.bytesRead} bytes read for ${presentBytes} present`).toBeLessThan(presentBytes + 4 * MiB);
    } finally {
      src.close();
      await src.whenClosed();
    }
    expect(src.stats().openFiles).toBe(0);
  });

  it('a postcopy request (one page, away from the scan) and readPage: a stale slot reads as zero', async () => {
    const src = SavedVmSource.fromMappedRam(path, file);
    try {
      for (const p of stale) {
        const v = await src.readPages('pc.ram', p * PAGE, 1);
        expect(Buffer.from(v).every((x) => x === 0), `page ${p}`).toBe(true);
        expect(src.readPage('pc.ram', p * PAGE).every((x) => x === 0), `readPage ${p}`).toBe(true);
      }
      const present = pcRam().present.next(0);
      expect(Buffer.compare(Buffer.from(await src.readPages('pc.ram', present * PAGE, 1)), want.get('pc.ram')!.subarray(present * PAGE, (present + 1) * PAGE))).toBe(0);
    } finally {
      src.close();
      await src.whenClosed();
    }
  });

  const CASES: { threads: 'on' | 'off'; policy: PostcopyPolicy; preempt: boolean }[] = [
    { threads: 'off', policy: 'never', preempt: false },
    { threads: 'off', policy: { afterPasses: 0 }, preempt: true },
    ...(socketTransferSupported()
      ? ([
          { threads: 'on', policy: 'never', preempt: false },
          { threads: 'on', policy: { afterPasses: 0 }, preempt: true },
        ] as const)
      : []),
  ];
  it.each(CASES)('sent with threads $threads, postcopy $policy, preempt $preempt: the destination has the file’s RAM bit for bit', async (c) => {
    const postcopy = c.policy !== 'never';
    const sink = new InMemorySink();
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, postcopy, idleTimeoutMs: 20_000 });
    // Postcopy: the destination asks for the stale pages and a present one first, against the background stream.
    let asked = 0;
    if (postcopy) {
      dst.once('postcopy-run', () => {
        for (const p of [...stale, pcRam().present.next(0)]) {
          if (dst.hasPage('pc.ram', p * PAGE)) continue;
          asked++;
          void dst.requestPage('pc.ram', p * PAGE).catch(() => undefined);
        }
      });
    }
    const src = SavedVmSource.fromMappedRam(path, file);
    try {
      const session = new SourceSession({
        to: dst.uri,
        memory: src,
        machineType: file.configuration!.machineType,
        devices: [],
        postcopy: c.policy,
        preempt: c.preempt,
        threads: c.threads,
        ...(postcopy ? { postcopyBandwidthLimit: 8 * MiB } : {}),
      });
      session.start();
      const [stats, result] = await Promise.all([session.done, dst.done]);
      expect(stats.status).toBe('completed');
      expect(result.complete).toBe(true);
      expect(stats.threads?.used ?? false).toBe(c.threads === 'on');
      if (postcopy) expect(asked, 'pages asked for in postcopy').toBeGreaterThan(0);
      for (const [name, mem] of want) {
        const at = firstDifference(mem, sink.blocks.get(name)!);
        expect(at, `${name}: first differing page at +0x${at.toString(16)}`).toBe(-1);
      }
      // Every page but the present ones went as a zero page.
      expect(stats.normal).toBe(presentBytes / PAGE);
    } finally {
      src.close();
      await src.whenClosed();
      dst.close();
    }
  });
});

describe('a 1 GiB mapped-ram file sent: memory does not grow with the guest, absent pages are not read', () => {
  const length = 1024 * MiB;
  const pokes = [0, 1, 77_777, length / PAGE - 1];
  let big: string;
  let bigFile: MappedRamFile;
  beforeAll(async () => {
    // Written by the library's sink, as qmt receive --format mapped-ram writes it: 4 pages present of 262 144.
    big = join(root, 'big.mapped-ram');
    const sink = new MappedRamSink(big);
    sink.setBlocks([{ idstr: 'pc.ram', length }]);
    for (const p of pokes) sink.writePage('pc.ram', p * PAGE, Buffer.alloc(PAGE, (p % 250) + 1));
    const summary = await sink.finish({ complete: true, configuration: { type: 'configuration', machineType: 'pc-q35-10.0', capabilities: ['mapped-ram'] }, machineType: 'pc-q35-10.0', devices: [], vmdesc: undefined });
    await sink.close();
    expect(summary.complete).toBe(true);
    bigFile = await MappedRamFile.open(big);
    await bigFile.close();
  });

  const modes = socketTransferSupported() ? (['off', 'on'] as const) : (['off'] as const);
  it.each(modes)('precopy with threads %s: RSS grows by far less than the guest, the 4 present pages are all that is read', async (threads) => {
    const sink = new InMemorySink();
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, idleTimeoutMs: 60_000 });
    const src = SavedVmSource.fromMappedRam(big, bigFile);
    // The sink's 1 GiB is zero-filled memory the kernel commits only where a page lands (4 pages):
    // what RSS gains is the source's buffers and the sessions'.
    global.gc?.();
    const rss0 = process.memoryUsage().rss;
    let peak = rss0;
    const sampler = setInterval(() => (peak = Math.max(peak, process.memoryUsage().rss)), 20);
    try {
      const session = new SourceSession({ to: dst.uri, memory: src, machineType: 'pc-q35-10.0', devices: [], threads });
      session.start();
      const [stats] = await Promise.all([session.done, dst.done]);
      expect(stats.status).toBe('completed');
      const got = sink.blocks.get('pc.ram')!;
      for (const p of pokes) expect(got[p * PAGE], `page ${p}`).toBe((p % 250) + 1);
      expect(stats.normal).toBe(pokes.length);
      // Read: the present pages, not the 1 GiB of holes.
      const read = threads === 'on' ? stats.threads!.channels.reduce((n, c) => n + (c.reads?.bytes ?? 0), 0) : src.stats().bytesRead;
      expect(read).toBe(pokes.length * PAGE);
      peak = Math.max(peak, process.memoryUsage().rss);
      console.log(`[mapped-ram-source] 1 GiB, threads ${threads}: ${read} bytes read, ${stats['total-time']} ms, RSS +${((peak - rss0) / MiB).toFixed(1)} MiB at most`);
      expect(peak - rss0, `RSS grew ${((peak - rss0) / MiB).toFixed(1)} MiB sending a 1 GiB guest`).toBeLessThan(64 * MiB);
    } finally {
      clearInterval(sampler);
      src.close();
      await src.whenClosed();
      dst.close();
    }
  }, 120_000);
});
