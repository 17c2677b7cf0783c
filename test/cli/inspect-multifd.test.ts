/**
 * `qmt inspect` of multifd captures, as users run it (test/cli/qmt.ts): the
 * QEMU 10.0.2 fixtures of mfd-codec (a main channel and its multifd channels,
 * plain and TLS plaintext) must count to QEMU's own statistics in their
 * sidecars; bad input (a channel cut inside a packet, a wrong magic) is one
 * typed error line naming the file and the offset, exit code 1.
 */
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { qmt, ROOT } from './qmt.js';

const FIX = join(ROOT, 'test', 'fixtures');
const work = mkdtempSync(join(tmpdir(), 'qmt-inspect-multifd-'));
afterAll(() => rmSync(work, { recursive: true, force: true }));

interface Sidecar {
  files: { main: { name: string; bytes: number }; multifd: Array<{ name: string; bytes: number; channelId: number }> };
  source: { queryMigrate: { ram: { normal: number; duplicate: number; 'multifd-bytes': number } } };
}

interface ManyJson {
  ok: boolean;
  files: Array<{ kind: 'stream' | 'multifd-channel'; file: string; bytes: number; id?: number; eof?: boolean; packets?: number; syncs?: number; pages: { normal: number; zero: number } }>;
  multifd: { channels: number; packets: number; syncs: number; pages: { normal: number; zero: number }; multifdBytes: number } | null;
}

const sidecar = (name: string): Sidecar => JSON.parse(readFileSync(join(FIX, `${name}.json`), 'utf8')) as Sidecar;

/** Offsets of a channel's packets (header start, normal pages), walked by the layout alone: init 64 bytes, header 1344, then normal × 4 KiB. */
function packets(b: Buffer): Array<{ at: number; normal: number }> {
  const out: Array<{ at: number; normal: number }> = [];
  for (let at = 64; at + 1344 <= b.length; ) {
    const normal = b.readUInt32BE(at + 16);
    out.push({ at, normal });
    at += 1344 + normal * 4096;
  }
  return out;
}

describe('qmt inspect: multifd captures of QEMU 10.0.2', () => {
  it.each(['multifd-2', 'multifd-4', 'multifd-tls'])('%s: main and every channel; the channels add up to QEMU\'s normal, duplicate and multifd-bytes', async (name) => {
    const sc = sidecar(name);
    const ram = sc.source.queryMigrate.ram;
    const files = [join(FIX, sc.files.main.name), ...sc.files.multifd.map((f) => join(FIX, f.name))];
    const r = await qmt(['inspect', '--json', ...files]);
    expect(r.code, r.stderr).toBe(0);
    const j = JSON.parse(r.stdout) as ManyJson;
    expect(j.ok).toBe(true);
    expect(j.files.map((f) => f.kind)).toEqual(['stream', ...sc.files.multifd.map(() => 'multifd-channel')]);
    expect(j.files[0]).toMatchObject({ eof: true, bytes: sc.files.main.bytes, pages: { normal: 0, zero: 0 } });
    for (const [i, f] of sc.files.multifd.entries()) {
      expect(j.files[i + 1]).toMatchObject({ id: f.channelId, bytes: f.bytes });
      expect(j.files[i + 1]!.syncs).toBeGreaterThanOrEqual(2);
    }
    expect(j.multifd).toMatchObject({ channels: sc.files.multifd.length, pages: { normal: ram.normal, zero: ram.duplicate }, multifdBytes: ram['multifd-bytes'] });

    // The text form: a summary per channel and the total.
    const text = await qmt(['inspect', ...files]);
    expect(text.code, text.stderr).toBe(0);
    for (const f of sc.files.multifd) expect(text.stdout).toContain(`${join(FIX, f.name)}: multifd channel ${f.channelId}, ${f.bytes} bytes`);
    expect(text.stdout).toContain(`multifd total: ${sc.files.multifd.length} channels`);
    expect(text.stdout).toContain(`pages ${ram.normal} normal, ${ram.duplicate} zero, ${ram['multifd-bytes']} bytes`);
  });

  it('one channel file alone: recognised by its magic; its JSON is its own report', async () => {
    const sc = sidecar('multifd-2');
    const f = sc.files.multifd[1]!;
    const r = await qmt(['inspect', '--json', join(FIX, f.name)]);
    expect(r.code, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)).toMatchObject({ command: 'inspect', ok: true, kind: 'multifd-channel', id: f.channelId, bytes: f.bytes, multifdBytes: f.bytes });
  });
});

describe('qmt inspect: bad multifd input', () => {
  const ch = readFileSync(join(FIX, 'multifd-2-ch1.bin'));
  const pk = packets(ch);
  const withPages = pk.find((p) => p.normal > 0)!;

  it('a channel cut inside the page data of a packet: truncated, at the offset of the missing data, naming the file', async () => {
    const file = join(work, 'cut.bin');
    writeFileSync(file, ch.subarray(0, withPages.at + 1344 + 100));
    const r = await qmt(['inspect', file]);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(new RegExp(`^qmt: truncated: ${file.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&')} at offset ${withPages.at + 1344}: multifd channel ended inside the page data`, 'm'));
    expect(r.stdout).toBe('');
  });

  it('a channel cut inside a packet header: truncated, at the header', async () => {
    const file = join(work, 'cut-header.bin');
    writeFileSync(file, ch.subarray(0, pk[1]!.at + 500));
    const r = await qmt(['inspect', '--json', file]);
    expect(r.code).toBe(1);
    expect(JSON.parse(r.stdout)).toMatchObject({ ok: false, error: { code: 'truncated', message: `${file} at offset ${pk[1]!.at}: multifd channel ended inside a packet header (500 of 1344 bytes)` } });
  });

  it('a wrong packet magic: bad-magic at that packet; a main stream read as a channel (--multifd): bad-magic at 0', async () => {
    const file = join(work, 'magic.bin');
    const b = Buffer.from(ch);
    b.writeUInt32BE(0xdeadbeef, pk[2]!.at);
    writeFileSync(file, b);
    const r = await qmt(['inspect', file]);
    expect(r.code).toBe(1);
    expect(r.stderr).toBe(`qmt: bad-magic: ${file} at offset ${pk[2]!.at}: multifd packet magic 0xdeadbeef (expected 0x11223344)\n`);
    const main = join(FIX, 'multifd-2-main.bin');
    const m = await qmt(['inspect', '--multifd', main]);
    expect(m.code).toBe(1);
    expect(m.stderr).toBe(`qmt: bad-magic: ${main} at offset 0: multifd init message magic 0x5145564d (expected 0x11223344)\n`);
  });

  it('several files: the failing one is named; a channel whose pages lie outside the main stream\'s blocks is refused', async () => {
    const file = join(work, 'outside.bin');
    const b = Buffer.from(ch);
    // The first page offset of a packet with pages, far past pc.ram (32 MiB).
    b.writeUInt32BE(0x10, withPages.at + 320);
    writeFileSync(file, b);
    const alone = await qmt(['inspect', file]);
    expect(alone.code, alone.stderr).toBe(0); // no block list: offsets cannot be bounded
    const r = await qmt(['inspect', join(FIX, 'multifd-2-main.bin'), join(FIX, 'multifd-2-ch0.bin'), file]);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(new RegExp(`^qmt: page-out-of-range: .*outside\\.bin at offset ${withPages.at + 320}: `, 'm'));
  });
});
