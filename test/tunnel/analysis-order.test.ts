/**
 * Both ends of the tunnel parse a QEMU multifd migration whose channels'
 * first bytes come before the main channel's: QEMU 10's multifd threads send
 * their MultiFDInit as soon as they connect, while the migration thread may
 * still be writing the stream header (CI saw it under load: the entry then
 * counted no page at all). The channels belong to the migration their QEMU
 * connection order says, whatever order their bytes come in. The stream is a
 * capture of QEMU 10.0.2 (multifd-2: 382 normal pages, all on the channels).
 */
import { readFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TunnelEntry, TunnelExit } from '../../src/protocol/tunnel/index.js';
import { initPkiDir } from '../../src/transport/pki.js';

const fixture = (name: string): Buffer => readFileSync(new URL(`../fixtures/${name}`, import.meta.url));
const captured = JSON.parse(fixture('multifd-2.json').toString()) as { source: { keyStats: Record<string, number> } };

let pki: string;
beforeAll(async () => {
  pki = await mkdtemp(join(tmpdir(), 'qmt-tunnel-order-'));
  await initPkiDir(pki);
});
afterAll(async () => {
  await rm(pki, { recursive: true, force: true });
});

async function until(what: string, ok: () => boolean, ms = 10_000): Promise<void> {
  const t0 = Date.now();
  while (!ok()) {
    if (Date.now() - t0 > ms) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

describe('tunnel analysis: connections in QEMU order, bytes in any order', () => {
  it("multifd channels' init before main's header: both ends count every page of the migration", async () => {
    const streams = [fixture('multifd-2-main.bin'), fixture('multifd-2-ch0.bin'), fixture('multifd-2-ch1.bin')];
    // A stand-in destination QEMU: reads each connection to its end.
    const got: number[] = [];
    const ended: Promise<void>[] = [];
    const server = net.createServer({ allowHalfOpen: true }, (s) => {
      const i = got.push(0) - 1;
      s.on('data', (c: Buffer) => (got[i]! += c.length));
      ended.push(new Promise<void>((r) => s.once('end', () => (s.end(), r()))));
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    const exit = await TunnelExit.start({ listen: 'tcp:127.0.0.1:0', to: `tcp:127.0.0.1:${(server.address() as net.AddressInfo).port}`, tls: { dir: pki } });
    const entry = await TunnelEntry.start({ listen: 'tcp:127.0.0.1:0', to: exit.uri, tls: { dir: pki, hostname: 'localhost' } });
    const opened: number[] = [];
    entry.on('connection', (c) => opened.push(c.index));
    try {
      // QEMU's order: main, then each channel, each connected before the next.
      const port = Number(entry.uri.split(':').pop());
      const sockets: net.Socket[] = [];
      for (let i = 0; i < streams.length; i++) {
        const s = net.connect({ port, host: '127.0.0.1', allowHalfOpen: true });
        s.on('data', () => undefined);
        await new Promise((r) => s.once('connect', r));
        sockets.push(s);
        await until(`connection ${i} across the hop`, () => opened.includes(i));
      }
      // The channels' MultiFDInit (64 bytes) first, through to the destination; then main's stream; then the pages.
      sockets[1]!.write(streams[1]!.subarray(0, 64));
      sockets[2]!.write(streams[2]!.subarray(0, 64));
      await until('both inits delivered', () => got[1] === 64 && got[2] === 64);
      sockets[0]!.end(streams[0]!);
      await until("main's stream delivered", () => got[0] === streams[0]!.length);
      sockets[1]!.end(streams[1]!.subarray(64));
      sockets[2]!.end(streams[2]!.subarray(64));
      await Promise.all(ended);
      expect(got).toEqual(streams.map((b) => b.length));
      const expected = captured.source.keyStats['ram.normal'];
      expect(expected).toBe(382);
      for (const [end, st] of [['entry', entry.stats()], ['exit', exit.stats()]] as const) {
        expect(st.connections.map((c) => c.role), end).toEqual(['main', 'multifd', 'multifd']);
        expect(st.migrations, `${end}: one migration`).toHaveLength(1);
        const m = st.migrations[0]!;
        expect(m.parseErrors, end).toEqual([]);
        expect(m.main.pages.normal + (m.multifd?.total.pages.normal ?? 0), `${end}: pages`).toBe(expected);
      }
      for (const s of sockets) s.destroy();
    } finally {
      await entry.close();
      await exit.close();
      await new Promise<void>((r) => server.close(() => r()));
    }
  });
});
