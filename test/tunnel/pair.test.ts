/**
 * The tunnel pair without QEMU: source peers → entry → fault relay (the hop)
 * → exit → a destination server. Through resets and a silent freeze of the
 * hop, every connection's bytes arrive bit for bit in both directions, in
 * the order the connections were opened, and neither peer sees anything but
 * a delay; strangers on the exit's port end nothing; an outage longer than the
 * limit closes the peers' connections (so that QEMU's own recovery would take
 * over); a full replay buffer stops the reading of the source instead of
 * growing; nothing is left open once both ends stop.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTunnelEntry, startTunnelExit, type TunnelEntry, type TunnelExit } from '../../src/protocol/tunnel/index.js';
import { initPkiDir } from '../../src/transport/pki.js';
import { FaultRelay } from '../faults/relay.js';
import { leftAfter, resourceSnapshot } from '../support/resources.js';
import { playStranger } from '../support/strangers.js';
import { Sender, Sink, pattern, sha, sleep, until } from './helpers.js';

let dir: string;
let pki: string;
let foreign: string;

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'qmt-tunnel-'));
  pki = join(dir, 'pki');
  foreign = join(dir, 'foreign');
  await initPkiDir(pki);
  await initPkiDir(foreign);
});

afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

/** Fast keepalive and silence detection, so that a freeze is noticed within a second. */
const HOP = { keepaliveMs: 150, silenceMs: 600, connectTimeoutMs: 3000 };

interface Rig {
  sink: Sink;
  exit: TunnelExit;
  relay: FaultRelay;
  entry: TunnelEntry;
  close(): Promise<void>;
}

async function rig(opts: { maxOutageMs?: number; replayBufferBytes?: number; bytesPerSecond?: number; reply: (i: number) => Buffer }): Promise<Rig> {
  const sink = await Sink.start(opts.reply);
  const common = { ...HOP, ...(opts.maxOutageMs ? { maxOutageMs: opts.maxOutageMs } : {}), ...(opts.replayBufferBytes ? { replayBufferBytes: opts.replayBufferBytes } : {}) };
  const exit = await startTunnelExit({ listen: 'tcp:127.0.0.1:0', to: sink.uri, tls: pki, ...common });
  const port = Number(/:(\d+)$/.exec(exit.uri)![1]);
  const rate = opts.bytesPerSecond;
  const relay = await FaultRelay.start({
    target: { host: '127.0.0.1', port },
    maxConnections: 200,
    ...(rate ? { connections: () => ({ up: { bytesPerSecond: rate } }) } : {}),
  });
  const entry = await startTunnelEntry({ listen: 'tcp:127.0.0.1:0', to: relay.uri, tls: pki, backoff: { initialMs: 20, maxMs: 200 }, ...common });
  return {
    sink,
    exit,
    relay,
    entry,
    async close() {
      await entry.close();
      await exit.close();
      await relay.close();
      await sink.close();
    },
  };
}

describe('qmt tunnel pair (no QEMU)', () => {
  it('carries three connections bit for bit, in order, through two resets and a freeze of the hop', async () => {
    const before = resourceSnapshot();
    const SIZES = [3 << 20, 1 << 20, 2 << 20];
    const REPLY = [256 << 10, 0, 64 << 10];
    const r = await rig({ bytesPerSecond: 3 << 20, reply: (i) => pattern(100 + i, REPLY[i] ?? 0) });
    const downs: string[] = [];
    r.entry.on('down', (d) => downs.push(`entry ${d.connection}: ${d.error.code}`));
    const resumed: number[] = [];
    r.entry.on('resumed', (u) => resumed.push(u.replayedBytes));
    try {
      // Main first; the others once it is in (as QEMU opens them after its main connection).
      const senders = [new Sender(r.entry.uri, pattern(0, SIZES[0]!))];
      await until(() => r.sink.accepted.length === 1, 5000, 'main connection at the destination');
      senders.push(new Sender(r.entry.uri, pattern(1, SIZES[1]!)));
      await until(() => r.sink.accepted.length === 2, 5000, 'second connection at the destination');
      senders.push(new Sender(r.entry.uri, pattern(2, SIZES[2]!)));

      // Cuts at moments drawn at random within the transfer (about 1 s at 3 MiB/s per connection).
      const t1 = 100 + Math.random() * 250;
      const t2 = 100 + Math.random() * 250;
      await sleep(t1);
      expect(r.relay.cut()).toBeGreaterThan(0);
      await sleep(t2);
      r.relay.cut();
      await sleep(100);
      r.relay.freeze();
      await until(() => downs.length >= 3 * 3, 5000, `every hop socket noticed the freeze (downs: ${downs.join(', ')})`);
      r.relay.heal();

      await Promise.all(senders.map((s) => s.done));
      for (let i = 0; i < 3; i++) {
        const got = r.sink.data(i);
        expect(r.sink.accepted[i]!.bytes, `connection ${i} bytes`).toBe(SIZES[i]);
        // In order: the destination accepted connection i as the i-th.
        expect(got[0], `connection ${i} is the ${i}th at the destination`).toBe(i);
        expect(sha(got), `connection ${i} bytes identical`).toBe(sha(pattern(i, SIZES[i]!)));
        expect(sha(senders[i]!.received), `connection ${i} reply identical`).toBe(sha(pattern(100 + i, REPLY[i]!)));
        // Nobody saw anything but a delay: a clean end both ways, no error.
        expect(senders[i]!.error, `source ${i} error`).toBeUndefined();
        expect(senders[i]!.ended).toBe(true);
        expect(r.sink.accepted[i]!.error, `destination ${i} error`).toBeUndefined();
        expect(r.sink.accepted[i]!.ended).toBe(true);
      }
      const rep = r.entry.report();
      const xrep = r.exit.report();
      console.log(
        `[tunnel pair] entry: ${rep.hop.outages} outages (${rep.hop.outageMs} ms, longest ${rep.hop.longestOutageMs} ms), ${rep.hop.reconnections} reconnections, ` +
          `${rep.hop.replayedBytes} bytes replayed; exit: ${xrep.hop.outages} outages, ${xrep.hop.replayedBytes} bytes replayed; downs ${downs.join(', ')}; relay: ${r.relay.fired.join('; ')}`,
      );
      expect(rep.sessions).toHaveLength(1);
      expect(rep.sessions[0]!.connections.map((c) => c.connection)).toEqual([0, 1, 2]);
      expect(rep.hop.outages).toBeGreaterThanOrEqual(3 * 3);
      expect(rep.hop.reconnections).toBeGreaterThanOrEqual(3 * 3);
      expect(rep.hop.gaveUp).toBe(0);
      expect(rep.hop.replayedBytes + xrep.hop.replayedBytes).toBeGreaterThan(0);
      expect(resumed.length).toBeGreaterThanOrEqual(9);
      const s = await r.entry.sessionEnd(1);
      expect(s.connections.every((c) => c.outcome?.ok)).toBe(true);
      expect(s.main.bytes).toBe(SIZES[0]);
      // The exit counted the same bytes toward its destination.
      const xs = await r.exit.sessionEnd(1);
      expect(xs.main.bytes).toBe(SIZES[0]);
      expect(xs.returnPath.bytes).toBe(REPLY[0]);
    } finally {
      await r.close();
    }
    expect(await leftAfter(before, 3000)).toEqual([]);
  });

  it('drops strangers on the exit port without ending anything', async () => {
    const r = await rig({ bytesPerSecond: 4 << 20, reply: () => pattern(7, 1000) });
    try {
      const port = Number(/:(\d+)$/.exec(r.exit.uri)![1]);
      const sender = new Sender(r.entry.uri, pattern(0, 2 << 20));
      await until(() => r.sink.accepted.length === 1, 5000, 'main at the destination');
      const silent = await playStranger('silent', port);
      await playStranger('connect-close', port);
      await playStranger('http', port);
      await playStranger('tls-foreign-ca', port, foreign);
      // A valid client certificate that speaks something else than a HELLO.
      await sender.done;
      silent?.destroy();
      expect(sha(r.sink.data(0))).toBe(sha(pattern(0, 2 << 20)));
      expect(sender.error).toBeUndefined();
      expect(sha(sender.received)).toBe(sha(pattern(7, 1000)));
      await until(() => r.exit.report().strangers.count >= 3, 5000, 'strangers reported');
      const st = r.exit.report().strangers;
      console.log(`[tunnel strangers] ${st.count}: ${st.latest.map((e) => `${e.reason}/${e.error.code}`).join(', ')}`);
      expect(st.latest.map((e) => e.reason)).toEqual(expect.arrayContaining(['closed', 'tls']));
      // Only the real connection went through to the destination.
      expect(r.sink.accepted).toHaveLength(1);
    } finally {
      await r.close();
    }
  });

  it('closes the peers’ connections once an outage outlasts the limit', async () => {
    const r = await rig({ maxOutageMs: 800, bytesPerSecond: 1 << 20, reply: () => pattern(9, 4096) });
    const closed: string[] = [];
    r.entry.on('closed', (c) => closed.push(`entry ${c.connection}: ${c.ok ? 'ok' : c.error?.code}`));
    r.exit.on('closed', (c) => closed.push(`exit ${c.connection}: ${c.ok ? 'ok' : c.error?.code}`));
    try {
      const sender = new Sender(r.entry.uri, pattern(0, 8 << 20), { endAfterWrite: false });
      await until(() => r.sink.accepted.length === 1 && r.sink.accepted[0]!.bytes > 100_000, 5000, 'bytes at the destination');
      const t0 = performance.now();
      r.relay.freeze();
      await sender.done;
      await until(() => r.sink.accepted[0]!.closed, 5000, 'the destination connection closed');
      const ms = performance.now() - t0;
      console.log(`[tunnel outage] source and destination connections closed ${ms.toFixed(0)} ms after the freeze: ${closed.join(', ')}`);
      // Silence detection (0.6 s) plus the limit (0.8 s), never much sooner.
      expect(ms).toBeGreaterThan(800);
      expect(sender.ended).toBe(false); // a reset or close, not a clean end: QEMU must see a failure
      expect(closed).toEqual(expect.arrayContaining(['entry 0: outage-timeout', 'exit 0: outage-timeout']));
      const c = r.entry.report().sessions[0]!.connections[0]!;
      expect(c.outcome).toMatchObject({ ok: false, code: 'outage-timeout' });
      expect(r.entry.report().hop.gaveUp).toBe(1);
    } finally {
      r.relay.heal();
      await r.close();
    }
  });

  it('stops reading the source when the replay buffer is full, without growing', async () => {
    const CAP = 256 << 10;
    const r = await rig({ replayBufferBytes: CAP, maxOutageMs: 20_000, reply: () => Buffer.alloc(0) });
    try {
      const size = 6 << 20;
      const sender = new Sender(r.entry.uri, pattern(3, size));
      await until(() => r.sink.accepted.length === 1, 5000, 'main at the destination');
      r.relay.freeze();
      await sleep(1500);
      const during = r.entry.report().sessions[0]!.connections[0]!.hop!;
      // The source's bytes wait in its own socket, not in the tunnel.
      expect(during.unacknowledgedBytes).toBeLessThanOrEqual(CAP + (64 << 10));
      expect(sender.socket.writableLength).toBeGreaterThan(0);
      r.relay.heal();
      await sender.done;
      expect(sha(r.sink.data(0))).toBe(sha(pattern(3, size)));
      const after = r.entry.report().sessions[0]!.connections[0]!.hop!;
      console.log(`[tunnel full buffer] peak unacknowledged ${after.peakUnacknowledgedBytes} bytes (capacity ${CAP}); outages ${after.outages}`);
      expect(after.peakUnacknowledgedBytes).toBeLessThanOrEqual(CAP + (64 << 10));
    } finally {
      await r.close();
    }
  });
});
