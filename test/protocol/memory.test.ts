import { describe, expect, it } from 'vitest';
import { InMemorySink } from '../../src/protocol/memory.js';

describe('InMemorySink', () => {
  it('preallocate: the stream block list of the same name and size uses the blocks as they are; another size or name is refused (QEMU: Length mismatch)', () => {
    const sink = new InMemorySink();
    sink.preallocate([{ idstr: 'pc.ram', length: 1 << 20 }, { idstr: 'pc.bios', length: 8192 }], { prefault: true });
    const ram = sink.blocks.get('pc.ram')!;
    expect(ram.length).toBe(1 << 20);
    expect(ram.every((b) => b === 0)).toBe(true);
    expect(() => sink.setBlocks([{ idstr: 'pc.ram', length: 1 << 20 }, { idstr: 'pc.bios', length: 4096 }])).toThrow(
      expect.objectContaining({ code: 'length-mismatch', message: expect.stringMatching(/pc\.bios.*0x1000.*0x2000.*Length mismatch/) }),
    );
    expect(() => sink.setBlocks([{ idstr: 'pc.rom', length: 4096 }])).toThrow(expect.objectContaining({ code: 'unknown-ram-block' }));
    expect(sink.blocks.get('pc.bios')!.length, 'not replaced').toBe(8192);
    sink.setBlocks([
      { idstr: 'pc.ram', length: 1 << 20 },
      { idstr: 'pc.bios', length: 8192 },
    ]);
    expect(sink.blocks.get('pc.ram'), 'same block kept').toBe(ram);
    const page = Buffer.alloc(4096, 0xab);
    sink.writePage('pc.ram', 8192, page);
    expect(ram.subarray(8192, 8192 + 4096).equals(page)).toBe(true);
    sink.zeroPage('pc.ram', 8192);
    expect(ram.subarray(8192, 8192 + 4096).every((b) => b === 0)).toBe(true);
  });
});

describe('a guest-memory source that recycles its buffers', () => {
  it('SourceSession refuses a main channel that may hold more unsent than the source keeps valid', async () => {
    const { SourceSession } = await import('../../src/protocol/source.js');
    const { InMemorySource } = await import('../../src/protocol/memory-source.js');
    const inner = new InMemorySource([{ idstr: 'pc.ram', length: 1 << 20 }]);
    const memory = Object.assign(Object.create(inner) as typeof inner, { reuseAfterBytes: 32 << 20 });
    const base = { to: 'tcp:127.0.0.1:1', memory, machineType: 'pc-q35-10.0', devices: [] };
    expect(() => new SourceSession(base)).not.toThrow();
    expect(() => new SourceSession({ ...base, transport: { main: { maxQueuedBytes: 64 << 20 } } })).toThrow(/recycles its buffers/);
  });
});
