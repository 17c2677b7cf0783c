import { mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { MappedRamFile, bufferReader } from '../../src/protocol/mapped-ram-file.js';
import { MappedRamSink } from '../../src/protocol/mapped-ram-sink.js';
import type { ReceivedDeviceSection } from '../../src/protocol/destination/types.js';
import { StreamError } from '../../src/stream/index.js';
import { loadMappedRam } from '../stream/mapped-ram-fixtures.js';

const PAGE = 4096;
const work = mkdtempSync(join(tmpdir(), 'qmt-mr-sink-'));
afterAll(() => rmSync(work, { recursive: true, force: true }));

/** QEMU's paused-guest save, read back: what a destination would have received. */
async function qemuSave() {
  const f = await MappedRamFile.read(bufferReader(loadMappedRam('mapped-ram-paused').bytes));
  const ram = new Map<string, Buffer>();
  for (const b of f.blocks) {
    const mem = Buffer.alloc(b.length);
    await f.readPages(b, 0, b.length / PAGE, mem);
    ram.set(b.idstr, mem);
  }
  const devices: ReceivedDeviceSection[] = f.devices.map((d) => ({ sectionId: d.sectionId, idstr: d.idstr, instanceId: d.instanceId, versionId: d.versionId, kind: d.kind, packaged: false, data: Buffer.from(d.data) }));
  return { f, ram, devices };
}

/** Feeds `ram` into a sink as a destination would: runs of non-zero pages as writes, runs of zero pages as ZERO records. */
function feed(sink: MappedRamSink, ram: Map<string, Buffer>): void {
  for (const [idstr, mem] of ram) {
    const zero = (p: number): boolean => mem.subarray(p * PAGE, (p + 1) * PAGE).every((x) => x === 0);
    const pages = mem.length / PAGE;
    for (let p = 0; p < pages; ) {
      let n = 1;
      while (p + n < pages && n < 32 && zero(p + n) === zero(p)) n++;
      if (zero(p)) sink.zeroPages(idstr, p * PAGE, n);
      else sink.writePages(idstr, p * PAGE, n, mem, p * PAGE, PAGE);
      p += n;
    }
  }
}

describe('MappedRamSink', () => {
  it('writes a mapped-ram file that reads back with the same blocks, pages and devices', async () => {
    const { f, ram, devices } = await qemuSave();
    const path = join(work, 'vm.mapped-ram');
    const sink = new MappedRamSink(path, { maxInFlightBytes: 1 << 20, writeBytes: 64 * 1024 });
    sink.setBlocks(f.blocks.map((b) => ({ idstr: b.idstr, length: b.length })));
    feed(sink, ram);
    // A page written and then found zero (a later pass) must read as zero: its bit is cleared.
    sink.writePage('pc.rom', 0, Buffer.alloc(PAGE, 7));
    sink.zeroPage('pc.rom', 0);
    // XBZRLE's base page: what the file will hold, pending or written (a page of the first data run, and one after flush).
    const [idstr, mem] = [...ram].find(([, m]) => m.some((x) => x !== 0))!;
    const p = Array.from({ length: mem.length / PAGE }, (_, i) => i).find((i) => mem.subarray(i * PAGE, (i + 1) * PAGE).some((x) => x !== 0))!;
    expect(Buffer.from(sink.readPage(idstr, p * PAGE)).equals(mem.subarray(p * PAGE, (p + 1) * PAGE))).toBe(true);
    await sink.flush();
    expect(Buffer.from(sink.readPage(idstr, p * PAGE)).equals(mem.subarray(p * PAGE, (p + 1) * PAGE))).toBe(true);
    expect(Buffer.from(sink.readPage('pc.rom', 0)).every((x) => x === 0)).toBe(true);
    expect(sink.stats().fsyncs).toBeGreaterThan(0);
    const saved = await sink.finish({ complete: true, configuration: f.configuration, machineType: f.configuration?.machineType, devices, vmdesc: f.vmdesc });
    await sink.close();
    expect(saved.complete).toBe(true);
    expect(saved.bytes).toBe(statSync(path).size);
    expect(sink.stats().peakInFlightBytes).toBeLessThanOrEqual(1 << 20);

    const back = await MappedRamFile.open(path);
    try {
      expect(back.configuration).toMatchObject({ machineType: 'pc-q35-10.0', capabilities: ['mapped-ram'] });
      expect(back.blocks.map((b) => [b.idstr, b.length])).toEqual(f.blocks.map((b) => [b.idstr, b.length]));
      // Each block's pages are 1 MiB aligned, as QEMU's.
      for (const b of back.blocks) expect(b.header.pagesOffset % (1 << 20)).toBe(0);
      // Pages present: those QEMU had written (ours are non-zero ones, exactly QEMU's set here: one pass).
      expect(back.pageCounts()).toEqual(f.pageCounts());
      for (const b of back.blocks) {
        const mem = Buffer.alloc(b.length);
        await back.readPages(b, 0, b.length / PAGE, mem);
        expect(mem.equals(ram.get(b.idstr)!), `block ${b.idstr}`).toBe(true);
      }
      expect(back.devices.map((d) => [d.idstr, d.instanceId, Buffer.from(d.data).toString('hex')])).toEqual(devices.map((d) => [d.idstr, d.instanceId, d.data.toString('hex')]));
      expect(back.vmdesc && Buffer.from(back.vmdesc).equals(Buffer.from(f.vmdesc!))).toBe(true);
    } finally {
      await back.close();
    }
  });

  it('a failed migration leaves a file marked unfinished: "QMTP", read as incomplete', async () => {
    const { f, ram, devices } = await qemuSave();
    const path = join(work, 'failed.mapped-ram');
    const sink = new MappedRamSink(path);
    sink.setBlocks(f.blocks.map((b) => ({ idstr: b.idstr, length: b.length })));
    feed(sink, ram);
    const saved = await sink.finish({ complete: false, configuration: f.configuration, machineType: 'pc-q35-10.0', devices: devices.slice(0, 3), vmdesc: undefined });
    await sink.close();
    expect(saved.complete).toBe(false);
    const bytes = readFileSync(path);
    expect(bytes.subarray(0, 4).toString('latin1')).toBe('QMTP');
    await expect(MappedRamFile.open(path)).rejects.toSatisfy((e: unknown) => e instanceof StreamError && e.code === 'incomplete' && e.offset === 0);
  });

  it('a receive that never finishes (a crash) leaves the same mark, from the block list on and before it', async () => {
    const path = join(work, 'crashed.mapped-ram');
    const sink = new MappedRamSink(path);
    expect(readFileSync(path).subarray(0, 4).toString('latin1')).toBe('QMTP');
    sink.setBlocks([{ idstr: 'pc.ram', length: 1 << 20 }]);
    sink.writePages('pc.ram', 0, 1, Buffer.alloc(PAGE, 1), 0, PAGE);
    await sink.flush();
    await sink.close(); // no finish(): as if the process died
    expect(readFileSync(path).subarray(0, 4).toString('latin1')).toBe('QMTP');
    await expect(MappedRamFile.open(path)).rejects.toMatchObject({ code: 'incomplete' });
  });

  it('refuses an x-ignore-shared block list (QEMU 10.0 cannot load such a mapped-ram file)', () => {
    const sink = new MappedRamSink(join(work, 'shared.mapped-ram'));
    expect(() => sink.setBlocks([{ idstr: 'pc.ram', length: 1 << 20, gpa: 0n }])).toThrow(expect.objectContaining({ code: 'unsupported' }));
    return sink.close();
  });
});
