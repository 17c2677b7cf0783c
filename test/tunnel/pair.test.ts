/**
 * The tunnel's entry and exit (library) with stand-ins for the two QEMUs:
 * a "source" that opens connections to the entry and a "destination" server
 * behind the exit, a FaultRelay on the hop between them. Every byte each side
 * writes arrives once, in order, however the hop is cut (resets, a silent
 * partition) — and the QEMU-side sockets never see an error; the destination
 * accepts the connections in the order the source opened them; an outage
 * longer than the limit closes both QEMU sides; strangers on the exit's port
 * are dropped and change nothing; nothing is left open.
 */
import { createHash, randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import tls from 'node:tls';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { KEEP_FINISHED } from '../../src/protocol/tunnel/common.js';
import { TunnelEntry, TunnelExit, type TunnelLimits } from '../../src/protocol/tunnel/index.js';
import { initPkiDir } from '../../src/transport/pki.js';
import type { StrangerEvent } from '../../src/transport/qualify.js';
import { FaultRelay } from '../faults/relay.js';
import { leftAfter, resourceSnapshot } from '../support/resources.js';

const MiB = 1 << 20;
let pki: string;
let otherPki: string;
beforeAll(async () => {
  pki = await mkdtemp(join(tmpdir(), 'qmt-tunnel-'));
  otherPki = await mkdtemp(join(tmpdir(), 'qmt-tunnel-other-'));
  await initPkiDir(pki);
  await initPkiDir(otherPki);
});
afterAll(async () => {
  await rm(pki, { recursive: true, force: true });
  await rm(otherPki, { recursive: true, force: true });
});

const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

/** A stand-in destination: accepts connections (half-open allowed), records what each sends, in accept order. */
async function destination(reply: (i: number) => Buffer, end = true) {
  const accepted: { socket: net.Socket; got: Buffer[]; ended: Promise<void>; errors: Error[] }[] = [];
  const server = net.createServer({ allowHalfOpen: true }, (s) => {
    const i = accepted.length;
    const rec = { socket: s, got: [] as Buffer[], errors: [] as Error[], ended: new Promise<void>((r) => s.once('end', () => r())) };
    accepted.push(rec);
    s.on('data', (c: Buffer) => rec.got.push(c));
    s.on('error', (e) => rec.errors.push(e));
    writeSlowly(s, reply(i)).then(
      () => end && s.end(),
      () => undefined,
    );
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return { accepted, uri: `tcp:127.0.0.1:${(server.address() as net.AddressInfo).port}`, close: () => new Promise<void>((r) => server.close(() => r())) };
}

/** Writes `b` in 64 KiB pieces, one per turn of the event loop, honouring backpressure. */
async function writeSlowly(s: net.Socket, b: Buffer): Promise<void> {
  for (let at = 0; at < b.length; at += 64 * 1024) {
    if (!s.write(b.subarray(at, at + 64 * 1024))) await new Promise((r) => s.once('drain', r));
    else await new Promise((r) => setImmediate(r));
  }
}

async function pair(limits: TunnelLimits = {}, relayOpts: { bytesPerSecond?: number; dstEnds?: boolean } = {}) {
  const dst = await destination((i) => Buffer.alloc(0).fill(i), relayOpts.dstEnds ?? true);
  const exit = await TunnelExit.start({ listen: 'tcp:127.0.0.1:0', to: dst.uri, tls: { dir: pki }, limits });
  const relay = await FaultRelay.start({ target: exit.uri, maxConnections: 256, ...(relayOpts.bytesPerSecond ? { connections: () => ({ up: { bytesPerSecond: relayOpts.bytesPerSecond! }, down: { bytesPerSecond: relayOpts.bytesPerSecond! } }) } : {}) });
  const entry = await TunnelEntry.start({ listen: 'tcp:127.0.0.1:0', to: relay.uri, tls: { dir: pki, hostname: 'localhost' }, limits, reconnect: { initialDelayMs: 20, maxDelayMs: 200 } });
  const strangers: StrangerEvent[] = [];
  exit.on('stranger', (e) => strangers.push(e));
  const events: string[] = [];
  for (const t of [entry, exit]) {
    const side = t === entry ? 'entry' : 'exit';
    t.on('lost', (e) => events.push(`${side} lost ${e.index}: ${e.error.code}`));
    t.on('resumed', (e) => events.push(`${side} resumed ${e.index} after ${Math.round(e.outageMs)} ms, ${e.replayed} replayed`));
    t.on('failed', (e) => events.push(`${side} failed ${e.index}: ${e.error.describe()}`));
  }
  return {
    dst,
    exit,
    relay,
    entry,
    strangers,
    events,
    async close() {
      await entry.close();
      await exit.close();
      await relay.close();
      await dst.close();
    },
  };
}

/** A stand-in source connection: sends `data`, then ends (unless `end` is false); collects what comes back. */
async function sourceConnection(uri: string, data: Buffer, end = true) {
  const port = Number(uri.split(':').pop());
  const s = net.connect({ port, host: '127.0.0.1', allowHalfOpen: true });
  const got: Buffer[] = [];
  const errors: Error[] = [];
  s.on('data', (c: Buffer) => got.push(c));
  s.on('error', (e) => errors.push(e));
  await new Promise((r) => s.once('connect', r));
  const sent = writeSlowly(s, data).then(() => end && s.end());
  const ended = new Promise<void>((r) => s.once('end', () => r()));
  return { s, got, errors, sent, ended };
}

describe('qmt tunnel: entry and exit', () => {
  it('three connections, both directions, cut and frozen on the hop: every byte once, in order; accepted in the order opened; no QEMU side saw an error', async () => {
    const before = resourceSnapshot();
    // Throttled so that the bytes are still flowing at the freeze (12 MiB at 8 MiB/s).
    const t = await pair({ silenceMs: 600, keepaliveMs: 100 }, { bytesPerSecond: 8 * MiB });
    try {
      const payloads = [randomBytes(12 * MiB), randomBytes(2 * MiB), randomBytes(4 * MiB)];
      // Each source connection announces its number first: the destination's accept order must match.
      const srcs = [];
      for (let i = 0; i < payloads.length; i++) {
        payloads[i]![0] = i;
        srcs.push(await sourceConnection(t.entry.uri, payloads[i]!));
        await new Promise((r) => setTimeout(r, 30));
      }
      // Cuts and a freeze while the bytes flow.
      await new Promise((r) => setTimeout(r, 150));
      expect(t.relay.cut()).toBeGreaterThan(0);
      await new Promise((r) => setTimeout(r, 250));
      t.relay.freeze();
      await new Promise((r) => setTimeout(r, 1200));
      t.relay.heal();
      await new Promise((r) => setTimeout(r, 200));
      t.relay.cut();
      await Promise.all(srcs.map((s) => s.sent));
      await Promise.all(t.dst.accepted.map((d) => d.ended));
      await Promise.all(srcs.map((s) => s.ended));
      expect(t.dst.accepted.length).toBe(3);
      for (let i = 0; i < 3; i++) {
        const d = t.dst.accepted[i]!;
        const got = Buffer.concat(d.got);
        expect(got[0], `accepted ${i} is the connection opened ${i}`).toBe(i);
        expect(got.length).toBe(payloads[i]!.length);
        expect(sha(got), `connection ${i}: bytes at the destination`).toBe(sha(payloads[i]!));
        expect(d.errors).toEqual([]);
        expect(srcs[i]!.errors).toEqual([]);
      }
      const st = t.entry.stats();
      expect(st.outages, t.events.join('\n')).toBeGreaterThanOrEqual(2);
      expect(t.events.some((e) => e.includes('resumed'))).toBe(true);
      expect(t.events.filter((e) => e.includes('failed'))).toEqual([]);
      await new Promise((r) => setTimeout(r, 300));
      expect(t.entry.stats().connections.map((c) => c.state)).toEqual(['done', 'done', 'done']);
      expect(t.exit.stats().connections.map((c) => c.state)).toEqual(['done', 'done', 'done']);
      for (const s of srcs) s.s.destroy();
    } finally {
      await t.close();
    }
    expect(await leftAfter(before, 3000)).toEqual([]);
  }, 60_000);

  it('the reply direction: what the destination writes reaches the source, once, in order, across cuts', async () => {
    const reply = randomBytes(6 * MiB);
    const dst = await destination(() => reply);
    const exit = await TunnelExit.start({ listen: 'tcp:127.0.0.1:0', to: dst.uri, tls: { dir: pki } });
    const relay = await FaultRelay.start({ target: exit.uri, maxConnections: 64, connections: () => ({ down: { bytesPerSecond: 16 * MiB } }) });
    const entry = await TunnelEntry.start({ listen: 'tcp:127.0.0.1:0', to: relay.uri, tls: { dir: pki, hostname: 'localhost' }, reconnect: { initialDelayMs: 20 } });
    try {
      const src = await sourceConnection(entry.uri, Buffer.from('hello'));
      for (let i = 0; i < 3; i++) {
        await new Promise((r) => setTimeout(r, 100));
        relay.cut();
      }
      await src.ended;
      expect(sha(Buffer.concat(src.got))).toBe(sha(reply));
      expect(src.errors).toEqual([]);
      expect(entry.stats().outages, 'the cuts came while the reply flowed').toBeGreaterThanOrEqual(1);
      expect(exit.stats().replayedBytes, 'the exit sent again what the cuts lost').toBeGreaterThan(0);
      src.s.destroy();
    } finally {
      await entry.close();
      await exit.close();
      await relay.close();
      await dst.close();
    }
  }, 30_000);

  it('an outage longer than the limit resets both QEMU sides (outage-timeout), so that QEMU can recover on its own', async () => {
    // Both QEMUs keep their connection open (a migration under way) when the hop goes silent.
    const t = await pair({ silenceMs: 300, keepaliveMs: 50, outageMs: 800 }, { dstEnds: false });
    try {
      const src = await sourceConnection(t.entry.uri, randomBytes(64 * 1024), false);
      await src.sent;
      await new Promise((r) => setTimeout(r, 200));
      const closed = new Promise<void>((r) => src.s.once('close', () => r()));
      const failed = new Promise<string>((r) => t.entry.once('failed', (e) => r(e.error.code)));
      t.relay.freeze();
      const t0 = Date.now();
      expect(await failed).toBe('outage-timeout');
      await closed;
      expect(src.errors.map((e) => (e as NodeJS.ErrnoException).code), 'the source saw a reset').toEqual(['ECONNRESET']);
      const waited = Date.now() - t0;
      expect(waited).toBeGreaterThanOrEqual(800);
      expect(waited).toBeLessThan(5000);
      // The destination's side went too (its own limit).
      await new Promise<void>((r) => (t.dst.accepted[0]!.socket.destroyed ? r() : t.dst.accepted[0]!.socket.once('close', () => r())));
      t.relay.heal();
    } finally {
      await t.close();
    }
  }, 30_000);

  it.each(['wait', 'close'] as const)('a replay buffer that fills during an outage (%s): bounded memory; wait holds QEMU until the hop is back, close fails the connection at once', async (whenFull) => {
    const t = await pair({ silenceMs: 300, keepaliveMs: 50, replayBytes: MiB, whenFull, outageMs: 20_000 });
    try {
      const payload = randomBytes(8 * MiB);
      const src = await sourceConnection(t.entry.uri, randomBytes(64 * 1024), false);
      await src.sent;
      await new Promise((r) => setTimeout(r, 200));
      t.relay.freeze();
      await new Promise((r) => setTimeout(r, 500)); // the hop is found silent
      const failed = new Promise<string>((r) => t.entry.once('failed', (e) => r(e.error.message)));
      const t0 = Date.now();
      const more = writeSlowly(src.s, payload).then(() => src.s.end());
      more.catch(() => undefined);
      if (whenFull === 'close') {
        expect(await failed).toMatch(/replay buffer \(1048576 bytes\) filled while the hop was down/);
        expect(Date.now() - t0, 'at once, not at the 20 s limit').toBeLessThan(5000);
        t.relay.heal();
        return;
      }
      await new Promise((r) => setTimeout(r, 1000));
      const during = t.entry.stats().connections[0]!;
      expect(during.state).toBe('outage');
      expect(during.peakUnacknowledged, 'what waits for an acknowledgement stays bounded').toBeLessThanOrEqual(MiB + 64 * 1024);
      t.relay.heal();
      await more;
      await t.dst.accepted[0]!.ended;
      expect(Buffer.concat(t.dst.accepted[0]!.got).length).toBe(64 * 1024 + payload.length);
      expect(t.events.filter((e) => e.includes('failed'))).toEqual([]);
      src.s.destroy();
    } finally {
      await t.close();
    }
  }, 30_000);

  it('a long-running tunnel keeps the stats of the latest finished connections only (bounded memory)', async () => {
    const t = await pair();
    try {
      for (let i = 0; i < KEEP_FINISHED + 6; i++) {
        const src = await sourceConnection(t.entry.uri, Buffer.from([i]));
        await src.sent;
        await src.ended;
        src.s.destroy();
      }
      await new Promise((r) => setTimeout(r, 200));
      const st = t.entry.stats();
      expect(st.connections.length).toBe(KEEP_FINISHED);
      expect(st.connections[0]!.index, 'the oldest went first').toBe(6);
      expect(t.exit.stats().connections.length).toBe(KEEP_FINISHED);
    } finally {
      await t.close();
    }
  }, 30_000);

  it("strangers on the exit's port (a probe, plain bytes, another CA's certificate, TLS then silence) are dropped typed; the tunnel carries on", async () => {
    const t = await pair({ connectTimeoutMs: 800 });
    try {
      const port = Number(t.exit.uri.split(':').pop());
      const probe = net.connect(port, '127.0.0.1');
      probe.on('error', () => undefined);
      probe.once('connect', () => probe.destroy());
      const http = net.connect(port, '127.0.0.1');
      http.on('error', () => undefined);
      http.once('connect', () => http.write('GET / HTTP/1.1\r\n\r\n'));
      const { loadTlsDir } = await import('../../src/transport/pki.js');
      const other = await loadTlsDir(otherPki, 'client');
      const foreign = tls.connect({ port, host: '127.0.0.1', ca: other.ca, cert: other.cert, key: other.key, rejectUnauthorized: false });
      foreign.on('error', () => undefined);
      const ours = await loadTlsDir(pki, 'client');
      const silent = tls.connect({ port, host: '127.0.0.1', ca: ours.ca, cert: ours.cert, key: ours.key, servername: 'localhost' });
      silent.on('error', () => undefined);
      const src = await sourceConnection(t.entry.uri, randomBytes(MiB));
      await src.sent;
      await t.dst.accepted[0]?.ended;
      await new Promise((r) => setTimeout(r, 1500));
      const reasons = t.strangers.map((s) => s.reason).sort();
      expect(reasons, t.strangers.map((s) => s.error.describe()).join('\n')).toEqual(['closed', 'timeout', 'tls', 'tls']);
      expect(t.strangers.map((x) => x.remote?.replace(/:\d+$/, '')), 'each says where it came from').toEqual(['127.0.0.1', '127.0.0.1', '127.0.0.1', '127.0.0.1']);
      expect(t.dst.accepted.length, 'only the real connection reached the destination').toBe(1);
      expect(Buffer.concat(t.dst.accepted[0]!.got).length).toBe(MiB);
      for (const s of [probe, http, foreign, silent, src.s]) s.destroy();
    } finally {
      await t.close();
    }
  }, 30_000);
});
