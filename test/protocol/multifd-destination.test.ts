/**
 * DestinationSession with `multifd` against a scripted multifd source (raw
 * sockets writing what QEMU 10.0 writes: the main stream with only the block
 * list, MULTIFD_FLUSH barriers and device state; N channels with an init
 * message, SYNC packets and page packets): memory lands whole and in order
 * across the barrier, bad input and a cut channel fail typed naming the
 * channel, and nothing is left open.
 */
import net from 'node:net';
import { describe, expect, it } from 'vitest';
import { DestinationSession, InMemorySink, MigrationError, StreamEncoder, concatPieces, type StreamRecord } from '../../src/index.js';
import { MultifdFlag, encodeMultifdInit, encodeMultifdPacketHeader } from '../../src/stream/multifd.js';
import { leftAfter, resourceSnapshot } from '../support/resources.js';

const PAGE = 4096;
const BLOCKS = [
  { idstr: 'pc.ram', length: 64 * PAGE },
  { idstr: '/rom@etc/acpi/tables', length: 4 * PAGE },
];
const RAM = { sectionId: 2, idstr: 'ram', instanceId: 0, versionId: 4 } as const;

/** A page whose bytes say which pass and page they are. */
function pageBytes(pass: number, block: string, offset: number): Buffer {
  const b = Buffer.alloc(PAGE, (pass * 31 + offset / PAGE) & 0xff);
  b.write(`${block}@${offset}#${pass}`, 0, 'latin1');
  return b;
}

/** One multifd packet: header, then the normal pages' bytes. */
function packet(num: number, block: string, normal: number[], zero: number[], pass: number, flags = 0): Buffer {
  const header = encodeMultifdPacketHeader({ flags, pagesAlloc: 128, packetNum: BigInt(num), block, normal, zero });
  return Buffer.concat([header, ...normal.map((o) => pageBytes(pass, block, o))]);
}
const sync = (num: number): Buffer => Buffer.from(encodeMultifdPacketHeader({ flags: MultifdFlag.SYNC, pagesAlloc: 128, packetNum: BigInt(num), block: '', normal: [], zero: [] }));

function mainRecords(passes: number, tail: StreamRecord[] = []): StreamRecord[] {
  const recs: StreamRecord[] = [
    { type: 'header', version: 3 },
    { type: 'configuration', machineType: 'pc-q35-10.0' },
    { type: 'section', kind: 'start', ...RAM },
    { type: 'ram-blocks', total: BLOCKS.reduce((s, b) => s + b.length, 0), blocks: BLOCKS },
    { type: 'ram-multifd-flush' },
    { type: 'ram-eos' },
    { type: 'footer', sectionId: 2 },
  ];
  for (let p = 0; p < passes; p++) recs.push({ type: 'section', kind: 'part', ...RAM }, { type: 'ram-multifd-flush' }, { type: 'ram-eos' }, { type: 'footer', sectionId: 2 });
  recs.push(...tail);
  return recs;
}
const completion: StreamRecord[] = [
  { type: 'section', kind: 'end', ...RAM },
  { type: 'ram-multifd-flush' },
  { type: 'ram-eos' },
  { type: 'footer', sectionId: 2 },
  { type: 'section', kind: 'full', sectionId: 5, idstr: 'timer', instanceId: 0, versionId: 1 },
  { type: 'device-state', sectionId: 5, idstr: 'timer', instanceId: 0, versionId: 1, kind: 'full', data: Uint8Array.of(1, 2, 3, 4) },
  { type: 'footer', sectionId: 5 },
  { type: 'eof' },
  {
    type: 'vmdesc',
    json: new TextEncoder().encode(JSON.stringify({ page_size: 4096, devices: [{ name: 'timer', instance_id: 0, vmsd_name: 'timer', version: 1, fields: [{ name: 'data', type: 'buffer', size: 4 }] }] })),
  },
];

function encode(records: StreamRecord[]): Buffer {
  const e = new StreamEncoder({ continueMode: 'as-recorded' });
  e.writeAll(records);
  return concatPieces(e.take());
}

async function dial(uri: string): Promise<net.Socket> {
  const s = net.connect(Number(uri.split(':').pop()), '127.0.0.1');
  s.on('error', () => undefined);
  await new Promise((r) => s.once('connect', r));
  return s;
}

const closed = (s: net.Socket): Promise<void> => (s.closed ? Promise.resolve() : new Promise((r) => s.once('close', () => r())));

/** Pass 1: pages 0–23 over three channels; pass 2 rewrites 0–7 on other channels; zero pages in both. */
function script(): { channels: Buffer[][]; expected: Map<string, Buffer> } {
  const expected = new Map<string, Buffer>(BLOCKS.map((b) => [b.idstr, Buffer.alloc(b.length)]));
  const put = (pass: number, block: string, offsets: number[]): void => {
    for (const o of offsets) pageBytes(pass, block, o).copy(expected.get(block)!, o);
  };
  const r = (from: number, n: number): number[] => Array.from({ length: n }, (_, i) => (from + i) * PAGE);
  // Each channel: its init, the setup SYNC, pass-1 packets, SYNC, pass-2 packets, SYNC, (completion) SYNC.
  const ch: Buffer[][] = [0, 1, 2].map((id) => [Buffer.from(encodeMultifdInit(id)), sync(id)]);
  let n = 3;
  ch[0]!.push(packet(n++, 'pc.ram', r(0, 8), [], 1));
  ch[1]!.push(packet(n++, 'pc.ram', [...r(10, 6), 8 * PAGE, 9 * PAGE], r(40, 4), 1));
  ch[2]!.push(packet(n++, 'pc.ram', r(16, 8), [], 1), packet(n++, '/rom@etc/acpi/tables', [PAGE], [], 1));
  put(1, 'pc.ram', r(0, 24));
  put(1, '/rom@etc/acpi/tables', [PAGE]);
  for (const c of ch) c.push(sync(n++));
  // Pass 2: pages 0–7 again, on channels 1 and 2; page 9 becomes a zero page.
  ch[1]!.push(packet(n++, 'pc.ram', r(0, 4), [9 * PAGE], 2));
  ch[2]!.push(packet(n++, 'pc.ram', r(4, 4), [], 2));
  put(2, 'pc.ram', r(0, 8));
  expected.get('pc.ram')!.fill(0, 9 * PAGE, 10 * PAGE);
  for (const c of ch) c.push(sync(n++));
  for (const c of ch) c.push(sync(n++)); // completion
  return { channels: ch, expected };
}

describe('DestinationSession with multifd (scripted source, plain TCP)', () => {
  it('lands every page of three channels, in pass order across the barrier, and completes with nothing left open', async () => {
    const before = resourceSnapshot();
    const sink = new InMemorySink();
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, multifd: { channels: 3 } });
    const events: string[] = [];
    dst.on('channel', ({ role, stats }) => events.push(`${role}${stats.id ?? ''}`));
    const { channels, expected } = script();
    const main = await dial(dst.uri);
    main.write(encode(mainRecords(2, completion)));
    // The channels connect after main, out of order; channel 0 writes its pass-1 pages last, so
    // that without the barrier pass 2's copies on channels 1 and 2 would be overwritten by them.
    const socks = await Promise.all([2, 1, 0].map(async (id) => [id, await dial(dst.uri)] as const));
    for (const [id, s] of socks) if (id !== 0) s.write(Buffer.concat(channels[id]!));
    await new Promise((r) => setTimeout(r, 100));
    const zero = socks.find(([id]) => id === 0)![1];
    for (const part of channels[0]!) zero.write(part);
    const result = await dst.done;
    for (const b of BLOCKS) expect(sink.blocks.get(b.idstr)!.equals(expected.get(b.idstr)!), b.idstr).toBe(true);
    expect(result.devices.map((d) => d.idstr)).toEqual(['timer']);
    expect(result.stats.multifd).toMatchObject({ channels: 3, syncs: 4, packets: 3 * 4 + 6, normal: 24 + 1 + 8, zero: 4 + 1 });
    expect(result.stats.normal).toBe(33);
    expect(result.stats.duplicate).toBe(5);
    expect(result.stats.channels.multifd?.map((c) => c.id)).toEqual([0, 1, 2]);
    expect(events.sort()).toEqual(['main', 'multifd0', 'multifd1', 'multifd2']);
    for (const [, s] of socks) s.destroy();
    main.destroy();
    await dst.close();
    expect(await leftAfter(before, 3000)).toEqual([]);
  });

  it('does not read the main channel before every multifd channel is in (as QEMU)', async () => {
    const sink = new InMemorySink();
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, multifd: { channels: 2 } });
    let blocks = 0;
    dst.on('ram-blocks', () => blocks++);
    const main = await dial(dst.uri);
    main.write(encode(mainRecords(0)));
    const c0 = await dial(dst.uri);
    c0.write(Buffer.concat([encodeMultifdInit(0), sync(0)]));
    await new Promise((r) => setTimeout(r, 200));
    expect(blocks).toBe(0);
    const c1 = await dial(dst.uri);
    c1.write(Buffer.concat([encodeMultifdInit(1), sync(1)]));
    const deadline = Date.now() + 5000;
    while (blocks === 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
    expect(blocks).toBe(1);
    await dst.close();
    for (const s of [main, c0, c1]) s.destroy();
  });

  it.each([
    ['a packet for an unknown block', (n: number) => packet(n, 'no-such-block', [0], [], 1), 'unknown-ram-block', /multifd-1: .*no-such-block/],
    ['a page outside its block', (n: number) => packet(n, '/rom@etc/acpi/tables', [8 * PAGE], [], 1), 'page-out-of-range', /multifd-1: /],
    ['a compressed packet', (n: number) => Buffer.from(encodeMultifdPacketHeader({ flags: 0x04, pagesAlloc: 128, packetNum: BigInt(n), block: 'pc.ram', normal: [], zero: [PAGE] })), 'unsupported', /multifd-1: .*zstd/],
  ])('%s fails the migration typed, naming the channel, and closes everything', async (_what, bad, code, message) => {
    const before = resourceSnapshot();
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink: new InMemorySink(), multifd: { channels: 2 } });
    const main = await dial(dst.uri);
    main.write(encode(mainRecords(1)));
    const c0 = await dial(dst.uri);
    const c1 = await dial(dst.uri);
    c0.write(Buffer.concat([encodeMultifdInit(0), sync(0)]));
    c1.write(Buffer.concat([encodeMultifdInit(1), sync(1), bad(2)]));
    const e = await dst.done.then(
      () => undefined,
      (err: unknown) => err,
    );
    expect(e).toBeInstanceOf(MigrationError);
    expect(e).toMatchObject({ code, message: expect.stringMatching(message) });
    await Promise.all([main, c0, c1].map(closed));
    await dst.close();
    expect(await leftAfter(before, 3000)).toEqual([]);
  });

  it.each(['reset', 'fin'] as const)('a multifd channel cut in precopy (%s) fails typed naming the channel; every socket closes', async (how) => {
    const before = resourceSnapshot();
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink: new InMemorySink(), multifd: { channels: 2 } });
    const failed: MigrationError[] = [];
    dst.on('failed', (e) => failed.push(e));
    const main = await dial(dst.uri);
    main.write(encode(mainRecords(1)));
    const c0 = await dial(dst.uri);
    const c1 = await dial(dst.uri);
    c0.write(Buffer.concat([encodeMultifdInit(0), sync(0), packet(2, 'pc.ram', [0], [], 1)]));
    c1.write(Buffer.concat([encodeMultifdInit(1), sync(1)]));
    await new Promise((r) => setTimeout(r, 100));
    if (how === 'reset') c0.resetAndDestroy();
    else c0.end();
    const e = await dst.done.then(
      () => undefined,
      (err: unknown) => err as MigrationError,
    );
    expect(e).toBeInstanceOf(MigrationError);
    expect(e!.phase).toBe('precopy');
    if (how === 'reset') expect(e).toMatchObject({ code: 'reset', kind: 'network', message: expect.stringContaining('multifd-0') });
    else expect(e).toMatchObject({ code: 'peer-disconnected', message: expect.stringContaining('multifd-0') });
    expect(failed).toEqual([e]);
    await Promise.all([main, c1].map(closed));
    await dst.close();
    expect(await leftAfter(before, 3000)).toEqual([]);
  });

  it('a multifd channel reset while it waits at its barrier, then the main channel ended by the source: the error names that channel (its reset, unread, was still in the kernel)', async () => {
    const before = resourceSnapshot();
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink: new InMemorySink(), multifd: { channels: 2 } });
    const blocks = new Promise<void>((r) => dst.once('ram-blocks', () => r()));
    const main = await dial(dst.uri);
    // The setup pass only: main then waits for more (it is read), and no flush releases a second SYNC.
    main.write(encode(mainRecords(0)));
    const c0 = await dial(dst.uri);
    const c1 = await dial(dst.uri);
    c0.write(Buffer.concat([encodeMultifdInit(0), sync(0)]));
    // Channel 1's pass-1 SYNC holds it at the barrier, and pass 2's pages pile up behind it: more than a
    // read takes, so its socket stops reading and the rest waits in the kernel.
    const pass2 = Array.from({ length: 256 }, (_, i) => packet(4 + i, 'pc.ram', Array.from({ length: 32 }, (_, k) => (k + (i % 2) * 32) * PAGE), [], 2));
    c1.write(Buffer.concat([encodeMultifdInit(1), sync(1), packet(2, 'pc.ram', [PAGE], [], 1), sync(3), ...pass2]));
    await blocks;
    await new Promise((r) => setTimeout(r, 300));
    c1.resetAndDestroy();
    await new Promise((r) => setTimeout(r, 100));
    // A QEMU source whose multifd channel failed gives up its main channel.
    main.end();
    const e = await dst.done.then(
      () => undefined,
      (err: unknown) => err as MigrationError,
    );
    expect(e).toBeInstanceOf(MigrationError);
    expect(e).toMatchObject({ code: 'reset', kind: 'network', phase: 'precopy', message: expect.stringContaining('multifd-1: the connection was reset (ECONNRESET), before the source closed its main channel') });
    await Promise.all([main, c0].map(closed));
    await dst.close();
    expect(await leftAfter(before, 3000)).toEqual([]);
  });

  it('a multifd channel that never connects: idle-timeout naming how many came, nothing left open', async () => {
    const before = resourceSnapshot();
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink: new InMemorySink(), multifd: { channels: 3 }, idleTimeoutMs: 300 });
    const main = await dial(dst.uri);
    main.write(encode(mainRecords(0)));
    const c0 = await dial(dst.uri);
    c0.write(Buffer.concat([encodeMultifdInit(0), sync(0)]));
    await expect(dst.done).rejects.toMatchObject({ code: 'idle-timeout', phase: 'setup', message: expect.stringContaining('only 1 of 3 multifd channels') });
    await Promise.all([main, c0].map(closed));
    await dst.close();
    expect(await leftAfter(before, 3000)).toEqual([]);
  });

  it('a stream with MULTIFD_FLUSH on a destination without multifd is refused, not taken for an empty RAM', async () => {
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink: new InMemorySink() });
    const main = await dial(dst.uri);
    main.write(encode(mainRecords(0)));
    await expect(dst.done).rejects.toMatchObject({ code: 'protocol', message: expect.stringContaining('multifd') });
    main.destroy();
    await dst.close();
  });

  it('refuses bad multifd options at the call', () => {
    const sink = new InMemorySink();
    for (const channels of [0, 256, 2.5]) expect(() => DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, multifd: { channels } })).toThrow(expect.objectContaining({ code: 'bad-option', option: 'multifd.channels' }));
    expect(() => DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, multifd: { channels: '2' as unknown as number } })).toThrow(TypeError);
    expect(() => DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, multifd: { channels: 2, uuid: new Uint8Array(8) } })).toThrow(expect.objectContaining({ option: 'multifd.uuid' }));
  });
});
