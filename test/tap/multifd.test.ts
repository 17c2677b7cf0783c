/**
 * Multifd through the tap, with scripted peers: a source that opens its
 * multifd channels before its main channel speaks (as QEMU 10.0 does), a
 * destination that records the order connections reach it. Checks: the
 * destination gets main first, then the channels (plain and TLS); bytes are
 * unchanged; per-channel counts come from the multifd decoder; a channel
 * taken after main is classified by its magic; a channel without main is
 * dropped in time; a channel cut inside a packet is a parse error naming the
 * channel and the offset; captures are one file per direction.
 */
import { randomFillSync } from 'node:crypto';
import { once } from 'node:events';
import { mkdtemp, readFile, readdir, rm } from 'node:fs/promises';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import tls from 'node:tls';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { DestinationSession } from '../../src/protocol/destination.js';
import { InMemorySink } from '../../src/protocol/memory.js';
import { InMemorySource } from '../../src/protocol/memory-source.js';
import { SourceSession } from '../../src/protocol/source.js';
import { startTap, type Tap } from '../../src/protocol/tap/index.js';
import { MultifdChannelCounter } from '../../src/protocol/tap/multifd.js';
import { encodeMultifdInit, encodeMultifdPacketHeader, MultifdFlag } from '../../src/stream/multifd.js';
import { initPkiDir, loadTlsDir } from '../../src/transport/pki.js';
import type { StrangerEvent } from '../../src/transport/qualify.js';
import { clientTlsOptions, secureAccept, secureConnect, serverTlsOptions } from '../../src/transport/tls.js';

const PAGE = 4096;

/** One channel's bytes: init, the setup SYNC, `packets` packets of pages (normal then zero), a final SYNC. */
function channelBytes(id: number, packets: Array<{ normal: number[]; zero: number[] }>, first = 0): Buffer {
  const parts: Buffer[] = [Buffer.from(encodeMultifdInit(id))];
  let num = BigInt(first);
  const sync = (): void => void parts.push(Buffer.from(encodeMultifdPacketHeader({ flags: MultifdFlag.SYNC, pagesAlloc: 128, packetNum: num++, block: '', normal: [], zero: [] })));
  sync();
  for (const p of packets) {
    parts.push(Buffer.from(encodeMultifdPacketHeader({ flags: 0, pagesAlloc: 128, packetNum: num++, block: 'pc.ram', normal: p.normal, zero: p.zero })));
    for (const off of p.normal) parts.push(Buffer.alloc(PAGE, (off / PAGE) & 0xff));
  }
  sync();
  return Buffer.concat(parts);
}

interface Arrival {
  index: number;
  sock: net.Socket | tls.TLSSocket;
  data: Buffer[];
  ended: Promise<void>;
}

/** A destination that keeps every connection and its bytes, in arrival order (TCP accept for plain; the handshake for TLS). */
async function recordingDestination(tlsDir?: string): Promise<{ uri: string; arrivals: Arrival[]; waitArrivals(n: number): Promise<void>; close(): void }> {
  const arrivals: Arrival[] = [];
  const material = tlsDir ? await loadTlsDir(tlsDir, 'server') : undefined;
  const record = (sock: net.Socket | tls.TLSSocket): void => {
    // Like QEMU, it closes a channel once the source has ended it.
    const a: Arrival = { index: arrivals.length, sock, data: [], ended: once(sock, 'end').then(() => void sock.end()) };
    a.ended.catch(() => undefined);
    sock.on('data', (b: Buffer) => a.data.push(b));
    sock.on('error', () => undefined);
    arrivals.push(a);
  };
  const server = net.createServer({ allowHalfOpen: true }, (raw) => {
    if (!material) return record(raw);
    secureAccept(raw, serverTlsOptions(material, { dir: tlsDir!, endpoint: 'server' }), { channel: 'main' }).then(record, () => undefined);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return {
    uri: `tcp:127.0.0.1:${(server.address() as net.AddressInfo).port}`,
    arrivals,
    async waitArrivals(n) {
      const deadline = Date.now() + 5000;
      while (arrivals.length < n && Date.now() < deadline) await sleep(5);
      expect(arrivals.length).toBeGreaterThanOrEqual(n);
    },
    close() {
      for (const a of arrivals) a.sock.destroy();
      server.close();
    },
  };
}

async function connectSource(uri: string, tlsDir?: string): Promise<net.Socket | tls.TLSSocket> {
  const m = /^tcp:(.*):(\d+)$/.exec(uri)!;
  const host = m[1]!;
  const port = Number(m[2]);
  if (!tlsDir) {
    const s = net.connect({ host, port, allowHalfOpen: true });
    await once(s, 'connect');
    s.on('error', () => undefined);
    return s;
  }
  const opts = clientTlsOptions(await loadTlsDir(tlsDir, 'client'), { dir: tlsDir, endpoint: 'client', hostname: 'localhost' }, host);
  const s = await secureConnect({ ...opts, host, port }, { channel: 'main' });
  s.on('error', () => undefined);
  return s;
}

const cleanups: Array<() => Promise<void> | void> = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'qmt-tap-multifd-'));
  await initPkiDir(join(dir, 'pki'));
});
afterAll(() => rm(dir, { recursive: true, force: true }));

async function tapTo(to: string, extra: Partial<Parameters<typeof startTap>[0]> = {}): Promise<Tap> {
  const tap = await startTap({ listen: 'tcp:127.0.0.1:0', to, ...extra });
  cleanups.push(async () => void (await tap.close()));
  return tap;
}

const CH0 = channelBytes(0, [{ normal: [0, PAGE, 2 * PAGE], zero: [8 * PAGE] }, { normal: [16 * PAGE], zero: [] }]);
const CH1 = channelBytes(1, [{ normal: [], zero: [3 * PAGE, 4 * PAGE] }, { normal: [5 * PAGE, 6 * PAGE], zero: [7 * PAGE] }], 10);
const MAIN = Buffer.from('QEVM\0\0\0\x03');

describe.each([
  { name: 'plain', tls: false },
  { name: 'TLS in and out', tls: true },
])('tap: multifd channels ($name)', ({ tls: useTls }) => {
  it('channels that come before main wait for it; the destination gets main first, then the channels; counts per channel', async () => {
    const pki = useTls ? join(dir, 'pki') : undefined;
    const dst = await recordingDestination(pki);
    cleanups.push(() => dst.close());
    const tap = await tapTo(dst.uri, pki ? { tlsIn: pki, tlsOut: pki, tlsHostname: 'localhost' } : {});
    // As QEMU 10.0: the channels connect and send their init before main says anything.
    const c0 = await connectSource(tap.uri, pki);
    const c1 = await connectSource(tap.uri, pki);
    c0.write(CH0.subarray(0, 64));
    c1.write(CH1.subarray(0, 64));
    const main = await connectSource(tap.uri, pki);
    await sleep(50);
    expect(dst.arrivals).toHaveLength(0); // nothing reaches the destination before main qualified
    main.write(MAIN);
    await dst.waitArrivals(3);
    c0.end(CH0.subarray(64));
    c1.end(CH1.subarray(64));
    main.end();
    await Promise.all(dst.arrivals.map((a) => a.ended));
    const r = await tap.sessionEnd(1);
    // The first connection at the destination is main; the channels follow (each names its id in its init).
    const got = dst.arrivals.map((a) => Buffer.concat(a.data));
    expect(got[0]!.equals(MAIN)).toBe(true);
    expect(got.slice(1).sort((a, b) => a[24]! - b[24]!).map((b) => b.equals(b[24] === 0 ? CH0 : CH1))).toEqual([true, true]);
    for (const c of r.connections.multifd) expect(c.establishedMs).toBeGreaterThanOrEqual(r.connections.main.establishedMs!);
    expect(r.connections.preempt).toBeNull();
    expect(r.preempt).toBeNull();
    const byId = new Map(r.multifd!.channels.map((c) => [c.id, c]));
    expect(byId.get(0)).toMatchObject({ packets: 4, syncs: 2, pages: { normal: 4, zero: 1 }, bytes: CH0.length, multifdBytes: CH0.length, parseError: null, reverseBytes: 0 });
    expect(byId.get(1)).toMatchObject({ packets: 4, syncs: 2, pages: { normal: 2, zero: 3 }, bytes: CH1.length, multifdBytes: CH1.length, parseError: null });
    expect(byId.get(0)!.blocks).toEqual({ 'pc.ram': { normal: 4, zero: 1 } });
    expect(r.multifd!.total).toEqual({ channels: 2, packets: 8, syncs: 4, pages: { normal: 6, zero: 4 }, multifdBytes: CH0.length + CH1.length });
    expect(r.parseErrors).toEqual([]);
    if (useTls) for (const c of r.connections.multifd) expect([c.tlsIn?.protocol, c.tlsOut?.protocol]).toEqual(['TLSv1.3', 'TLSv1.3']);
    for (const s of [c0, c1, main]) s.destroy();
  });
});

describe('tap: multifd classification and faults', () => {
  it('a connection taken after main that then sends the multifd magic is a multifd channel, not the preempt channel', async () => {
    const dst = await recordingDestination();
    cleanups.push(() => dst.close());
    const tap = await tapTo(dst.uri);
    const main = await connectSource(tap.uri);
    main.write(MAIN);
    await dst.waitArrivals(1);
    const late = await connectSource(tap.uri);
    await dst.waitArrivals(2); // relayed at once, as a preempt channel would be
    late.end(CH0);
    main.end();
    await Promise.all(dst.arrivals.map((a) => a.ended));
    const r = await tap.sessionEnd(1);
    expect(Buffer.concat(dst.arrivals[1]!.data).equals(CH0)).toBe(true);
    expect(r.connections.preempt).toBeNull();
    expect(r.connections.multifd).toHaveLength(1);
    expect(r.multifd!.channels[0]).toMatchObject({ id: 0, packets: 4, pages: { normal: 4, zero: 1 } });
    late.destroy();
    main.destroy();
  });

  it('a multifd channel whose main channel never comes is dropped as a stranger within the qualify time', async () => {
    const dst = await recordingDestination();
    cleanups.push(() => dst.close());
    const tap = await tapTo(dst.uri, { connectTimeoutMs: 300 });
    const strangers: StrangerEvent[] = [];
    tap.on('stranger', (ev) => strangers.push(ev));
    const c0 = await connectSource(tap.uri);
    c0.write(CH0.subarray(0, 64));
    await new Promise((resolve) => c0.once('close', resolve));
    expect(strangers).toMatchObject([{ reason: 'timeout', error: { code: 'qualify-timeout' } }]);
    expect(dst.arrivals).toHaveLength(0);
  });

  it('a channel cut inside a packet: forwarded as it was, and a parse error naming the channel and the offset', async () => {
    const dst = await recordingDestination();
    cleanups.push(() => dst.close());
    const capture = join(dir, 'capture-cut');
    const tap = await tapTo(dst.uri, { capture });
    const errors: Array<{ direction: string; channel?: number; code: string; offset: number }> = [];
    tap.on('parse-error', (e) => errors.push({ direction: e.direction, ...(e.channel === undefined ? {} : { channel: e.channel }), code: e.error.code, offset: e.error.offset }));
    const c0 = await connectSource(tap.uri);
    const cut = CH0.subarray(0, 64 + 1344 + 1344 + 100); // init, SYNC, the header of the first page packet, 100 bytes of a page
    c0.write(cut.subarray(0, 64));
    const main = await connectSource(tap.uri);
    main.write(MAIN);
    await dst.waitArrivals(2);
    c0.end(cut.subarray(64));
    main.end();
    await Promise.all(dst.arrivals.map((a) => a.ended));
    const r = await tap.sessionEnd(1);
    expect(Buffer.concat(dst.arrivals[1]!.data).equals(cut)).toBe(true);
    const ch = r.multifd!.channels[0]!;
    expect(ch.parseError).toMatchObject({ code: 'truncated', offset: 64 + 1344 + 1344 });
    expect(r.parseErrors).toEqual([expect.objectContaining({ direction: 'multifd', channel: 0, code: 'truncated', offset: 64 + 1344 + 1344 })]);
    expect(errors).toEqual([{ direction: 'multifd', channel: 0, code: 'truncated', offset: 64 + 1344 + 1344 }]);
    // The captures: one file per direction that carried bytes, as forwarded.
    await tap.close();
    expect((await readdir(capture)).sort()).toEqual(['session-1-main.bin', 'session-1-multifd-0.bin']);
    expect((await readFile(join(capture, 'session-1-multifd-0.bin'))).equals(cut)).toBe(true);
    expect((await readFile(join(capture, 'session-1-main.bin'))).equals(MAIN)).toBe(true);
    expect(r.capture!.files.map((f) => [f.name, f.bytes, f.error])).toEqual(
      expect.arrayContaining([
        ['main', MAIN.length, null],
        ['multifd-0', cut.length, null],
      ]),
    );
    c0.destroy();
    main.destroy();
  });
});

describe('tap: a QEMU 10.0.2 multifd capture replayed (test/fixtures/multifd-4)', () => {
  it('main and 4 channels through the tap: bytes unchanged; the channels count to QEMU\'s normal, duplicate and multifd-bytes', async () => {
    const FIX = join(import.meta.dirname, '..', 'fixtures');
    const sc = JSON.parse(await readFile(join(FIX, 'multifd-4.json'), 'utf8')) as {
      files: { main: { name: string }; multifd: Array<{ name: string; channelId: number }> };
      source: { queryMigrate: { ram: { normal: number; duplicate: number; 'multifd-bytes': number } } };
    };
    const main = await readFile(join(FIX, sc.files.main.name));
    const chans = await Promise.all(sc.files.multifd.map((f) => readFile(join(FIX, f.name))));
    const dst = await recordingDestination();
    cleanups.push(() => dst.close());
    const tap = await tapTo(dst.uri);
    // As the source did: the channels connect and send their init message before main speaks.
    const socks = await Promise.all(chans.map(() => connectSource(tap.uri)));
    for (const [i, s] of socks.entries()) s.write(chans[i]!.subarray(0, 64));
    const m = await connectSource(tap.uri);
    m.write(main);
    await dst.waitArrivals(1 + chans.length);
    for (const [i, s] of socks.entries()) s.end(chans[i]!.subarray(64));
    m.end();
    await Promise.all(dst.arrivals.map((a) => a.ended));
    const r = await tap.sessionEnd(1);
    const got = dst.arrivals.map((a) => Buffer.concat(a.data));
    expect(got[0]!.equals(main)).toBe(true);
    expect(got.slice(1).map((b) => chans.findIndex((c) => c.equals(b))).sort()).toEqual([0, 1, 2, 3]);
    const ram = sc.source.queryMigrate.ram;
    expect(r.complete).toBe(true);
    expect(r.parseErrors).toEqual([]);
    expect(r.multifd!.total).toMatchObject({ channels: 4, pages: { normal: ram.normal, zero: ram.duplicate }, multifdBytes: ram['multifd-bytes'] });
    expect(r.multifd!.channels.map((c) => c.id).sort()).toEqual(sc.files.multifd.map((f) => f.channelId).sort());
    // With multifd the main stream carries no page record; every channel met every barrier (one MULTIFD_FLUSH on main per SYNC round).
    expect(r.main.pages).toEqual({ normal: 0, zero: 0, xbzrle: 0 });
    expect(r.main.multifdFlushes).toBeGreaterThan(1);
    for (const c of r.multifd!.channels) expect(c.syncs).toBe(r.main.multifdFlushes);
    for (const s of [...socks, m]) s.destroy();
  });
});

describe('MultifdChannelCounter', () => {
  it('counts a QEMU channel the same for any chunking (whole, random splits, splits inside pages and headers)', async () => {
    const bytes = await readFile(join(import.meta.dirname, '..', 'fixtures', 'multifd-2-ch1.bin'));
    const count = (sizes: () => number): ReturnType<MultifdChannelCounter['counts']> => {
      const c = new MultifdChannelCounter();
      for (let at = 0; at < bytes.length; ) {
        const n = Math.max(1, sizes());
        expect(c.push(bytes.subarray(at, at + n))).toBeUndefined();
        at += n;
      }
      expect(c.end()).toBeUndefined();
      return c.counts();
    };
    const whole = count(() => bytes.length);
    expect(whole).toMatchObject({ id: 1, multifdBytes: bytes.length });
    expect(whole.packets).toBeGreaterThan(10);
    let seed = 7;
    const rand = (): number => ((seed = (seed * 1103515245 + 12345) & 0x7fffffff) / 0x7fffffff);
    for (const max of [5000, 70_000, 600_000]) expect(count(() => Math.floor(rand() * max))).toEqual(whole);
    expect(count(() => 4097)).toEqual(whole);
    expect(count(() => 1343)).toEqual(whole);
  });
});

describe('tap: library source → tap → library destination, multifd then postcopy with preempt (QEMU 10.1 order), TLS both ways', () => {
  it('the channels are told apart (2 multifd by their magic, the last one preempt by order), RAM arrives bit for bit, the tap counts what the sessions counted', async () => {
    const RAM = 8 * 1024 * 1024;
    const pki = join(dir, 'pki');
    const source = new InMemorySource([{ idstr: 'pc.ram', length: RAM }]);
    const ram = source.memory.get('pc.ram')!;
    for (let p = 0; p < RAM; p += 3 * PAGE) randomFillSync(ram, p, PAGE);
    // The guest keeps rewriting pages during precopy, so that postcopy has pages to send and to fault on.
    const noise = Buffer.alloc(64);
    const writer = setInterval(() => {
      for (let i = 0; i < 100; i++) {
        randomFillSync(noise);
        source.write('pc.ram', Math.floor(Math.random() * (RAM / PAGE)) * PAGE, noise);
      }
    }, 10);
    cleanups.push(() => clearInterval(writer));
    const sink = new InMemorySink();
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, postcopy: true, multifd: { channels: 2 }, idleTimeoutMs: 20_000, transport: { tls: { dir: pki } } });
    cleanups.push(() => dst.close());
    const tap = await tapTo(dst.uri, { tlsIn: pki, tlsOut: pki, tlsHostname: 'localhost' });
    // Once the destination runs, it faults on pages from the top down, against the background stream.
    const faulting = new Promise<void>((resolve) => {
      dst.once('postcopy-run', () => {
        void (async () => {
          for (let off = RAM - PAGE; off >= 0 && dst.stats().status !== 'completed'; off -= PAGE) {
            if (!dst.hasPage('pc.ram', off)) await dst.requestPage('pc.ram', off).catch(() => undefined);
          }
        })().then(resolve);
      });
      dst.done.then(() => resolve(), () => resolve());
    });
    const src = new SourceSession({
      to: tap.uri,
      transport: { tls: { dir: pki, hostname: 'localhost' } },
      memory: source,
      machineType: 'pc-q35-10.0',
      devices: [],
      multifd: { channels: 2 },
      postcopy: { afterPasses: 1 },
      preempt: true,
      bandwidthLimit: 16 * 1024 * 1024,
      postcopyBandwidthLimit: 4 * 1024 * 1024,
      stopVm: () => clearInterval(writer),
    });
    src.start();
    const [stats, result] = await Promise.all([src.done, dst.done]);
    await faulting;
    const r = await tap.sessionEnd(1);
    expect(stats.status).toBe('completed');
    expect(result.postcopy).toBe(true);
    const got = sink.blocks.get('pc.ram')!;
    expect(Buffer.compare(got, ram), 'destination RAM').toBe(0);

    expect(r.complete).toBe(true);
    expect(r.parseErrors).toEqual([]);
    expect(r.connections.multifd).toHaveLength(2);
    expect(r.multifd!.channels.map((c) => c.id).sort()).toEqual([0, 1]);
    // 10.1's order, kept towards the destination: the preempt connection after every multifd one.
    const pre = r.connections.preempt!;
    for (const m of r.connections.multifd) expect(pre.establishedMs!).toBeGreaterThanOrEqual(m.establishedMs!);
    expect([pre.tlsIn?.protocol, pre.tlsOut?.protocol]).toEqual(['TLSv1.3', 'TLSv1.3']);
    // Every page the source sent is on one channel or another; requests as the source counted them.
    const pages = r.multifd!.total.pages;
    expect(pages.normal + r.main.pages.normal + r.preempt!.pages.normal).toBe(stats.normal);
    expect(pages.zero + r.main.pages.zero + r.preempt!.pages.zero).toBe(stats.duplicate);
    // Answered where the source says it answered them: on preempt, or by a page already in flight on main.
    expect(r.requests.answered.preempt).toBe(stats['requests-answered'].preempt);
    expect(r.requests.answered.preempt).toBeGreaterThan(0);
    expect(r.preempt!.pages.normal + r.preempt!.pages.zero).toBeGreaterThan(0);
    expect(r.requests.count).toBe(stats['postcopy-requests']);
    expect(r.requests.unanswered).toBe(0);
    // Multifd is idle in postcopy: every SYNC round of the channels has its MULTIFD_FLUSH on main.
    for (const c of r.multifd!.channels) expect(c.syncs).toBe(r.main.multifdFlushes);
  });
});

describe('tap: a multifd channel cut in precopy', () => {
  it('a source reset on one channel is passed on to the destination at once, typed and named; the session ends with nothing left open', async () => {
    const dst = await recordingDestination();
    cleanups.push(() => dst.close());
    const tap = await tapTo(dst.uri);
    const errors: Array<{ code: string; channel: string | undefined }> = [];
    tap.on('error', (e) => errors.push({ code: e.code, channel: e.channel }));
    const c0 = await connectSource(tap.uri);
    const c1 = await connectSource(tap.uri);
    c0.write(CH0.subarray(0, 64));
    c1.write(CH1.subarray(0, 64));
    const main = await connectSource(tap.uri);
    main.write(MAIN);
    await dst.waitArrivals(3);
    c1.write(CH1.subarray(64, 2000));
    // Accepted is not yet arrived: on a busy machine channel 1's init may still be on its way.
    const deadline = Date.now() + 5000;
    const ch1 = () => dst.arrivals.find((a) => a.index > 0 && Buffer.concat(a.data).subarray(0, 64).equals(CH1.subarray(0, 64)));
    while (!ch1() && Date.now() < deadline) await sleep(5);
    const atDst = ch1();
    if (!atDst) throw new Error("channel 1's init never reached the destination");
    while (Buffer.concat(atDst.data).length < 2000 && Date.now() < deadline) await sleep(5);
    const reset = new Promise<string | undefined>((resolve) => {
      atDst.sock.once('error', (e: NodeJS.ErrnoException) => resolve(e.code));
      atDst.sock.once('close', () => resolve(undefined));
    });
    (c1 as net.Socket).resetAndDestroy();
    expect(await reset).toBe('ECONNRESET');
    expect(errors).toEqual([{ code: 'reset', channel: 'multifd-1' }]);
    // The rest of the migration goes its way (here: ends); then every connection is closed.
    c0.end(CH0.subarray(64));
    main.end();
    const r = await tap.sessionEnd(1);
    expect(r.transportErrors).toEqual([expect.objectContaining({ side: 'source', channel: 'multifd', code: 'reset', afterComplete: false })]);
    expect([r.connections.main, ...r.connections.multifd].every((c) => c.closedMs !== null)).toBe(true);
    const cut = r.multifd!.channels.find((c) => c.id === 1)!;
    expect(cut.bytes).toBe(2000);
    for (const s of [c0, main]) s.destroy();
  });
});
