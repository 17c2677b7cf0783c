import { execFile } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { gunzipSync } from 'node:zlib';
import { promisify } from 'node:util';
import { afterAll, describe, expect, it } from 'vitest';
import { inspectFile, formatInspectReport } from '../../src/cli/inspect.js';
import { recodeFile } from '../../src/cli/recode.js';

const run = promisify(execFile);
const ROOT = join(import.meta.dirname, '..', '..');
const FIX = join(ROOT, 'test', 'fixtures');
const work = mkdtempSync(join(tmpdir(), 'qmt-cli-'));
afterAll(() => rmSync(work, { recursive: true, force: true }));

describe('qmt inspect', () => {
  it('summarises a capture: blocks, pages per pass, commands, devices', async () => {
    const r = await inspectFile(join(FIX, 'running-guest.bin'));
    const facts = JSON.parse(readFileSync(join(FIX, 'running-guest.json'), 'utf8'));
    expect(r.machineType).toBe('pc-q35-10.0');
    expect(r.pages.normal).toBe(facts.source.queryMigrate.ram.normal);
    expect(r.passes.length).toBeGreaterThan(1);
    expect(r.passes.reduce((s, p) => s + p.normal + p.zero, 0)).toBe(r.pages.normal + r.pages.zero);
    expect(r.devices.map((d) => d.idstr)).toContain('cpu');
    expect(r.commands.map((c) => c.cmd)).toEqual(['switchover-start']);
    const text = formatInspectReport(r);
    expect(text).toMatch(/^RAM blocks:$/m);
    expect(text).toMatch(/pc\.ram\s+32 MiB/);
    expect(text).toMatch(/pass 2: \d+ PAGE/);
  });

  it('--devices decodes fields with the VM description', async () => {
    const file = join(work, 'q35.bin');
    writeFileSync(file, gunzipSync(readFileSync(join(FIX, 'vmdesc', 'q35.bin.gz'))));
    const r = await inspectFile(file, { devices: true });
    const cpu = r.deviceFields?.['cpu/0'] as Record<string, unknown>;
    expect(cpu).toBeDefined();
    expect(Object.keys(cpu)).toEqual(expect.arrayContaining(['env.eip', 'env.regs', 'cpu/poll_control_msr']));
    expect(cpu['env.eip']).toBe('65520'); // 0xfff0: a paused VM that never ran sits at the reset vector
    expect(r.deviceFields?.['timer/0']).toBeDefined();
  });

  it('runs as a command: --json, and one line with exit code 1 on bad input', async () => {
    const cli = [process.execPath, ['--import', 'tsx', join(ROOT, 'src', 'cli', 'main.ts')]] as const;
    const { stdout } = await run(cli[0], [...cli[1], 'inspect', '--json', join(FIX, 'postcopy-main.bin')], { cwd: ROOT });
    const j = JSON.parse(stdout);
    expect(j).toMatchObject({ version: 1, command: 'inspect', ok: true, streamVersion: 3 });
    expect(j.commands.map((c: { cmd: string }) => c.cmd)).toContain('packaged');
    expect(j.devices.every((d: { packaged: boolean }) => d.packaged)).toBe(true);
    const bad = join(work, 'bad.bin');
    const bytes = readFileSync(join(FIX, 'paused-guest.bin'));
    // An unknown section id in the first PART: a typed error naming the offset.
    const at = bytes.indexOf(Buffer.from([0x02, 0, 0, 0, 1]));
    bytes.writeUInt32BE(77, at + 1);
    writeFileSync(bad, bytes);
    const err = await run(cli[0], [...cli[1], 'inspect', bad], { cwd: ROOT }).then(
      () => undefined,
      (e: { code: number; stderr: string }) => e,
    );
    expect(err?.code).toBe(1);
    expect(err?.stderr).toBe(`qmt: unknown-section: ${bad} at offset ${at}: section 77 was never started\n`);
  });
});

describe('qmt recode', () => {
  it('re-encodes byte for byte, and without CONTINUE to a longer equivalent stream', async () => {
    const input = join(FIX, 'xbzrle.bin');
    const same = join(work, 'same.bin');
    const long = join(work, 'long.bin');
    await recodeFile(input, same);
    await recodeFile(input, long, { noContinue: true });
    expect(readFileSync(same).equals(readFileSync(input))).toBe(true);
    const a = await inspectFile(input);
    const b = await inspectFile(long);
    expect(b.bytes).toBeGreaterThan(a.bytes);
    expect(b.pages).toEqual(a.pages);
    expect(b.devices).toEqual(a.devices);
  });
});
