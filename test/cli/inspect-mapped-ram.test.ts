import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { MAPPED_RAM_FIXTURES, loadMappedRam } from '../stream/mapped-ram-fixtures.js';
import { qmt } from './qmt.js';

const work = mkdtempSync(join(tmpdir(), 'qmt-inspect-mr-'));
afterAll(() => rmSync(work, { recursive: true, force: true }));

describe.each(MAPPED_RAM_FIXTURES)('qmt inspect of QEMU’s mapped-ram file %s', (name) => {
  const c = loadMappedRam(name);
  const file = join(work, `${name}.bin`);
  writeFileSync(file, c.bytes);
  const stats = c.sidecar.source.keyStats;

  it('--json: blocks with their layout, pages present as QEMU counted them, devices', async () => {
    const r = await qmt(['inspect', file, '--json']);
    expect(r.code, r.stderr).toBe(0);
    const j = JSON.parse(r.stdout);
    expect(j).toMatchObject({ ok: true, kind: 'stream', capabilities: ['mapped-ram'], bytes: c.bytes.length, eof: true });
    expect(j.ramBlocks.map((b: { idstr: string }) => b.idstr)).toEqual(c.sidecar.source.ramBlocks.map((b) => b.name));
    expect(j.mappedRam.map((b: { pagesOffset: number }) => b.pagesOffset)).toEqual(c.skips.map((s) => s.header.pagesOffset));
    expect(j.pages.normal + j.pages.zero).toBe(Number(stats['ram.total']) / 4096);
    if (c.sidecar.guest.vmStoppedBeforeMigrate) expect(j.pages).toEqual({ normal: stats['ram.normal'], zero: stats['ram.duplicate'], xbzrle: 0 });
    else expect(j.pages.normal).toBeLessThanOrEqual(Number(stats['ram.normal']));
    expect(j.devices.length).toBeGreaterThan(20);
  });

  it('a cut file: a typed error naming the file and the block whose pages run past its end', async () => {
    const cut = join(work, `${name}-cut.bin`);
    writeFileSync(cut, c.bytes.subarray(0, 2 << 20));
    const r = await qmt(['inspect', cut]);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(new RegExp(`^qmt: truncated: .*${name}-cut\\.bin at offset ${c.skips[0]!.headerOffset}: the pages of RAM block "pc\\.ram" .* run past the file's end`, 'm'));
  });
});
