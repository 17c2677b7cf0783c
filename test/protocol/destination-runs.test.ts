/**
 * The destination's page path in runs, and the sink's backpressure.
 *
 * A scripted source (a raw socket) writes a precopy stream of consecutive
 * pages with CONTINUE, as QEMU does. The destination must land them as runs
 * (stats.runs: far fewer landings than pages), the same memory bit for bit
 * whether the sink takes runs or only pages; requests waiting for pages of a
 * run are resolved by it. A slow sink (its backpressure promise settles at a
 * simulated disk rate) must pause the socket (channel readPauses > 0) and
 * keep what the sink holds bounded; a sink whose backpressure rejects fails
 * the migration as `storage` — in postcopy too, not a pause.
 */
import { performance } from 'node:perf_hooks';
import { describe, expect, it } from 'vitest';
import {
  DestinationSession,
  InMemorySink,
  MigrationError,
  type GuestMemorySink,
  type StreamRecord,
} from '../../src/index.js';
import { syntheticRecords } from '../stream/synthetic.js';
import { scriptedSource } from '../support/scripted-source.js';

const PAGE = 4096;
const MiB = 1024 * 1024;
const RAM = { sectionId: 2, idstr: 'ram', instanceId: 0, versionId: 4 } as const;


/** Page i of the test stream: data in every page but every 16th (ZERO), a counter in its bytes. */
function pageOf(i: number): Buffer | undefined {
  if (i % 16 === 15) return undefined;
  const b = Buffer.alloc(PAGE, i & 0xff);
  b.writeUInt32LE(i, 0);
  b.writeUInt32LE((i ^ 0xa5a5a5a5) >>> 0, PAGE - 4);
  return b;
}

/** A whole precopy stream: one block of `pages` pages, all sent in one pass with CONTINUE, then EOF and the VM description. */
function precopyStream(pages: number): StreamRecord[] {
  const recs: StreamRecord[] = [
    { type: 'header', version: 3 },
    { type: 'configuration', machineType: 'pc-q35-10.0', capabilities: [] },
    { type: 'command', command: { cmd: 'open-return-path' } },
    { type: 'section', kind: 'start', ...RAM },
    { type: 'ram-blocks', total: pages * PAGE, blocks: [{ idstr: 'pc.ram', length: pages * PAGE }] },
    { type: 'ram-eos' },
    { type: 'footer', sectionId: 2 },
    { type: 'section', kind: 'part', ...RAM },
  ];
  for (let i = 0; i < pages; i++) {
    const data = pageOf(i);
    recs.push(data ? { type: 'ram-page', block: 'pc.ram', offset: i * PAGE, continued: i > 0, data } : { type: 'ram-zero', block: 'pc.ram', offset: i * PAGE, continued: i > 0 });
  }
  recs.push({ type: 'ram-eos' }, { type: 'footer', sectionId: 2 });
  recs.push({ type: 'section', kind: 'end', ...RAM }, { type: 'ram-eos' }, { type: 'footer', sectionId: 2 });
  recs.push({ type: 'eof' }, { type: 'vmdesc', json: new TextEncoder().encode(JSON.stringify({ page_size: PAGE, devices: [] })) });
  return recs;
}

function expectRam(sink: InMemorySink, pages: number): void {
  const ram = sink.blocks.get('pc.ram')!;
  expect(ram.length).toBe(pages * PAGE);
  for (let i = 0; i < pages; i++) {
    const want = pageOf(i) ?? Buffer.alloc(PAGE);
    if (!ram.subarray(i * PAGE, (i + 1) * PAGE).equals(want)) throw new Error(`page ${i} differs`);
  }
}

/** InMemorySink without writePages/zeroPages (a third-party sink of before): pages one by one. */
class PagesOnlySink implements GuestMemorySink {
  readonly inner = new InMemorySink();
  writes = 0;
  setBlocks(b: Parameters<GuestMemorySink['setBlocks']>[0]) {
    this.inner.setBlocks(b);
  }
  writePage(block: string, offset: number, data: Uint8Array) {
    this.writes++;
    this.inner.writePage(block, offset, data);
  }
  zeroPage(block: string, offset: number) {
    this.inner.zeroPage(block, offset);
  }
  readPage(block: string, offset: number) {
    return this.inner.readPage(block, offset);
  }
  async flush() {}
  async close() {}
}

/**
 * A sink with a disk of `bytesPerSecond`: what it is given is "in flight"
 * until the disk has written it; above `bound` bytes in flight backpressure()
 * returns a promise that settles when the disk is back under it.
 */
class SlowSink extends InMemorySink {
  private inFlight = 0;
  private at = performance.now();
  maxInFlight = 0;
  pauses = 0;
  constructor(
    private readonly bound: number,
    private readonly bytesPerSecond: number,
  ) {
    super();
  }
  private drain(): void {
    const now = performance.now();
    this.inFlight = Math.max(0, this.inFlight - ((now - this.at) / 1000) * this.bytesPerSecond);
    this.at = now;
  }
  private add(bytes: number): void {
    this.drain();
    this.inFlight += bytes;
    this.maxInFlight = Math.max(this.maxInFlight, this.inFlight);
  }
  override writePages(block: string, offset: number, count: number, data: Uint8Array, start: number, stride: number): void {
    super.writePages(block, offset, count, data, start, stride);
    this.add(count * PAGE);
  }
  override writePage(block: string, offset: number, data: Uint8Array): void {
    super.writePage(block, offset, data);
    this.add(PAGE);
  }
  pressure(): Promise<void> | undefined {
    this.drain();
    if (this.inFlight <= this.bound) return undefined;
    this.pauses++;
    const ms = ((this.inFlight - this.bound) / this.bytesPerSecond) * 1000;
    return new Promise((r) => setTimeout(r, ms));
  }
}

/** Replaces the sink's backpressure (InMemorySink never has any). */
function withBackpressure(sink: GuestMemorySink, bp: () => Promise<void> | undefined): void {
  sink.backpressure = bp;
}

describe('DestinationSession: pages in runs', () => {
  it('a precopy pass of consecutive pages lands in runs, memory bit for bit; a sink without writePages gets the same memory page by page', async () => {
    const pages = 2048;
    const records = precopyStream(pages);
    for (const kind of ['runs', 'pages-only'] as const) {
      const runsSink = new InMemorySink();
      const pagesSink = new PagesOnlySink();
      const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink: kind === 'runs' ? runsSink : pagesSink });
      const src = await scriptedSource(dst.uri);
      src.write(records);
      const result = await dst.done;
      await src.waitFor((m) => m.some((x) => x.type === 'shut'));
      expect(src.messages.at(-1)).toEqual({ type: 'shut', value: 0 });
      expect(result.complete).toBe(true);
      expectRam(kind === 'runs' ? runsSink : pagesSink.inner, pages);
      const s = result.stats;
      expect(s.normal + s.duplicate).toBe(pages);
      expect(s.duplicate).toBe(pages / 16);
      expect(s.runs.pages).toBe(pages);
      // Runs end at ZERO/PAGE changes (every 16th page) and at chunk ends: far fewer than the pages.
      expect(s.runs.count).toBeLessThan(pages / 4);
      if (kind === 'pages-only') expect(pagesSink.writes).toBe(s.normal);
      src.sock.destroy();
    }
  });

  it('postcopy: requests waiting for pages of a run are resolved by it, on the channel it came on', async () => {
    const sink = new InMemorySink();
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, postcopy: true });
    const src = await scriptedSource(dst.uri);
    const all = syntheticRecords(8, { postcopy: true, pagesPerPass: 2 });
    const ping4 = all.findIndex((r) => r.type === 'package-end') + 1;
    src.write(all.slice(0, ping4 + 1));
    await new Promise<void>((r) => dst.once('postcopy-run', () => r()));
    // Two missing pages inside one run, one missing page outside it.
    const missing = [...Array(64).keys()].filter((p) => !dst.hasPage('pc.ram', p * PAGE));
    expect(missing.length).toBeGreaterThan(3);
    const inRun = missing.slice(0, 2);
    const outside = missing.at(-1)!;
    const waits = inRun.map((p) => dst.requestPage('pc.ram', p * PAGE));
    const later = dst.requestPage('pc.ram', outside * PAGE);
    await src.waitFor((m) => m.filter((x) => x.type === 'req-pages' || x.type === 'req-pages-id').length === 3);
    const run: StreamRecord[] = [];
    for (let p = inRun[0]!; p <= inRun[1]!; p++) run.push({ type: 'ram-page', block: 'pc.ram', offset: p * PAGE, continued: p > inRun[0]!, data: Buffer.alloc(PAGE, p) });
    src.write([{ type: 'section', kind: 'part', ...RAM }, ...run, { type: 'ram-eos' }, { type: 'footer', sectionId: 2 }]);
    const got = await Promise.all(waits);
    for (const [i, r] of got.entries()) expect(r).toMatchObject({ requested: true, channel: 'main', offset: inRun[i]! * PAGE });
    expect(dst.hasPage('pc.ram', outside * PAGE)).toBe(false);
    // The rest, then the end: the last request is answered by it.
    const rest: StreamRecord[] = [];
    for (const [block, size] of [['pc.ram', 64], ['/rom@etc/acpi/tables', 4]] as const) {
      for (let p = 0; p < size; p++) if (!dst.hasPage(block, p * PAGE)) rest.push({ type: 'ram-zero', block, offset: p * PAGE, continued: false });
    }
    src.write([
      { type: 'section', kind: 'part', ...RAM },
      ...rest,
      { type: 'ram-eos' },
      { type: 'footer', sectionId: 2 },
      { type: 'section', kind: 'end', ...RAM },
      { type: 'ram-eos' },
      { type: 'footer', sectionId: 2 },
      { type: 'eof' },
    ]);
    await expect(later).resolves.toMatchObject({ requested: true, channel: 'main', offset: outside * PAGE });
    const result = await dst.done;
    expect(result.complete).toBe(true);
    expect(result.stats['placed-twice']).toBe(0);
    for (const p of inRun) expect(sink.blocks.get('pc.ram')![p * PAGE]).toBe(p & 0xff);
    src.sock.destroy();
  });
});

describe('DestinationSession: backpressure from the sink', () => {
  it('a sink slower than the network pauses the socket; what it holds stays bounded; the migration completes bit for bit', async () => {
    const pages = 4096; // 16 MiB
    const bound = MiB;
    const sink = new SlowSink(bound, 16 * MiB);
    withBackpressure(sink, () => sink.pressure());
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink });
    const src = await scriptedSource(dst.uri);
    src.write(precopyStream(pages));
    const result = await dst.done;
    expect(result.complete).toBe(true);
    expectRam(sink, pages);
    expect(sink.pauses).toBeGreaterThan(0);
    expect(result.stats['sink-waits']).toBe(sink.pauses);
    expect(result.stats.channels.main!.readPauses).toBeGreaterThan(0);
    // Over the bound only by what one chunk of the socket carries (≤ 64 KiB here), never by the backlog.
    expect(sink.maxInFlight).toBeLessThan(bound + MiB);
    src.sock.destroy();
  }, 30_000);

  it('a sink whose backpressure rejects fails the migration as storage, SHUT 1', async () => {
    const sink = new InMemorySink();
    const disk = Object.assign(new Error('no space left on device'), { code: 'ENOSPC' });
    let calls = 0;
    withBackpressure(sink, () => (++calls === 2 ? Promise.reject(disk) : undefined));
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink });
    const src = await scriptedSource(dst.uri);
    // Two writes: two chunks at least, so that the second chunk's backpressure fails.
    const records = precopyStream(256);
    const split = records.findIndex((r) => r.type === 'ram-page' && r.offset === 128 * PAGE);
    src.write(records.slice(0, split));
    await new Promise((r) => setTimeout(r, 100));
    src.write(records.slice(split));
    const err = await dst.done.then(
      () => undefined,
      (e: unknown) => e as MigrationError,
    );
    expect(err).toBeInstanceOf(MigrationError);
    expect(err).toMatchObject({ code: 'storage', kind: 'storage' });
    expect(err!.message).toMatch(/no space left/);
    await src.waitFor((m) => m.some((x) => x.type === 'shut'));
    expect(src.messages.at(-1)).toEqual({ type: 'shut', value: 1 });
    expect(dst.stats().status).toBe('failed');
    src.sock.destroy();
  });

  it('postcopy: a storage failure while the VM runs here fails the migration, it does not pause', async () => {
    const sink = new InMemorySink();
    let failing = false;
    withBackpressure(sink, () => (failing ? Promise.reject(new MigrationError('storage', 'postcopy', 'disk gone')) : undefined));
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, postcopy: true });
    let paused = false;
    dst.on('paused', () => (paused = true));
    const src = await scriptedSource(dst.uri);
    const all = syntheticRecords(3, { postcopy: true, pagesPerPass: 2 });
    const ping4 = all.findIndex((r) => r.type === 'package-end') + 1;
    src.write(all.slice(0, ping4 + 1));
    await new Promise<void>((r) => dst.once('postcopy-run', () => r()));
    failing = true;
    src.write(all.slice(ping4 + 1, ping4 + 4));
    await expect(dst.done).rejects.toMatchObject({ code: 'storage', kind: 'storage', reason: 'disk gone' });
    expect(paused).toBe(false);
    expect(dst.stats().status).toBe('failed');
    src.sock.destroy();
  });
});
