import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { connect, createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { buildGuest } from '../guest/build.js';
import {
  checkGuestInvariant,
  compareGuestRam,
  guestRangeOf,
  liveQemus,
  migrateBetween,
  parseRamBlocks,
  readGuestRam,
  startQemu,
  stopAll,
  TCG_DIRTY_SAFE_PAD_MIB,
} from './harness.js';
import { startRelay, type MigrationRelay } from './relay.js';
import { describeWithQemu } from './require-qemu.js';

const MiB = 1024 * 1024;

/** A dump with the guest's counter bytes set: `values[i]` is the counter of page i of [start, end). */
function fakeDump(startMiB: number, endMiB: number, values: (i: number) => number): Buffer {
  const mem = Buffer.alloc(endMiB * MiB);
  const pages = ((endMiB - startMiB) * MiB) / 4096;
  for (let i = 0; i < pages; i++) mem[startMiB * MiB + i * 4096] = values(i) & 0xff;
  return mem;
}

describe('checkGuestInvariant (synthetic dumps)', () => {
  const range = { startMiB: 1, endMiB: 2 }; // 256 pages
  it('accepts N everywhere, and N then N-1 with one step, in both directions', () => {
    expect(checkGuestInvariant(fakeDump(1, 2, () => 7), range)).toMatchObject({ ok: true, n: 7, stepAt: null });
    const up = checkGuestInvariant(fakeDump(1, 2, (i) => (i < 100 ? 8 : 7)), range);
    expect(up).toMatchObject({ ok: true, n: 8, stepAt: MiB + 100 * 4096 });
    // top-down guest: high pages were incremented first
    const downMem = fakeDump(1, 2, (i) => (i >= 200 ? 8 : 7));
    expect(checkGuestInvariant(downMem, { ...range, direction: 'down' })).toMatchObject({
      ok: true,
      n: 8,
      stepAt: MiB + 199 * 4096,
    });
    expect(checkGuestInvariant(downMem, { ...range, direction: 'up' }).ok).toBe(false);
  });
  it('handles the 8-bit wrap', () => {
    expect(checkGuestInvariant(fakeDump(1, 2, (i) => (i < 10 ? 0 : 255)), range)).toMatchObject({ ok: true, n: 0 });
  });
  it('rejects two steps, a step up, and values other than N / N-1', () => {
    expect(checkGuestInvariant(fakeDump(1, 2, (i) => (i < 10 ? 5 : i < 20 ? 4 : 5)), range).ok).toBe(false);
    expect(checkGuestInvariant(fakeDump(1, 2, (i) => (i < 10 ? 4 : 5)), range).ok).toBe(false);
    expect(checkGuestInvariant(fakeDump(1, 2, (i) => (i === 77 ? 9 : 5)), range).ok).toBe(false);
    expect(checkGuestInvariant(fakeDump(1, 2, (i) => (i < 50 ? 5 : 3)), range).ok).toBe(false);
    expect(checkGuestInvariant(Buffer.alloc(MiB), range).ok).toBe(false); // dump too short
  });
});

describe('compareGuestRam and parseRamBlocks', () => {
  it('skips 0xA0000-0xFFFFF and reports differing pages in order', () => {
    const a = Buffer.alloc(2 * MiB);
    const b = Buffer.from(a);
    b[0xb8000] = 1; // VGA window: ignored
    expect(compareGuestRam(a, b).equal).toBe(true);
    b[0x5000] = 1;
    b[0x123456] = 2;
    expect(compareGuestRam(a, b)).toEqual({ equal: false, pages: [0x5000, 0x123000], count: 2 });
    expect(compareGuestRam(a, b.subarray(0, MiB)).equal).toBe(false);
  });
  it('parses info ramblock', () => {
    const text =
      '              Block Name    PSize              Offset               Used              Total                HVA  RO\r\n' +
      '                  pc.ram    4 KiB  0x0000000000000000 0x0000000002000000 0x0000000002000000 0x00007f0000000000  rw\r\n' +
      '    /rom@etc/acpi/tables    4 KiB  0x0000000002080000 0x0000000000020000 0x0000000000200000 0x00007f0000000000  ro\r\n';
    expect(parseRamBlocks(text)).toEqual([
      {
        name: 'pc.ram',
        pageSize: 4096,
        offset: 0,
        usedLength: 32 * MiB,
        maxLength: 32 * MiB,
        readonly: false,
        hva: 0x7f0000000000,
      },
      {
        name: '/rom@etc/acpi/tables',
        pageSize: 4096,
        offset: 0x2080000,
        usedLength: 0x20000,
        maxLength: 0x200000,
        readonly: true,
        hva: 0x7f0000000000,
      },
    ]);
  });
});

describe('MigrationRelay (no QEMU)', () => {
  it('forwards and records both directions over unix sockets, assigns roles by accept order, cuts', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'qmt-relay-'));
    // Destination: replies to everything with "ack:<data>" and ends when the peer ends.
    const accepted: string[] = [];
    const server = createServer({ allowHalfOpen: true }, (sock) => {
      const chunks: Buffer[] = [];
      sock.on('data', (d: Buffer) => {
        chunks.push(d);
        sock.write(Buffer.concat([Buffer.from('ack:'), d]));
      });
      sock.on('end', () => {
        accepted.push(Buffer.concat(chunks).toString());
        sock.end();
      });
      sock.on('error', () => undefined);
    });
    await new Promise<void>((r) => server.listen(join(dir, 'dst.sock'), r));
    const relay = await startRelay({ target: `unix:${join(dir, 'dst.sock')}`, listen: { path: join(dir, 'relay.sock') } });
    try {
      expect(relay.uri).toBe(`unix:${join(dir, 'relay.sock')}`);
      const talk = (msg: string): Promise<string> =>
        new Promise((resolve, reject) => {
          const c = connect(join(dir, 'relay.sock'));
          const got: Buffer[] = [];
          c.on('data', (d: Buffer) => got.push(d));
          c.on('end', () => resolve(Buffer.concat(got).toString()));
          c.on('error', reject);
          c.end(msg);
        });
      expect(await talk('first')).toBe('ack:first');
      expect(await talk('second')).toBe('ack:second');
      await relay.waitAllClosed(5_000);
      expect(relay.connections.map((c) => [c.role, c.srcToDst.data().toString(), c.dstToSrc.data().toString()])).toEqual([
        ['main', 'first', 'ack:first'],
        ['preempt', 'second', 'ack:second'],
      ]);
      expect(accepted).toEqual(['first', 'second']);
      // cut(): open connection is destroyed; the next one starts a new generation as 'main'.
      const c3 = connect(join(dir, 'relay.sock'));
      c3.on('error', () => undefined);
      const closed = new Promise((r) => c3.on('close', r));
      await relay.waitConnections(3);
      relay.cut();
      await closed;
      expect(await talk('after-cut')).toBe('ack:after-cut');
      expect(relay.connections.map((c) => [c.generation, c.role])).toEqual([
        [0, 'main'],
        [0, 'preempt'],
        [0, 'extra'],
        [1, 'main'],
      ]);
    } finally {
      await relay.close();
      await new Promise((r) => server.close(r));
      await rm(dir, { recursive: true, force: true });
    }
  });
});

describeWithQemu('QEMU harness', () => {
  const relays: MigrationRelay[] = [];
  afterEach(async () => {
    await Promise.all(relays.splice(0).map((r) => r.close()));
    await stopAll();
  });
  afterAll(async () => {
    await stopAll();
    expect(liveQemus()).toEqual([]);
  });

  it('builds a cached boot-sector guest image', async () => {
    const a = await buildGuest({ startMiB: 1, endMiB: 3, direction: 'down' });
    const b = await buildGuest({ startMiB: 1, endMiB: 3, direction: 'down' });
    const c = await buildGuest({ startMiB: 1, endMiB: 3, direction: 'up' });
    expect(a).toBe(b);
    expect(c).not.toBe(a);
    const img = await readFile(a);
    expect(img[510]).toBe(0x55);
    expect(img[511]).toBe(0xaa);
    await expect(buildGuest({ startMiB: 0.5 })).rejects.toThrow(/1 MiB/);
  });

  it('boots the guest, counts passes, and the invariant holds on a paused snapshot', async () => {
    const q = await startQemu({ name: 'boot', memoryMiB: 64, guest: { startMiB: 1, endMiB: 48 } });
    await q.waitSerialPasses(3, 15_000);
    expect(q.serialLog()).toContain('QMT-GUEST');
    const p1 = q.serialPasses();
    await q.waitSerialPasses(p1 + 5, 15_000);
    expect((await q.queryStatus()).status).toBe('running');

    // Reads are not atomic against a running vCPU: pause for a consistent snapshot.
    const cursor = q.qmp.eventCursor();
    await q.pauseVm();
    await q.waitEvent('STOP', undefined, 5_000, cursor);
    const mem = await readGuestRam(q, 48 * MiB, 0, 'procmem');
    // /proc/PID/mem and pmemsave agree except in the VGA/ROM window.
    const viaPmemsave = await readGuestRam(q, 48 * MiB, 0, 'pmemsave');
    expect(compareGuestRam(mem, viaPmemsave).equal).toBe(true);
    await q.resumeVm();
    await q.waitEvent('RESUME', undefined, 5_000, cursor);
    const res = checkGuestInvariant(mem, guestRangeOf(q));
    expect(res.ok, res.detail).toBe(true);
    // Counters are not all zero any more: the guest ran several passes.
    expect(mem.subarray(MiB).some((v) => v !== 0)).toBe(true);

    // The same dump with one page's counter bumped must fail (no test that cannot fail).
    const bad = Buffer.from(mem);
    const victim = 20 * MiB;
    bad[victim] = ((bad[victim] ?? 0) + 2) & 0xff;
    const r2 = checkGuestInvariant(bad, guestRangeOf(q));
    expect(r2.ok).toBe(false);
    expect(r2.detail).toContain(`0x${victim.toString(16)}`);

    const blocks = await q.ramBlocks();
    expect(blocks.find((b) => b.name === 'pc.ram')).toMatchObject({ usedLength: 64 * MiB, pageSize: 4096 });
    expect((await q.hmp('info status')).trim()).toBe('VM status: running');
    await q.stop();
    await q.stop(); // idempotent
    expect(q.isRunning).toBe(false);
  });

  it('two NUMA RAM blocks with a known guest-physical mapping migrate bit-for-bit (top-down guest)', async () => {
    // Range 15.875..16.125 MiB spans both nodes: block ram-node1 starts at GPA 16 MiB. Node 1 is
    // padded by 8 KiB to dodge QEMU 10.0.2's TCG dirty-tracking bug for non-first blocks
    // (without the pad this test loses all 32 pages of ram-node1 in the guest range).
    const numaNodesMiB = [16, 16 + TCG_DIRTY_SAFE_PAD_MIB];
    const guest = { startMiB: 15.875, endMiB: 16.125, direction: 'down' as const };
    const src = await startQemu({ name: 'numa', numaNodesMiB, guest });
    const dst = await startQemu({ name: 'numa-dst', numaNodesMiB, guest, incoming: true, paused: true });
    const blocks = await src.ramBlocks();
    // (info ramblock lists blocks by decreasing size, not by address)
    const nodes = blocks.filter((b) => b.name.startsWith('ram-node')).sort((x, y) => x.offset - y.offset);
    expect(nodes.map((b) => [b.name, b.usedLength, b.offset])).toEqual([
      ['ram-node0', 16 * MiB, 0],
      ['ram-node1', 16 * MiB + 8192, 16 * MiB],
    ]);
    expect(src.numaBlocks).toEqual([
      { name: 'ram-node0', gpa: 0, size: 16 * MiB },
      { name: 'ram-node1', gpa: 16 * MiB, size: 16 * MiB + 8192 },
    ]);
    await src.waitSerialPasses(20, 15_000);
    await src.pauseVm();
    const size = 32 * MiB + 8192;
    const mem = await readGuestRam(src, size, 0, 'procmem'); // spans both RAM blocks
    expect(compareGuestRam(mem, await readGuestRam(src, size, 0, 'pmemsave')).equal).toBe(true);
    const res = checkGuestInvariant(mem, guestRangeOf(src));
    expect(res.ok, res.detail).toBe(true);
    // The guest wrote the range (not a zero range that holds the invariant trivially). Its counter is a byte:
    // one pass in 256 writes 0, so one end alone may hold 0; both ends only if the snapshot fell between two passes.
    expect(mem[15.875 * MiB] !== 0 || mem[16.125 * MiB - 4096] !== 0, `counter bytes ${mem[15.875 * MiB]} and ${mem[16.125 * MiB - 4096]}`).toBe(true);
    if (res.stepAt !== null) {
      // A snapshot taken mid-pass has its step in top-down order only.
      expect(checkGuestInvariant(mem, { ...guestRangeOf(src), direction: 'up' }).ok).toBe(false);
    }
    await src.resumeVm();
    await src.waitSerialPasses(src.serialPasses() + 5, 15_000);
    // Several dirty syncs while the guest writes to both blocks: slow link, converge after 3 syncs.
    const r = await migrateBetween(src, dst, {
      parameters: { 'max-bandwidth': 4 * MiB, 'downtime-limit': 1 },
      convergeAfterPasses: 3,
    });
    expect(r.source.ram?.['dirty-sync-count']).toBeGreaterThanOrEqual(4);
    const [a, b] = await Promise.all([readGuestRam(src, size), readGuestRam(dst, size)]);
    const diff = compareGuestRam(a, b);
    expect(diff.equal, `differing pages ${diff.pages.map((p) => p.toString(16)).join(',')}`).toBe(true);
  });

  it('postcopy: migrateBetween starts postcopy after the first pass and the destination keeps the invariant', async () => {
    const guest = { startMiB: 1, endMiB: 2, direction: 'down' as const };
    const src = await startQemu({ name: 'pc-src', memoryMiB: 32, guest });
    const dst = await startQemu({ name: 'pc-dst', memoryMiB: 32, guest, incoming: true });
    await src.waitSerialPasses(10, 15_000);
    const res = await migrateBetween(src, dst, {
      capabilities: { 'postcopy-ram': true, 'postcopy-preempt': true },
      // Precopy cannot converge; the background stream stays slow in postcopy so pages get requested.
      sourceParameters: { 'max-bandwidth': 1 * MiB, 'downtime-limit': 1, 'max-postcopy-bandwidth': 256 * 1024 },
      postcopyAfterPasses: 2,
    });
    expect(res.postcopyStarted).toBe(true);
    expect(res.source.ram?.['dirty-sync-count']).toBeGreaterThanOrEqual(2);
    expect(res.source.ram?.['postcopy-requests']).toBeGreaterThan(0);
    await dst.waitSerialPasses(dst.serialPasses() + 3, 15_000);
    await dst.pauseVm();
    const mem = await readGuestRam(dst, 32 * MiB);
    const inv = checkGuestInvariant(mem, guest);
    expect(inv.ok, inv.detail).toBe(true);
    // Outside the guest's range nothing changed after the switch.
    const srcMem = await readGuestRam(src, 32 * MiB);
    expect(compareGuestRam(srcMem, mem, { skip: [[1 * MiB, 2 * MiB]] }).equal).toBe(true);
  });

  it('precopy over a unix socket: stopped source RAM equals the paused destination, which then runs', async () => {
    const guest = { startMiB: 1, endMiB: 32 };
    const src = await startQemu({ name: 'src', memoryMiB: 96, guest });
    const dst = await startQemu({ name: 'dst', memoryMiB: 96, guest, incoming: true, paused: true });
    await src.waitSerialPasses(20, 15_000); // let it dirty memory first
    // The guest rewrites its whole range every few ms; allow a long enough downtime to converge.
    const res = await migrateBetween(src, dst, { timeoutMs: 60_000, parameters: { 'downtime-limit': 2000 } });
    expect(res.source.status).toBe('completed');
    expect(res.destination?.status).toBe('completed');
    expect(res.source.ram?.normal).toBeGreaterThan(31 * 256);
    expect((await src.queryStatus()).status).toBe('postmigrate');
    expect((await dst.queryStatus()).status).toBe('paused');

    const size = 96 * MiB;
    const [a, b] = await Promise.all([readGuestRam(src, size), readGuestRam(dst, size)]);
    const diff = compareGuestRam(a, b);
    expect(diff, `first differing pages: ${diff.pages.map((p) => p.toString(16)).join(',')}`).toMatchObject({
      equal: true,
      count: 0,
    });
    const inv = checkGuestInvariant(b, guest);
    expect(inv.ok, inv.detail).toBe(true);
    // ... and a changed page is detected
    const b2 = Buffer.from(b);
    b2[40 * MiB + 17] = 0x5a;
    expect(compareGuestRam(a, b2)).toMatchObject({ equal: false, pages: [40 * MiB], count: 1 });

    expect(dst.serialPasses()).toBe(0);
    await dst.resumeVm();
    await dst.waitSerialPasses(5, 15_000);
    await src.stop();
    await dst.stop();
  });

  it('relays a return-path migration over TCP, records both directions, caps the rate and cuts', async () => {
    const guest = { startMiB: 1, endMiB: 3 };
    const src = await startQemu({ name: 'rsrc', memoryMiB: 32, guest });
    const dst = await startQemu({ name: 'rdst', memoryMiB: 32, guest, incoming: true });
    const dstUri = `unix:${dst.dir}/in.sock`;
    const relay = await startRelay({ target: dstUri });
    relays.push(relay);
    await src.waitSerialPasses(10, 15_000);
    const res = await migrateBetween(src, dst, {
      uri: dstUri,
      connectUri: relay.uri,
      capabilities: { 'return-path': true },
    });
    expect(res.destination?.status).toBe('completed');
    await relay.waitAllClosed(10_000);
    expect(relay.connections.map((c) => c.role)).toEqual(['main']);
    const main = relay.connections[0]!;
    const up = main.srcToDst.data();
    expect(up.subarray(0, 8).toString('hex')).toBe('5145564d00000003');
    expect(up.length).toBeGreaterThan(2 * MiB);
    expect(up.length).toBe(main.srcToDst.bytes);
    // Return path: PONG (type 2, len 4, value 1) first, SHUT (type 1, len 4, value 0) last.
    const rp = main.dstToSrc.data();
    expect(rp.subarray(0, 8).toString('hex')).toBe('0002000400000001');
    expect(rp.subarray(rp.length - 8).toString('hex')).toBe('0001000400000000');
    expect(main.srcToDst.chunks[0]!.t).toBeGreaterThanOrEqual(main.acceptedAt);
    // The destination keeps running the guest.
    await dst.waitSerialPasses(3, 15_000);
    await src.stop();
    await dst.stop();

    // A capped relay limits throughput; cut() makes the migration fail. With the return path
    // the source stays active until the destination confirms (otherwise the whole small stream
    // fits in the kernel's socket buffers and the source reports completed early).
    const guest2 = { startMiB: 1, endMiB: 12 }; // > 11 MB to send: ~20 s at the cap
    const src2 = await startQemu({ name: 'csrc', memoryMiB: 32, guest: guest2 });
    const dst2 = await startQemu({ name: 'cdst', memoryMiB: 32, guest: guest2, incoming: true });
    const dst2Uri = `unix:${dst2.dir}/in.sock`;
    const capped = await startRelay({ target: dst2Uri, rateLimit: { bytesPerSecond: 512 * 1024 } });
    relays.push(capped);
    await src2.waitSerialPasses(10, 15_000);
    await dst2.setCapabilities({ 'return-path': true });
    await src2.setCapabilities({ 'return-path': true });
    // exit-on-error=false: a failed incoming migration would otherwise make the destination exit.
    await dst2.migrateIncoming(dst2Uri, { 'exit-on-error': false });
    await src2.migrate(capped.uri);
    await capped.waitConnections(1);
    await new Promise((r) => setTimeout(r, 1000));
    const conn = capped.connections[0]!;
    const elapsed = (capped.now() - conn.connectedAt!) / 1000;
    // Bytes taken from the source are bounded by rate * time + burst + the relay's 256 KiB queue.
    // Uncapped, the whole ~12 MB stream would have passed in well under a second.
    const received = conn.srcToDst.bytes;
    expect(received).toBeGreaterThan(100 * 1024);
    expect(received).toBeLessThan(512 * 1024 * elapsed + 400 * 1024);
    expect(['active', 'device']).toContain((await src2.queryMigrate()).status);
    capped.cut();
    await src2.waitMigration(['failed'], 15_000);
    await dst2.waitMigration(['failed'], 15_000);
    expect(conn.closedAt).toBeDefined();
  });
});
