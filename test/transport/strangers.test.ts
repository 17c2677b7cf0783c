/**
 * Strangers on a migration listener's port (issue 11 §3): a connection that
 * closes, fails or says something else before it is a migration channel is
 * dropped and reported, the listener keeps waiting, and the real source's
 * connection still becomes the main channel. Also the bounds on waiting
 * connections, and the TLS allow-list of peer names (QEMU's tls-authz) on
 * both ends.
 */
import { once } from 'node:events';
import { copyFile, mkdir, mkdtemp, rm } from 'node:fs/promises';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import tls from 'node:tls';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { MigrationListener, SourceConnection, type TransportOptions } from '../../src/transport/connection.js';
import { TransportError } from '../../src/transport/errors.js';
import { initPkiDir } from '../../src/transport/pki.js';
import type { StrangerEvent } from '../../src/transport/qualify.js';

const MAGIC = Buffer.from('QEVM');

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'qmt-strangers-'));
  const { pki } = await initPkiDir(join(dir, 'good'));
  await initPkiDir(join(dir, 'other-ca'));
  // Same CA, a client certificate that names peer-a.example (and the server one too).
  await initPkiDir(join(dir, 'peer-a'), { ca: { cert: pki.caCert, key: pki.caKey }, hostnames: ['peer-a.example'] });
  // Trusts our CA, presents a client certificate of another CA.
  await mkdir(join(dir, 'foreign-client'));
  await copyFile(join(dir, 'good', 'ca-cert.pem'), join(dir, 'foreign-client', 'ca-cert.pem'));
  await copyFile(join(dir, 'other-ca', 'client-cert.pem'), join(dir, 'foreign-client', 'client-cert.pem'));
  await copyFile(join(dir, 'other-ca', 'client-key.pem'), join(dir, 'foreign-client', 'client-key.pem'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

/** A listener that records its strangers, and helpers to poke at its port. */
async function watched(opts: TransportOptions = {}) {
  const listener = await MigrationListener.listen('tcp:127.0.0.1:0', opts);
  const strangers: StrangerEvent[] = [];
  listener.on('stranger', (ev) => strangers.push(ev));
  const port = (listener.endpoint as { port: number }).port;
  const sockets: net.Socket[] = [];
  return {
    listener,
    strangers,
    port,
    async raw(): Promise<net.Socket> {
      const s = net.connect(port, '127.0.0.1');
      s.on('error', () => undefined);
      sockets.push(s);
      await once(s, 'connect');
      return s;
    },
    async until(what: string, ok: () => boolean, ms = 15_000): Promise<void> {
      const deadline = Date.now() + ms;
      while (!ok()) {
        if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}; strangers: ${JSON.stringify(strangers.map((e) => `${e.reason}: ${e.error.describe()}`))}`);
        await new Promise((r) => setTimeout(r, 10));
      }
    },
    close(): void {
      for (const s of sockets) s.destroy();
      listener.close();
    },
  };
}

/** The real source after the strangers: its main channel is the one accepted, bytes intact. */
async function realSourceGetsIn(w: Awaited<ReturnType<typeof watched>>, opts: TransportOptions = {}): Promise<void> {
  const accepted = w.listener.accept();
  const src = await SourceConnection.connect(w.listener.uri, opts);
  try {
    await src.main.send([MAGIC, Buffer.from('-real')]);
    const dst = await accepted;
    const parts: Buffer[] = [];
    dst.main.read((c) => void parts.push(c));
    await w.until('the real bytes', () => Buffer.concat(parts).length >= 9);
    expect(Buffer.concat(parts).toString()).toBe('QEVM-real');
    dst.destroy();
  } finally {
    src.destroy();
  }
}

describe('plain TCP strangers are dropped, the listener keeps waiting', () => {
  it('connect and close', async () => {
    const w = await watched();
    try {
      (await w.raw()).end();
      await w.until('the drop', () => w.strangers.length === 1);
      expect(w.strangers[0]).toMatchObject({ reason: 'closed', error: { code: 'closed' } });
      await realSourceGetsIn(w);
    } finally {
      w.close();
    }
  });

  it('connect and reset', async () => {
    const w = await watched();
    try {
      const s = await w.raw();
      s.resetAndDestroy();
      await w.until('the drop', () => w.strangers.length === 1);
      expect(w.strangers[0]!.reason).toBe('closed');
      await realSourceGetsIn(w);
    } finally {
      w.close();
    }
  });

  it('an HTTP request', async () => {
    const w = await watched();
    try {
      const s = await w.raw();
      s.write('GET /health HTTP/1.1\r\nHost: dst\r\n\r\n');
      await w.until('the drop', () => w.strangers.length === 1);
      expect(w.strangers[0]).toMatchObject({ reason: 'not-migration', error: { code: 'not-a-migration-channel' } });
      expect(w.strangers[0]!.error.message).toMatch(/"GET \/hea".*QEVM/);
      if (!s.closed) await once(s, 'close');
      await realSourceGetsIn(w);
    } finally {
      w.close();
    }
  });

  it('a TLS client at a plain listener is named as such', async () => {
    const w = await watched();
    try {
      const t = tls.connect({ host: '127.0.0.1', port: w.port, rejectUnauthorized: false });
      t.on('error', () => undefined);
      await w.until('the drop', () => w.strangers.length === 1);
      expect(w.strangers[0]!.reason).toBe('not-migration');
      expect(w.strangers[0]!.error.message).toContain('TLS ClientHello');
      t.destroy();
      await realSourceGetsIn(w);
    } finally {
      w.close();
    }
  });

  it('a client that sends nothing is dropped after qualifyTimeoutMs', async () => {
    const w = await watched({ qualifyTimeoutMs: 300 });
    try {
      const s = await w.raw();
      const t0 = Date.now();
      await once(s, 'close'); // 300 ms away: registered in time
      const ms = Date.now() - t0;
      expect(ms).toBeGreaterThanOrEqual(250);
      expect(w.strangers).toHaveLength(1);
      expect(w.strangers[0]).toMatchObject({ reason: 'timeout', error: { code: 'qualify-timeout' } });
      await realSourceGetsIn(w);
    } finally {
      w.close();
    }
  });

  it('a flood of silent connections beyond maxPendingConnections: the oldest make room, never more than the bound wait, the real source still gets in', async () => {
    const max = 8;
    const flood = 60;
    const w = await watched({ maxPendingConnections: max, qualifyTimeoutMs: 30_000 });
    try {
      let peak = 0;
      for (let i = 0; i < flood; i++) {
        await w.raw();
        peak = Math.max(peak, w.listener.pendingConnections);
      }
      await w.until('the listener to see every connection', () => w.strangers.length + w.listener.pendingConnections === flood);
      expect(peak).toBeLessThanOrEqual(max);
      expect(w.listener.pendingConnections).toBe(max);
      expect(w.strangers).toHaveLength(flood - max);
      expect(w.strangers.every((e) => e.reason === 'too-many' && e.error.code === 'too-many-connections')).toBe(true);
      // The silent ones still hold every slot; the real source's main channel makes room and qualifies.
      await realSourceGetsIn(w);
      const by = (r: string) => w.strangers.filter((e) => e.reason === r).length;
      console.log(`[strangers] flood of ${flood} silent connections, bound ${max}: peak ${peak} waiting; dropped: too-many ${by('too-many')}, extra ${by('extra')} (once the real main channel qualified)`);
    } finally {
      w.close();
    }
  });

  it('after the main channel, a silent connection waits (the real preempt channel may be silent) but a stranger that speaks is dropped', async () => {
    const w = await watched({ qualifyTimeoutMs: 200 });
    try {
      const accepted = w.listener.accept();
      const main = await w.raw();
      main.write(MAGIC);
      const conn = await accepted;
      const silent = await w.raw();
      const http = await w.raw();
      http.write('GET / HTTP/1.0\r\n\r\n');
      await w.until('the HTTP drop', () => w.strangers.length === 1);
      expect(w.strangers[0]).toMatchObject({ reason: 'not-migration', error: { channel: 'preempt' } });
      // Longer than qualifyTimeoutMs: a preempt candidate has no time limit.
      await new Promise((r) => setTimeout(r, 500));
      expect(w.strangers).toHaveLength(1);
      expect(conn.preemptExpected).toBe(true);
      expect(conn.preempt).toBeUndefined();
      // Its first page record makes it the preempt channel.
      silent.write(Buffer.concat([Buffer.from('0000000000002008', 'hex'), Buffer.from([6]), Buffer.from('pc.ram'), Buffer.alloc(4096, 7)]));
      const pre = await conn.waitPreempt();
      expect(pre.role).toBe('preempt');
      conn.destroy();
    } finally {
      w.close();
    }
  });
});

describe('silent preempt candidates (plain TCP)', () => {
  const PAGE = Buffer.concat([Buffer.from('0000000000002008', 'hex'), Buffer.from([6]), Buffer.from('pc.ram'), Buffer.alloc(4096, 7)]);

  async function withMain(w: Awaited<ReturnType<typeof watched>>) {
    const accepted = w.listener.accept();
    const main = await w.raw();
    main.write(MAGIC);
    return accepted;
  }

  it('one that stays silent past qualifyTimeoutMs is dropped once a newer one waits; the newest keeps waiting and becomes the preempt channel', async () => {
    const w = await watched({ qualifyTimeoutMs: 300 });
    try {
      const conn = await withMain(w);
      const stranger = await w.raw();
      const strangerClosed = once(stranger, 'close');
      const real = await w.raw();
      await w.until('the silent stranger to time out', () => w.strangers.length === 1);
      expect(w.strangers[0]).toMatchObject({ reason: 'timeout', error: { code: 'qualify-timeout', channel: 'preempt' } });
      await strangerClosed; // the older one went
      // The newest is past its own limit too, but it is the one the real, silent, preempt channel would be.
      await new Promise((r) => setTimeout(r, 600));
      expect(w.strangers).toHaveLength(1);
      expect(w.listener.pendingConnections).toBe(1);
      expect(conn.preemptExpected).toBe(true);
      real.write(PAGE);
      const pre = await conn.waitPreempt();
      expect(pre.role).toBe('preempt');
      conn.destroy();
    } finally {
      w.close();
    }
  });

  it('at maxPendingConnections the oldest silent one makes room: the real preempt channel after a flood of silent ones still gets in', async () => {
    const max = 4;
    const w = await watched({ maxPendingConnections: max, qualifyTimeoutMs: 30_000 });
    try {
      const conn = await withMain(w);
      for (let i = 0; i < max; i++) await w.raw();
      await w.until('the flood to wait', () => w.listener.pendingConnections === max);
      const real = await w.raw();
      await w.until('room made for the newcomer', () => w.strangers.length === 1);
      expect(w.strangers[0]).toMatchObject({ reason: 'too-many', error: { code: 'too-many-connections' } });
      expect(w.listener.pendingConnections).toBe(max);
      real.write(PAGE);
      const pre = await conn.waitPreempt();
      expect(pre.role).toBe('preempt');
      // The silent rest is dropped once the role is taken.
      await w.until('the rest dropped', () => w.strangers.length === max);
      expect(w.strangers.slice(1).every((e) => e.reason === 'extra')).toBe(true);
      conn.destroy();
    } finally {
      w.close();
    }
  });
});

describe('TLS strangers', () => {
  const good = () => ({ tls: { dir: join(dir, 'good') } });

  it('a client certificate of another CA is dropped as tls-unknown-ca, then the real source gets in', async () => {
    const w = await watched(good());
    try {
      const err = await SourceConnection.connect(w.listener.uri, { tls: { dir: join(dir, 'foreign-client') } }).then(
        async (c) => {
          // TLS 1.3: the client's handshake is done before the server has judged its certificate.
          if (!c.main.isClosed) await once(c.main, 'close');
          return undefined;
        },
        (e: unknown) => e,
      );
      expect(err === undefined || err instanceof TransportError).toBe(true);
      await w.until('the drop', () => w.strangers.length === 1);
      expect(w.strangers[0]).toMatchObject({ reason: 'tls', error: { code: 'tls-unknown-ca' } });
      await realSourceGetsIn(w, good());
    } finally {
      w.close();
    }
  });

  it('a server certificate of another CA: the source refuses, the destination drops it and keeps waiting', async () => {
    const w = await watched(good());
    try {
      await expect(SourceConnection.connect(w.listener.uri, { tls: { dir: join(dir, 'other-ca') } })).rejects.toMatchObject({ code: 'tls-unknown-ca' });
      await w.until('the drop', () => w.strangers.length === 1);
      expect(w.strangers[0]!.reason).toBe('tls');
      await realSourceGetsIn(w, good());
    } finally {
      w.close();
    }
  });

  it('a client that opens TCP and never starts the handshake times out', async () => {
    const w = await watched({ ...good(), qualifyTimeoutMs: 300 });
    try {
      const s = await w.raw();
      await once(s, 'close'); // 300 ms away: registered in time
      await w.until('the drop', () => w.strangers.length === 1);
      expect(w.strangers[0]).toMatchObject({ reason: 'timeout', error: { code: 'qualify-timeout' } });
      await realSourceGetsIn(w, good());
    } finally {
      w.close();
    }
  });

  it('plain bytes to a TLS listener', async () => {
    const w = await watched(good());
    try {
      (await w.raw()).write('GET / HTTP/1.1\r\n\r\n');
      await w.until('the drop', () => w.strangers.length === 1);
      expect(w.strangers[0]).toMatchObject({ reason: 'tls', error: { code: 'tls-not-tls' } });
      await realSourceGetsIn(w, good());
    } finally {
      w.close();
    }
  });
});

describe('TLS allow-list (allowedPeers, as tls-authz)', () => {
  it('the destination refuses a valid but unnamed client and accepts a named one', async () => {
    const w = await watched({ tls: { dir: join(dir, 'good'), allowedPeers: ['peer-a.example'] } });
    try {
      // 'good' holds a client certificate of our CA, naming localhost, 127.0.0.1, ::1: valid, not allowed.
      await SourceConnection.connect(w.listener.uri, { tls: { dir: join(dir, 'good') } }).then(
        (c) => (c.main.isClosed ? undefined : once(c.main, 'close')),
        () => undefined,
      );
      await w.until('the drop', () => w.strangers.length === 1);
      expect(w.strangers[0]).toMatchObject({ reason: 'tls', error: { code: 'tls-peer-not-allowed' } });
      expect(w.strangers[0]!.error.message).toContain('CN=qmt migration client');
      // peer-a's client certificate names peer-a.example (its CA-signed server certificate is not used here).
      await realSourceGetsIn(w, { tls: { dir: join(dir, 'peer-a'), hostname: 'localhost' } });
      expect(w.strangers).toHaveLength(1);
    } finally {
      w.close();
    }
  });

  it('names match the subject DN in either order, the CN and IP subjectAltNames in any spelling', async () => {
    for (const name of ['O=qemu-migration-transport,CN=qmt migration client', 'CN=qmt migration client,O=qemu-migration-transport', 'qmt migration client', '::1', '0:0:0:0:0:0:0:1']) {
      const w = await watched({ tls: { dir: join(dir, 'good'), allowedPeers: [name] } });
      try {
        await realSourceGetsIn(w, { tls: { dir: join(dir, 'good') } });
        expect(w.strangers, name).toEqual([]);
      } finally {
        w.close();
      }
    }
  });

  it('the source refuses a destination whose certificate is valid but not named, typed', async () => {
    const w = await watched({ tls: { dir: join(dir, 'good') } });
    try {
      const refused = SourceConnection.connect(w.listener.uri, { tls: { dir: join(dir, 'good'), allowedPeers: ['dst.example'] } });
      await expect(refused).rejects.toBeInstanceOf(TransportError);
      await expect(refused).rejects.toMatchObject({ code: 'tls-peer-not-allowed', channel: 'main' });
      await realSourceGetsIn(w, { tls: { dir: join(dir, 'good'), allowedPeers: ['localhost'] } });
    } finally {
      w.close();
    }
  });

  it('an empty list refuses every peer', async () => {
    const w = await watched({ tls: { dir: join(dir, 'good'), allowedPeers: [] } });
    try {
      await SourceConnection.connect(w.listener.uri, { tls: { dir: join(dir, 'good') } }).then(
        (c) => (c.main.isClosed ? undefined : once(c.main, 'close')),
        () => undefined,
      );
      await w.until('the drop', () => w.strangers.length === 1);
      expect(w.strangers[0]!.error.code).toBe('tls-peer-not-allowed');
    } finally {
      w.close();
    }
  });
});

describe('options', () => {
  it('bad bounds are refused at listen()', async () => {
    await expect(MigrationListener.listen('tcp:127.0.0.1:0', { maxPendingConnections: 0 })).rejects.toBeInstanceOf(RangeError);
    await expect(MigrationListener.listen('tcp:127.0.0.1:0', { qualifyTimeoutMs: -5 })).rejects.toBeInstanceOf(RangeError);
  });
});
