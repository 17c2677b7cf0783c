/**
 * A bulk connection of the tunnel yields to the event loop (ResumableConnection
 * setYield): between two turns it reads at most its budget and one read more,
 * so that another connection on the same thread (the preempt channel's urgent
 * page) is served within that much work; without a budget a burst is read in
 * one go (libuv reads a ready socket up to 32 times in a row). Every byte still
 * arrives, in order.
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

  it('without a budget (the urgent connection) a burst is read as it comes', async () => {
    const r = await burst(undefined, 16 * MiB);
    expect(r.digest).toBe(r.sent);
    // The comparison the budget is for: libuv reads many 64 KiB chunks per turn.
    expect(r.most).toBeGreaterThan(320 * KiB);
  });
});
