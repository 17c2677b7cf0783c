/**
 * Multifd channels in worker threads into a sink of files (DirectorySink,
 * `threads: 'on'`): each multifd channel's worker writes the pages it decodes
 * into the block files through its own PageFileWriter, arrives at a SYNC only
 * once its writes are done, and is drained before POSTCOPY_LISTEN and before
 * the fsync at completion. Library ↔ library (2 and 4 channels, plain and
 * TLS, a guest that keeps writing over several passes so that pages are sent
 * again on other channels; postcopy + preempt after a multifd pass in 10.1's
 * order): the files equal the source bit for bit. A scripted source for the
 * order of two channels' writes of one page across a barrier. A write that
 * fails in a multifd worker fails the migration typed (storage, naming the
 * file), nothing left alive. Needs Node 26.6+ (socket transfer).
 */
import * as fs from 'node:fs';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import net from 'node:net';
import tls from 'node:tls';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DestinationSession } from '../../src/protocol/destination.js';
import { DirectorySink, blockFileName, type DirectorySinkFs } from '../../src/protocol/directory-sink.js';
import { MigrationError, StorageError } from '../../src/protocol/errors.js';
import { SourceSession } from '../../src/protocol/source.js';
import { StreamEncoder, concatPieces, type StreamRecord } from '../../src/index.js';
import { MultifdFlag, encodeMultifdInit, encodeMultifdPacketHeader } from '../../src/stream/multifd.js';
import { initPkiDir } from '../../src/transport/pki.js';
import { socketTransferSupported } from '../../src/transport/worker/support.js';
import { faultTopDown, writingGuest } from '../support/writing-guest.js';
import { leftAfter, noneAlive, resourceSnapshot, watchWorkers } from '../support/resources.js';

const PAGE = 4096;
const MiB = 1 << 20;
const RAM = 16 * MiB;
const root = mkdtempSync(join(tmpdir(), 'qmt-dirsink-mfd-'));
let pki: string;
let dirs = 0;
beforeAll(async () => {
  pki = join(root, 'pki');
  await initPkiDir(pki, { hostnames: ['127.0.0.1', 'localhost'] });
});
afterAll(() => rmSync(root, { recursive: true, force: true }));

/** The first page where the block file differs from the source's memory, -1 if none. */
function firstDifferingPage(dir: string, name: string, mem: Buffer): number {
  const file = readFileSync(join(dir, blockFileName(name)));
  for (let off = 0; off < mem.length; off += PAGE) if (mem.compare(file, off, off + PAGE, off, off + PAGE) !== 0) return off;
  return file.length === mem.length ? -1 : mem.length;
}

async function migrate(channels: number, tls: boolean, postcopy: boolean) {
  const before = resourceSnapshot();
  const w = watchWorkers();
  const dir = join(root, `d${dirs++}`);
  const sink = new DirectorySink(dir);
  const transport = tls ? { tls: { dir: pki } } : {};
  const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, transport, postcopy, multifd: { channels }, threads: 'on', idleTimeoutMs: 20_000 });
  if (postcopy) faultTopDown(dst, RAM);
  const g = writingGuest(RAM);
  const src = new SourceSession({
    to: dst.uri,
    memory: g.source,
    machineType: 'pc-q35-10.0',
    devices: [],
    transport,
    multifd: { channels },
    maxPasses: 3,
    downtimeLimitMs: 1,
    stopVm: () => g.stop(),
    bandwidthLimit: 48 * MiB,
    // The postcopy bulk capped: pages requested from the top of RAM are still unsent when asked for (preempt).
    ...(postcopy ? { postcopy: { afterPasses: 1 }, preempt: true, postcopyBandwidthLimit: 12 * MiB } : {}),
  });
  g.start();
  src.start();
  try {
    const [stats, result] = await Promise.all([src.done, dst.done]);
    g.stop();
    // Done means durable: every worker's writes are in the files (fsynced by the sink), read back here directly.
    const ds = dst.stats();
    await sink.close();
    expect(stats.status).toBe('completed');
    expect(result.complete).toBe(true);
    expect(ds.threads.used, ds.threads.why).toBe(true);
    expect(ds.threads.why).toMatch(/writes the pages it decodes into the sink's files/);
    // The caller's thread wrote nothing itself; fsyncs at completion.
    expect(sink.stats().writes).toBe(0);
    expect(sink.stats().fsyncs).toBeGreaterThanOrEqual(2);
    for (const [name, mem] of g.source.memory) {
      const at = firstDifferingPage(dir, name, mem);
      expect(at, `${name}: first differing page at +0x${at.toString(16)}`).toBe(-1);
    }
    expect(w.started(), 'a worker per channel').toBeGreaterThanOrEqual(channels + 1);
    expect(await noneAlive(w.alive, 5000), 'workers alive after done').toBe(0);
    await dst.close();
    expect(await leftAfter(before, 3000)).toEqual([]);
    return { stats, result };
  } finally {
    g.stop();
    w.stop();
    await dst.close();
  }
}

describe.skipIf(!socketTransferSupported())('multifd channels in worker threads into a DirectorySink (Node 26.6+)', () => {
  it.each([2, 4].flatMap((channels) => [false, true].map((tls) => ({ channels, tls }))))(
    'precopy with $channels channels (TLS $tls), a guest writing over several passes: each multifd worker writes the files; once done they equal the source bit for bit',
    async ({ channels, tls }) => {
      const { stats, result } = await migrate(channels, tls, false);
      const t = result.stats.threads;
      expect(t.channels.map((c) => c.role).sort()).toEqual(['main', ...Array.from({ length: channels }, (_, i) => `multifd-${i}`)].sort());
      const mf = result.stats.multifd!;
      expect({ normal: mf.normal, zero: mf.zero }).toEqual({ normal: stats.normal, zero: stats.duplicate });
      expect(mf.perChannel.map((c) => c.normal > 0)).toEqual(Array.from({ length: channels }, () => true));
      // Pages were sent more than once (later passes, on whichever channel had room): what ordering bugs need.
      expect(stats.passes).toBeGreaterThanOrEqual(2);
      expect(stats.normal).toBeGreaterThan(RAM / PAGE / 3);
      console.log(`[dirsink-threads-multifd] ${channels} channels TLS ${tls}: passes ${stats.passes}, normal ${stats.normal}, barriers ${mf.syncs}`);
    },
    30_000,
  );

  it.each([false, true])(
    'postcopy with preempt after a multifd pass (10.1 order, TLS %s): multifd workers drained before LISTEN, preempt and main write after; the files equal the source bit for bit',
    async (tls) => {
      const { stats, result } = await migrate(2, tls, true);
      expect(result.postcopy).toBe(true);
      expect(result.stats.threads.channels.map((c) => c.role).sort()).toEqual(['main', 'multifd-0', 'multifd-1', 'preempt']);
      expect(result.stats.multifd!.normal).toBeGreaterThan(0);
      expect(stats['requests-answered'].preempt, JSON.stringify(stats['requests-answered'])).toBeGreaterThan(0);
    },
    30_000,
  );

  it('a write that fails in a multifd worker (disk full): the migration fails typed, storage, naming the file; nothing left alive', async () => {
    const before = resourceSnapshot();
    const w = watchWorkers();
    const dir = join(root, `d${dirs++}`);
    // Through the sink's fs seam, pc.ram's descriptor is /dev/full's: every write of it fails with ENOSPC. Main
    // carries no page with multifd: the writes that fail are the multifd workers'.
    let full = -1;
    const io: DirectorySinkFs = {
      openSync: (p, f) => (p.endsWith(blockFileName('pc.ram')) ? (full = fs.openSync('/dev/full', 'w')) : fs.openSync(p, f)),
      ftruncateSync: (fd, l) => (fd === full ? undefined : fs.ftruncateSync(fd, l)),
      readSync: (fd, b, o, l, p) => fs.readSync(fd, b, o, l, p),
      write: (fd, b, o, l, p, cb) => fs.write(fd, b, o, l, p, cb),
      fsync: (fd, cb) => fs.fsync(fd, cb),
      close: (fd, cb) => fs.close(fd, cb),
    };
    const sink = new DirectorySink(dir, { fs: io });
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, multifd: { channels: 2 }, threads: 'on', idleTimeoutMs: 20_000 });
    const g = writingGuest(RAM);
    const src = new SourceSession({ to: dst.uri, memory: g.source, machineType: 'pc-q35-10.0', devices: [], multifd: { channels: 2 } });
    src.start();
    const e = await dst.done.then(
      () => undefined,
      (x: unknown) => x,
    );
    await src.done.catch(() => undefined);
    await sink.close().catch(() => undefined);
    expect(e).toBeInstanceOf(MigrationError);
    const err = e as MigrationError;
    expect(err.code).toBe('storage');
    expect(err.kind).toBe('storage');
    expect(err.cause).toBeInstanceOf(StorageError);
    expect(err.cause).toMatchObject({ operation: 'write', errno: 'ENOSPC' });
    expect((err.cause as StorageError).file).toMatch(/pc\.ram\.bin$/);
    const ds = dst.stats();
    expect(ds.status).toBe('failed');
    expect(ds.threads.used).toBe(true);
    await dst.close();
    expect(await leftAfter(before, 4000)).toEqual([]);
    expect(await noneAlive(w.alive, 5000), 'workers alive').toBe(0);
    w.stop();
  }, 30_000);
});

// ---- a scripted multifd source (raw sockets): the order of two channels' writes of one page ------------

const BLOCKS = [{ idstr: 'pc.ram', length: 4096 * PAGE }];
const RAM_SECTION = { sectionId: 2, idstr: 'ram', instanceId: 0, versionId: 4 } as const;

function pageBytes(pass: number, offset: number): Buffer {
  const b = Buffer.alloc(PAGE, (pass * 31 + offset / PAGE) & 0xff);
  b.write(`pc.ram@${offset}#${pass}`, 0, 'latin1');
  return b;
}
function packet(num: number, normal: number[], pass: number): Buffer {
  const header = encodeMultifdPacketHeader({ flags: 0, pagesAlloc: 128, packetNum: BigInt(num), block: 'pc.ram', normal, zero: [] });
  return Buffer.concat([header, ...normal.map((o) => pageBytes(pass, o))]);
}
const sync = (num: number): Buffer => Buffer.from(encodeMultifdPacketHeader({ flags: MultifdFlag.SYNC, pagesAlloc: 128, packetNum: BigInt(num), block: '', normal: [], zero: [] }));

/** The main channel: setup, `passes` RAM sections each ending with MULTIFD_FLUSH (`bodies[p]` before it), then `tail`. */
function mainStream(passes: number, tail: StreamRecord[], bodies: StreamRecord[][] = []): Buffer {
  const recs: StreamRecord[] = [
    { type: 'header', version: 3 },
    { type: 'configuration', machineType: 'pc-q35-10.0' },
    { type: 'section', kind: 'start', ...RAM_SECTION },
    { type: 'ram-blocks', total: BLOCKS.reduce((s, b) => s + b.length, 0), blocks: BLOCKS },
    { type: 'ram-multifd-flush' },
    { type: 'ram-eos' },
    { type: 'footer', sectionId: 2 },
  ];
  for (let p = 0; p < passes; p++) recs.push({ type: 'section', kind: 'part', ...RAM_SECTION }, ...(bodies[p] ?? []), { type: 'ram-multifd-flush' }, { type: 'ram-eos' }, { type: 'footer', sectionId: 2 });
  recs.push(...tail);
  const e = new StreamEncoder({ continueMode: 'as-recorded' });
  e.writeAll(recs);
  return concatPieces(e.take());
}
const COMPLETION: StreamRecord[] = [
  { type: 'section', kind: 'end', ...RAM_SECTION },
  { type: 'ram-multifd-flush' },
  { type: 'ram-eos' },
  { type: 'footer', sectionId: 2 },
  { type: 'section', kind: 'full', sectionId: 5, idstr: 'timer', instanceId: 0, versionId: 1 },
  { type: 'device-state', sectionId: 5, idstr: 'timer', instanceId: 0, versionId: 1, kind: 'full', data: Uint8Array.of(1, 2, 3, 4) },
  { type: 'footer', sectionId: 5 },
  { type: 'eof' },
  {
    type: 'vmdesc',
    json: new TextEncoder().encode(JSON.stringify({ page_size: 4096, devices: [{ name: 'timer', instance_id: 0, vmsd_name: 'timer', version: 1, fields: [{ name: 'data', type: 'buffer', size: 4 }] }] })),
  },
];

/** Polls `ok` every 20 ms, for 10 s at most. */
async function until(ok: () => boolean, what: string): Promise<void> {
  for (let t = 0; !ok(); t += 20) {
    if (t > 10_000) throw new Error(`timed out waiting for ${what}`);
    await new Promise((res) => setTimeout(res, 20));
  }
}

async function dial(uri: string, secure = false): Promise<net.Socket> {
  const port = Number(uri.split(':').pop());
  if (secure) {
    const pem = (f: string): Buffer => readFileSync(join(pki, f));
    const s = tls.connect({ host: '127.0.0.1', port, ca: pem('ca-cert.pem'), cert: pem('client-cert.pem'), key: pem('client-key.pem'), checkServerIdentity: () => undefined });
    s.on('error', () => undefined);
    await new Promise((r) => s.once('secureConnect', r));
    return s;
  }
  const s = net.connect(port, '127.0.0.1');
  s.on('error', () => undefined);
  await new Promise((r) => s.once('connect', r));
  return s;
}

/** Byte offsets of `n` pages from page `from`. */
const run = (from: number, n: number): number[] => Array.from({ length: n }, (_, i) => (from + i) * PAGE);

/** A threaded multifd destination (2 channels) into a fresh DirectorySink, for a scripted source. */
async function scriptedDestination(opts: { postcopy?: boolean; secure?: boolean } = {}) {
  const before = resourceSnapshot();
  const w = watchWorkers();
  const dir = join(root, `d${dirs++}`);
  const sink = new DirectorySink(dir);
  const dst = await DestinationSession.listen({
    listen: 'tcp:127.0.0.1:0',
    sink,
    multifd: { channels: 2 },
    threads: 'on',
    idleTimeoutMs: 20_000,
    ...(opts.postcopy ? { postcopy: true } : {}),
    ...(opts.secure ? { transport: { tls: { dir: pki } } } : {}),
  });
  return {
    dst,
    sink,
    dir,
    /** The pages among `offsets` whose bytes in pc.ram's file are not `expected`'s, by number. */
    stale(expected: Buffer, offsets: readonly number[]): number[] {
      const file = readFileSync(join(dir, blockFileName('pc.ram')));
      return offsets.filter((o) => file.compare(expected, o, o + PAGE, o, o + PAGE) !== 0).map((o) => o / PAGE);
    },
    /** Closes the destination: no socket, timer or worker left. */
    async end(sockets: readonly net.Socket[]): Promise<void> {
      for (const s of sockets) s.destroy();
      await dst.close();
      expect(await leftAfter(before, 3000)).toEqual([]);
      expect(await noneAlive(w.alive, 5000), 'workers alive').toBe(0);
      w.stop();
    },
  };
}

/**
 * Main's `passes` up to the completion and both channels' scripts; once
 * `landed` pages are in (and 300 ms for their last writes to reach the files,
 * before the completion drains the writers), the completion. The result.
 */
async function playPasses(dst: DestinationSession, passes: number, bodies: StreamRecord[][], ch0: readonly Uint8Array[], ch1: readonly Uint8Array[], landed: number) {
  const whole = mainStream(passes, COMPLETION, bodies);
  const head = mainStream(passes, [], bodies);
  expect(whole.subarray(0, head.length).equals(head), 'the stream up to the completion is a prefix of the whole').toBe(true);
  const main = await dial(dst.uri);
  main.write(head);
  const [c0, c1] = [await dial(dst.uri), await dial(dst.uri)];
  c0.write(Buffer.concat(ch0));
  c1.write(Buffer.concat(ch1));
  await until(() => (dst.stats().multifd?.normal ?? 0) >= landed, `${landed} pages landed`);
  await new Promise((res) => setTimeout(res, 300));
  main.write(whole.subarray(head.length));
  return { result: await dst.done, sockets: [main, c0, c1] };
}

describe.skipIf(!socketTransferSupported())('multifd workers into files: a scripted source', () => {
  it("a page sent in pass 1 on channel 0 and in pass 2 on channel 1: the file ends with pass 2's copy (channel 0's write is done before it arrives at its SYNC)", async () => {
    // Pass 1: channel 0 pages 0–7 (one contiguous run: its writer keeps it staged, growing, until something seals
    // it), channel 1 pages 8–15. Pass 2: channel 1 pages 0 and 2 (not contiguous: page 0's run is sealed and written
    // at once). Without the drain before arriving, channel 0's run of pass 1 is written only when the session drains
    // the writers at completion: after channel 1's page 0 of pass 2, over it.
    const expected = Buffer.alloc(64 * PAGE);
    for (const o of run(0, 16)) pageBytes(1, o).copy(expected, o);
    for (const o of [0, 2 * PAGE]) pageBytes(2, o).copy(expected, o);
    const ch0 = [encodeMultifdInit(0), sync(0), packet(2, run(0, 8), 1), sync(4), sync(6), sync(8)];
    const ch1 = [encodeMultifdInit(1), sync(1), packet(3, run(8, 8), 1), sync(5), packet(7, [0, 2 * PAGE], 2), sync(9), sync(10)];
    const d = await scriptedDestination();
    const { result, sockets } = await playPasses(d.dst, 2, [], ch0, ch1, 18);
    await d.sink.close();
    expect(result.stats.multifd).toMatchObject({ channels: 2, syncs: 4, normal: 18 });
    expect(d.stale(expected, run(0, 16)), 'pages whose last copy did not win').toEqual([]);
    await d.end(sockets);
  }, 30_000);

  it("a zero page on main (QEMU's legacy zero-page detection) between two multifd copies: main's write is done before the barrier releases the channels", async () => {
    // Pass 1: channel 0 pages 0–7. Pass 2: page 0 is zero, on main (a run main's writer keeps staged). Pass 3: channel 1
    // pages 0 and 2 (page 0's run written at once). Main's zero write must not land after pass 3's page 0.
    const expected = Buffer.alloc(64 * PAGE);
    for (const o of run(0, 8)) pageBytes(1, o).copy(expected, o);
    for (const o of [0, 2 * PAGE]) pageBytes(3, o).copy(expected, o);
    const ch0 = [encodeMultifdInit(0), sync(0), packet(2, run(0, 8), 1), sync(4), sync(6), sync(8), sync(10)];
    const ch1 = [encodeMultifdInit(1), sync(1), sync(5), sync(7), packet(9, [0, 2 * PAGE], 3), sync(11), sync(12)];
    const bodies: StreamRecord[][] = [[], [{ type: 'ram-zero', block: 'pc.ram', offset: 0, continued: false }], []];
    const d = await scriptedDestination();
    const { result, sockets } = await playPasses(d.dst, 3, bodies, ch0, ch1, 10);
    await d.sink.close();
    expect(result.stats.multifd).toMatchObject({ channels: 2, syncs: 5, normal: 10 });
    expect(d.stale(expected, run(0, 8)), 'pages whose last copy did not win').toEqual([]);
    await d.end(sockets);
  }, 30_000);

  it.each([false, true])('a channel that ends right after its last SYNC (as QEMU once done) while its writes drain (TLS %s): the barrier takes it as arrived; completes, the files hold every page', async (secure) => {
    // Channel 1's last pass: 8 MiB of pages, its SYNC and its FIN at once. The FIN is read while the writes drain
    // before the arrival: it must not be taken for a channel that ended before the barrier.
    const pages = Array.from({ length: 2048 }, (_, i) => i * PAGE);
    const packets: Buffer[] = [];
    for (let i = 0; i < pages.length; i += 128) packets.push(packet(3 + i / 128, pages.slice(i, i + 128), 1));
    const { dst, sink, dir, end } = await scriptedDestination({ secure });
    const main = await dial(dst.uri, secure);
    main.write(mainStream(1, COMPLETION));
    const [c0, c1] = [await dial(dst.uri, secure), await dial(dst.uri, secure)];
    c0.write(Buffer.concat([encodeMultifdInit(0), sync(0), sync(100), sync(102)]));
    c1.write(Buffer.concat([encodeMultifdInit(1), sync(1), sync(101)]));
    await until(() => (dst.stats().multifd?.syncs ?? 0) >= 2, 'the first barriers');
    c0.end();
    c1.end(Buffer.concat([...packets, sync(103)]));
    const result = await dst.done;
    await sink.close();
    expect(result.stats.multifd).toMatchObject({ channels: 2, syncs: 3, normal: 2048 });
    const file = readFileSync(join(dir, blockFileName('pc.ram')));
    const bad = pages.filter((o) => !file.subarray(o, o + PAGE).equals(pageBytes(1, o))).map((o) => o / PAGE);
    expect(bad, 'pages not in the file').toEqual([]);
    await end([main, c0, c1]);
  }, 30_000);

  it("multifd pages after the last barrier are in the file before main reads on past POSTCOPY_LISTEN: main's postcopy copy of a page wins", async () => {
    const blocks = [{ idstr: 'pc.ram', length: 8 * PAGE }];
    const ram = (kind: 'start' | 'part' | 'end', body: StreamRecord[]): StreamRecord[] => [{ type: 'section', kind, ...RAM_SECTION }, ...body, { type: 'ram-eos' }, { type: 'footer', sectionId: 2 }];
    const encode = (recs: StreamRecord[]): Buffer => {
      const e = new StreamEncoder({ continueMode: 'as-recorded' });
      e.writeAll(recs);
      return concatPieces(e.take());
    };
    const pkg: StreamRecord[] = [
      { type: 'command', command: { cmd: 'postcopy-listen' } },
      { type: 'command', command: { cmd: 'postcopy-run' } },
    ];
    const head: StreamRecord[] = [
      { type: 'header', version: 3 },
      { type: 'configuration', machineType: 'pc-q35-10.0' },
      { type: 'command', command: { cmd: 'postcopy-advise', pageSizeSummary: 0x1000n, targetPageSize: 0x1000n } },
      ...ram('start', [{ type: 'ram-blocks', total: 8 * PAGE, blocks }, { type: 'ram-multifd-flush' }]),
    ];
    // Pages 0 and 2 again on main once postcopy listens: page 0's run is sealed (written) at once, page 2's when the writers drain.
    const postcopy: StreamRecord[] = [
      { type: 'command', command: { cmd: 'packaged', length: encode(pkg).length } },
      ...pkg,
      { type: 'package-end' },
      ...ram('part', [
        { type: 'ram-page', block: 'pc.ram', offset: 0, continued: false, data: pageBytes(2, 0) },
        { type: 'ram-page', block: 'pc.ram', offset: 2 * PAGE, continued: true, data: pageBytes(2, 2 * PAGE) },
      ]),
    ];
    const whole = encode([...head, ...postcopy, ...ram('end', []), { type: 'eof' }]);
    const cuts = [encode(head).length, encode([...head, ...postcopy]).length];
    expect(whole.subarray(0, cuts[1]).equals(encode([...head, ...postcopy])), 'the parts are prefixes of the whole').toBe(true);
    const expected = Buffer.alloc(8 * PAGE);
    for (const o of run(0, 8)) pageBytes(1, o).copy(expected, o);
    for (const o of [0, 2 * PAGE]) pageBytes(2, o).copy(expected, o);
    const d = await scriptedDestination({ postcopy: true });
    const { dst, sink } = d;
    const main = await dial(dst.uri);
    main.write(whole.subarray(0, cuts[0]));
    const [c0, c1] = [await dial(dst.uri), await dial(dst.uri)];
    // Channel 0: the setup barrier, then pages 0–7 with no SYNC after them (one run, staged in its writer).
    c0.write(Buffer.concat([encodeMultifdInit(0), sync(0), packet(2, run(0, 8), 1)]));
    c1.write(Buffer.concat([encodeMultifdInit(1), sync(1)]));
    await until(() => run(0, 8).every((o) => dst.hasPage('pc.ram', o)), "channel 0's pages");
    // (A failure instead: dst.done rejects with it.)
    const running = Promise.race([new Promise((res) => dst.once('postcopy-run', res)), dst.done]);
    main.write(whole.subarray(cuts[0], cuts[1]));
    // Main's pages come after RUN in the same write; time for its page 0 to reach its file before the completion drains the writers.
    await running;
    await new Promise((res) => setTimeout(res, 300));
    main.write(whole.subarray(cuts[1]));
    const result = await dst.done;
    await sink.close();
    expect(result.postcopy).toBe(true);
    expect(d.stale(expected, run(0, 8)), 'pages whose last copy did not win').toEqual([]);
    await d.end([main, c0, c1]);
  }, 30_000);
});
