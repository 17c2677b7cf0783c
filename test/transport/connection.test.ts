import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { once } from 'node:events';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Channel } from '../../src/transport/channel.js';
import { MigrationListener, SourceConnection, type TransportOptions } from '../../src/transport/connection.js';
import { formatEndpoint, parseEndpoint } from '../../src/transport/endpoint.js';
import { TransportError } from '../../src/transport/errors.js';
import type { StrangerEvent } from '../../src/transport/qualify.js';
import { initPkiDir } from '../../src/transport/pki.js';

const work = mkdtempSync(join(tmpdir(), 'qmt-conn-'));
const pkiDir = join(work, 'pki');
const otherPkiDir = join(work, 'other-pki');

beforeAll(async () => {
  await initPkiDir(pkiDir);
  await initPkiDir(otherPkiDir);
});
afterAll(() => rmSync(work, { recursive: true, force: true }));

/** Collects what a channel receives. */
function collect(ch: Channel): { bytes: () => Buffer; waitFor: (n: number) => Promise<Buffer> } {
  const parts: Buffer[] = [];
  let total = 0;
  let wake: (() => void) | undefined;
  ch.read((c) => {
    parts.push(c);
    total += c.length;
    wake?.();
  });
  return {
    bytes: () => Buffer.concat(parts),
    waitFor: async (n) => {
      const deadline = Date.now() + 20_000;
      while (total < n) {
        if (Date.now() > deadline) throw new Error(`received ${total} of ${n} bytes`);
        await new Promise<void>((r) => {
          wake = r;
          setTimeout(r, 50);
        });
      }
      return Buffer.concat(parts);
    },
  };
}

/** What a main channel starts with (the stream magic), and a preempt channel (a PAGE record naming its block). */
const MAGIC = Buffer.from('QEVM');
const pageRecord = (data: Buffer): Buffer => Buffer.concat([Buffer.from('0000000000001008', 'hex'), Buffer.from([2]), Buffer.from('m0'), data]);

/** Roles by order, no byte checked: for the tests of the bytes themselves (backpressure, tuning). */
const BY_ORDER = { start: 'any' } as const;

let unixCount = 0;
const endpoints = () => ({ tcp: 'tcp:127.0.0.1:0', unix: `unix:${join(work, `m${unixCount++}.sock`)}` });

describe('endpoints', () => {
  it('parses QEMU URIs', () => {
    expect(parseEndpoint('tcp:127.0.0.1:4444')).toEqual({ kind: 'tcp', host: '127.0.0.1', port: 4444 });
    expect(parseEndpoint('tcp:[::1]:5')).toEqual({ kind: 'tcp', host: '::1', port: 5 });
    expect(parseEndpoint('unix:/tmp/x.sock')).toEqual({ kind: 'unix', path: '/tmp/x.sock' });
    expect(formatEndpoint(parseEndpoint('tcp:[::1]:5'))).toBe('tcp:[::1]:5');
    for (const bad of ['tcp:host', 'tcp:h:99999', 'exec:cat', 'unix:', 'fd:3']) {
      expect(() => parseEndpoint(bad)).toThrow(expect.objectContaining({ code: 'bad-endpoint' }));
    }
  });
});

describe.each([
  ['tcp', false],
  ['tcp', true],
  ['unix', false],
  ['unix', true],
] as const)('round trips over %s (TLS: %s)', (kind, useTls) => {
  it('main both ways, then the preempt channel, bytes intact', async () => {
    const opts: TransportOptions = useTls ? { tls: { dir: pkiDir, ...(kind === 'unix' ? { hostname: 'localhost' } : {}) } } : {};
    const listener = await MigrationListener.listen(endpoints()[kind], opts);
    try {
      const accepted = listener.accept();
      const src = await SourceConnection.connect(listener.uri, opts);
      // The listener peeks at the magic without consuming it: the reader gets every byte.
      const bulk = Buffer.concat([MAGIC, randomBytes((3 << 20) - MAGIC.length)]);
      await src.main.send([bulk.subarray(0, MAGIC.length)]);
      const dst = await accepted;
      const onMain = collect(dst.main);
      const onReturn = collect(src.main);
      for (let i = MAGIC.length; i < bulk.length; i += 256 << 10) await src.main.send([bulk.subarray(i, i + (128 << 10)), bulk.subarray(i + (128 << 10), i + (256 << 10))]);
      expect((await onMain.waitFor(bulk.length)).equals(bulk)).toBe(true);
      // the return path: the reverse direction of the main socket
      await dst.main.send([Buffer.from([0, 2, 0, 4, 0, 0, 0, 1])], 'urgent');
      expect((await onReturn.waitFor(8)).toString('hex')).toBe('0002000400000001');

      const preempt = await src.connectPreempt();
      const page = pageRecord(randomBytes(4096));
      await preempt.send([page], 'urgent');
      const dstPreempt = await dst.waitPreempt();
      const onPreempt = collect(dstPreempt);
      expect((await onPreempt.waitFor(page.length)).equals(page)).toBe(true);
      if (useTls) {
        expect(src.main.stats.tls).toMatchObject({ protocol: 'TLSv1.3', resumed: false });
        expect(preempt.stats.tls).toMatchObject({ protocol: 'TLSv1.3', resumed: true });
      } else {
        expect(src.main.stats.tls).toBeUndefined();
      }
      expect(src.stats().main.bytesSent).toBe(bulk.length);
      expect(dst.stats().main.bytesReceived).toBe(bulk.length);
      await Promise.all([src.close(), dst.close()]);
      expect(src.main.isClosed && preempt.isClosed).toBe(true);
    } finally {
      listener.close();
    }
  });
});

describe('channel order', () => {
  it('roles go to connections that qualify: main by the magic, then preempt by its first record; the others are dropped as strangers', async () => {
    const listener = await MigrationListener.listen('tcp:127.0.0.1:0');
    const strangers: StrangerEvent[] = [];
    listener.on('stranger', (ev) => strangers.push(ev));
    const sockets: net.Socket[] = [];
    const open = async (): Promise<net.Socket> => {
      const s = net.connect((listener.endpoint as { port: number }).port, '127.0.0.1');
      s.on('error', () => undefined);
      sockets.push(s);
      await once(s, 'connect');
      return s;
    };
    const until = async (what: string, ok: () => boolean): Promise<void> => {
      const deadline = Date.now() + 10_000;
      while (!ok()) {
        if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}; strangers: ${JSON.stringify(strangers.map((e) => e.error.describe()))}`);
        await new Promise((r) => setTimeout(r, 10));
      }
    };
    try {
      const http = await open();
      http.write('GET / HTTP/1.1\r\nHost: x\r\n\r\n');
      await until('the HTTP request to be dropped', () => strangers.length === 1);
      expect(strangers[0]).toMatchObject({ reason: 'not-migration', error: { code: 'not-a-migration-channel' } });
      expect(strangers[0]!.error.message).toContain('"GET / HT"');
      expect(strangers[0]!.remote).toMatch(/^127\.0\.0\.1:\d+$/);

      const accepted = listener.accept();
      const first = await open();
      first.write('QE'); // the magic in two pieces: the listener waits for the rest
      await new Promise((r) => setTimeout(r, 50));
      first.write(Buffer.from('VMfirst'));
      const dst = await accepted;
      const onMain = collect(dst.main);
      expect((await onMain.waitFor(9)).toString()).toBe('QEVMfirst');

      // Two connections after the main channel: a silent one, and one that sends a page record.
      await open();
      const second = await open();
      const rec = pageRecord(Buffer.from('second'));
      second.write(rec);
      const pre = await dst.waitPreempt();
      const onPre = collect(pre);
      expect((await onPre.waitFor(rec.length)).equals(rec)).toBe(true);
      await until('the silent candidate to be dropped', () => strangers.length === 2);
      expect(strangers[1]).toMatchObject({ reason: 'extra', error: { code: 'channel-order' } });

      // Every role is taken: the next connection is dropped at once.
      const third = await open();
      await until('the third connection to be dropped', () => strangers.length === 3);
      expect(strangers[2]).toMatchObject({ reason: 'extra', error: { code: 'channel-order' } });
      await new Promise((r) => (third.destroyed ? r(undefined) : third.once('close', r)));
      expect(listener.pendingConnections).toBe(0);
      dst.destroy();
    } finally {
      for (const s of sockets) s.destroy();
      listener.close();
    }
  });

  it('the source connects the preempt channel only after the main channel', async () => {
    const listener = await MigrationListener.listen('tcp:127.0.0.1:0');
    const seen: string[] = [];
    listener.on('main', () => seen.push('main'));
    listener.on('preempt', () => seen.push('preempt'));
    try {
      const accepted = listener.accept();
      const src = await SourceConnection.connect(listener.uri);
      await src.main.send([MAGIC]);
      const dst = await accepted;
      expect(seen).toEqual(['main']);
      const preempt = await src.connectPreempt();
      await preempt.send([pageRecord(Buffer.alloc(4096))]);
      await dst.waitPreempt();
      expect(seen).toEqual(['main', 'preempt']);
      // Once the main channel is gone, a preempt channel is refused: its role could not be told apart.
      src.main.destroy();
      const lone = await SourceConnection.connect(listener.uri);
      lone.main.destroy();
      await expect(lone.connectPreempt()).rejects.toMatchObject({ code: 'channel-order' });
      src.destroy();
      dst.destroy();
    } finally {
      listener.close();
    }
  });
});

describe('backpressure', () => {
  it("a stalled reader never makes the writer's memory grow past its bound", async () => {
    const maxQueuedBytes = 2 << 20;
    const opts: TransportOptions = { main: { maxQueuedBytes, tuning: { sndbuf: 256 << 10, rcvbuf: 256 << 10 } } };
    const listener = await MigrationListener.listen('tcp:127.0.0.1:0', opts, BY_ORDER);
    try {
      const accepted = listener.accept();
      const src = await SourceConnection.connect(listener.uri, opts);
      const dst = await accepted;
      // The destination's consumer stalls: reading pauses, TCP fills, then our queue.
      let release!: () => void;
      const stalled = new Promise<void>((r) => (release = r));
      let received = 0;
      dst.main.read((c) => {
        received += c.length;
        return stalled;
      });
      const chunk = Buffer.alloc(64 << 10, 0x42);
      let sent = 0;
      let pending: Promise<void> | undefined;
      const rss0 = process.memoryUsage().rss;
      // Write until a send() stays pending: that is the producer being held back.
      for (let i = 0; i < 4096; i++) {
        const p = src.main.send([chunk]);
        sent += chunk.length;
        const settled = await Promise.race([p.then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), 50))]);
        expect(src.main.queuedBytes).toBeLessThanOrEqual(maxQueuedBytes + chunk.length);
        if (!settled) {
          pending = p;
          break;
        }
      }
      expect(pending).toBeDefined();
      expect(sent).toBeLessThan(64 << 20); // bounded by our queue + kernel buffers, not by the 256 MiB we would have written
      const stillPending = await Promise.race([pending!.then(() => false), new Promise<boolean>((r) => setTimeout(() => r(true), 300))]);
      expect(stillPending).toBe(true);
      expect(src.main.stats.peakQueuedBytes).toBeLessThanOrEqual(maxQueuedBytes + chunk.length);
      expect(process.memoryUsage().rss - rss0).toBeLessThan(64 << 20);
      expect(dst.main.stats.readPauses).toBeGreaterThan(0);
      // Release the reader: everything arrives and the writer moves on.
      release();
      await pending;
      await src.main.flush();
      const deadline = Date.now() + 10_000;
      while (received < sent && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
      expect(received).toBe(sent);
      src.destroy();
      dst.destroy();
    } finally {
      listener.close();
    }
  });

  it('urgent writes overtake bulk writes queued in user space', async () => {
    const opts: TransportOptions = { main: { maxQueuedBytes: 64 << 20, socketBufferBytes: 0, tuning: { sndbuf: 64 << 10, rcvbuf: 64 << 10 } } };
    const listener = await MigrationListener.listen('tcp:127.0.0.1:0', opts, BY_ORDER);
    try {
      const accepted = listener.accept();
      const src = await SourceConnection.connect(listener.uri, opts);
      const dst = await accepted;
      let release!: () => void;
      const stalled = new Promise<void>((r) => (release = r));
      const parts: Buffer[] = [];
      let first = true;
      dst.main.read((c) => {
        parts.push(c);
        if (first) {
          first = false;
          return stalled;
        }
      });
      // 16 MiB of bulk (0xBB), far more than the kernel buffers hold, then 4 KiB urgent (0xAA).
      const bulk = Buffer.alloc(1 << 20, 0xbb);
      for (let i = 0; i < 16; i++) void src.main.send([bulk]);
      await new Promise((r) => setTimeout(r, 100));
      expect(src.main.queuedBytes).toBeGreaterThan(8 << 20);
      void src.main.send([Buffer.alloc(4096, 0xaa)], 'urgent');
      release();
      await src.main.flush();
      const total = 16 * bulk.length + 4096;
      const deadline = Date.now() + 10_000;
      while (parts.reduce((s, p) => s + p.length, 0) < total && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
      const all = Buffer.concat(parts);
      expect(all.length).toBe(total);
      const at = all.indexOf(0xaa);
      // The urgent page came out before most of the bulk: only what the kernel already held was ahead of it.
      expect(at).toBeGreaterThan(0);
      expect(at).toBeLessThan(4 << 20);
      expect(all.subarray(at, at + 4096).every((b) => b === 0xaa)).toBe(true);
      src.destroy();
      dst.destroy();
    } finally {
      listener.close();
    }
  });
});

describe('tuning', () => {
  it('applies the profiles and reads them back; overrides win', async () => {
    const opts: TransportOptions = { preempt: { tuning: { notSentLowat: 32 << 10, priority: 5 } } };
    const listener = await MigrationListener.listen('tcp:127.0.0.1:0', opts, BY_ORDER);
    try {
      const accepted = listener.accept();
      const src = await SourceConnection.connect(listener.uri, opts);
      const dst = await accepted;
      const pre = await src.connectPreempt();
      await dst.waitPreempt();
      const m = src.main.stats.tuning;
      expect(m.warnings).toEqual([]);
      expect(m.sndbuf).toBe(2 * (4 << 20)); // the kernel doubles what was asked
      expect(m.rcvbuf).toBe(2 * (4 << 20));
      expect(m.noDelay).toBe(false);
      // the destination's main channel carries only return-path messages: no Nagle there
      expect(dst.main.stats.tuning).toMatchObject({ noDelay: true, cork: false, rcvbuf: 2 * (4 << 20) });
      expect(m.cork).toBe(true);
      const p = pre.stats.tuning;
      expect(p).toMatchObject({ noDelay: true, notSentLowat: 32 << 10, priority: 5, tos: 0xb8, sndbuf: 2 * (64 << 10), cork: false, warnings: [] });
      expect(dst.preempt!.stats.tuning).toMatchObject({ noDelay: true, priority: 5 });
      src.destroy();
      dst.destroy();
    } finally {
      listener.close();
    }
  });

  it('TCP options on a unix socket degrade to warnings', async () => {
    const listener = await MigrationListener.listen(endpoints().unix, {}, BY_ORDER);
    try {
      const accepted = listener.accept();
      const src = await SourceConnection.connect(listener.uri);
      const dst = await accepted;
      const pre = await src.connectPreempt();
      expect(pre.stats.tuning.warnings.join('\n')).toMatch(/TCP_NODELAY: not applicable to a unix socket/);
      expect(pre.stats.tuning.sndbuf).toBeGreaterThan(0);
      src.destroy();
      dst.destroy();
    } finally {
      listener.close();
    }
  });
});

describe('refusals through the connection API', () => {
  async function refusedPair(srcOpts: TransportOptions, dstOpts: TransportOptions, uri = 'tcp:127.0.0.1:0') {
    const before = process.getActiveResourcesInfo().filter((r) => r === 'TCPSocketWrap' || r === 'PipeWrap').length;
    const listener = await MigrationListener.listen(uri, dstOpts);
    // A refused connection is dropped and reported; the listener keeps waiting.
    const accepted = new Promise<TransportError>((r) => listener.once('stranger', (ev) => r(ev.error)));
    const srcErr = await SourceConnection.connect(listener.uri, srcOpts).then(
      (c) => {
        c.destroy();
        return undefined;
      },
      (e: unknown) => e,
    );
    const dstErr = await Promise.race([accepted, new Promise((r) => setTimeout(() => r('no refusal'), 3000))]);
    listener.close();
    await new Promise((r) => setTimeout(r, 50));
    const after = process.getActiveResourcesInfo().filter((r) => r === 'TCPSocketWrap' || r === 'PipeWrap').length;
    return { srcErr: srcErr as TransportError | undefined, dstErr: dstErr as TransportError | undefined, leaked: after - before };
  }

  it('a certificate from another CA', async () => {
    const r = await refusedPair({ tls: { dir: otherPkiDir } }, { tls: { dir: pkiDir } });
    expect(r.srcErr).toBeInstanceOf(TransportError);
    expect(r.srcErr?.code).toBe('tls-unknown-ca');
    expect(r.leaked).toBeLessThanOrEqual(0);
  });

  it('a hostname mismatch', async () => {
    const r = await refusedPair({ tls: { dir: pkiDir, hostname: 'not-this-host.example' } }, { tls: { dir: pkiDir } });
    expect(r.srcErr?.code).toBe('tls-hostname-mismatch');
    expect(r.leaked).toBeLessThanOrEqual(0);
  });

  it('no hostname over a unix socket', async () => {
    const r = await refusedPair({ tls: { dir: pkiDir } }, { tls: { dir: pkiDir } }, endpoints().unix);
    expect(r.srcErr?.code).toBe('tls-no-hostname');
    expect(r.leaked).toBeLessThanOrEqual(0);
  });

  it('a plain TCP peer talking to a TLS listener', async () => {
    const r = await refusedPair({}, { tls: { dir: pkiDir } });
    // our plain source connected; the listener refused the peer as not TLS
    expect(r.dstErr?.code).toBe('tls-not-tls');
    expect(r.leaked).toBeLessThanOrEqual(0);
  });

  it('a TLS source talking to a plain listener', async () => {
    const listener = await MigrationListener.listen('tcp:127.0.0.1:0');
    listener.accept().then((c) => setTimeout(() => c.destroy(), 200), () => undefined);
    const err = await SourceConnection.connect(listener.uri, { tls: { dir: pkiDir }, connectTimeoutMs: 1500 }).then(
      () => undefined,
      (e: unknown) => e as TransportError,
    );
    listener.close();
    expect(err).toBeInstanceOf(TransportError);
    expect(['tls-handshake-failed', 'tls-not-tls', 'connect-timeout', 'reset']).toContain(err?.code);
  });
});
