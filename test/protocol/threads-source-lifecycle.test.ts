/**
 * A threaded SourceSession's threads end with it: after `done`, after a
 * failure (the destination cuts the main channel in precopy), every channel
 * thread has exited by itself (nothing left alive in it: never terminated),
 * nothing is left in this thread either, and a process that ran such
 * migrations exits on its own.
 */
import { spawn } from 'node:child_process';
import { writeFileSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { describe, expect, it } from 'vitest';
import { DestinationSession } from '../../src/protocol/destination.js';
import { MigrationError } from '../../src/protocol/errors.js';
import { InMemorySink } from '../../src/protocol/memory.js';
import { InMemorySource } from '../../src/protocol/memory-source.js';
import { SourceSession, type SourceStats } from '../../src/protocol/source.js';
import { MigrationListener } from '../../src/transport/connection.js';
import { socketTransferSupported } from '../../src/transport/worker/support.js';
import { leftAfter, resourceSnapshot } from '../support/resources.js';
import { FaultRelay } from '../faults/relay.js';

const MiB = 1 << 20;
const ROOT = join(import.meta.dirname, '..', '..');

function guest(): InMemorySource {
  const m = new InMemorySource([{ idstr: 'pc.ram', length: 16 * MiB }], { shared: true });
  m.memory.get('pc.ram')!.fill(0x5a, 0, 8 * MiB);
  return m;
}

async function threadsEnded(stats: () => SourceStats, count: number): Promise<SourceStats['threads']> {
  const deadline = Date.now() + 5000;
  for (;;) {
    const t = stats().threads!;
    if ((t.channels.length === count && t.channels.every((c) => c.ended)) || Date.now() > deadline) return t;
    await new Promise((r) => setTimeout(r, 20));
  }
}

describe.skipIf(!socketTransferSupported())('threaded SourceSession: nothing outlives it (Node 26.6+)', () => {
  it('after done (postcopy with preempt): both threads exited by themselves, no handle left', async () => {
    const before = resourceSnapshot();
    const sink = new InMemorySink();
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, postcopy: true });
    const src = new SourceSession({ to: dst.uri, memory: guest(), machineType: 'pc-q35-10.0', devices: [], threads: 'on', postcopy: { afterPasses: 1 }, preempt: true });
    src.start();
    const [stats] = await Promise.all([src.done, dst.done]);
    expect(stats.threads!.channels.map((c) => [c.role, c.ended])).toEqual([
      ['main', 'by-itself'],
      ['preempt', 'by-itself'],
    ]);
    await dst.close();
    expect(await leftAfter(before, 3000)).toEqual([]);
  });

  it('after a failure (the main channel cut in precopy): typed error, the thread exited by itself, no handle left', async () => {
    const before = resourceSnapshot();
    const listener = await MigrationListener.listen('tcp:127.0.0.1:0');
    const src = new SourceSession({ to: listener.uri, memory: guest(), machineType: 'pc-q35-10.0', devices: [], threads: 'on', bandwidthLimit: 8 * MiB });
    src.start();
    const conn = await listener.accept();
    let got = 0;
    const cut = new Promise<void>((resolve) =>
      conn.main.read((chunk) => {
        got += chunk.length;
        // Well into the first pass: cut the connection (RST), as a destination host that dies.
        if (got > 2 * MiB) {
          conn.main.socket.resetAndDestroy();
          resolve();
        }
      }),
    );
    await cut;
    const e = await src.done.then(
      () => undefined,
      (err: unknown) => err,
    );
    expect(e).toBeInstanceOf(MigrationError);
    expect((e as MigrationError).phase).toBe('precopy');
    expect((e as MigrationError).code).toMatch(/^(reset|peer-disconnected|closed)$/);
    const t = await threadsEnded(() => src.stats(), 1);
    expect(t!.channels.map((c) => [c.role, c.ended])).toEqual([['main', 'by-itself']]);
    await listener.close();
    expect(await leftAfter(before, 3000)).toEqual([]);
  });

  it('a process that ran a threaded migration and a failed one exits on its own, nothing active in it', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'qmt-threads-life-'));
    const script = join(dir, 'run.mts');
    const src = (p: string) => JSON.stringify(pathToFileURL(join(ROOT, 'src', p)).href);
    writeFileSync(
      script,
      `import { DestinationSession } from ${src('protocol/destination.js')};
import { InMemorySink } from ${src('protocol/memory.js')};
import { InMemorySource } from ${src('protocol/memory-source.js')};
import { SourceSession } from ${src('protocol/source.js')};
const mem = new InMemorySource([{ idstr: 'pc.ram', length: 8 << 20 }], { shared: true });
mem.memory.get('pc.ram').fill(1, 0, 4 << 20);
const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink: new InMemorySink(), postcopy: true });
const [s] = await Promise.all([SourceSession.migrate({ to: dst.uri, memory: mem, machineType: 'pc-q35-10.0', devices: [], threads: 'on', postcopy: { afterPasses: 1 }, preempt: true }), dst.done]);
await dst.close();
// Nobody listens there any more: the connect fails (typed), with threads on.
const failed = await SourceSession.migrate({ to: dst.uri, memory: mem, machineType: 'pc-q35-10.0', devices: [], threads: 'on' }).then(() => 'completed', (e) => e.code);
// A refused socket's handle closes a moment after the rejection: look until nothing is active (at most 1 s; the look is one short timer).
const active = () => process.getActiveResourcesInfo().filter((r) => r !== 'TTYWrap' && r !== 'PipeWrap');
const report = () => console.log(JSON.stringify({ status: s.status, threads: s.threads.channels.map((c) => c.ended), failed, active: active() }));
// Looked at from setImmediate: inside a timer's callback that timer itself is listed as active.
const look = (left) => setImmediate(() => (active().length === 0 || left === 0 ? report() : setTimeout(() => look(left - 1), 20)));
look(50);
`,
    );
    try {
      const child = spawn(process.execPath, ['--import', 'tsx', script], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
      let out = '';
      let err = '';
      child.stdout.setEncoding('utf8').on('data', (d: string) => (out += d));
      child.stderr.setEncoding('utf8').on('data', (d: string) => (err += d));
      // No kill, no exit() in the script: it must end by itself.
      const code = await new Promise<number | null>((resolve) => {
        const timer = setTimeout(() => {
          child.kill('SIGKILL');
          resolve(-1);
        }, 60_000);
        child.on('close', (c) => {
          clearTimeout(timer);
          resolve(c);
        });
      });
      expect(code, `the process did not exit on its own: ${err}`).toBe(0);
      const r = JSON.parse(out.trim().split('\n').pop()!) as { status: string; threads: string[]; failed: string; active: string[] };
      expect(r.status).toBe('completed');
      expect(r.threads).toEqual(['by-itself', 'by-itself']);
      expect(r.failed).toBe('connect-failed');
      expect(r.active).toEqual([]);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('postcopy with preempt, every channel cut twice: pauses, recovers on new threads, memory bit for bit, every thread ended by itself', async () => {
    const before = resourceSnapshot();
    const sink = new InMemorySink();
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, postcopy: true, idleTimeoutMs: 20_000 });
    const relay = await FaultRelay.start({ target: dst.uri, maxConnections: 64 });
    const memory = guest();
    const src = new SourceSession({
      to: relay.uri,
      memory,
      machineType: 'pc-q35-10.0',
      devices: [],
      threads: 'on',
      // All of RAM in postcopy, slowly: the cuts come while pages still flow.
      postcopy: { afterPasses: 0 },
      preempt: true,
      postcopyBandwidthLimit: 4 * MiB,
      recovery: { initialDelayMs: 20, maxDelayMs: 200 },
    });
    // A cut once postcopy runs, and again once both sides have resumed from it.
    let resumed = { src: 0, dst: 0 };
    let cuts = 0;
    const cut = () =>
      setTimeout(() => {
        if (dst.stats().status === 'postcopy-active' && relay.cut(() => true) > 0) cuts++;
      }, 50);
    const maybeCut = () => {
      if (cuts < 2 && resumed.src === cuts && resumed.dst === cuts) cut();
    };
    dst.once('postcopy-run', () => {
      // The destination's guest faults from the top down, through the pauses.
      void (async () => {
        for (let off = 16 * MiB - 4096; off >= 0 && dst.stats().status !== 'completed'; off -= 4096) {
          if (!dst.hasPage('pc.ram', off)) await dst.requestPage('pc.ram', off).catch(() => undefined);
        }
      })();
      cut();
    });
    src.on('resumed', () => {
      resumed = { ...resumed, src: resumed.src + 1 };
      maybeCut();
    });
    dst.on('resumed', () => {
      resumed = { ...resumed, dst: resumed.dst + 1 };
      maybeCut();
    });
    src.start();
    const [stats] = await Promise.all([src.done, dst.done]);
    await relay.close();
    await dst.close();
    expect(sink.blocks.get('pc.ram')!.equals(memory.memory.get('pc.ram')!)).toBe(true);
    expect(cuts).toBe(2);
    expect(stats.recoveries).toBe(cuts);
    // Each link had its own threads; every one of them ended by itself.
    const t = stats.threads!.channels;
    expect(t.length).toBe(2 * (cuts + 1));
    expect(t.every((c) => c.ended === 'by-itself'), JSON.stringify(t)).toBe(true);
    expect(await leftAfter(before, 3000)).toEqual([]);
  });
});
