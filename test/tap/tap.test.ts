/**
 * The tap between a scripted source and a scripted destination: the captured
 * QEMU streams (test/fixtures) are replayed through it in the order the
 * recording relay saw them — each chunk is written only once the previous one
 * has come out of the tap — so the tap sees every page request before its
 * answer, as it would between two QEMUs. Checks: the bytes out equal the bytes
 * in, in every direction; the report's page and request counts equal QEMU's own
 * (the sidecars); TLS both ways; a parse error does not stop forwarding;
 * connection order; backpressure; failures.
 */
import { randomBytes } from 'node:crypto';
import { once } from 'node:events';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { setTimeout as sleep } from 'node:timers/promises';
import tls from 'node:tls';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { StreamEncoder } from '../../src/stream/encoder.js';
import { startTap, type Tap, type TapReport } from '../../src/protocol/tap/index.js';
import type { Channel } from '../../src/transport/channel.js';
import { MigrationListener, SourceConnection, type DestinationConnection } from '../../src/transport/connection.js';
import { initPkiDir, loadTlsDir } from '../../src/transport/pki.js';
import type { StrangerEvent } from '../../src/transport/qualify.js';
import { clientTlsOptions, secureAccept, secureConnect, serverTlsOptions } from '../../src/transport/tls.js';

const FIXTURES = join(import.meta.dirname, '..', 'fixtures');
const MiB = 1024 * 1024;

interface Sidecar {
  relay: {
    connections: Array<{
      index: number;
      role: 'main' | 'preempt';
      acceptedAtMs: number;
      srcToDstChunks: Array<[number, number, number]>;
      dstToSrcChunks: Array<[number, number, number]>;
    }>;
  };
  source: { queryMigrate: { ram: { normal: number; duplicate: number; 'postcopy-requests': number } } };
}

const load = (name: string): Promise<Buffer> => readFile(join(FIXTURES, name));
const sidecar = async (name: string): Promise<Sidecar> => JSON.parse(await readFile(join(FIXTURES, name), 'utf8')) as Sidecar;

/** One end of one connection as the test drives it: writes, and counts what it received. */
interface End {
  write(b: Buffer): Promise<void> | void;
  end(): void;
  received(): Buffer;
  receivedBytes(): number;
  /** Resolves once `n` bytes have been received in total. */
  waitFor(n: number, timeoutMs?: number): Promise<void>;
}

class Collector {
  private chunks: Buffer[] = [];
  private n = 0;
  private waiters: Array<{ n: number; resolve: () => void }> = [];
  /** `keep` false: count only (bulk transfers). */
  constructor(private readonly keep = true) {}
  add(b: Buffer): void {
    if (this.keep) this.chunks.push(b);
    this.n += b.length;
    this.waiters = this.waiters.filter((w) => (w.n <= this.n ? (w.resolve(), false) : true));
  }
  get bytes(): number {
    return this.n;
  }
  data(): Buffer {
    return Buffer.concat(this.chunks);
  }
  waitFor(n: number, timeoutMs = 5000): Promise<void> {
    if (this.n >= n) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new Error(`received ${this.n} of ${n} bytes`)), timeoutMs);
      this.waiters.push({ n, resolve: () => (clearTimeout(t), resolve()) });
    });
  }
}

function socketEnd(s: net.Socket | tls.TLSSocket, keep = true): End {
  const c = new Collector(keep);
  s.on('data', (b: Buffer) => c.add(b));
  s.on('error', () => undefined);
  return {
    write: (b) => void s.write(b),
    end: () => s.end(),
    received: () => c.data(),
    receivedBytes: () => c.bytes,
    waitFor: (n, t) => c.waitFor(n, t),
  };
}

function channelEnd(ch: Channel): End {
  const c = new Collector();
  ch.read((b) => c.add(b));
  ch.on('error', () => undefined);
  return {
    write: (b) => ch.send([b]),
    end: () => void ch.close(),
    received: () => c.data(),
    receivedBytes: () => c.bytes,
    waitFor: (n, t) => c.waitFor(n, t),
  };
}

/**
 * The end of a connection that exists only later: the tap connects to the
 * destination once the source's first bytes have qualified (the magic), so the
 * replay writes before that end is there.
 */
function later(p: Promise<End>): End {
  let e: End | undefined;
  void p.then((x) => (e = x));
  const now = (): End => {
    if (!e) throw new Error('that connection has not arrived');
    return e;
  };
  return {
    write: async (b) => (await p).write(b),
    end: () => void p.then((x) => x.end()),
    received: () => now().received(),
    receivedBytes: () => now().receivedBytes(),
    waitFor: async (n, t) => (await p).waitFor(n, t),
  };
}

/** A plain destination: accepted sockets, in order. */
async function plainDestination(keep = true): Promise<{ uri: string; conns: Array<net.Socket>; ends: End[]; next(i: number): Promise<End>; close(): void }> {
  const conns: net.Socket[] = [];
  const ends: End[] = [];
  const arrived: Array<() => void> = [];
  const server = net.createServer({ allowHalfOpen: true }, (s) => {
    conns.push(s);
    ends.push(socketEnd(s, keep));
    for (const a of arrived.splice(0)) a();
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return {
    uri: `tcp:127.0.0.1:${(server.address() as net.AddressInfo).port}`,
    conns,
    ends,
    async next(i) {
      while (!ends[i]) await new Promise<void>((r) => arrived.push(r));
      return ends[i]!;
    },
    close() {
      for (const c of conns) c.destroy();
      server.close();
    },
  };
}

async function plainSource(uri: string): Promise<{ sock: net.Socket; end: End }> {
  const m = /^tcp:(.*):(\d+)$/.exec(uri)!;
  const sock = net.connect({ host: m[1]!, port: Number(m[2]), allowHalfOpen: true });
  await once(sock, 'connect');
  return { sock, end: socketEnd(sock) };
}

type Step =
  | { t: number; kind: 'src'; conn: number; offset: number; length: number }
  | { t: number; kind: 'dst'; conn: number; offset: number; length: number }
  | { t: number; kind: 'connect'; conn: number };

function timeline(sc: Sidecar): Step[] {
  const steps: Step[] = [];
  for (const c of sc.relay.connections) {
    if (c.index > 0) steps.push({ t: c.acceptedAtMs, kind: 'connect', conn: c.index });
    for (const [t, offset, length] of c.srcToDstChunks) steps.push({ t, kind: 'src', conn: c.index, offset, length });
    for (const [t, offset, length] of c.dstToSrcChunks) steps.push({ t, kind: 'dst', conn: c.index, offset, length });
  }
  // Stable: within a millisecond the recorded order of each list is kept.
  return steps.map((s, i) => ({ s, i })).sort((a, b) => a.s.t - b.s.t || a.i - b.i).map((x) => x.s);
}

interface Replay {
  srcEnds: End[];
  dstEnds: End[];
}

/**
 * Replays a capture step by step: `src` chunks are written by the source end
 * of their connection and awaited at the destination end, `dst` chunks the
 * other way round. `connect(i)` opens the source's connection i and returns
 * both of its ends.
 */
async function replay(steps: Step[], streams: { src: Buffer[]; dst: Buffer[] }, first: { src: End; dst: End }, connect: (conn: number) => Promise<{ src: End; dst: End }>): Promise<Replay> {
  const srcEnds: End[] = [first.src];
  const dstEnds: End[] = [first.dst];
  for (const st of steps) {
    if (st.kind === 'connect') {
      const e = await connect(st.conn);
      srcEnds[st.conn] = e.src;
      dstEnds[st.conn] = e.dst;
      continue;
    }
    const from = st.kind === 'src' ? srcEnds[st.conn]! : dstEnds[st.conn]!;
    const to = st.kind === 'src' ? dstEnds[st.conn]! : srcEnds[st.conn]!;
    const bytes = (st.kind === 'src' ? streams.src : streams.dst)[st.conn]!;
    await from.write(bytes.subarray(st.offset, st.offset + st.length));
    await to.waitFor(st.offset + st.length);
  }
  return { srcEnds, dstEnds };
}

const taps: Tap[] = [];
const cleanups: Array<() => unknown> = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
  for (const t of taps.splice(0)) await t.close();
});

async function tapTo(to: string, extra: Partial<Parameters<typeof startTap>[0]> = {}): Promise<Tap> {
  const tap = await startTap({ listen: 'tcp:127.0.0.1:0', to, ...extra });
  taps.push(tap);
  return tap;
}

function expectCleanRequests(r: TapReport, want: number): void {
  expect(r.requests.count).toBe(want);
  expect(r.requests.unanswered).toBe(0);
  expect(r.requests.answered.main + r.requests.answered.preempt + r.requests.alreadyForwarded).toBe(want);
  expect(r.requests.latency.all.count).toBe(r.requests.answered.main + r.requests.answered.preempt);
}

describe('tap: fixture replay, plain TCP', () => {
  it('postcopy (no preempt): identical bytes both ways; pages and requests as QEMU counted them', async () => {
    const [main, rp, sc] = await Promise.all([load('postcopy-main.bin'), load('postcopy-rp.bin'), sidecar('postcopy.json')]);
    const dst = await plainDestination();
    cleanups.push(() => dst.close());
    const tap = await tapTo(dst.uri);
    const events = { requests: 0, answered: 0, milestones: [] as string[] };
    tap.on('page-request', () => events.requests++);
    tap.on('page-answered', () => events.answered++);
    tap.on('milestone', (m) => events.milestones.push(m.name));
    const src = await plainSource(tap.uri);
    const ended = tap.sessionEnd(1);
    await replay(timeline(sc), { src: [main], dst: [rp] }, { src: src.end, dst: later(dst.next(0)) }, () => Promise.reject(new Error('no preempt here')));
    src.end.end();
    dst.ends[0]!.end();
    const r = await ended;

    expect(dst.ends[0]!.received().equals(main)).toBe(true);
    expect(src.end.received().equals(rp)).toBe(true);
    const ram = sc.source.queryMigrate.ram;
    expect(r.state).toBe('ended');
    expect(r.kind).toBe('migration');
    expect(r.machineType).toBe('pc-q35-10.0');
    expect(r.complete).toBe(true);
    expect(r.postcopy).toBe(true);
    expect(r.preempt).toBeNull();
    expect(r.main.bytes).toBe(main.length);
    expect(r.returnPath.bytes).toBe(rp.length);
    expect(r.main.pages.normal).toBe(ram.normal);
    expect(r.main.pages.zero).toBe(ram.duplicate);
    expect(r.main.postcopyPages.normal).toBeGreaterThan(0);
    expectCleanRequests(r, ram['postcopy-requests']);
    expect(r.requests.answered.preempt).toBe(0);
    expect(events.requests).toBe(ram['postcopy-requests']);
    expect(events.answered).toBe(r.requests.answered.main);
    expect(r.returnPath.shut).toBe(0);
    expect(r.parseErrors).toEqual([]);
    expect(r.transportErrors).toEqual([]);
    // Passes: precopy passes from the scan wrapping, then postcopy's background pass(es).
    expect(r.main.ramParts.precopy).toBeGreaterThan(0);
    expect(r.passes.filter((p) => p.phase === 'precopy').length).toBeGreaterThanOrEqual(2);
    expect(r.passes.some((p) => p.phase === 'postcopy')).toBe(true);
    const sum = r.passes.reduce((a, p) => a + p.normal, 0);
    expect(sum).toBe(ram.normal);
    // Milestones in wire order.
    const s = r.switchover;
    expect(s.switchoverStartMs).not.toBeNull();
    expect(s.switchoverStartMs!).toBeLessThanOrEqual(s.packagedMs!);
    expect(s.packagedMs!).toBeLessThanOrEqual(s.postcopyListenMs!);
    expect(s.postcopyListenMs!).toBeLessThanOrEqual(s.postcopyRunMs!);
    expect(s.postcopyRunMs!).toBeLessThanOrEqual(s.eofMs!);
    expect(s.wireMs).toBeCloseTo(s.postcopyRunMs! - s.switchoverStartMs!, 2);
    expect(events.milestones).toEqual(['switchover-start', 'packaged', 'postcopy-listen', 'postcopy-run', 'eof', 'shut']);
    // Overhead: every chunk's write completed and was timed.
    expect(r.overhead.forwardDelay.all.count).toBe(r.main.chunks + r.returnPath.chunks);
    expect(r.overhead.peakQueuedBytes).toBeLessThan(1 * MiB);
    expect(r.connections.main.establishedMs).not.toBeNull();
    expect(r.connections.main.closedMs).not.toBeNull();
  });

  it('postcopy with preempt: three streams identical; main + preempt pages are QEMU\'s; requests answered on both channels', async () => {
    const [main, rp, pre, sc] = await Promise.all([load('preempt-main.bin'), load('preempt-rp.bin'), load('preempt-channel.bin'), sidecar('preempt.json')]);
    const dst = await plainDestination();
    cleanups.push(() => dst.close());
    const tap = await tapTo(dst.uri);
    const channels: string[] = [];
    tap.on('channel', (c) => channels.push(c.role));
    const src = await plainSource(tap.uri);
    let preSrc: net.Socket | undefined;
    const ended = tap.sessionEnd(1);
    await replay(timeline(sc), { src: [main, pre], dst: [rp, Buffer.alloc(0)] }, { src: src.end, dst: later(dst.next(0)) }, async () => {
      const p = await plainSource(tap.uri);
      preSrc = p.sock;
      return { src: p.end, dst: await dst.next(1) };
    });
    src.end.end();
    preSrc!.end();
    dst.ends[0]!.end();
    dst.ends[1]!.end();
    const r = await ended;

    expect(dst.ends[0]!.received().equals(main)).toBe(true);
    expect(dst.ends[1]!.received().equals(pre)).toBe(true);
    expect(src.end.received().equals(rp)).toBe(true);
    expect(channels).toEqual(['main', 'preempt']);
    const ram = sc.source.queryMigrate.ram;
    expect(r.preempt).not.toBeNull();
    expect(r.preempt!.bytes).toBe(pre.length);
    expect(r.main.pages.normal + r.preempt!.pages.normal).toBe(ram.normal);
    expect(r.main.pages.zero + r.preempt!.pages.zero).toBe(ram.duplicate);
    expectCleanRequests(r, ram['postcopy-requests']);
    expect(r.requests.answered.preempt).toBeGreaterThan(r.requests.answered.main);
    expect(r.requests.latency.preempt.count).toBe(r.requests.answered.preempt);
    expect(r.complete).toBe(true);
    expect(r.parseErrors).toEqual([]);
    expect(r.connections.preempt?.establishedMs).toBeGreaterThan(r.connections.main.establishedMs!);
  });

  it('a parse error is reported and forwarding goes on unchanged; the other directions are still analysed', async () => {
    const [good, rp, sc] = await Promise.all([load('postcopy-main.bin'), load('postcopy-rp.bin'), sidecar('postcopy.json')]);
    const main = Buffer.from(good);
    // The configuration record's length field (after the 8-byte header): 0 is refused.
    main.writeUInt32BE(0, 9);
    const dst = await plainDestination();
    cleanups.push(() => dst.close());
    const tap = await tapTo(dst.uri);
    const errors: string[] = [];
    tap.on('parse-error', (e) => errors.push(`${e.direction}:${e.error.code}`));
    const src = await plainSource(tap.uri);
    const ended = tap.sessionEnd();
    await replay(timeline(sc), { src: [main], dst: [rp] }, { src: src.end, dst: later(dst.next(0)) }, () => Promise.reject(new Error('no preempt')));
    src.end.end();
    dst.ends[0]!.end();
    const r = await ended;
    expect(dst.ends[0]!.received().equals(main)).toBe(true);
    expect(src.end.received().equals(rp)).toBe(true);
    expect(errors).toEqual(['main:bad-configuration']);
    expect(r.parseErrors).toMatchObject([{ direction: 'main', code: 'bad-configuration', offset: 8 }]);
    expect(r.main.bytes).toBe(main.length);
    expect(r.complete).toBe(false);
    // The return path was parsed: its requests were counted (never answered: main is not parsed).
    expect(r.requests.count).toBe(sc.source.queryMigrate.ram['postcopy-requests']);
    expect(r.returnPath.shut).toBe(0);
  });
});

describe('tap: TLS in and out', () => {
  let dir: string;
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'qmt-tap-tls-'));
    await initPkiDir(dir);
  });
  afterAll(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it('SourceConnection → tap → MigrationListener over TLS both ways: the preempt replay is byte-exact and analysed', async () => {
    const [main, rp, pre, sc] = await Promise.all([load('preempt-main.bin'), load('preempt-rp.bin'), load('preempt-channel.bin'), sidecar('preempt.json')]);
    // Roles by order (as QEMU): the replay sends the channels' bytes only once both ends exist.
    const listener = await MigrationListener.listen('tcp:127.0.0.1:0', { tls: { dir } }, { start: 'any' });
    cleanups.push(() => listener.close());
    const tap = await tapTo(listener.uri, { tlsIn: dir, tlsOut: dir, tlsHostname: 'localhost' });
    const source = await SourceConnection.connect(tap.uri, { tls: { dir, hostname: 'localhost' } });
    cleanups.push(() => source.destroy());
    // The tap connects onward once the source's first bytes (the magic) have qualified it.
    const accepted = listener.accept();
    void accepted.then((d) => cleanups.push(() => d.destroy()));
    const ended = tap.sessionEnd(1);
    await replay(timeline(sc), { src: [main, pre], dst: [rp, Buffer.alloc(0)] }, { src: channelEnd(source.main), dst: later(accepted.then((d) => channelEnd(d.main))) }, async () => {
      const ch = await source.connectPreempt();
      const dest: DestinationConnection = await accepted;
      return { src: channelEnd(ch), dst: channelEnd(await dest.waitPreempt()) };
    });
    const dest = await accepted;
    await source.close();
    await dest.close();
    const r = await ended;

    const ram = sc.source.queryMigrate.ram;
    expect(r.tls).toEqual({ in: true, out: true });
    expect(r.connections.main.tlsIn?.protocol).toBe('TLSv1.3');
    expect(r.connections.main.tlsOut?.protocol).toBe('TLSv1.3');
    expect(r.connections.preempt?.tlsIn?.protocol).toBe('TLSv1.3');
    expect(r.main.bytes).toBe(main.length);
    expect(r.preempt!.bytes).toBe(pre.length);
    expect(r.returnPath.bytes).toBe(rp.length);
    expect(r.main.pages.normal + r.preempt!.pages.normal).toBe(ram.normal);
    expectCleanRequests(r, ram['postcopy-requests']);
    expect(r.complete).toBe(true);
    expect(r.parseErrors).toEqual([]);
  });

  it('a preempt connection whose handshake completes after the main connection closed is dropped and reported as extra', async () => {
    const dst = await plainDestination();
    cleanups.push(() => dst.close());
    const tap = await tapTo(dst.uri, { tlsIn: dir });
    const strangers: StrangerEvent[] = [];
    tap.on('stranger', (ev) => strangers.push(ev));
    const port = Number(/:(\d+)$/.exec(tap.uri)![1]);
    const opts = clientTlsOptions(await loadTlsDir(dir, 'client'), { dir, endpoint: 'client', hostname: 'localhost' }, '127.0.0.1');
    const main = await secureConnect({ ...opts, host: '127.0.0.1', port }, { channel: 'main' });
    main.on('error', () => undefined);
    main.write('QEVM');
    const d = await dst.next(0);
    await d.waitFor(4);
    // The second connection arrives while the main one is open (a preempt candidate), but has not begun its handshake.
    const raw = net.connect(port, '127.0.0.1');
    raw.on('error', () => undefined);
    await once(raw, 'connect');
    const deadline = Date.now() + 5000;
    while (tap.pendingConnections === 0 && Date.now() < deadline) await sleep(5);
    expect(tap.pendingConnections).toBe(1);
    const ended = tap.sessionEnd(1);
    main.destroy();
    dst.conns[0]!.destroy();
    await ended;
    // Now it qualifies (a valid certificate), for a role that is gone.
    const late = await secureConnect({ ...opts, socket: raw }, { channel: 'preempt' });
    late.on('error', () => undefined);
    while (strangers.length === 0 && Date.now() < deadline + 5000) await sleep(5);
    expect(strangers).toMatchObject([{ reason: 'extra', error: { code: 'channel-order', channel: 'preempt' } }]);
    expect(dst.conns).toHaveLength(1);
    late.destroy();
  });

  it('the preempt connection to the destination is opened only once the main one is established (TLS handshake included)', async () => {
    // A destination whose first TLS handshake is slow: it answers the main connection's ClientHello 300 ms late.
    const material = await loadTlsDir(dir, 'server');
    const opts = serverTlsOptions(material, { dir, endpoint: 'server' });
    const log: string[] = [];
    const secured: tls.TLSSocket[] = [];
    let n = 0;
    const server = net.createServer((raw) => {
      const i = n++;
      log.push(`tcp${i}`);
      const go = (): void => {
        secureAccept(raw, opts, { channel: i === 0 ? 'main' : 'preempt' }).then(
          (s) => {
            log.push(`tls${i}`);
            secured.push(s);
            s.on('data', (b: Buffer) => log.push(`data${i}:${b.toString('latin1')}`));
          },
          () => log.push(`fail${i}`),
        );
      };
      if (i === 0) setTimeout(go, 300);
      else go();
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    cleanups.push(() => {
      for (const s of secured) s.destroy();
      server.close();
    });
    const tap = await tapTo(`tcp:127.0.0.1:${(server.address() as net.AddressInfo).port}`, { tlsOut: dir, tlsHostname: 'localhost' });
    tap.on('channel', (c) => log.push(`tap-${c.role}`));
    // The source's main connection qualifies by its magic; then the second one comes at once, and both write.
    const sessionStarted = once(tap, 'session');
    const a = await plainSource(tap.uri);
    a.sock.write('QEVM');
    await sessionStarted;
    const b = await plainSource(tap.uri);
    b.sock.write('P');
    const deadline = Date.now() + 5000;
    while (!(log.includes('data0:QEVM') && log.includes('data1:P')) && Date.now() < deadline) await sleep(10);
    // The tap connected the second connection only after its handshake on the first had completed
    // (300 ms late); QEMU's source does the same (and waits for PONG 1 before connecting at all).
    expect(log.indexOf('tap-main')).toBeGreaterThan(log.indexOf('tcp0'));
    expect(log.indexOf('tcp1')).toBeGreaterThan(log.indexOf('tap-main'));
    expect(log.indexOf('tap-preempt')).toBeGreaterThan(log.indexOf('tcp1'));
    expect(log.filter((l) => l.startsWith('data'))).toEqual(expect.arrayContaining(['data0:QEVM', 'data1:P']));
    a.sock.destroy();
    b.sock.destroy();
  });
});

describe('tap: forwarding', () => {
  it('keeps backpressure: a destination that stops reading stalls the source, not the tap\'s memory; then 48 MiB arrive intact', async () => {
    const dst = await plainDestination();
    cleanups.push(() => dst.close());
    const tap = await tapTo(dst.uri);
    const src = await plainSource(tap.uri);
    const payload = randomBytes(48 * MiB);
    // The magic qualifies the connection (the tap then connects onward); the rest is not a stream.
    payload.write('QEVM', 0, 'latin1');
    src.sock.write(payload.subarray(0, 4));
    const d = await dst.next(0);
    await d.waitFor(4);
    dst.conns[0]!.pause();
    let written = 0;
    // Write as fast as the source socket takes it.
    const writer = (async () => {
      for (let off = 4; off < payload.length; off += 1 * MiB) {
        if (!src.sock.write(payload.subarray(off, off + MiB))) await once(src.sock, 'drain');
        written = off + MiB;
      }
    })();
    await sleep(500);
    const stalledAt = written;
    const inTap = tap.report()!.overhead.peakQueuedBytes;
    expect(stalledAt).toBeLessThan(payload.length); // the source is held back ...
    expect(inTap).toBeLessThanOrEqual(256 * 1024); // ... and the tap holds at most a socket buffer and a chunk
    dst.conns[0]!.resume();
    await writer;
    await d.waitFor(payload.length, 20_000);
    expect(d.received().equals(payload)).toBe(true);
    const r = tap.report()!;
    expect(r.overhead.peakQueuedBytes).toBeLessThanOrEqual(256 * 1024);
    // Not a QEMU stream after its magic: one parse error, and the bytes went through regardless.
    expect(r.parseErrors).toMatchObject([{ direction: 'main' }]);
  });

  it('overhead: forwarding delay and throughput of a 256 MiB RAM stream, parsed on the way (printed)', async () => {
    const dst = await plainDestination(false);
    cleanups.push(() => dst.close());
    const tap = await tapTo(dst.uri);
    const src = await plainSource(tap.uri);
    const d = later(dst.next(0));
    const pages = 65_536;
    const perSection = 1024;
    const ram = { sectionId: 1, idstr: 'ram', instanceId: 0, versionId: 4 } as const;
    const enc = new StreamEncoder();
    const data = randomBytes(4096);
    const send = async (): Promise<void> => {
      for (const piece of enc.take()) if (!src.sock.write(piece)) await once(src.sock, 'drain');
    };
    const t0 = performance.now();
    enc.writeAll([
      { type: 'header', version: 3 },
      { type: 'configuration', machineType: 'pc-q35-10.0' },
      { type: 'section', kind: 'start', ...ram },
      { type: 'ram-blocks', total: pages * 4096, blocks: [{ idstr: 'pc.ram', length: pages * 4096 }] },
      { type: 'ram-eos' },
      { type: 'footer', sectionId: 1 },
    ]);
    for (let p = 0; p < pages; p += perSection) {
      enc.write({ type: 'section', kind: 'part', ...ram });
      for (let i = p; i < p + perSection; i++) enc.write({ type: 'ram-page', block: 'pc.ram', offset: i * 4096, continued: i > 0, data });
      enc.writeAll([{ type: 'ram-eos' }, { type: 'footer', sectionId: 1 }]);
      await send();
    }
    enc.writeAll([{ type: 'section', kind: 'end', ...ram }, { type: 'ram-eos' }, { type: 'footer', sectionId: 1 }, { type: 'eof' }]);
    await send();
    const total = src.sock.bytesWritten;
    await d.waitFor(total, 30_000);
    const secs = (performance.now() - t0) / 1000;
    const r = tap.report()!;
    const fd = r.overhead.forwardDelay.main;
    const an = r.overhead.analysisPerChunk;
    console.log(
      `[tap overhead] plain TCP, ${(total / MiB).toFixed(0)} MiB RAM stream, source, tap and destination in one process: ` +
        `${(total / MiB / secs).toFixed(0)} MiB/s end to end; forward delay p50 ${fd.p50} µs, p99 ${fd.p99} µs, max ${fd.max} µs ` +
        `over ${fd.count} chunks; analysis per chunk p50 ${an.p50} µs, p99 ${an.p99} µs; peak queued ${r.overhead.peakQueuedBytes} B`,
    );
    expect(r.parseErrors).toEqual([]);
    expect(r.main.bytes).toBe(total);
    expect(r.main.pages.normal).toBe(pages);
    expect(r.main.ramParts.precopy).toBe(pages / perSection);
    expect(r.passes).toHaveLength(1);
    expect(r.main.eof).toBe(true);
    expect(fd.count).toBe(r.main.chunks);
  });

  it('a source reset is passed on to the destination at once; the next main connection is a new session', async () => {
    const dst = await plainDestination();
    cleanups.push(() => dst.close());
    const tap = await tapTo(dst.uri);
    const errors: string[] = [];
    tap.on('error', (e) => errors.push(e.code));
    const src = await plainSource(tap.uri);
    src.sock.write('QEVM');
    const d = await dst.next(0);
    await d.waitFor(4);
    const closed = new Promise((resolve) => dst.conns[0]!.once('close', resolve));
    const ended = tap.sessionEnd(1);
    src.sock.resetAndDestroy();
    await closed;
    const r1 = await ended;
    expect(r1.state).toBe('ended');
    expect(r1.transportErrors).toMatchObject([{ side: 'source', channel: 'main', code: 'reset', afterComplete: false }]);
    expect(errors).toEqual(['reset']);
    // A new main connection: session 2.
    const again = await plainSource(tap.uri);
    again.sock.write('QEVM');
    const d2 = await dst.next(1);
    await d2.waitFor(4);
    expect(tap.report()!.session).toBe(2);
    expect(tap.reports().map((r) => r.session)).toEqual([1, 2]);
    again.sock.destroy();
  });

  it('a connection after the preempt channel (it spoke: not multifd) is refused; a destination that refuses makes the source fail', async () => {
    const dst = await plainDestination();
    cleanups.push(() => dst.close());
    const tap = await tapTo(dst.uri);
    const codes: string[] = [];
    tap.on('error', (e) => codes.push(e.code));
    const strangers: string[] = [];
    tap.on('stranger', (ev) => strangers.push(ev.reason));
    const a = await plainSource(tap.uri);
    a.sock.write('QEVM');
    await dst.next(0);
    const b = await plainSource(tap.uri);
    // A ZERO page record header: not the multifd magic, so this is the preempt channel.
    b.sock.write(Buffer.from([0, 0, 0, 0, 0, 0, 0, 0x02]));
    await (await dst.next(1)).waitFor(8);
    const c = await plainSource(tap.uri);
    await new Promise((resolve) => c.sock.once('end', resolve));
    expect(codes).toEqual(['channel-order']);
    expect(strangers).toEqual(['extra']);
    expect(dst.conns.length).toBe(2);
    a.sock.destroy();
    b.sock.destroy();

    // Nobody listens at the destination: the source's connection is reset.
    const dead = await tapTo('tcp:127.0.0.1:1');
    const codes2: string[] = [];
    dead.on('error', (e) => codes2.push(e.code));
    const s = await plainSource(dead.uri);
    s.sock.write('QEVM');
    await new Promise((resolve) => s.sock.once('close', resolve));
    expect(codes2).toEqual(['connect-failed']);
    const r = await dead.sessionEnd(1);
    expect(r.connections.main.establishedMs).toBeNull();
    expect(r.transportErrors[0]).toMatchObject({ side: 'destination', code: 'connect-failed' });
  });
});
