/**
 * Lifecycle (issue 11 §5), through the public API: AbortSignal on both
 * sessions and on listen, awaitable cancel()/close(), `await using`, a
 * destination nobody connects to (acceptTimeoutMs, signal), a peer that
 * accepts and never reads (replyTimeoutMs), and nothing left keeping the
 * process alive the moment `done` settles.
 */
import { execFile } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { performance } from 'node:perf_hooks';
import { describe, expect, it } from 'vitest';
import { DestinationSession, InMemorySink, InMemorySource, SourceSession } from '../../src/index.js';
import { rejection } from '../support/rejection.js';
import { leakedSince, leftAfter, resourceSnapshot } from '../support/resources.js';

const execFileP = promisify(execFile);
const root = join(import.meta.dirname, '..', '..');
const PAGE = 4096;
const MiB = 1 << 20;

function guest(bytes: number): InMemorySource {
  const buf = Buffer.alloc(bytes);
  for (let off = 0; off < buf.length; off += 2 * PAGE) randomFillSync(buf, off, PAGE);
  return new InMemorySource(new Map([['pc.ram', buf]]));
}

function sameMemory(src: InMemorySource, sink: InMemorySink): boolean {
  for (const [name, buf] of src.memory) if (!sink.blocks.get(name)?.equals(buf)) return false;
  return true;
}

function portOf(uri: string): number {
  return Number(uri.split(':').at(-1));
}

/**
 * Runs one library-to-library migration in a fresh node process (no test
 * runner's own timers around) on the built package, as users import it (a
 * TypeScript loader would add its own pending cache writes), and reports, right after both `done`, the
 * active resources and how long the process then took to exit by itself.
 */
interface ChildOutcome {
  /** Active resources right after both `done`, but Immediates. */
  resources: string[];
  immediates: number;
  /** Active resources one turn of the event loop later. */
  afterTurn: string[];
  exitMs: number;
  equal: boolean;
}

async function migrateInChild(opts: string): Promise<ChildOutcome> {
  const dir = await mkdtemp(join(tmpdir(), 'qmt-lifecycle-'));
  const script = join(dir, 'run.mjs');
  await writeFile(
    script,
    `import { randomFillSync } from 'node:crypto';
import { performance } from 'node:perf_hooks';
import { DestinationSession, InMemorySink, InMemorySource, SourceSession, initPkiDir } from ${JSON.stringify(join(root, 'dist', 'index.js'))};
const buf = Buffer.alloc(8 << 20);
for (let off = 0; off < buf.length; off += 8192) randomFillSync(buf, off, 4096);
const memory = new InMemorySource(new Map([['pc.ram', buf]]));
const { tls, ...opts } = ${opts};
let transport = {};
if (tls) {
  await initPkiDir(${JSON.stringify(join(dir, 'pki'))}, { hostnames: ['127.0.0.1', 'localhost'] });
  transport = { tls: { dir: ${JSON.stringify(join(dir, 'pki'))} } };
}
const sink = new InMemorySink();
const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, postcopy: opts.postcopy !== undefined, transport });
const src = new SourceSession({ to: dst.uri, memory, machineType: 'pc-q35-10.0', devices: [{ idstr: 'timer', instanceId: 0, versionId: 2, data: Buffer.alloc(24, 3) }], transport, ...opts });
src.start();
await Promise.all([src.done, dst.done]);
// Immediates are callbacks already queued for this very turn of the loop (TLS tears its
// sockets down through them): they cannot keep the process alive, so they are listed apart.
const active = () => process.getActiveResourcesInfo().filter((r) => r !== 'PipeWrap' && r !== 'TTYWrap');
const all = active();
const resources = all.filter((r) => r !== 'Immediate');
const immediates = all.length - resources.length;
const doneAt = performance.now();
await new Promise((r) => setImmediate(r));
const afterTurn = active();
const equal = sink.blocks.get('pc.ram').equals(buf);
process.on('exit', () => process.stdout.write(JSON.stringify({ resources, immediates, afterTurn, exitMs: performance.now() - doneAt, equal }) + '\\n'));
`,
  );
  try {
    const { stdout } = await execFileP(process.execPath, [script], { cwd: root, timeout: 50_000 });
    return JSON.parse(stdout.trim().split('\n').at(-1)!) as ChildOutcome;
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

describe('nothing keeps the process alive after done', () => {
  for (const [what, opts] of [
    ['precopy', '{}'],
    ['postcopy with preempt', "{ postcopy: { afterPasses: 1 }, preempt: true }"],
    ['postcopy with preempt over TLS', "{ postcopy: { afterPasses: 1 }, preempt: true, tls: true }"],
  ] as const) {
    it(`${what}: process.getActiveResourcesInfo() is empty right after both done, and the process exits by itself`, async () => {
      const r = await migrateInChild(opts);
      console.log(`[after done] ${what}: resources ${JSON.stringify(r.resources)} (+${r.immediates} immediates), one turn later ${JSON.stringify(r.afterTurn)}, exited ${Math.round(r.exitMs)} ms after done`);
      expect(r.equal, 'memory identical').toBe(true);
      expect(r.resources, 'active resources right after done').toEqual([]);
      expect(r.afterTurn, 'active resources one loop turn later').toEqual([]);
      // The drain timer before the stop used to hold the process for up to 1 s.
      expect(r.exitMs).toBeLessThan(500);
    }, 60_000);
  }
});

describe('AbortSignal', () => {
  it('SourceSession: abort mid-precopy → done rejects cancelled (cause: the reason), both sides let go of everything', async () => {
    const before = resourceSnapshot();
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink: new InMemorySink() });
    const ac = new AbortController();
    const src = new SourceSession({ to: dst.uri, memory: guest(32 * MiB), machineType: 'pc-q35-10.0', devices: [], bandwidthLimit: 8 * MiB, signal: ac.signal });
    src.once('pass', () => undefined);
    src.start();
    await new Promise<void>((r) => src.once('connected', () => r()));
    await new Promise((r) => setTimeout(r, 100));
    const reason = new Error('operator gave up');
    ac.abort(reason);
    const e = await rejection(src.done);
    expect(e).toMatchObject({ code: 'cancelled', kind: 'cancelled' });
    expect(e.cause).toBe(reason);
    await rejection(dst.done);
    expect(await leftAfter(before, 4000)).toEqual([]);
  });

  it('SourceSession: an already aborted signal fails at start, no connection made', async () => {
    let connects = 0;
    const server = net.createServer((s) => {
      connects++;
      s.destroy();
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    const src = new SourceSession({ to: `tcp:127.0.0.1:${(server.address() as net.AddressInfo).port}`, memory: guest(PAGE * 4), machineType: 'pc-q35-10.0', devices: [], signal: AbortSignal.abort() });
    src.start();
    expect(await rejection(src.done)).toMatchObject({ code: 'cancelled', phase: 'setup' });
    await new Promise((r) => setTimeout(r, 50));
    expect(connects).toBe(0);
    server.close();
  });

  it('DestinationSession.listen: an aborted signal rejects; aborting while it waits closes the port', async () => {
    await expect(DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink: new InMemorySink(), signal: AbortSignal.abort() })).rejects.toMatchObject({ code: 'cancelled' });
    const before = resourceSnapshot();
    const ac = new AbortController();
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink: new InMemorySink(), signal: ac.signal });
    ac.abort();
    expect(await rejection(dst.done)).toMatchObject({ code: 'cancelled', phase: 'setup' });
    // The port is free again: listen there.
    const again = await DestinationSession.listen({ listen: dst.uri, sink: new InMemorySink() });
    await again.close();
    expect(await leftAfter(before, 2000)).toEqual([]);
  });
});

describe('a destination nobody connects to', () => {
  it('acceptTimeoutMs: fails with accept-timeout, listener closed', async () => {
    const before = resourceSnapshot();
    const t0 = performance.now();
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink: new InMemorySink(), acceptTimeoutMs: 300 });
    const e = await rejection(dst.done);
    const ms = performance.now() - t0;
    expect(e).toMatchObject({ code: 'accept-timeout', phase: 'setup' });
    expect(ms).toBeGreaterThanOrEqual(290);
    expect(ms).toBeLessThan(10_000);
    await expect(new Promise((resolve, reject) => net.connect(portOf(dst.uri), '127.0.0.1').on('connect', resolve).on('error', reject))).rejects.toMatchObject({ code: 'ECONNREFUSED' });
    expect(await leftAfter(before, 2000)).toEqual([]);
  });

  it('acceptTimeoutMs does not fire once the source is in', async () => {
    const sink = new InMemorySink();
    const memory = guest(16 * MiB);
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, acceptTimeoutMs: 1000 });
    const src = new SourceSession({ to: dst.uri, memory, machineType: 'pc-q35-10.0', devices: [], bandwidthLimit: 4 * MiB });
    src.start();
    const [, result] = await Promise.all([src.done, dst.done]);
    // 8 MiB of data at 4 MiB/s: the migration outlasts the accept timeout by far.
    expect(result.stats['total-time']).toBeGreaterThan(1000);
    expect(result.complete).toBe(true);
    expect(sameMemory(memory, sink)).toBe(true);
  });
});

describe('cancel() and close()', () => {
  it('both sessions have both, awaitable: resolved, nothing of theirs is left', async () => {
    const before = resourceSnapshot();
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink: new InMemorySink() });
    const src = new SourceSession({ to: dst.uri, memory: guest(32 * MiB), machineType: 'pc-q35-10.0', devices: [], bandwidthLimit: 8 * MiB });
    src.start();
    await new Promise<void>((r) => dst.once('channel', () => r()));
    await src.close();
    expect(await rejection(src.done)).toMatchObject({ code: 'cancelled' });
    await dst.cancel();
    await rejection(dst.done);
    expect(leakedSince(before), 'right after both awaited').toEqual([]);
  });

  // One session per scope: with both in one scope the source is disposed first (reverse order), and
  // whether the destination then sees the source's reset or its own close() first is a race of I/O.
  it('await using: a scope that ends cancels the source', async () => {
    const before = resourceSnapshot();
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink: new InMemorySink() });
    let srcDone: Promise<unknown>;
    {
      await using src = new SourceSession({ to: dst.uri, memory: guest(32 * MiB), machineType: 'pc-q35-10.0', devices: [], bandwidthLimit: 8 * MiB }).start();
      srcDone = src.done;
      await new Promise<void>((r) => dst.once('channel', () => r()));
    }
    expect(await rejection(srcDone)).toMatchObject({ code: 'cancelled' });
    await dst.close();
    await rejection(dst.done);
    expect(leakedSince(before), 'right after the scope and the close').toEqual([]);
  });

  it('await using: a scope that ends closes the destination', async () => {
    const before = resourceSnapshot();
    let src: SourceSession | undefined;
    let dstDone: Promise<unknown>;
    {
      await using dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink: new InMemorySink() });
      dstDone = dst.done;
      src = new SourceSession({ to: dst.uri, memory: guest(32 * MiB), machineType: 'pc-q35-10.0', devices: [], bandwidthLimit: 8 * MiB }).start();
      await new Promise<void>((r) => dst.once('channel', () => r()));
    }
    expect(await rejection(dstDone)).toMatchObject({ code: 'cancelled' });
    await src.cancel();
    await rejection(src.done);
    expect(leakedSince(before), 'right after the scope and the cancel').toEqual([]);
  });
});

describe('a peer that accepts and never reads', () => {
  it('plain TCP: the source fails typed after replyTimeoutMs without progress, not a hang', async () => {
    const before = resourceSnapshot();
    const sockets: net.Socket[] = [];
    const server = net.createServer((s) => {
      s.pause(); // never reads
      sockets.push(s);
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    const t0 = performance.now();
    const src = new SourceSession({ to: `tcp:127.0.0.1:${(server.address() as net.AddressInfo).port}`, memory: guest(256 * MiB), machineType: 'pc-q35-10.0', devices: [], replyTimeoutMs: 1500 });
    src.start();
    const e = await rejection(src.done);
    const ms = performance.now() - t0;
    console.log(`[never reads] failed after ${Math.round(ms)} ms: ${e.message}`);
    expect(e).toMatchObject({ code: 'idle-timeout', kind: 'network', phase: 'precopy' });
    expect(e.message).toMatch(/not read from the main channel/);
    expect(ms).toBeGreaterThanOrEqual(1500);
    expect(ms).toBeLessThan(30_000);
    for (const s of sockets) s.destroy();
    server.close();
    expect(await leftAfter(before, 3000)).toEqual([]);
  }, 60_000);
});
