/**
 * A DestinationSession with multifd channels in worker threads (`threads:
 * 'on'`, a shared InMemorySink): each channel is judged in its worker (init
 * message: version, UUID, id < N, not taken), decodes its packets and lands
 * them into the shared memory and received set there, and meets the SYNC
 * barrier through shared words. Library ↔ library (2 and 4 channels, plain and
 * TLS, postcopy + preempt after a multifd precopy in 10.1's order), a scripted
 * source for the barrier's order, a cut channel and bad init messages — typed,
 * and no worker left. Needs Node 26.6+ (socket transfer): skipped otherwise.
 */
import { randomFillSync } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DestinationSession, InMemorySink, InMemorySource, MigrationError, SourceSession, StreamEncoder, concatPieces, type StreamRecord } from '../../src/index.js';
import type { PageRequestResult } from '../../src/protocol/page-tracker.js';
import type { StrangerEvent } from '../../src/transport/qualify.js';
import { MultifdFlag, encodeMultifdInit, encodeMultifdPacketHeader } from '../../src/stream/multifd.js';
import { initPkiDir } from '../../src/transport/pki.js';
import { setAvailableCoresForTest, socketTransferSupported } from '../../src/transport/worker/support.js';
import { leftAfter, noneAlive, resourceSnapshot, watchWorkers } from '../support/resources.js';

const PAGE = 4096;
const MiB = 1 << 20;
const threadsWork = socketTransferSupported();

let pki: string;
beforeAll(async () => {
  pki = await mkdtemp(join(tmpdir(), 'qmt-threads-mfd-dst-'));
  await initPkiDir(pki, { hostnames: ['127.0.0.1', 'localhost'] });
});
afterAll(async () => {
  await rm(pki, { recursive: true, force: true });
});

function guest(bytes: number): InMemorySource {
  const buf = Buffer.alloc(bytes);
  for (let off = 0; off < buf.length; off += 16 * PAGE) randomFillSync(buf, off, 8 * PAGE);
  return new InMemorySource(new Map([['pc.ram', buf]]));
}


async function migrate(channels: number, tls: boolean, postcopy: boolean) {
  const before = resourceSnapshot();
  const w = watchWorkers();
  const memory = guest(16 * MiB);
  const sink = new InMemorySink({ shared: true });
  const transport = tls ? { tls: { dir: pki } } : {};
  const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, transport, postcopy, multifd: { channels }, threads: (process.env.DST_THREADS as 'on' | undefined) ?? 'on', idleTimeoutMs: 20_000 });
  const order: string[] = [];
  dst.on('channel', (c) => order.push(c.role === 'multifd' ? `multifd-${c.stats.id ?? '?'}` : c.role));
  const answers: Promise<PageRequestResult>[] = [];
  dst.on('postcopy-run', () => {
    const length = memory.memory.get('pc.ram')!.length;
    for (let off = length - PAGE; off >= 0 && answers.length < 32; off -= PAGE) if (!dst.hasPage('pc.ram', off)) answers.push(dst.requestPage('pc.ram', off));
  });
  const ram = memory.memory.get('pc.ram')!;
  const noise = Buffer.alloc(PAGE);
  const writer = setInterval(() => {
    for (let i = 0; i < 64; i++) {
      randomFillSync(noise);
      memory.write('pc.ram', Math.floor(Math.random() * (ram.length / PAGE)) * PAGE, noise);
    }
  }, 5);
  const src = new SourceSession({
    to: dst.uri,
    memory,
    machineType: 'pc-q35-10.0',
    devices: [{ idstr: 'timer', instanceId: 0, versionId: 2, data: Buffer.alloc(24, 3) }],
    transport,
    multifd: { channels },
    ...(process.env.SRC_THREADS ? { threads: process.env.SRC_THREADS as 'off' } : {}),
    maxPasses: 3,
    downtimeLimitMs: 1,
    stopVm: () => clearInterval(writer),
    // The postcopy bulk capped: the pages requested from the top of RAM are still unsent when asked for (preempt).
    ...(postcopy ? { postcopy: { afterPasses: 1 }, preempt: true, bandwidthLimit: 64 * MiB, postcopyBandwidthLimit: 8 * MiB } : {}),
  }).start();
  try {
    const [stats, result] = await Promise.all([src.done, dst.done]);
    const pages = await Promise.all(answers);
    const got = sink.blocks.get('pc.ram')!;
    const bad: number[] = [];
    for (let off = 0; off < ram.length; off += PAGE) if (ram.compare(got, off, off + PAGE, off, off + PAGE) !== 0) bad.push(off / PAGE);
    expect(bad, 'pc.ram bit for bit: differing pages').toEqual([]);
    // Every channel's thread (and the source's, when threaded) ends with the sessions: none left after done.
    expect(w.started(), 'a worker per channel').toBeGreaterThanOrEqual(channels + 1);
    expect(await noneAlive(w.alive, 5000), 'workers alive after done').toBe(0);
    await dst.close();
    expect(await leftAfter(before, 3000)).toEqual([]);
    return { stats, result, pages, order };
  } finally {
    clearInterval(writer);
    w.stop();
    await dst.close();
  }
}

describe.skipIf(!threadsWork)('multifd channels in worker threads: library ↔ library', () => {
  it.each([2, 4].flatMap((channels) => [false, true].map((tls) => ({ channels, tls }))))(
    'precopy with $channels channels (TLS $tls): every channel in its worker, pages landed there, RAM bit for bit',
    async ({ channels, tls }) => {
      const { stats, result, order } = await migrate(channels, tls, false);
      const t = result.stats.threads;
      expect(t.used, t.why).toBe(true);
      expect(t.channels.map((c) => c.role).sort()).toEqual(['main', ...Array.from({ length: channels }, (_, i) => `multifd-${i}`)].sort());
      expect(new Set(t.channels.map((c) => c.threadId)).size).toBe(channels + 1);
      const mf = result.stats.multifd!;
      // Every page went in a multifd packet, landed by the channels' workers; barriers: setup, each pass, the END section.
      expect({ normal: mf.normal, zero: mf.zero }).toEqual({ normal: stats.normal, zero: stats.duplicate });
      expect(mf.syncs).toBe(stats.passes + 2);
      expect(mf.perChannel.map((c) => c.normal > 0)).toEqual(Array.from({ length: channels }, () => true));
      expect(result.stats.normal).toBe(stats.normal);
      expect(order[0]).toBe('main');
      expect(order.slice(1).sort()).toEqual(Array.from({ length: channels }, (_, i) => `multifd-${i}`).sort());
    },
    60_000,
  );

  it.each([false, true])('postcopy with preempt after a multifd pass (10.1 order, TLS %s): preempt in its worker after main and every multifd channel, RAM bit for bit', async (tls) => {
    const { result, pages, order } = await migrate(2, tls, true);
    expect(result.postcopy).toBe(true);
    expect(result.stats.threads.channels.map((c) => c.role).sort()).toEqual(['main', 'multifd-0', 'multifd-1', 'preempt']);
    expect(order).toHaveLength(4);
    expect(order[0]).toBe('main');
    expect(order.slice(1, 3).sort()).toEqual(['multifd-0', 'multifd-1']);
    expect(order[3]).toBe('preempt');
    expect(result.stats.multifd!.normal).toBeGreaterThan(0);
    // Multifd is idle in postcopy: the requested pages came on preempt (recorded by the worker that landed them).
    expect(pages.filter((p) => p.requested && p.channel === 'preempt').length).toBeGreaterThan(0);
    expect(result.stats['preempt-pages']).toBeGreaterThan(0);
  }, 60_000);
});

// ---- a scripted multifd source (raw sockets) ------------------------------------------------

const BLOCKS = [
  { idstr: 'pc.ram', length: 64 * PAGE },
  { idstr: '/rom@etc/acpi/tables', length: 4 * PAGE },
];
const RAM = { sectionId: 2, idstr: 'ram', instanceId: 0, versionId: 4 } as const;

function pageBytes(pass: number, block: string, offset: number): Buffer {
  const b = Buffer.alloc(PAGE, (pass * 31 + offset / PAGE) & 0xff);
  b.write(`${block}@${offset}#${pass}`, 0, 'latin1');
  return b;
}
function packet(num: number, block: string, normal: number[], zero: number[], pass: number): Buffer {
  const header = encodeMultifdPacketHeader({ flags: 0, pagesAlloc: 128, packetNum: BigInt(num), block, normal, zero });
  return Buffer.concat([header, ...normal.map((o) => pageBytes(pass, block, o))]);
}
const sync = (num: number): Buffer => Buffer.from(encodeMultifdPacketHeader({ flags: MultifdFlag.SYNC, pagesAlloc: 128, packetNum: BigInt(num), block: '', normal: [], zero: [] }));

function mainRecords(passes: number, tail: StreamRecord[] = []): Buffer {
  const recs: StreamRecord[] = [
    { type: 'header', version: 3 },
    { type: 'configuration', machineType: 'pc-q35-10.0' },
    { type: 'section', kind: 'start', ...RAM },
    { type: 'ram-blocks', total: BLOCKS.reduce((s, b) => s + b.length, 0), blocks: BLOCKS },
    { type: 'ram-multifd-flush' },
    { type: 'ram-eos' },
    { type: 'footer', sectionId: 2 },
  ];
  for (let p = 0; p < passes; p++) recs.push({ type: 'section', kind: 'part', ...RAM }, { type: 'ram-multifd-flush' }, { type: 'ram-eos' }, { type: 'footer', sectionId: 2 });
  recs.push(...tail);
  const e = new StreamEncoder({ continueMode: 'as-recorded' });
  e.writeAll(recs);
  return concatPieces(e.take());
}
const completion: StreamRecord[] = [
  { type: 'section', kind: 'end', ...RAM },
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

async function dial(uri: string): Promise<net.Socket> {
  const s = net.connect(Number(uri.split(':').pop()), '127.0.0.1');
  s.on('error', () => undefined);
  await new Promise((r) => s.once('connect', r));
  return s;
}
const closed = (s: net.Socket): Promise<void> => (s.closed ? Promise.resolve() : new Promise((r) => s.once('close', () => r())));
const listen = (channels: number, uuid?: Uint8Array) => DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink: new InMemorySink({ shared: true }), multifd: { channels, ...(uuid ? { uuid } : {}) }, threads: 'on' });

describe.skipIf(!threadsWork)('multifd channels in worker threads: a scripted source', () => {
  it("'auto' with multifd runs the channels in workers (and says why); a plain sink falls back", async () => {
    // On a machine with the cores for them ('auto' wants 4: threads-destination.test.ts).
    setAvailableCoresForTest(8);
    const auto = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink: new InMemorySink({ shared: true }), multifd: { channels: 2 } }).finally(() => setAvailableCoresForTest(undefined));
    expect(auto.stats().threads).toMatchObject({ used: true, why: expect.stringMatching(/threads: 'auto' \(sockets can move/) });
    await auto.close();
    const plain = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink: new InMemorySink(), multifd: { channels: 2 } });
    expect(plain.stats().threads).toMatchObject({ used: false, why: expect.stringMatching(/not shared/) });
    await plain.close();
  });

  it('the barrier across threads: pass 2 on other channels is not overwritten by a late pass-1 channel; completes, no worker left', async () => {
    const before = resourceSnapshot();
    const w = watchWorkers();
    const r = (from: number, n: number): number[] => Array.from({ length: n }, (_, i) => (from + i) * PAGE);
    const expected = Buffer.alloc(64 * PAGE);
    for (const o of r(0, 16)) pageBytes(1, 'pc.ram', o).copy(expected, o);
    for (const o of r(0, 8)) pageBytes(2, 'pc.ram', o).copy(expected, o);
    expected.fill(0, 9 * PAGE, 10 * PAGE);
    // Channel 0 carries pass 1's pages 0–7; channel 1 pass 1's 8–15, then pass 2's 0–7 and page 9 as zero.
    const ch0 = [Buffer.from(encodeMultifdInit(0)), sync(0), packet(2, 'pc.ram', r(0, 8), [], 1), sync(4), sync(6), sync(8)];
    const ch1 = [Buffer.from(encodeMultifdInit(1)), sync(1), packet(3, 'pc.ram', r(8, 8), [], 1), sync(5), packet(7, 'pc.ram', r(0, 8), [9 * PAGE], 2), sync(9), sync(10)];
    const sink = new InMemorySink({ shared: true });
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, multifd: { channels: 2 }, threads: 'on' });
    const main = await dial(dst.uri);
    main.write(mainRecords(2, completion));
    const [c1, c0] = [await dial(dst.uri), await dial(dst.uri)];
    c1.write(Buffer.concat(ch1));
    await new Promise((res) => setTimeout(res, 150));
    for (const part of ch0) c0.write(part);
    const result = await dst.done;
    expect(sink.blocks.get('pc.ram')!.equals(expected)).toBe(true);
    expect(result.stats.threads.channels.map((c) => c.role).sort()).toEqual(['main', 'multifd-0', 'multifd-1']);
    expect(result.stats.multifd).toMatchObject({ channels: 2, syncs: 4, normal: 24, zero: 1 });
    for (const s of [main, c0, c1]) s.destroy();
    await dst.close();
    expect(await leftAfter(before, 3000)).toEqual([]);
    expect(await noneAlive(w.alive, 5000), 'workers alive').toBe(0);
    w.stop();
  });

  it('bytes that come while the peeked ones hold a channel at its SYNC wait for the barrier too (they used to land at once: stale pages)', async () => {
    const before = resourceSnapshot();
    const w = watchWorkers();
    const r = (from: number, n: number): number[] => Array.from({ length: n }, (_, i) => (from + i) * PAGE);
    const expected = Buffer.alloc(64 * PAGE);
    for (const o of r(0, 8)) pageBytes(2, 'pc.ram', o).copy(expected, o);
    for (const o of r(8, 8)) pageBytes(1, 'pc.ram', o).copy(expected, o);
    const sink = new InMemorySink({ shared: true });
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, multifd: { channels: 2 }, threads: 'on' });
    const blocks = new Promise<void>((res) => dst.once('ram-blocks', () => res()));
    const main = await dial(dst.uri);
    main.write(mainRecords(2, completion));
    const [c1, c0] = [await dial(dst.uri), await dial(dst.uri)];
    // Channel 1's first bytes (what its worker peeked) end with the setup SYNC; channel 0 has sent only its init.
    c1.write(Buffer.concat([encodeMultifdInit(1), sync(1)]));
    c0.write(encodeMultifdInit(0));
    await blocks;
    await new Promise((res) => setTimeout(res, 200));
    // While channel 1 waits at that SYNC: its pass 1 (pages 8–15) and pass 2 (pages 0–7). Pass 2 must wait for channel 0's pass 1.
    c1.write(Buffer.concat([packet(3, 'pc.ram', r(8, 8), [], 1), sync(5), packet(7, 'pc.ram', r(0, 8), [], 2), sync(9), sync(10)]));
    await new Promise((res) => setTimeout(res, 200));
    c0.write(Buffer.concat([sync(0), packet(2, 'pc.ram', r(0, 8), [], 1), sync(4), sync(6), sync(8)]));
    const result = await dst.done;
    const got = sink.blocks.get('pc.ram')!;
    const stale = r(0, 16).filter((o) => got.compare(expected, o, o + PAGE, o, o + PAGE) !== 0).map((o) => o / PAGE);
    expect(stale, 'pages whose last copy did not win').toEqual([]);
    expect(result.stats.multifd).toMatchObject({ syncs: 4, normal: 24 });
    for (const s of [main, c0, c1]) s.destroy();
    await dst.close();
    expect(await leftAfter(before, 3000)).toEqual([]);
    expect(await noneAlive(w.alive, 5000), 'workers alive').toBe(0);
    w.stop();
  });

  it.each(['reset', 'fin'] as const)('a multifd channel cut in precopy (%s) fails typed naming multifd-0; no worker or socket left', async (how) => {
    const before = resourceSnapshot();
    const w = watchWorkers();
    const dst = await listen(2);
    const blocks = new Promise<void>((res) => dst.once('ram-blocks', () => res()));
    const main = await dial(dst.uri);
    main.write(mainRecords(1));
    const c0 = await dial(dst.uri);
    const c1 = await dial(dst.uri);
    // Channel 0 stops inside a packet: its header says one page, no page follows.
    c0.write(Buffer.concat([encodeMultifdInit(0), sync(0), packet(2, 'pc.ram', [0], [], 1).subarray(0, 200)]));
    c1.write(Buffer.concat([encodeMultifdInit(1), sync(1)]));
    // In precopy: main is read (its block list) once every channel is in. A cut before that is a setup
    // failure (the cases below); a fixed wait alone was not enough on a loaded machine.
    await blocks;
    await new Promise((r) => setTimeout(r, 150));
    if (how === 'reset') c0.resetAndDestroy();
    else c0.end();
    const e = await dst.done.then(
      () => undefined,
      (err: unknown) => err as MigrationError,
    );
    expect(e).toBeInstanceOf(MigrationError);
    expect(e!.phase).toBe('precopy');
    // A reset seen by the worker is 'reset'; one that came while the channel waited for the others ends it as a cut.
    expect(e).toMatchObject({ kind: 'network', code: how === 'reset' ? expect.stringMatching(/^(reset|peer-disconnected)$/) : 'peer-disconnected', message: expect.stringContaining('multifd-0') });
    await Promise.all([main, c1].map(closed));
    await dst.close();
    expect(await leftAfter(before, 3000)).toEqual([]);
    expect(await noneAlive(w.alive, 5000), 'workers alive').toBe(0);
    w.stop();
  });

  it.each([
    ['main', 'reset'],
    ['main', 'fin'],
    ['multifd-0', 'reset'],
    ['multifd-0', 'fin'],
  ] as const)('%s cut (%s) after it qualified, while it waits to be served: fails typed at once, naming it (main used to hang until the idle timeout)', async (which, how) => {
    const before = resourceSnapshot();
    const w = watchWorkers();
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink: new InMemorySink({ shared: true }), multifd: { channels: 2 }, threads: 'on', idleTimeoutMs: 60_000 });
    const strangers: StrangerEvent[] = [];
    dst.on('stranger', (ev) => strangers.push(ev));
    const ended = dst.done.then(
      () => new Error('completed'),
      (err: unknown) => err as MigrationError,
    );
    // Main is served only once every multifd channel is in (as QEMU reads it), a multifd channel once
    // they all are: the channel cut is judged and taken (nothing tells when: a second is ample), and
    // cut before the last channel comes. A cut before its verdict would make it a stranger.
    const main = await dial(dst.uri);
    main.write(mainRecords(1));
    const c0 = await dial(dst.uri);
    c0.write(Buffer.concat([encodeMultifdInit(0), sync(0)]));
    await new Promise((r) => setTimeout(r, 1000));
    const cut = which === 'main' ? main : c0;
    if (how === 'reset') cut.resetAndDestroy();
    else cut.end();
    await closed(cut);
    await new Promise((r) => setTimeout(r, 100));
    const c1 = await dial(dst.uri);
    c1.write(Buffer.concat([encodeMultifdInit(1), sync(1)]));
    const t0 = Date.now();
    const e = await Promise.race([ended, new Promise<undefined>((r) => setTimeout(() => r(undefined), 10_000).unref())]);
    expect(strangers.map((x) => x.reason), `${which} was cut before it qualified`).toEqual([]);
    expect(e, 'the session ended within 10 s').toBeDefined();
    expect(e).toBeInstanceOf(MigrationError);
    expect(e).toMatchObject({ kind: 'network', message: expect.stringContaining(which) });
    expect(Date.now() - t0).toBeLessThan(10_000);
    for (const s of [main, c0, c1]) s.destroy();
    await dst.close();
    expect(await leftAfter(before, 3000)).toEqual([]);
    expect(await noneAlive(w.alive, 5000), 'workers alive').toBe(0);
    w.stop();
  });

  it('bad init messages (another UUID, an id ≥ N, a taken id) are strangers judged in their workers; the migration then completes', async () => {
    const before = resourceSnapshot();
    const w = watchWorkers();
    const uuid = new Uint8Array(16).fill(0x5a);
    const dst = await listen(2, uuid);
    const strangers: StrangerEvent[] = [];
    dst.on('stranger', (ev) => strangers.push(ev));
    const main = await dial(dst.uri);
    main.write(mainRecords(0, completion));
    const wrongUuid = await dial(dst.uri);
    wrongUuid.write(encodeMultifdInit(0));
    const outOfRange = await dial(dst.uri);
    outOfRange.write(encodeMultifdInit(2, uuid));
    await Promise.all([wrongUuid, outOfRange].map(closed));
    const c0 = await dial(dst.uri);
    c0.write(Buffer.concat([encodeMultifdInit(0, uuid), sync(0)]));
    await new Promise((r) => setTimeout(r, 150));
    const taken = await dial(dst.uri);
    taken.write(encodeMultifdInit(0, uuid));
    await closed(taken);
    const c1 = await dial(dst.uri);
    c1.write(Buffer.concat([encodeMultifdInit(1, uuid), sync(1)]));
    c0.write(sync(2));
    c1.write(sync(3));
    const result = await dst.done;
    expect(result.complete).toBe(true);
    // The first two in either order (each judged in its own worker).
    expect(strangers.map((s) => [s.reason, s.error.code, s.error.channel]).sort()).toEqual([
      ['extra', 'channel-order', 'multifd-0'],
      ['not-migration', 'bad-multifd-init', 'multifd'],
      ['not-migration', 'bad-multifd-init', 'multifd-2'],
    ]);
    expect(strangers.find((s) => s.error.channel === 'multifd')!.error.message).toMatch(/5a5a5a5a/);
    for (const s of [main, c0, c1]) s.destroy();
    await dst.close();
    expect(await leftAfter(before, 3000)).toEqual([]);
    expect(await noneAlive(w.alive, 5000), 'workers alive').toBe(0);
    w.stop();
  });
});
