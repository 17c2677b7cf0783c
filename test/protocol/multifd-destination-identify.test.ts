/**
 * How a multifd listener tells its connections apart (src/transport/qualify.ts):
 * "QEVM" → main, the multifd magic → a multifd channel by the id of its init
 * message, checked (version, UUID, id < N, not taken); anything else is a
 * stranger, before, among and after the channels; the preempt channel only
 * after main and every multifd channel (QEMU 10.1's order). Plain TCP and
 * TLS (content read after the handshake) alike.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { once } from 'node:events';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import tls from 'node:tls';
import { readFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Channel } from '../../src/transport/channel.js';
import { MigrationListener, type DestinationConnection } from '../../src/transport/connection.js';
import { initPkiDir } from '../../src/transport/pki.js';
import { judgeMainOrMultifd, type StrangerEvent } from '../../src/transport/qualify.js';

const work = mkdtempSync(join(tmpdir(), 'qmt-mfd-id-'));
const pkiDir = join(work, 'pki');
beforeAll(async () => {
  await initPkiDir(pkiDir);
});
afterAll(() => rmSync(work, { recursive: true, force: true }));

/** A multifd init message (multifd.c MultiFDInit_t): magic, version, UUID, id, reserved zeros. */
function init(id: number, opts: { uuid?: Uint8Array; version?: number } = {}): Buffer {
  const b = Buffer.alloc(64);
  b.writeUInt32BE(0x11223344, 0);
  b.writeUInt32BE(opts.version ?? 1, 4);
  if (opts.uuid) Buffer.from(opts.uuid).copy(b, 8);
  b[24] = id;
  return b;
}
const MAGIC = Buffer.from('QEVM');
const pageRecord = Buffer.concat([Buffer.from('0000000000001008', 'hex'), Buffer.from([2]), Buffer.from('m0'), Buffer.alloc(4096, 7)]);

async function until(what: string, ok: () => boolean, strangers: StrangerEvent[]): Promise<void> {
  const deadline = Date.now() + 10_000;
  while (!ok()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}; strangers: ${JSON.stringify(strangers.map((e) => e.error.describe()))}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** The first `n` bytes a channel's reader gets. */
function firstBytes(ch: Channel, n: number): Promise<Buffer> {
  const parts: Buffer[] = [];
  let total = 0;
  return new Promise((resolve) =>
    ch.read((c) => {
      parts.push(c);
      total += c.length;
      if (total >= n) resolve(Buffer.concat(parts).subarray(0, n));
    }),
  );
}

describe('judgeMainOrMultifd', () => {
  const m = { channels: 4, uuid: new Uint8Array(16), taken: (id: number) => id === 2 };
  it('tells main from multifd by the first bytes, and waits for the whole init message', () => {
    expect(judgeMainOrMultifd(MAGIC.subarray(0, 2), m)).toEqual({ verdict: 'more' });
    expect(judgeMainOrMultifd(MAGIC, m)).toEqual({ verdict: 'main' });
    expect(judgeMainOrMultifd(init(1).subarray(0, 63), m)).toEqual({ verdict: 'more' });
    expect(judgeMainOrMultifd(init(1), m)).toEqual({ verdict: 'multifd', id: 1 });
    expect(judgeMainOrMultifd(Buffer.from('GET / HTTP/1.1'), m)).toEqual({ verdict: 'no' });
    // Already wrong at the first byte that differs from both magics.
    expect(judgeMainOrMultifd(Buffer.from([0x16]), m)).toEqual({ verdict: 'no' });
  });
  it('refuses a wrong version, another UUID, an id ≥ N and a taken id, naming them', () => {
    expect(judgeMainOrMultifd(init(1, { version: 2 }), m)).toMatchObject({ verdict: 'bad-init', why: expect.stringContaining('version 2') });
    const other = new Uint8Array(16).fill(0xab);
    expect(judgeMainOrMultifd(init(1, { uuid: other }), m)).toMatchObject({ verdict: 'bad-init', why: expect.stringContaining('abababab') });
    expect(judgeMainOrMultifd(init(4), m)).toMatchObject({ verdict: 'bad-init', id: 4, why: expect.stringContaining('4 channel(s)') });
    expect(judgeMainOrMultifd(init(2), m)).toMatchObject({ verdict: 'bad-init', id: 2, taken: true });
    const mine = { ...m, uuid: other };
    expect(judgeMainOrMultifd(init(1, { uuid: other }), mine)).toEqual({ verdict: 'multifd', id: 1 });
    expect(judgeMainOrMultifd(init(1), mine)).toMatchObject({ verdict: 'bad-init' });
  });
});

describe.each([false, true])('a multifd listener (TLS: %s)', (useTls) => {
  const transport = useTls ? { tls: { dir: pkiDir } } : {};

  async function dial(port: number): Promise<net.Socket> {
    if (!useTls) {
      const s = net.connect(port, '127.0.0.1');
      s.on('error', () => undefined);
      await once(s, 'connect');
      return s;
    }
    const s = tls.connect({
      host: '127.0.0.1',
      port,
      ca: readFileSync(join(pkiDir, 'ca-cert.pem')),
      cert: readFileSync(join(pkiDir, 'client-cert.pem')),
      key: readFileSync(join(pkiDir, 'client-key.pem')),
      servername: '',
    });
    s.on('error', () => undefined);
    await once(s, 'secureConnect');
    return s;
  }

  it('takes main and every multifd channel in any order, strangers before and among them dropped, then the preempt channel', async () => {
    const listener = await MigrationListener.listen('tcp:127.0.0.1:0', transport, { multifd: { channels: 3 } });
    const strangers: StrangerEvent[] = [];
    listener.on('stranger', (ev) => strangers.push(ev));
    const port = (listener.endpoint as { port: number }).port;
    const sockets: net.Socket[] = [];
    let conn: DestinationConnection | undefined;
    try {
      const open = async (first?: Buffer): Promise<net.Socket> => {
        const s = await dial(port);
        sockets.push(s);
        if (first) s.write(first);
        return s;
      };
      await open(Buffer.from('GET /healthz HTTP/1.1\r\n\r\n'));
      await until('the HTTP stranger', () => strangers.length === 1, strangers);
      // multifd channels before the main channel, out of order.
      await open(Buffer.concat([init(2), Buffer.from('after-init-2')]));
      await open(init(0));
      await until('two multifd channels', () => listener.multifdChannels!.count === 2, strangers);
      await open(Buffer.from('SSH-2.0-OpenSSH_9.2\r\n'));
      await until('the SSH stranger', () => strangers.length === 2, strangers);
      const accepted = listener.accept();
      await open(Buffer.concat([MAGIC, Buffer.from('rest-of-main')]));
      conn = await accepted;
      expect(listener.multifdChannels!.complete).toBe(false);
      await open(init(1));
      const all = await conn.multifd!.whenComplete();
      expect(all.map((c) => [c.role, c.id])).toEqual([
        ['multifd', 0],
        ['multifd', 1],
        ['multifd', 2],
      ]);
      // Peeked, never consumed: each reader gets its channel from its first byte.
      expect((await firstBytes(conn.main, 16)).toString('latin1')).toBe('QEVMrest-of-main');
      expect((await firstBytes(all[2]!, 76)).equals(Buffer.concat([init(2), Buffer.from('after-init-2')]))).toBe(true);
      expect(conn.stats().multifd?.map((s) => s.id)).toEqual([0, 1, 2]);
      // The next connection is the preempt channel (plain: by its first page record; TLS: by order).
      await open(pageRecord);
      const preempt = await conn.waitPreempt();
      expect((await firstBytes(preempt, 9)).equals(pageRecord.subarray(0, 9))).toBe(true);
      expect(strangers.map((e) => [e.reason, e.error.code])).toEqual([
        ['not-migration', 'not-a-migration-channel'],
        ['not-migration', 'not-a-migration-channel'],
      ]);
    } finally {
      conn?.destroy();
      listener.close();
      for (const s of sockets) s.destroy();
    }
  });

  it('drops a second channel with a taken id, an id ≥ N and another UUID as strangers, naming the channel', async () => {
    const uuid = new Uint8Array(16).fill(0x5a);
    const listener = await MigrationListener.listen('tcp:127.0.0.1:0', transport, { multifd: { channels: 2, uuid } });
    const strangers: StrangerEvent[] = [];
    listener.on('stranger', (ev) => strangers.push(ev));
    const port = (listener.endpoint as { port: number }).port;
    const sockets: net.Socket[] = [];
    let conn: DestinationConnection | undefined;
    try {
      const open = async (first: Buffer): Promise<void> => {
        const s = await dial(port);
        sockets.push(s);
        s.write(first);
      };
      await open(init(0, { uuid }));
      await until('channel 0', () => listener.multifdChannels!.count === 1, strangers);
      await open(init(0, { uuid }));
      await until('the duplicate', () => strangers.length === 1, strangers);
      await open(init(2, { uuid }));
      await until('the id out of range', () => strangers.length === 2, strangers);
      await open(init(1));
      await until('the wrong UUID', () => strangers.length === 3, strangers);
      expect(strangers.map((e) => [e.reason, e.error.code, e.error.channel])).toEqual([
        ['extra', 'channel-order', 'multifd-0'],
        ['not-migration', 'bad-multifd-init', 'multifd-2'],
        ['not-migration', 'bad-multifd-init', 'multifd'],
      ]);
      expect(strangers[0]!.error.describe()).toContain('multifd-0 channel');
      expect(strangers[2]!.error.message).toContain('5a5a5a5a');
      // The real ones still get their roles.
      const accepted = listener.accept();
      await open(init(1, { uuid }));
      await open(MAGIC);
      conn = await accepted;
      await conn.multifd!.whenComplete();
      expect(strangers).toHaveLength(3);
    } finally {
      conn?.destroy();
      listener.close();
      for (const s of sockets) s.destroy();
    }
  });

  it('closing the listener before main came closes the multifd channels already in', async () => {
    const listener = await MigrationListener.listen('tcp:127.0.0.1:0', transport, { multifd: { channels: 2 } });
    const port = (listener.endpoint as { port: number }).port;
    const s = await dial(port);
    s.write(init(1));
    await until('channel 1', () => listener.multifdChannels!.count === 1, []);
    const ch = listener.multifdChannels!.get(1)!;
    const waiting = listener.multifdChannels!.whenComplete();
    listener.close();
    await expect(waiting).rejects.toMatchObject({ code: 'closed' });
    expect(ch.isClosed).toBe(true);
    await new Promise<void>((r) => (s.closed ? r() : s.once('close', () => r())));
  });
});

describe('multifd listener options', () => {
  it('refuses a channel count outside 1–255 and a UUID that is not 16 bytes, at the call', async () => {
    for (const channels of [0, 256, 1.5, Number.NaN]) {
      await expect(MigrationListener.listen('tcp:127.0.0.1:0', {}, { multifd: { channels } })).rejects.toThrow(RangeError);
    }
    await expect(MigrationListener.listen('tcp:127.0.0.1:0', {}, { multifd: { channels: 2, uuid: new Uint8Array(4) } })).rejects.toThrow(/16 bytes/);
  });
});

describe('many multifd channels at once', () => {
  it('40 channels connecting before any speaks all qualify (the pending bound grows with the channels)', async () => {
    const listener = await MigrationListener.listen('tcp:127.0.0.1:0', {}, { multifd: { channels: 40 } });
    const strangers: StrangerEvent[] = [];
    listener.on('stranger', (ev) => strangers.push(ev));
    const port = (listener.endpoint as { port: number }).port;
    const sockets: net.Socket[] = [];
    try {
      for (let i = 0; i < 40; i++) {
        const s = net.connect(port, '127.0.0.1');
        s.on('error', () => undefined);
        sockets.push(s);
      }
      await Promise.all(sockets.map((s) => once(s, 'connect')));
      await until('40 candidates', () => listener.pendingConnections === 40, strangers);
      sockets.forEach((s, id) => s.write(init(id)));
      await until('40 multifd channels', () => listener.multifdChannels!.complete, strangers);
      expect(strangers).toEqual([]);
    } finally {
      listener.multifdChannels?.destroy();
      listener.close();
      for (const s of sockets) s.destroy();
    }
  });
});
