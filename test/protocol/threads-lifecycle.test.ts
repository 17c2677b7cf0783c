/**
 * A DestinationSession with threads ends its threads with the session: after
 * `done` (completed or failed) or close(), no channel worker (nor the spare
 * started ahead of a connection) is alive, nothing of ours is left in
 * process.getActiveResourcesInfo(), and a process that ran a migration exits
 * by itself. Workers are seen through process's 'worker' event (they are not
 * in getActiveResourcesInfo); each one's own resources are checked by its end.
 */
import { execFile } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DestinationSession, InMemorySink, InMemorySource, SourceSession } from '../../src/index.js';
import { initPkiDir } from '../../src/transport/pki.js';
import { socketTransferSupported } from '../../src/transport/worker/support.js';
import { leftAfter, noneAlive, resourceSnapshot, watchWorkers } from '../support/resources.js';

const execFileP = promisify(execFile);
const root = join(import.meta.dirname, '..', '..');
const PAGE = 4096;
const MiB = 1 << 20;

function guest(bytes: number): InMemorySource {
  const buf = Buffer.alloc(bytes);
  for (let off = 0; off < buf.length; off += 16 * PAGE) randomFillSync(buf, off, 8 * PAGE);
  return new InMemorySource(new Map([['pc.ram', buf]]));
}

let pki: string;
beforeAll(async () => {
  pki = await mkdtemp(join(tmpdir(), 'qmt-threads-life-'));
  await initPkiDir(pki, { hostnames: ['127.0.0.1', 'localhost'] });
});
afterAll(async () => {
  await rm(pki, { recursive: true, force: true });
});

describe.skipIf(!socketTransferSupported())('threads end with the destination session', () => {
  for (const tls of [false, true]) {
    it(`completed (${tls ? 'TLS' : 'plain'}, postcopy with preempt): no worker alive, nothing left`, async () => {
      const before = resourceSnapshot();
      const w = watchWorkers();
      try {
        const transport = tls ? { tls: { dir: pki } } : {};
        const memory = guest(8 * MiB);
        const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink: new InMemorySink({ shared: true }), transport, postcopy: true, threads: 'on' });
        const src = new SourceSession({ to: dst.uri, memory, machineType: 'pc-q35-10.0', devices: [], transport, postcopy: { afterPasses: 1 }, preempt: true }).start();
        const [, r] = await Promise.all([src.done, dst.done]);
        expect(r.complete).toBe(true);
        expect(r.stats.threads.used).toBe(true);
        expect(w.started(), 'workers were started').toBeGreaterThanOrEqual(2);
        expect(await noneAlive(w.alive, 5000), 'workers alive after done').toBe(0);
        expect(await leftAfter(before, 3000)).toEqual([]);
      } finally {
        w.stop();
      }
    }, 60_000);
  }

  it('failed (the source cancels mid-precopy): done rejects, no worker alive, nothing left', async () => {
    const before = resourceSnapshot();
    const w = watchWorkers();
    try {
      const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink: new InMemorySink({ shared: true }), threads: 'on' });
      const src = new SourceSession({ to: dst.uri, memory: guest(32 * MiB), machineType: 'pc-q35-10.0', devices: [], bandwidthLimit: 8 * MiB }).start();
      await new Promise<void>((r) => dst.once('ram-blocks', () => r()));
      await new Promise((r) => setTimeout(r, 100));
      await src.cancel();
      await expect(dst.done).rejects.toMatchObject({ code: expect.stringMatching(/peer-disconnected|closed|reset|cancelled/) });
      await src.done.catch(() => undefined);
      expect(await noneAlive(w.alive, 5000), 'workers alive after the failure').toBe(0);
      expect(await leftAfter(before, 3000)).toEqual([]);
    } finally {
      w.stop();
    }
  }, 60_000);

  it('close() before any source came: the spare worker and the candidates end', async () => {
    const before = resourceSnapshot();
    const w = watchWorkers();
    try {
      const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink: new InMemorySink({ shared: true }), threads: 'on' });
      for (let i = 0; i < 250 && w.started() === 0; i++) await new Promise((r) => setTimeout(r, 20));
      expect(w.started(), 'a spare worker waits for the first connection').toBe(1);
      await dst.close();
      await expect(dst.done).rejects.toMatchObject({ code: 'cancelled' });
      expect(await noneAlive(w.alive, 5000)).toBe(0);
      expect(await leftAfter(before, 3000)).toEqual([]);
    } finally {
      w.stop();
    }
  }, 30_000);

  const built = existsSync(join(root, 'dist', 'index.js')) && existsSync(join(root, 'dist', 'protocol', 'destination', 'threads', 'channel-worker.js'));
  it.skipIf(!built)('a process that ran a migration with threads (the built package) exits by itself right after done', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'qmt-threads-child-'));
    const script = join(dir, 'run.mjs');
    await writeFile(
      script,
      `import { randomFillSync } from 'node:crypto';
import { performance } from 'node:perf_hooks';
import { DestinationSession, InMemorySink, InMemorySource, SourceSession } from ${JSON.stringify(join(root, 'dist', 'index.js'))};
const workers = new Set();
process.on('worker', (w) => { workers.add(w); w.once('exit', () => workers.delete(w)); });
const buf = Buffer.alloc(8 << 20);
for (let off = 0; off < buf.length; off += 8192) randomFillSync(buf, off, 4096);
const memory = new InMemorySource(new Map([['pc.ram', buf]]));
const sink = new InMemorySink({ shared: true });
const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, postcopy: true, threads: 'on' });
const src = new SourceSession({ to: dst.uri, memory, machineType: 'pc-q35-10.0', devices: [], postcopy: { afterPasses: 1 }, preempt: true, threads: 'off' });
src.start();
const [, r] = await Promise.all([src.done, dst.done]);
const doneAt = performance.now();
const resources = process.getActiveResourcesInfo().filter((x) => x !== 'PipeWrap' && x !== 'TTYWrap' && x !== 'Immediate');
const equal = sink.blocks.get('pc.ram').equals(buf);
process.on('exit', () => process.stdout.write(JSON.stringify({ used: r.stats.threads.used, resources, workersAtExit: workers.size, exitMs: performance.now() - doneAt, equal }) + '\\n'));
`,
    );
    try {
      const { stdout } = await execFileP(process.execPath, [script], { cwd: root, timeout: 50_000 });
      const out = JSON.parse(stdout.trim().split('\n').at(-1)!) as { used: boolean; resources: string[]; workersAtExit: number; exitMs: number; equal: boolean };
      console.log(`[threads child] ${JSON.stringify(out)}`);
      expect(out.used).toBe(true);
      expect(out.equal).toBe(true);
      expect(out.resources).toEqual([]);
      // The process ended on its own (no timeout): and not by killing live channel threads.
      expect(out.workersAtExit, 'channel workers still running when the process exited').toBe(0);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  }, 60_000);
});
