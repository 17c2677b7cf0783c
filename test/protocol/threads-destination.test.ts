/**
 * A DestinationSession with its channels in worker threads (`threads`),
 * library ↔ library: precopy and postcopy with preempt, plain and TLS,
 * memory bit for bit, demand requests answered through the workers; the
 * choice ('auto', 'on', 'off') and why, in the stats. Socket transfer needs
 * Node 26.6+: under older Node the thread cases skip and 'auto' is checked
 * to fall back.
 */
import { randomFillSync } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DestinationSession, DirectorySink, InMemorySink, InMemorySource, SourceSession } from '../../src/index.js';
import type { PageRequestResult } from '../../src/protocol/page-tracker.js';
import { initPkiDir } from '../../src/transport/pki.js';
import { AUTO_THREADS_MIN_CORES, availableCores, setAvailableCoresForTest, socketTransferSupported } from '../../src/transport/worker/support.js';
import { qmt } from '../cli/qmt.js';

const PAGE = 4096;
const MiB = 1 << 20;
const threadsWork = socketTransferSupported();

function guest(bytes: number): InMemorySource {
  const buf = Buffer.alloc(bytes);
  // Runs of 8 random pages, then 8 zero pages: PAGE and ZERO runs both.
  for (let off = 0; off < buf.length; off += 16 * PAGE) randomFillSync(buf, off, 8 * PAGE);
  return new InMemorySource(new Map([['pc.ram', buf]]));
}

let pki: string;
beforeAll(async () => {
  pki = await mkdtemp(join(tmpdir(), 'qmt-threads-dst-'));
  await initPkiDir(pki, { hostnames: ['127.0.0.1', 'localhost'] });
});
afterAll(async () => {
  await rm(pki, { recursive: true, force: true });
});

interface Run {
  tls: boolean;
  postcopy: boolean;
  /** Demand requests made once the VM runs here (postcopy). */
  requests?: number;
}

async function migrate(r: Run) {
  const memory = guest(16 * MiB);
  const sink = new InMemorySink({ shared: true });
  const transport = r.tls ? { tls: { dir: pki } } : {};
  const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, transport, postcopy: r.postcopy, threads: 'on' });
  const answers: Promise<PageRequestResult>[] = [];
  dst.on('postcopy-run', () => {
    // Pages not here (dirtied after precopy sent them: discarded, to be sent again), from the middle of RAM
    // up: the capped postcopy bulk goes bottom-up and reaches them last, and the top is where precopy's
    // last pages may still be in flight on main (the source answers those as already sent, not on preempt).
    const length = memory.memory.get('pc.ram')!.length;
    for (let off = length / 2; off < length && answers.length < (r.requests ?? 0); off += PAGE) if (!dst.hasPage('pc.ram', off)) answers.push(dst.requestPage('pc.ram', off));
  });
  // The guest dirties pages while precopy runs: postcopy then has pages left to send and to request.
  const ram = memory.memory.get('pc.ram')!;
  const noise = Buffer.alloc(PAGE);
  const writer = r.postcopy
    ? setInterval(() => {
        for (let i = 0; i < 64; i++) {
          randomFillSync(noise);
          memory.write('pc.ram', Math.floor(Math.random() * (ram.length / PAGE)) * PAGE, noise);
        }
      }, 2)
    : undefined;
  const src = new SourceSession({
    to: dst.uri,
    memory,
    machineType: 'pc-q35-10.0',
    devices: [{ idstr: 'timer', instanceId: 0, versionId: 2, data: Buffer.alloc(24, 3) }],
    transport,
    stopVm: () => clearInterval(writer),
    // The postcopy bulk is capped: the pages requested from the top of RAM are still unsent when the
    // requests come, under any load, so they go on preempt (uncapped, the bulk can send all of them first).
    ...(r.postcopy ? { postcopy: { afterPasses: 1 }, preempt: true, bandwidthLimit: 64 * MiB, postcopyBandwidthLimit: 2 * MiB } : {}),
  }).start();
  const [, result] = await Promise.all([src.done, dst.done]);
  clearInterval(writer);
  const pages = await Promise.all(answers);
  return { memory, sink, result, pages };
}

describe.skipIf(!threadsWork)('DestinationSession with threads: library ↔ library', () => {
  for (const tls of [false, true]) {
    const how = tls ? 'TLS' : 'plain TCP';
    it(`precopy over ${how}: memory bit for bit, the main channel ran in a worker`, async () => {
      const { memory, sink, result } = await migrate({ tls, postcopy: false });
      expect(result.complete).toBe(true);
      expect(sink.blocks.get('pc.ram')!.equals(memory.memory.get('pc.ram')!)).toBe(true);
      const s = result.stats;
      expect(s.threads.used, s.threads.why).toBe(true);
      expect(s.threads.channels.map((c) => c.role)).toEqual(['main']);
      expect(s.threads.channels[0]!.threadId).toBeGreaterThan(0);
      expect(s.normal + s.duplicate, 'every page counted by the worker').toBeGreaterThanOrEqual(16 * MiB / PAGE);
      expect(s.runs.count).toBeLessThan(s.runs.pages);
      expect(s.transferred).toBeGreaterThan(8 * MiB);
      expect(result.devices.map((d) => d.idstr)).toContain('timer');
      if (tls) expect(s.channels.main?.tls?.protocol).toBe('TLSv1.3');
    }, 60_000);

    it(`postcopy with preempt over ${how}: requests answered (most on preempt), memory bit for bit`, async () => {
      const { memory, sink, result, pages } = await migrate({ tls, postcopy: true, requests: 64 });
      expect(result.complete).toBe(true);
      expect(result.postcopy).toBe(true);
      expect(sink.blocks.get('pc.ram')!.equals(memory.memory.get('pc.ram')!)).toBe(true);
      const s = result.stats;
      expect(s.threads.used).toBe(true);
      const roles = s.threads.channels.map((c) => c.role);
      expect(roles).toContain('main');
      // Plain TCP too: the preempt channel qualifies with its first page, and pages go on it (below).
      expect(roles.sort()).toEqual(['main', 'preempt']);
      expect(s['placed-twice']).toBe(0);
      expect(pages.length, 'pages were missing when the VM started here').toBeGreaterThan(0);
      const requested = pages.filter((p) => p.requested);
      expect(requested.length, 'some pages were not here yet').toBeGreaterThan(0);
      expect(s['postcopy-requests']).toBeGreaterThanOrEqual(requested.length);
      // Who brought a page is recorded by the worker that landed it first (not inferred): exact.
      const onPreempt = requested.filter((p) => p.channel === 'preempt').length;
      expect(onPreempt, 'requests answered by pages the preempt worker landed').toBeGreaterThan(0);
      expect(s['preempt-pages']).toBeGreaterThanOrEqual(onPreempt);
      for (const p of pages) expect(['main', 'preempt', 'none']).toContain(p.channel);
    }, 60_000);
  }
});

describe('threads: the choice and why', () => {
  it("'off' and a sink that is not shared run on this thread and say why; 'on' there is a typed error at the call", async () => {
    const off = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink: new InMemorySink({ shared: true }), threads: 'off' });
    expect(off.stats().threads).toEqual({ used: false, why: "threads: 'off'", channels: [] });
    await off.close();
    const plain = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink: new InMemorySink() });
    expect(plain.stats().threads.used).toBe(false);
    expect(plain.stats().threads.why).toMatch(threadsWork ? /not shared/ : /cannot transfer a socket/);
    await plain.close();
    expect(() => DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink: new InMemorySink(), threads: 'on' })).toThrow(
      expect.objectContaining({ code: 'threads-unavailable', option: 'threads', message: expect.stringMatching(threadsWork ? /not shared/ : /Node 26\.6/) }),
    );
    expect(() => DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink: new InMemorySink(), threads: 'yes' as never })).toThrow(expect.objectContaining({ code: 'bad-option', option: 'threads' }));
  });

  it("multifd is no reason to stay on one thread: 'auto' runs the multifd channels in workers exactly when this Node can transfer sockets; 'on' where it cannot is a typed error", async () => {
    setAvailableCoresForTest(8);
    const auto = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink: new InMemorySink({ shared: true }), multifd: { channels: 2 } }).finally(() => setAvailableCoresForTest(undefined));
    expect(auto.stats().threads.used).toBe(threadsWork);
    expect(auto.stats().threads.why).not.toMatch(/multifd/);
    if (!threadsWork) expect(auto.stats().threads.why).toMatch(/cannot transfer a socket/);
    await auto.close();
    if (threadsWork) {
      const on = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink: new InMemorySink({ shared: true }), multifd: { channels: 2 }, threads: 'on' });
      expect(on.stats().threads).toMatchObject({ used: true, why: "threads: 'on'" });
      await on.close();
    } else {
      expect(() => DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink: new InMemorySink({ shared: true }), multifd: { channels: 2 }, threads: 'on' })).toThrow(
        expect.objectContaining({ code: 'threads-unavailable', option: 'threads', message: expect.stringMatching(/Node 26\.6/) }),
      );
    }
  });

  it("'auto' with a shared sink: threads exactly when this Node can transfer sockets and there are 4 or more cores; fewer cores say so, and 'on' ignores them", async () => {
    try {
      setAvailableCoresForTest(AUTO_THREADS_MIN_CORES);
      const many = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink: new InMemorySink({ shared: true }) });
      expect(many.stats().threads.used).toBe(threadsWork);
      await many.close();
      setAvailableCoresForTest(AUTO_THREADS_MIN_CORES - 1);
      const few = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink: new InMemorySink({ shared: true }) });
      expect(few.stats().threads.used).toBe(false);
      expect(few.stats().threads.why).toMatch(threadsWork ? /fell back to one thread: 3 cores available: .*needs 4 or more/ : /cannot transfer a socket/);
      await few.close();
      if (threadsWork) {
        const on = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink: new InMemorySink({ shared: true }), threads: 'on' });
        expect(on.stats().threads).toMatchObject({ used: true, why: "threads: 'on'" });
        await on.close();
      }
    } finally {
      setAvailableCoresForTest(undefined);
    }
    // This machine, as it is.
    const real = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink: new InMemorySink({ shared: true }) });
    expect(real.stats().threads.used).toBe(threadsWork && availableCores() >= AUTO_THREADS_MIN_CORES);
    await real.close();
  });
  it("'auto' with a DirectorySink (qmt receive's sink) follows the same rule: threads with 4 or more cores, and the workers write the files", async () => {
    const dir = mkdtempSync(join(tmpdir(), 'qmt-auto-files-'));
    try {
      setAvailableCoresForTest(AUTO_THREADS_MIN_CORES);
      const many = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink: new DirectorySink(join(dir, 'a')) });
      expect(many.stats().threads.used).toBe(threadsWork);
      if (threadsWork) expect(many.stats().threads.why).toMatch(/^threads: 'auto' \(sockets can move to worker threads; each channel's thread writes the pages it decodes into the sink's files\)$/);
      await many.close();
      setAvailableCoresForTest(AUTO_THREADS_MIN_CORES - 1);
      const few = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink: new DirectorySink(join(dir, 'b')) });
      expect(few.stats().threads.used).toBe(false);
      expect(few.stats().threads.why).toMatch(threadsWork ? /fell back to one thread: 3 cores available: .*needs 4 or more/ : /cannot transfer a socket/);
      await few.close();
    } finally {
      setAvailableCoresForTest(undefined);
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('qmt: --threads', () => {
  it("qmt demo --threads on: the destination's channels ran in workers (stats say so), memory identical; qmt receive --threads on is refused where threads are impossible, typed", async () => {
    const demo = await qmt(['demo', '--size', '16', '--threads', threadsWork ? 'on' : 'auto', '--json', '--progress', 'none']);
    expect(demo.code, demo.stderr).toBe(0);
    const j = JSON.parse(demo.stdout) as { memoryIdentical: boolean; destinationThreads: { used: boolean; why: string; channels: { role: string }[] }; channels: { returnPathBytes: number } };
    expect(j.memoryIdentical).toBe(true);
    expect(j.destinationThreads.used, j.destinationThreads.why).toBe(threadsWork);
    if (threadsWork) expect(j.destinationThreads.channels.map((c) => c.role)).toContain('main');
    expect(j.channels.returnPathBytes, 'the final stats of the main worker').toBeGreaterThan(8);
    // Where threads work, qmt receive --threads on writes the files from its workers (test/qemu/receive-threads.test.ts).
    if (threadsWork) return;
    const recv = await qmt(['receive', '--listen', 'tcp:127.0.0.1:0', '--out', join(pki, 'never'), '--threads', 'on', '--progress', 'none']);
    expect(recv.code).not.toBe(0);
    expect(recv.stderr).toMatch(/threads-unavailable: .*Node 26\.6/);
  }, 120_000);
});
