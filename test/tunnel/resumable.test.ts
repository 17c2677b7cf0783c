/**
 * ResumableConnection on its own. A peer that resumes at a byte this side
 * never sent loses that hop connection before it begins: an outage (so the
 * owner tries again, and the outage limit applies), not a connection left
 * waiting forever. A bulk connection of the tunnel yields to the event loop
 * (setYield): between two turns it reads at most its budget and one read
 * more, so that another connection on the same thread (the preempt channel's
 * urgent page) is served within that much work (without one, libuv reads a
 * ready socket up to 32 times in a row). Every byte still arrives, in order.
 */
import { createHash, randomBytes } from 'node:crypto';
import net from 'node:net';
import { describe, expect, it } from 'vitest';
import { HopFrameDecoder } from '../../src/transport/resumable-frames.js';
import { ResumableConnection } from '../../src/transport/resumable.js';

const KiB = 1024;
const MiB = 1024 * KiB;

/** Two connected sockets (half-open allowed). */
async function socketPair(): Promise<[net.Socket, net.Socket]> {
  const server = net.createServer({ allowHalfOpen: true });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const accepted = new Promise<net.Socket>((r) => server.once('connection', r));
  const client = net.connect({ port: (server.address() as net.AddressInfo).port, host: '127.0.0.1', allowHalfOpen: true });
  await new Promise((r) => client.once('connect', r));
  const other = await accepted;
  server.close();
  return [client, other];
}

/** The most bytes the connection read between two turns of the event loop, over a burst of `size`. */
async function burst(budget: number | undefined, size: number): Promise<{ most: number; digest: string; sent: string }> {
  const [qemu, local] = await socketPair();
  const [hopNear, hopFar] = await socketPair();
  const conn = new ResumableConnection(local, 'main', { replayBytes: 4 * size });
  conn.setYield(budget);
  conn.attach(hopNear, new HopFrameDecoder(), 0);
  // The far end: decodes the frames, gathers the payload, acknowledges now and then.
  const far = new HopFrameDecoder();
  const got: Buffer[] = [];
  let gotBytes = 0;
  hopFar.on('data', (c: Buffer) => {
    for (const f of far.push(c)) {
      if (f.type !== 'data') continue;
      got.push(Buffer.from(f.payload));
      gotBytes += f.payload.length;
    }
  });
  let read = 0;
  let atTurn = 0;
  let most = 0;
  conn.observer = { read: (c) => (read += c.length), delivered: () => undefined };
  let turning = true;
  const turn = (): void => {
    most = Math.max(most, read - atTurn);
    atTurn = read;
    if (turning) setImmediate(turn);
  };
  setImmediate(turn);
  const data = randomBytes(size);
  qemu.write(data);
  while (gotBytes < size) await new Promise((r) => setTimeout(r, 5));
  turning = false;
  for (const s of [qemu, local, hopNear, hopFar]) s.destroy();
  return { most, digest: createHash('sha256').update(Buffer.concat(got)).digest('hex'), sent: createHash('sha256').update(data).digest('hex') };
}

describe('a bulk connection yields to the event loop', () => {
  it('reads at most its budget and one read between two turns; every byte arrives in order', async () => {
    const r = await burst(256 * KiB, 16 * MiB);
    expect(r.digest).toBe(r.sent);
    expect(r.most, 'bytes read between two turns').toBeLessThanOrEqual(256 * KiB + 64 * KiB);
  });

  it('without a budget (the urgent connection) every byte arrives in order too', async () => {
    // How much libuv reads per turn without a budget depends on how fast the bytes come (CI saw 190 KiB on a
    // loaded machine, 2 MiB on an idle one): not asserted.
    const r = await burst(undefined, 16 * MiB);
    expect(r.digest).toBe(r.sent);
  });
});

describe('a hop connection that resumes where it cannot', () => {
  it('is lost before it begins: an outage, typed hop-protocol; a good one after it carries on', async () => {
    const [qemu, local] = await socketPair();
    const conn = new ResumableConnection(local, 'main', { outageMs: 0 });
    const lost: string[] = [];
    conn.on('lost', (e) => lost.push(`${e.code}: ${e.message}`));
    qemu.write(Buffer.from('QEVM'));
    await new Promise((r) => setTimeout(r, 50));
    const [bad, badFar] = await socketPair();
    conn.attach(bad, new HopFrameDecoder(), 1_000_000);
    expect(conn.state).toBe('outage');
    expect(lost).toEqual([expect.stringMatching(/^hop-protocol: the peer acknowledged byte 1000000 of 4 sent/)]);
    expect(bad.destroyed).toBe(true);
    const [good, goodFar] = await socketPair();
    const far = new HopFrameDecoder();
    const got: Buffer[] = [];
    goodFar.on('data', (c: Buffer) => {
      for (const f of far.push(c)) if (f.type === 'data') got.push(Buffer.from(f.payload));
    });
    conn.attach(good, new HopFrameDecoder(), 0);
    expect(conn.state).toBe('attached');
    await new Promise((r) => setTimeout(r, 50));
    expect(Buffer.concat(got).toString('latin1')).toBe('QEVM');
    for (const s of [qemu, local, badFar, good, goodFar]) s.destroy();
  });
});
