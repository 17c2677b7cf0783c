/**
 * `--json` of every command, run as a user runs it: one object on stdout
 * with the envelope (`version`, `command`, `ok`, `durationMs`, `error` on
 * failure) and every numeric field named with its unit or a count. receive
 * and send run without QEMU: a library source migrates into `qmt receive`,
 * and `qmt send` restores what it saved into a library destination (memory
 * compared bit for bit both ways).
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { JSON_SCHEMA_VERSION } from '../../src/cli/json.js';
import { DestinationSession } from '../../src/protocol/destination.js';
import { InMemorySink } from '../../src/protocol/memory.js';
import { InMemorySource } from '../../src/protocol/memory-source.js';
import { SourceSession } from '../../src/protocol/source.js';
import { mapLimit, qmt, ROOT, startQmt } from './qmt.js';

const MiB = 1024 * 1024;
const work = mkdtempSync(join(tmpdir(), 'qmt-json-'));
afterAll(() => rmSync(work, { recursive: true, force: true }));
const FIX = join(ROOT, 'test', 'fixtures');

/** Numbers whose key is a count (or an enum-like number), not a quantity with a unit. */
const COUNTS = new Set([
  'version', 'streamVersion', 'count', 'normal', 'zero', 'xbzrle', 'pass', 'passes', 'sectionId', 'instanceId', 'versionId',
  'start', 'part', 'end', 'full', 'recoveries', 'postcopyRequests', 'preemptPages', 'precopyIterations', 'placedTwice',
  'dirtySyncCount', 'issued', 'answered', 'satisfied', 'skipped', 'throttled', 'unanswered', 'main', 'preempt', 'validDays',
  'channels', 'syncs', 'packets', 'flushWaits', 'id', 'multifd', // multifd: channel counts and ids (qmt receive/send)
  'reads', 'waits', // threads: a channel worker's positioned reads of a saved VM, and its waits on them
  'writeWaits', 'bulkWaits', 'mainInFlight', 'mainNoPreempt', 'readPauses', 'priority', 'tos', 'session', 'pauses', 'alreadyForwarded', 'offset', 'shut', 'rate', 'pagesPerSecond', 'value',
]);
const UNIT = /(Bytes|Ms|Us|MiB|MBps|PerSecond|Percent|OfOneCore)$|^bytes(Sent|Received|Read|Written)?$/;

/** Paths of numeric fields named neither with a unit nor as a count. */
function unitless(v: unknown, path = ''): string[] {
  if (Array.isArray(v)) return v.flatMap((x, i) => unitless(x, `${path}[${i}]`));
  if (typeof v !== 'object' || v === null) return [];
  const out: string[] = [];
  for (const [k, x] of Object.entries(v)) {
    if (path.endsWith('deviceFields') || path.includes('.deviceFields.')) continue; // the guest's own field names
    if (typeof x === 'number' && !UNIT.test(k) && !COUNTS.has(k)) out.push(`${path}.${k}`);
    out.push(...unitless(x, `${path}.${k}`));
  }
  return out;
}

function parseOne(stdout: string, command: string): Record<string, unknown> {
  const j = JSON.parse(stdout) as Record<string, unknown>;
  expect(Object.keys(j).slice(0, 4)).toEqual(['version', 'command', 'ok', 'durationMs']);
  expect(j.version).toBe(JSON_SCHEMA_VERSION);
  expect(j.command).toBe(command);
  expect(typeof j.durationMs).toBe('number');
  expect(unitless(j), `${command}: numeric fields without a unit`).toEqual([]);
  return j;
}

describe('--json: one object per command, the same envelope, units in the keys', () => {
  it('inspect, recode, pki init (and a failure of each)', async () => {
    const out = join(work, 'recoded.bin');
    const taken = join(work, 'taken.bin');
    writeFileSync(taken, 'x');
    const runs = await mapLimit(
      [
        ['inspect', join(FIX, 'postcopy-main.bin'), '--json'],
        ['recode', join(FIX, 'xbzrle.bin'), out, '--json'],
        ['pki', 'init', join(work, 'pki'), '--hostname', 'localhost', '--json'],
        ['inspect', join(work, 'nope.bin'), '--json'],
        ['recode', join(FIX, 'xbzrle.bin'), taken, '--json'],
      ],
      3,
      (a) => qmt(a),
    );
    const [inspect, recode, pki, inspectFail, recodeFail] = runs as [(typeof runs)[number], (typeof runs)[number], (typeof runs)[number], (typeof runs)[number], (typeof runs)[number]];

    expect(inspect.code, inspect.stderr).toBe(0);
    const i = parseOne(inspect.stdout, 'inspect');
    expect(i).toMatchObject({ ok: true, streamVersion: 3, machineType: 'pc-q35-10.0', eof: true });
    expect((i.ramBlocks as { lengthBytes: number }[])[0]!.lengthBytes).toBeGreaterThan(0);
    expect((i.commands as { cmd: string; lengthBytes?: number }[]).find((c) => c.cmd === 'packaged')?.lengthBytes).toBeGreaterThan(0);
    expect(i.error).toBeUndefined();

    expect(recode.code, recode.stderr).toBe(0);
    expect(recode.stderr).toBe(''); // --json: the "wrote N bytes" line is in the object
    const r = parseOne(recode.stdout, 'recode');
    expect(r).toMatchObject({ ok: true, out, continue: true });
    expect(r.bytesWritten).toBe(r.bytesRead);

    expect(pki.code, pki.stderr).toBe(0);
    const p = parseOne(pki.stdout, 'pki init');
    expect(p).toMatchObject({ ok: true, hostnames: ['localhost'], validDays: 365 });
    expect(p.files).toHaveLength(5);

    expect(inspectFail.code).toBe(1);
    expect(parseOne(inspectFail.stdout, 'inspect')).toMatchObject({ ok: false, error: { code: 'not-found' } });
    expect(recodeFail.code).toBe(1);
    expect(parseOne(recodeFail.stdout, 'recode')).toMatchObject({ ok: false, error: { code: 'exists' } });
  }, 60_000);

  it('demo', async () => {
    const d = await qmt(['demo', '--size', '16', '--no-tls', '--workload', 'idle', '--postcopy', 'after:1', '--json']);
    expect(d.code, d.stderr).toBe(0);
    const j = parseOne(d.stdout, 'demo');
    expect(j).toMatchObject({ ok: true, guestMiB: 16, policy: 'after:1', tls: false, memoryIdentical: true, postcopy: true, passes: 1 });
    expect(j.migrationMs).toBeGreaterThan(0);
    expect((j.source as { transferredBytes: number }).transferredBytes).toBeGreaterThan(16 * MiB * 0.3);
    expect((j.faults as { p99Us: number }).p99Us).toBeGreaterThanOrEqual(0);
  }, 60_000);

  it('receive from a library source, then send what it saved to a library destination', async () => {
    const vm = join(work, 'vm');
    const recv = startQmt(['receive', '--listen', 'tcp:127.0.0.1:0', '--out', vm, '--json']);
    const listening = (await recv.stderrMatches(/^qmt: listening on (tcp:[\d.]+:\d+)/m))[1]!;
    const size = 4 * MiB;
    const memory = new InMemorySource([{ idstr: 'pc.ram', length: size }]);
    const ram = memory.memory.get('pc.ram')!;
    for (let o = 0; o < size; o += 8192) ram.fill(((o >> 13) % 255) + 1, o, o + 4096); // never a zero page
    const src = new SourceSession({ to: listening, memory, machineType: 'pc-q35-10.0', devices: [{ idstr: 'timer', instanceId: 0, versionId: 2, data: Buffer.alloc(24, 7) }] });
    src.start();
    await src.done;
    const received = await recv.exit;
    expect(received.code, received.stderr).toBe(0);
    const rj = parseOne(received.stdout, 'receive');
    expect(rj).toMatchObject({ ok: true, listen: listening, manifest: { complete: true, blocks: [{ idstr: 'pc.ram', lengthBytes: size }] } });
    expect((rj.stats as { pages: { normal: number } }).pages.normal).toBe(size / 8192);

    const sink = new InMemorySink();
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink });
    const sent = qmt(['send', '--from', vm, '--to', dst.uri, '--json']);
    const result = await dst.done;
    const s = await sent;
    expect(s.code, s.stderr).toBe(0);
    const sj = parseOne(s.stdout, 'send');
    expect(sj).toMatchObject({ ok: true, to: dst.uri, policy: 'never', postcopy: false, machineType: 'pc-q35-10.0' });
    expect((sj.stats as { transferredBytes: number; downtimeMs: number | null }).transferredBytes).toBeGreaterThan(size / 2);
    expect(result.complete).toBe(true);
    expect(sink.blocks.get('pc.ram')?.equals(ram), 'restored RAM equals the source, bit for bit').toBe(true);
  }, 60_000);

  it('tap (stopped by SIGINT before any migration)', async () => {
    const run = startQmt(['tap', '--listen', 'tcp:127.0.0.1:0', '--to', 'tcp:127.0.0.1:1', '--json']);
    await run.stderrMatches(/^qmt: tap listening on /m);
    run.child.kill('SIGINT');
    const r = await run.exit;
    expect(r.code).toBe(130);
    expect(parseOne(r.stdout, 'tap')).toMatchObject({ ok: false, error: { code: 'cancelled' }, to: 'tcp:127.0.0.1:1', sessions: [] });
  }, 60_000);
});
