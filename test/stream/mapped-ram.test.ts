import { describe, expect, it } from 'vitest';
import { ByteWriter, StreamDecoder, StreamError, concatPieces } from '../../src/stream/index.js';
import {
  MAPPED_RAM_HEADER_BYTES,
  checkMappedRamRegions,
  decodeMappedRamHeader,
  layoutMappedRamBlock,
  mappedRamBitmapBytes,
  mappedRamHeaderLength,
  mappedRamPagePosition,
  writeMappedRamHeader,
  type MappedRamHeader,
} from '../../src/stream/mapped-ram.js';
import { MappedRamFile, bufferReader } from '../../src/protocol/mapped-ram-file.js';
import { checkGuestInvariant } from '../qemu/harness.js';
import { MAPPED_RAM_FIXTURES, loadMappedRam } from './mapped-ram-fixtures.js';

const PAGE = 4096;

function encode(h: MappedRamHeader): Uint8Array {
  const w = new ByteWriter();
  writeMappedRamHeader(w, h);
  return concatPieces(w.take());
}

/** The StreamError `f` throws (or fails the test). */
async function streamError(f: () => unknown): Promise<StreamError> {
  try {
    await f();
  } catch (e) {
    if (e instanceof StreamError) return e;
    throw e;
  }
  throw new Error('no error');
}

/** A copy of `b` with the be32/be64 at `at` replaced. */
function patched(b: Buffer, at: number, value: bigint, bytes: 4 | 8): Buffer {
  const c = Buffer.from(b);
  if (bytes === 4) c.writeUInt32BE(Number(value), at);
  else c.writeBigUInt64BE(value, at);
  return c;
}

describe('mapped-ram block header', () => {
  it('encodes to 28 bytes and decodes back', () => {
    const h = layoutMappedRamBlock(111, 32 << 20);
    const bytes = encode(h);
    expect(bytes.length).toBe(MAPPED_RAM_HEADER_BYTES);
    expect(mappedRamHeaderLength()).toBe(bytes.length);
    expect(decodeMappedRamHeader(bytes, 111, 'pc.ram', 32 << 20)).toEqual(h);
    // QEMU's layout: bitmap right after the header, pages at the next MiB.
    expect(h).toEqual({ version: 1, pageSize: 4096, bitmapOffset: 139, pagesOffset: 0x100000 });
    expect(mappedRamBitmapBytes(32 << 20)).toBe(1024);
    expect(mappedRamBitmapBytes(4096)).toBe(8); // whole unsigned longs
    expect(mappedRamPagePosition(h, 0x5000)).toBe(0x105000);
  });

  const good = layoutMappedRamBlock(1000, 1 << 20);
  const cases: [string, MappedRamHeader, StreamError['code'], number][] = [
    ['version 2', { ...good, version: 2 }, 'unsupported-version', 1000],
    ['version 0', { ...good, version: 0 }, 'unsupported-version', 1000],
    ['page size 8 KiB', { ...good, pageSize: 8192 }, 'bad-mapped-ram-header', 1004],
    ['pages not page aligned', { ...good, pagesOffset: good.pagesOffset + 512 }, 'bad-mapped-ram-header', 1020],
    ['bitmap inside the header', { ...good, bitmapOffset: 1010 }, 'bad-mapped-ram-header', 1012],
    ['bitmap running into the pages', { ...good, bitmapOffset: good.pagesOffset - 8 }, 'bad-mapped-ram-header', 1012],
    ['pages before the header', { ...good, pagesOffset: 0 }, 'bad-mapped-ram-header', 1012],
  ];
  it.each(cases)('refuses %s with a typed error at the field', (_what, h, code, offset) => {
    const e = (() => {
      try {
        decodeMappedRamHeader(encode(h), 1000, 'pc.ram', 1 << 20);
      } catch (x) {
        return x as StreamError;
      }
      throw new Error('accepted');
    })();
    expect(e).toBeInstanceOf(StreamError);
    expect({ code: e.code, offset: e.offset }).toEqual({ code, offset });
  });

  it('refuses offsets beyond 2^53 as length-too-large', () => {
    const bytes = Buffer.from(encode(good));
    bytes.writeBigUInt64BE(0xffff_ffff_ffff_f000n, 20);
    expect(() => decodeMappedRamHeader(bytes, 1000, 'pc.ram', 1 << 20)).toThrow(expect.objectContaining({ code: 'length-too-large', offset: 1020 }));
  });

  it('says which region runs past the end of a file', () => {
    const b = { idstr: 'pc.ram', length: 1 << 20, header: good, headerOffset: 1000 };
    expect(() => checkMappedRamRegions(b, good.pagesOffset + (1 << 20))).not.toThrow();
    expect(() => checkMappedRamRegions(b, good.pagesOffset + 4096)).toThrow(expect.objectContaining({ code: 'truncated', offset: 1000, message: expect.stringContaining('pages of RAM block "pc.ram"') }));
    expect(() => checkMappedRamRegions(b, 1040)).toThrow(expect.objectContaining({ code: 'truncated', offset: 1000, message: expect.stringContaining('bitmap') }));
  });
});

describe.each(MAPPED_RAM_FIXTURES)('QEMU 10.0.2 mapped-ram file %s', (name) => {
  const c = loadMappedRam(name);
  const stats = c.sidecar.source.keyStats;

  it('decodes: QEMU’s blocks, laid out as layoutMappedRamBlock says, with QEMU’s page counts', async () => {
    const f = await MappedRamFile.read(bufferReader(c.bytes));
    expect(f.configuration?.capabilities).toEqual(['mapped-ram']);
    expect(f.blocks.map((b) => [b.idstr, b.length])).toEqual(c.sidecar.source.ramBlocks.map((b) => [b.name, b.usedLength]));
    for (const s of c.skips) expect(layoutMappedRamBlock(s.headerOffset, s.length)).toEqual(s.header);
    const pages = f.pageCounts();
    expect(pages.normal + pages.zero).toBe(Number(stats['ram.total']) / PAGE);
    if (c.sidecar.guest.vmStoppedBeforeMigrate) {
      // One pass: every page written once or found zero once.
      expect(pages).toEqual({ normal: stats['ram.normal'], zero: stats['ram.duplicate'] });
    } else {
      // Later passes rewrite pages in place (QEMU counts every write): the file holds fewer.
      expect(pages.normal).toBeLessThanOrEqual(Number(stats['ram.normal']));
      expect(pages.normal).toBeGreaterThan(0);
    }
    expect(f.devices.length).toBeGreaterThan(20);
    expect(f.vmdesc).toBeDefined();
  });

  it('reads the guest’s memory by (block, offset): the guest invariant holds', async () => {
    const f = await MappedRamFile.read(bufferReader(c.bytes));
    const ram = f.block('pc.ram')!;
    const mem = Buffer.alloc(ram.length);
    // In runs of 100 pages, as a source would: one positioned read each.
    for (let o = 0; o < ram.length; o += 100 * PAGE) await f.readPages(ram, o, Math.min(100, (ram.length - o) / PAGE), mem, o);
    expect(checkGuestInvariant(mem, c.sidecar.guest)).toMatchObject({ ok: true });
    // Pages whose bit is clear read as zero whatever the file holds there.
    for (let p = 0; p < ram.present.pages; p++) {
      if (ram.present.has(p)) continue;
      expect(mem.subarray(p * PAGE, (p + 1) * PAGE).every((x) => x === 0)).toBe(true);
    }
  });

  it('reads only the stream parts and the bitmaps, not the pages', async () => {
    let read = 0;
    const r = bufferReader(c.bytes);
    await MappedRamFile.read({ size: r.size, read: async (into, at) => ((read += into.length), r.read(into, at)) }, { chunkBytes: 4096 });
    const parts = c.streamParts.reduce((n, p) => n + p.end - p.start, 0);
    expect(read).toBeLessThan(parts + c.skips.length * (4096 + 2048) + 4096);
  });

  it('decodes the same records pushed whole, in small pieces and with jumps', () => {
    const whole = new StreamDecoder({ mappedRam: true });
    const a = [...whole.push(c.bytes), ...whole.end()];
    const jumping = new StreamDecoder({ mappedRam: true });
    const b = [];
    for (const p of c.streamParts) for (let o = p.start; o < p.end; o += 977) b.push(...jumping.push(c.bytes.subarray(o, Math.min(p.end, o + 977))), ...(jumping.jump() === undefined ? [] : []));
    b.push(...jumping.end());
    expect(b.map((r) => r.type)).toEqual(a.map((r) => r.type));
    expect(b.find((r) => r.type === 'ram-blocks')).toEqual(a.find((r) => r.type === 'ram-blocks'));
  });

  it('is refused where mapped-ram was not asked for (a socket never carries it)', () => {
    const d = new StreamDecoder();
    d.push(c.bytes.subarray(0, 4096)); // the header and configuration's first part come back; then the error
    expect(d.error).toMatchObject({ code: 'unsupported', offset: 24 });
  });

  it('typed errors for a bad header in the file, at the field', async () => {
    const at = c.skips[0]!.headerOffset;
    const cases: [Buffer, string, number][] = [
      [patched(c.bytes, at, 2n, 4), 'unsupported-version', at],
      [patched(c.bytes, at + 4, 65536n, 8), 'bad-mapped-ram-header', at + 4],
      [patched(c.bytes, at + 12, 0n, 8), 'bad-mapped-ram-header', at + 12],
      [patched(c.bytes, at + 20, 0x100100n, 8), 'bad-mapped-ram-header', at + 20],
      [patched(c.bytes, at + 20, 1n << 60n, 8), 'length-too-large', at + 20],
      [patched(c.bytes, at + 20, 0x4000_0000n, 8), 'truncated', at],
    ];
    for (const [bytes, code, offset] of cases) {
      const e = await streamError(() => MappedRamFile.read(bufferReader(bytes)));
      expect({ code: e.code, offset: e.offset }).toEqual({ code, offset });
    }
  });

  it('a page record in a mapped-ram stream is refused (QEMU: "Unexpected RAM flags")', async () => {
    // The first record after the block list is the START section's EOS; make it a ZERO page.
    const eos = c.skips.at(-1)!.to;
    const e = await streamError(() => MappedRamFile.read(bufferReader(patched(c.bytes, eos, 0x2n, 8))));
    expect({ code: e.code, offset: e.offset }).toEqual({ code: 'bad-ram-flags', offset: eos });
  });
});
