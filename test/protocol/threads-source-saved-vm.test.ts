/**
 * A SavedVmSource (the directory `qmt receive` writes) sent with `threads`:
 * each channel's worker reads the pages it sends from the block files itself
 * (positioned reads of runs), the caller's thread reads none. Library to
 * library: precopy, postcopy at once with preempt (plain and TLS), multifd;
 * RAM bit for bit, every page read exactly once (a page is sent once, by the
 * thread that claimed it); a read that fails in a worker ends the migration
 * typed (storage, in postcopy too) with nothing left alive; and memory that
 * does not grow with the guest (1 GiB sent, RSS grows by a few MiB).
 */
import * as fs from 'node:fs';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DestinationSession, type DestinationResult } from '../../src/protocol/destination.js';
import { blockFileName } from '../../src/protocol/directory-sink.js';
import { MigrationError, StorageError } from '../../src/protocol/errors.js';
import { InMemorySink, type GuestMemorySink } from '../../src/protocol/memory.js';
import type { PostcopyPolicy } from '../../src/protocol/postcopy-policy.js';
import { SavedVmSource, type SavedVmSourceFs } from '../../src/protocol/saved-vm-source.js';
import { SourceSession, type SourceStats } from '../../src/protocol/source.js';
import type { RamBlockInfo } from '../../src/stream/records.js';
import { initPkiDir } from '../../src/transport/pki.js';
import { socketTransferSupported } from '../../src/transport/worker/support.js';
import { leftAfter, resourceSnapshot } from '../support/resources.js';
import { pattern, writeTestSavedVm, type TestBlock } from '../support/saved-vm.js';

const PAGE = 4096;
const MiB = 1 << 20;
const RAM = 24 * MiB;
const BIOS = 256 * 1024;

const root = mkdtempSync(join(tmpdir(), 'qmt-threads-saved-'));
let pkiDir: string;
let dirs = 0;
afterAll(() => rmSync(root, { recursive: true, force: true }));

async function waitFor<T>(f: () => T | undefined, ms = 10_000): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = f();
    if (v !== undefined) return v;
    if (Date.now() > deadline) throw new Error(`not within ${ms} ms`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

function savedVm(blocks: TestBlock[]): string {
  return writeTestSavedVm(join(root, `vm${dirs++}`), blocks);
}

/** A guest's RAM: data in two of every three pages (the rest zero), a BIOS block of data. */
function guestRam(): { ram: Buffer; bios: Buffer } {
  const ram = pattern(RAM, 3);
  for (let p = 0; p < RAM; p += 3 * PAGE) ram.fill(0, p, p + PAGE);
  return { ram, bios: pattern(BIOS, 9) };
}

/** Once the destination runs, it touches pc.ram from the top down (against the background stream), four faults in flight. */
function faultTopDown(dst: DestinationSession): { faults: () => number } {
  let n = 0;
  dst.once('postcopy-run', () => {
    void (async () => {
      const inFlight = new Set<Promise<unknown>>();
      for (let off = RAM - PAGE; off >= 0; off -= 5 * PAGE) {
        if (dst.hasPage('pc.ram', off)) continue;
        const st = dst.stats().status;
        if (st === 'completed' || st === 'failed') break;
        n++;
        const p: Promise<unknown> = dst.requestPage('pc.ram', off).catch(() => undefined);
        inFlight.add(p);
        void p.then(() => inFlight.delete(p));
        if (inFlight.size >= 4) await Promise.race(inFlight);
      }
    })();
  });
  return { faults: () => n };
}

interface Run {
  stats: SourceStats;
  result: DestinationResult;
  sink: InMemorySink;
  saved: SavedVmSource;
  faults: number;
}

async function send(dir: string, o: { policy: PostcopyPolicy; preempt: boolean; tls?: boolean; multifd?: number }): Promise<Run> {
  const postcopy = o.policy !== 'never';
  const sink = new InMemorySink();
  const tls = o.tls ? { tls: { dir: pkiDir } } : undefined;
  const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, postcopy, idleTimeoutMs: 20_000, ...(o.multifd ? { multifd: { channels: o.multifd } } : {}), ...(tls ? { transport: tls } : {}) });
  const faulting = postcopy ? faultTopDown(dst) : { faults: () => 0 };
  const saved = await SavedVmSource.open(dir);
  try {
    const src = new SourceSession({
      to: dst.uri,
      memory: saved,
      machineType: 'pc-q35-10.0',
      devices: [],
      postcopy: o.policy,
      preempt: o.preempt,
      threads: 'on',
      ...(o.multifd ? { multifd: { channels: o.multifd } } : {}),
      ...(o.tls ? { transport: { tls: { dir: pkiDir, hostname: 'localhost' } } } : {}),
      // Slow enough in postcopy that the destination's faults come before the background stream has everything.
      ...(postcopy ? { postcopyBandwidthLimit: 24 * MiB } : {}),
    });
    src.start();
    const [stats, result] = await Promise.all([src.done, dst.done]);
    return { stats, result, sink, saved, faults: faulting.faults() };
  } finally {
    saved.close();
    await saved.whenClosed();
    dst.close();
  }
}

function expectSame(r: Run, want: ReadonlyMap<string, Buffer>): void {
  expect(r.stats.status).toBe('completed');
  expect(r.result.complete).toBe(true);
  for (const [name, mem] of want) {
    const got = r.sink.blocks.get(name)!;
    let at = -1;
    for (let off = 0; off < mem.length && at < 0; off += PAGE) if (mem.compare(got, off, off + PAGE, off, off + PAGE) !== 0) at = off;
    expect(at, `${name}: first differing page at +0x${at.toString(16)}`).toBe(-1);
  }
}

/** What the threads read of the files: every page once, by whichever thread sent it; the caller's thread none. */
function expectReadOnce(r: Run, total: number): void {
  const t = r.stats.threads!;
  expect(t.used).toBe(true);
  expect(t.why).toMatch(/reads the pages it sends from the block files/);
  const bytes = t.channels.reduce((s, c) => s + (c.reads?.bytes ?? 0), 0);
  expect(bytes, JSON.stringify(t.channels)).toBe(total);
  // The bulk reads runs of pages (a request, on preempt, is one page: read alone). In postcopy the runs are
  // shorter: 16-page batches, and the pages the preempt thread took (every 5th near the top here) cut them.
  for (const c of t.channels) if (c.reads && c.role !== 'preempt') expect(c.reads.reads, `${c.role}: reads are of runs, not of pages`).toBeLessThanOrEqual(Math.max(1, c.reads.bytes / PAGE / 3));
  expect(r.saved.stats().bytesRead, "the caller's thread read nothing").toBe(0);
  for (const c of t.channels) expect(c.ended).toBe('by-itself');
}

describe.skipIf(!socketTransferSupported())('a saved VM sent with threads: each channel reads its pages from the files (Node 26.6+)', () => {
  let dir: string;
  let want: Map<string, Buffer>;

  beforeAll(async () => {
    const { ram, bios } = guestRam();
    want = new Map([
      ['pc.ram', ram],
      ['pc.bios', bios],
    ]);
    dir = savedVm([
      { idstr: 'pc.ram', data: ram },
      { idstr: 'pc.bios', data: bios },
    ]);
    pkiDir = join(root, 'pki');
    await initPkiDir(pkiDir);
  });

  it('precopy: RAM bit for bit; the main thread read every page once, in runs', async () => {
    const before = resourceSnapshot();
    const r = await send(dir, { policy: 'never', preempt: false });
    expectSame(r, want);
    expect(r.stats.threads!.channels.map((c) => c.role)).toEqual(['main']);
    expectReadOnce(r, RAM + BIOS);
    // Precopy reads whole batches of 64 pages (a block's last may be shorter).
    expect(r.stats.threads!.channels[0]!.reads!.reads).toBeLessThanOrEqual((RAM + BIOS) / PAGE / 64 + 2);
    console.log(`[threads-saved-vm] precopy: ${JSON.stringify(r.stats.threads!.channels)}`);
    expect(await leftAfter(before, 2000)).toEqual([]);
  });

  it.each([false, true])('postcopy at once with preempt (tls %s): RAM bit for bit; requests read and sent by the preempt thread; every page read once', async (tls) => {
    const before = resourceSnapshot();
    const r = await send(dir, { policy: { afterPasses: 0 }, preempt: true, tls });
    expectSame(r, want);
    expect(r.result.postcopy).toBe(true);
    expect(r.faults, 'the destination faulted').toBeGreaterThan(10);
    const reasons = r.stats['requests-answered'];
    expect(reasons.preempt, JSON.stringify(reasons)).toBeGreaterThan(0);
    expect(reasons['main-no-preempt']).toBe(0);
    const preempt = r.stats.threads!.channels.find((c) => c.role === 'preempt')!;
    expect(preempt.reads?.bytes, 'the preempt thread read the pages it answered').toBeGreaterThan(0);
    expectReadOnce(r, RAM + BIOS);
    if (tls) expect(r.stats.channels.preempt?.tls?.protocol).toBe('TLSv1.3');
    console.log(`[threads-saved-vm] postcopy+preempt tls ${tls}: requests ${r.stats['postcopy-requests']} ${JSON.stringify(reasons)}, latency p50 ${r.stats['postcopy-latency'].p50} µs; ${JSON.stringify(r.stats.threads!.channels)}`);
    expect(await leftAfter(before, 2000)).toEqual([]);
  });

  it('postcopy at once without preempt: requests read by the main thread, answered inside its stream; RAM bit for bit', async () => {
    const r = await send(dir, { policy: { afterPasses: 0 }, preempt: false });
    expectSame(r, want);
    expect(r.stats['requests-answered']['main-no-preempt'] + r.stats['requests-answered']['main-in-flight']).toBeGreaterThan(0);
    expectReadOnce(r, RAM + BIOS);
  });

  it('multifd, 2 channels: each multifd thread reads its chunks; RAM bit for bit', async () => {
    const r = await send(dir, { policy: 'never', preempt: false, multifd: 2 });
    expectSame(r, want);
    const mf = r.stats.threads!.channels.filter((c) => c.role === 'multifd');
    expect(mf).toHaveLength(2);
    for (const c of mf) expect(c.reads?.bytes, JSON.stringify(c)).toBeGreaterThan(0);
    expectReadOnce(r, RAM + BIOS);
  });

  it.each([
    ['precopy', 'never'],
    ['postcopy', { afterPasses: 0 }],
  ] as const)('a read that fails in a worker (%s): the migration fails typed (storage, naming the file), nothing left alive', async (_, policy) => {
    const before = resourceSnapshot();
    // pc.ram's descriptor is a directory's: every read of it fails with EISDIR (through the source's fs seam).
    const io: SavedVmSourceFs = {
      openSync: (p, f) => fs.openSync(p.endsWith(blockFileName('pc.ram')) ? root : p, f),
      readSync: (fd, b, o, l, p) => fs.readSync(fd, b, o, l, p),
      read: (fd, b, o, l, p, cb) => fs.read(fd, b, o, l, p, cb),
      close: (fd, cb) => fs.close(fd, cb),
    };
    const saved = await SavedVmSource.open(dir, { fs: io });
    const sink = new InMemorySink();
    const postcopy = policy !== 'never';
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, postcopy, idleTimeoutMs: 20_000 });
    const src = new SourceSession({ to: dst.uri, memory: saved, machineType: 'pc-q35-10.0', devices: [], postcopy: policy, preempt: postcopy, threads: 'on' });
    src.start();
    const e = await src.done.then(
      () => undefined,
      (x: unknown) => x,
    );
    // The destination's link went down in postcopy: it pauses, waiting for a recovery that will not come.
    if (postcopy) await waitFor(() => (dst.stats().status === 'postcopy-paused' ? true : undefined));
    dst.close();
    await dst.done.catch(() => undefined);
    saved.close();
    await saved.whenClosed();
    expect(e).toBeInstanceOf(MigrationError);
    const err = e as MigrationError;
    expect(err.code).toBe('storage');
    expect(err.kind).toBe('storage');
    expect(err.phase).toBe(postcopy ? 'postcopy' : 'precopy');
    expect(err.cause).toBeInstanceOf(StorageError);
    expect(err.cause).toMatchObject({ operation: 'read', errno: 'EISDIR' });
    expect((err.cause as StorageError).file).toMatch(/pc\.ram\.bin$/);
    expect(src.stats().status).toBe('failed');
    // Every channel thread ends (by itself, or terminated after its grace).
    const threads = await waitFor(() => {
      const t = src.stats().threads!;
      return t.channels.length > 0 && t.channels.every((c) => c.ended !== undefined) ? t : undefined;
    });
    expect(threads.channels.map((c) => c.role)).toContain('main');
    expect(await leftAfter(before, 4000)).toEqual([]);
  });
});

/** A sink that keeps nothing: it checks the pages that hold data against their pattern and counts the rest. */
class CheckingSink implements GuestMemorySink {
  zero = 0;
  data: number[] = [];
  bad = 0;
  setBlocks(_: readonly RamBlockInfo[]): void {}
  writePage(block: string, offset: number, d: Uint8Array): void {
    this.writePages(block, offset, 1, d, 0, PAGE);
  }
  writePages(_block: string, offset: number, count: number, d: Uint8Array, start: number, stride: number): void {
    for (let i = 0; i < count; i++) {
      const p = offset / PAGE + i;
      this.data.push(p);
      if (!pattern(PAGE, p).equals(Buffer.from(d.buffer, d.byteOffset + start + i * stride, PAGE))) this.bad++;
    }
  }
  zeroPage(): void {
    this.zero++;
  }
  zeroPages(_b: string, _o: number, count: number): void {
    this.zero += count;
  }
  readPage(): Uint8Array {
    throw new Error('not kept');
  }
  async flush(): Promise<void> {}
  async close(): Promise<void> {}
}

describe.skipIf(!socketTransferSupported())('a saved VM sent with threads: memory does not grow with the guest', () => {
  it('1 GiB sparse saved VM, precopy with threads: every page read by the main thread; RSS grows by far less than the guest', async () => {
    const length = 1024 * MiB;
    const pokes = [0, 1, 77_777, length / PAGE - 1];
    const dir = savedVm([{ idstr: 'pc.ram', length, pokes }]);
    const saved = await SavedVmSource.open(dir);
    const sink = new CheckingSink();
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, idleTimeoutMs: 60_000 });
    global.gc?.();
    const rss0 = process.memoryUsage().rss;
    let peak = rss0;
    const sampler = setInterval(() => (peak = Math.max(peak, process.memoryUsage().rss)), 20);
    try {
      const src = new SourceSession({ to: dst.uri, memory: saved, machineType: 'pc-q35-10.0', devices: [], threads: 'on' });
      src.start();
      const [stats] = await Promise.all([src.done, dst.done]);
      peak = Math.max(peak, process.memoryUsage().rss);
      const main = stats.threads!.channels[0]!;
      console.log(`[threads-saved-vm] 1 GiB: RSS +${((peak - rss0) / MiB).toFixed(1)} MiB, ${stats['total-time']} ms, main ${JSON.stringify(main)}`);
      expect(stats.status).toBe('completed');
      expect(sink.data.sort((a, b) => a - b)).toEqual(pokes);
      expect(sink.bad).toBe(0);
      expect(sink.zero).toBe(length / PAGE - pokes.length);
      expect(main.reads?.bytes).toBe(length);
      expect(saved.stats().bytesRead).toBe(0);
      expect(peak - rss0, `RSS grew ${((peak - rss0) / MiB).toFixed(1)} MiB sending a 1 GiB guest`).toBeLessThan(64 * MiB);
    } finally {
      clearInterval(sampler);
      saved.close();
      dst.close();
    }
  }, 180_000);
});
