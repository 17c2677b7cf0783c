/**
 * `qmt tap`: runTapCommand in process (text and JSON reports of a replayed
 * postcopy capture) and the registered command in a child process (usage
 * errors, SIGINT before any migration, a replayed multifd capture with
 * --capture read back by `qmt inspect`).
 */
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { mkdtemp, readFile, readdir, rm } from 'node:fs/promises';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { PassThrough } from 'node:stream';
import { describe, expect, it } from 'vitest';
import { formatTapReport, runTapCommand, type TapCommandReport } from '../../src/cli/tap.js';
import type { Tap } from '../../src/protocol/tap/index.js';
import { qmt, startQmt } from '../cli/qmt.js';

const ROOT = join(import.meta.dirname, '..', '..');
const FIXTURES = join(ROOT, 'test', 'fixtures');

interface Sidecar {
  relay: { connections: Array<{ srcToDstChunks: Array<[number, number, number]>; dstToSrcChunks: Array<[number, number, number]> }> };
  source: { queryMigrate: { ram: { normal: number; 'postcopy-requests': number } } };
}

function collect(s: net.Socket): { bytes: () => number; data: () => Buffer } {
  const chunks: Buffer[] = [];
  let n = 0;
  s.on('data', (b: Buffer) => {
    chunks.push(b);
    n += b.length;
  });
  s.on('error', () => undefined);
  return { bytes: () => n, data: () => Buffer.concat(chunks) };
}

async function until(cond: () => boolean, what: string, timeoutMs = 5000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out: ${what}`);
    await new Promise((r) => setTimeout(r, 1));
  }
}

/** Replays postcopy-main.bin / postcopy-rp.bin through `tap` in recorded order (each chunk awaited at the far end). */
async function replayPostcopy(tap: Tap | string, dstServer: net.Server): Promise<{ atDst: Buffer }> {
  const [main, rp] = await Promise.all([readFile(join(FIXTURES, 'postcopy-main.bin')), readFile(join(FIXTURES, 'postcopy-rp.bin'))]);
  const sc = JSON.parse(await readFile(join(FIXTURES, 'postcopy.json'), 'utf8')) as Sidecar;
  const conn = sc.relay.connections[0]!;
  const accepted = once(dstServer, 'connection') as Promise<[net.Socket]>;
  const m = /^tcp:(.*):(\d+)$/.exec(typeof tap === 'string' ? tap : tap.uri)!;
  const src = net.connect({ host: m[1]!, port: Number(m[2]) });
  const atSrc = collect(src);
  const steps = [
    ...conn.srcToDstChunks.map(([t, off, len]) => ({ t, up: true, off, len })),
    ...conn.dstToSrcChunks.map(([t, off, len]) => ({ t, up: false, off, len })),
  ].sort((a, b) => a.t - b.t);
  // The tap connects to the destination once the source's first bytes (the magic) have qualified it.
  const first = steps.shift()!;
  src.write(main.subarray(first.off, first.off + first.len));
  const [dst] = await accepted;
  const atDst = collect(dst);
  await until(() => atDst.bytes() >= first.off + first.len, 'first chunk');
  for (const s of steps) {
    if (s.up) src.write(main.subarray(s.off, s.off + s.len));
    else dst.write(rp.subarray(s.off, s.off + s.len));
    await until(() => (s.up ? atDst.bytes() : atSrc.bytes()) >= s.off + s.len, 'replayed chunk');
  }
  src.end();
  dst.end();
  return { atDst: atDst.data() };
}

describe('qmt tap (runTapCommand)', () => {
  it('prints the text report of a completed postcopy migration and stops after it', async () => {
    const dstServer = net.createServer();
    await new Promise<void>((r) => dstServer.listen(0, '127.0.0.1', r));
    const stdout = new PassThrough();
    const stderr = new PassThrough();
    let out = '';
    let err = '';
    stdout.on('data', (b: Buffer) => (out += b.toString()));
    stderr.on('data', (b: Buffer) => (err += b.toString()));
    let replay: Promise<unknown> | undefined;
    const r = await runTapCommand(
      { listen: 'tcp:127.0.0.1:0', to: `tcp:127.0.0.1:${(dstServer.address() as net.AddressInfo).port}` },
      { stdout, stderr, onListening: (tap) => (replay = replayPostcopy(tap, dstServer)) },
    );
    await replay;
    dstServer.close();
    expect(r.ok).toBe(true);
    expect(r.sessions).toHaveLength(1);
    expect(err).toMatch(/^qmt: tap listening on tcp:127\.0\.0\.1:\d+, relaying to tcp:127\.0\.0\.1:\d+$/m);
    expect(err).toMatch(/session 1: main channel forwarding/);
    expect(err).toMatch(/session 1: postcopy-run at /);
    expect(out).toMatch(/^session 1 \(migration, pc-q35-10\.0\): complete after .*, postcopy$/m);
    expect(out).toMatch(/^ {2}requests {3}3: answered on preempt 0, on main 3; crossed in flight 0; unanswered 0$/m);
    expect(out).toMatch(/^ {4}request → page {2}p50 /m);
    expect(out).toMatch(/^ {2}switchover SWITCHOVER_START at .*, PACKAGED .*, RUN .*, EOF /m);
    expect(out).toMatch(/^ {2}tap {8}forward delay p50 /m);
    expect(out.trim().split('\n')).toEqual(formatTapReport(r.sessions[0]!));
  });

  it('--json prints one report object', async () => {
    const dstServer = net.createServer();
    await new Promise<void>((r) => dstServer.listen(0, '127.0.0.1', r));
    const stdout = new PassThrough();
    let out = '';
    stdout.on('data', (b: Buffer) => (out += b.toString()));
    let replay: Promise<unknown> | undefined;
    await runTapCommand(
      { listen: 'tcp:127.0.0.1:0', to: `tcp:127.0.0.1:${(dstServer.address() as net.AddressInfo).port}`, json: true },
      { stdout, stderr: new PassThrough(), onListening: (tap) => (replay = replayPostcopy(tap, dstServer)) },
    );
    await replay;
    dstServer.close();
    const j = JSON.parse(out) as TapCommandReport;
    const sc = JSON.parse(await readFile(join(FIXTURES, 'postcopy.json'), 'utf8')) as Sidecar;
    expect(j.ok).toBe(true);
    expect(j.sessions).toHaveLength(1);
    expect(j.sessions[0]!.main.pages.normal).toBe(sc.source.queryMigrate.ram.normal);
    expect(j.sessions[0]!.requests.count).toBe(sc.source.queryMigrate.ram['postcopy-requests']);
    expect(j.sessions[0]!.requests.latency.all.count).toBe(3);
  });

  it('a listen address in use is reported, not thrown', async () => {
    const busy = net.createServer();
    await new Promise<void>((r) => busy.listen(0, '127.0.0.1', r));
    const port = (busy.address() as net.AddressInfo).port;
    const r = await runTapCommand({ listen: `tcp:127.0.0.1:${port}`, to: 'tcp:127.0.0.1:1' }, { stdout: new PassThrough(), stderr: new PassThrough() });
    busy.close();
    expect(r.ok).toBe(false);
    expect(r.listen).toBeNull();
    expect(r.error?.code).toBeDefined();
  });
});

describe('qmt tap (command line)', () => {
  it('strangers before the real source are dropped and reported; the source gets the main role and the migration completes', async () => {
    const dstServer = net.createServer();
    const arrived: net.Socket[] = [];
    dstServer.on('connection', (s) => arrived.push(s));
    await new Promise<void>((r) => dstServer.listen(0, '127.0.0.1', r));
    const run = startQmt(['tap', '--listen', 'tcp:127.0.0.1:0', '--to', `tcp:127.0.0.1:${(dstServer.address() as net.AddressInfo).port}`, '--json']);
    try {
      const [, uri] = await run.stderrMatches(/^qmt: tap listening on (tcp:\S+), relaying/m);
      const port = Number(/:(\d+)$/.exec(uri!)![1]);
      // An HTTP health probe: dropped at its first bytes.
      const http = net.connect(port, '127.0.0.1');
      http.on('error', () => undefined);
      http.write('GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n');
      await run.stderrMatches(/^qmt: stranger from 127\.0\.0\.1:\d+ dropped \(not-migration\): not-a-migration-channel: first bytes 47 45 54 20/m);
      // A client that connects first and says nothing: it must not become the main channel (and, as it
      // could still be one of the migration's multifd channels, it waits to qualify by its own bytes).
      const silent = net.connect(port, '127.0.0.1');
      silent.on('error', () => undefined);
      await once(silent, 'connect');
      const { atDst } = await replayPostcopy(uri!, dstServer);
      const r = await run.exit;
      silent.destroy();
      http.destroy();
      expect(r.code).toBe(0);
      const j = JSON.parse(r.stdout) as TapCommandReport;
      expect(j.ok).toBe(true);
      expect(j.sessions).toHaveLength(1);
      expect(j.sessions[0]!.complete).toBe(true);
      // Only the real source's connection reached the destination, with the stream unchanged.
      expect(arrived).toHaveLength(1);
      expect(atDst.equals(await readFile(join(FIXTURES, 'postcopy-main.bin')))).toBe(true);
      expect(j.strangers.count).toBe(1);
      expect(j.strangers.latest.map((e) => `${e.reason}/${e.code}`)).toEqual(['not-migration/not-a-migration-channel']);
    } finally {
      run.child.kill('SIGKILL');
      for (const s of arrived) s.destroy();
      dstServer.close();
    }
  });

  const run = (args: string[]) => spawn(process.execPath, ['--import', 'tsx', join(ROOT, 'src', 'cli', 'main.ts'), ...args], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });

  it('refuses a missing --to', async () => {
    const p = run(['tap', '--listen', 'tcp:127.0.0.1:0']);
    let err = '';
    p.stderr.on('data', (b: Buffer) => (err += b.toString()));
    const [code] = (await once(p, 'exit')) as [number];
    expect(code).toBe(2);
    expect(err).toBe("qmt: usage: required option '--to <uri>' not specified\n");
  });

  it('SIGINT before any migration: a JSON report without sessions, exit code 130', async () => {
    const p = run(['tap', '--listen', 'tcp:127.0.0.1:0', '--to', 'tcp:127.0.0.1:1', '--json']);
    let out = '';
    let err = '';
    p.stdout.on('data', (b: Buffer) => (out += b.toString()));
    p.stderr.on('data', (b: Buffer) => (err += b.toString()));
    await until(() => /tap listening on/.test(err), 'listening line', 20_000);
    p.kill('SIGINT');
    const [code] = (await once(p, 'exit')) as [number];
    expect(code).toBe(130);
    const j = JSON.parse(out) as TapCommandReport;
    expect(j).toMatchObject({ version: 1, command: 'tap', ok: false, error: { code: 'cancelled', message: 'interrupted by SIGINT' }, to: 'tcp:127.0.0.1:1', sessions: [] });
    expect(err.trimEnd().split('\n').pop()).toBe('qmt: cancelled: interrupted by SIGINT');
    expect(j.listen).toMatch(/^tcp:127\.0\.0\.1:\d+$/);
  });
});

describe('qmt tap --capture (a multifd capture replayed)', () => {
  it('prints the channels, writes one file per channel identical to what went through, and qmt inspect of them counts QEMU\'s pages', async () => {
    const sc = JSON.parse(await readFile(join(FIXTURES, 'multifd-2.json'), 'utf8')) as {
      files: { main: { name: string }; multifd: Array<{ name: string; channelId: number }> };
      source: { queryMigrate: { ram: { normal: number; duplicate: number; 'multifd-bytes': number } } };
    };
    const main = await readFile(join(FIXTURES, sc.files.main.name));
    const chans = await Promise.all(sc.files.multifd.map((f) => readFile(join(FIXTURES, f.name))));
    const dir = await mkdtemp(join(tmpdir(), 'qmt-tap-capture-'));
    const dstServer = net.createServer({ allowHalfOpen: true }, (s) => {
      s.on('error', () => undefined);
      s.resume();
      s.on('end', () => s.end());
    });
    await new Promise<void>((r) => dstServer.listen(0, '127.0.0.1', r));
    const run = startQmt(['tap', '--listen', 'tcp:127.0.0.1:0', '--to', `tcp:127.0.0.1:${(dstServer.address() as net.AddressInfo).port}`, '--capture', dir]);
    try {
      const [, uri] = await run.stderrMatches(/^qmt: tap listening on (tcp:\S+), relaying/m);
      const port = Number(/:(\d+)$/.exec(uri!)![1]);
      const open = async (): Promise<net.Socket> => {
        const s = net.connect({ port, host: '127.0.0.1', allowHalfOpen: true });
        s.on('error', () => undefined);
        s.resume();
        await once(s, 'connect');
        return s;
      };
      // The channels first, with their init message, as QEMU's source; then main; then the rest.
      const socks = [];
      for (const c of chans) {
        const s = await open();
        s.write(c.subarray(0, 64));
        socks.push(s);
      }
      const m = await open();
      m.write(main);
      await run.stderrMatches(/multifd channel forwarding[\s\S]*multifd channel forwarding/);
      for (const [i, s] of socks.entries()) s.end(chans[i]!.subarray(64));
      m.end();
      const r = await run.exit;
      expect(r.code, r.stderr).toBe(0);
      const ram = sc.source.queryMigrate.ram;
      expect(r.stdout).toContain(`  multifd    2 channels, `);
      expect(r.stdout).toMatch(new RegExp(`pages ${ram.normal} normal, ${ram.duplicate} zero\\n`));
      for (const f of sc.files.multifd) expect(r.stdout).toMatch(new RegExp(`^    channel ${f.channelId} \\(connection \\d\\) `, 'm'));
      expect(r.stdout).toContain(`  capture    3 files in ${dir}`);
      const files = (await readdir(dir)).sort();
      expect(files).toEqual(['session-1-main.bin', 'session-1-multifd-0.bin', 'session-1-multifd-1.bin']);
      expect((await readFile(join(dir, 'session-1-main.bin'))).equals(main)).toBe(true);
      const captured = await Promise.all(files.slice(1).map((f) => readFile(join(dir, f))));
      expect(captured.map((b) => chans.findIndex((c) => c.equals(b))).sort()).toEqual([0, 1]);
      const j = await qmt(['inspect', '--json', ...files.map((f) => join(dir, f))]);
      expect(j.code, j.stderr).toBe(0);
      expect(JSON.parse(j.stdout).multifd).toMatchObject({ channels: 2, pages: { normal: ram.normal, zero: ram.duplicate }, multifdBytes: ram['multifd-bytes'] });
    } finally {
      run.child.kill('SIGKILL');
      dstServer.close();
      await rm(dir, { recursive: true, force: true });
    }
  });
});
