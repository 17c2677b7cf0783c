/**
 * A DestinationSession with a DirectorySink and `threads`: each channel's
 * worker writes the pages it decodes into the block files itself (a
 * PageFileWriter per thread, positioned writes at the pages' fixed places),
 * and `done` comes once every worker's writes are done and the files are
 * fsynced. Library to library: precopy and postcopy with preempt over a
 * guest that keeps writing, the files equal to the source bit for bit; a
 * write that fails in a worker fails the migration typed (storage, naming
 * the file), nothing left alive.
 */
import * as fs from 'node:fs';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { DestinationSession } from '../../src/protocol/destination.js';
import { DirectorySink, blockFileName, type DirectorySinkFs } from '../../src/protocol/directory-sink.js';
import { MigrationError, StorageError } from '../../src/protocol/errors.js';
import type { PostcopyPolicy } from '../../src/protocol/postcopy-policy.js';
import { SourceSession } from '../../src/protocol/source.js';
import { socketTransferSupported } from '../../src/transport/worker/support.js';
import { faultTopDown, writingGuest } from '../support/writing-guest.js';
import { leftAfter, resourceSnapshot } from '../support/resources.js';

const PAGE = 4096;
const MiB = 1 << 20;
const RAM = 24 * MiB;
const root = mkdtempSync(join(tmpdir(), 'qmt-dirsink-threads-'));
afterAll(() => rmSync(root, { recursive: true, force: true }));
let dirs = 0;

describe.skipIf(!socketTransferSupported())('DestinationSession with a DirectorySink and threads (Node 26.6+)', () => {
  it.each([
    ['precopy', 'never' as PostcopyPolicy, false],
    ['postcopy after 1 pass with preempt', { afterPasses: 1 } as PostcopyPolicy, true],
  ])('%s: the workers write the files; once done they equal the source bit for bit', async (_, policy, preempt) => {
    const before = resourceSnapshot();
    const dir = join(root, `d${dirs++}`);
    const sink = new DirectorySink(dir);
    const postcopy = policy !== 'never';
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, postcopy, threads: 'on', idleTimeoutMs: 20_000 });
    if (postcopy) faultTopDown(dst, RAM);
    const g = writingGuest(RAM);
    const src = new SourceSession({ to: dst.uri, memory: g.source, machineType: 'pc-q35-10.0', devices: [], postcopy: policy, preempt, threads: 'on', bandwidthLimit: 48 * MiB, postcopyBandwidthLimit: 24 * MiB, maxPasses: 3, downtimeLimitMs: 1, stopVm: () => g.stop() });
    g.start();
    src.start();
    const [stats, result] = await Promise.all([src.done, dst.done]);
    g.stop();
    // Done means durable: the workers' writes are in the files (fsynced by the sink), read back here directly.
    const ds = dst.stats();
    await sink.close();
    expect(stats.status).toBe('completed');
    expect(result.complete).toBe(true);
    expect(ds.threads.used).toBe(true);
    expect(ds.threads.why).toMatch(/writes the pages it decodes into the sink's files/);
    if (postcopy) {
      expect(result.postcopy).toBe(true);
      expect(ds.threads.channels.map((c) => c.role).sort()).toEqual(['main', 'preempt']);
      expect(stats['requests-answered'].preempt, JSON.stringify(stats['requests-answered'])).toBeGreaterThan(0);
    }
    expect(sink.stats().fsyncs).toBeGreaterThanOrEqual(2);
    // The caller's thread wrote nothing itself.
    expect(sink.stats().writes).toBe(0);
    for (const [name, mem] of g.source.memory) {
      const file = readFileSync(join(dir, blockFileName(name)));
      let at = -1;
      for (let off = 0; off < mem.length && at < 0; off += PAGE) if (mem.compare(file, off, off + PAGE, off, off + PAGE) !== 0) at = off;
      expect(at, `${name}: first differing page at +0x${at.toString(16)}`).toBe(-1);
    }
    console.log(`[dirsink-threads] ${_}: passes ${stats.passes}, requests ${stats['postcopy-requests']} ${JSON.stringify(stats['requests-answered'])}, threads ${JSON.stringify(ds.threads)}`);
    dst.close();
    expect(await leftAfter(before, 3000)).toEqual([]);
  });

  it.each([
    ['precopy', 'never' as PostcopyPolicy],
    ['postcopy', { afterPasses: 0 } as PostcopyPolicy],
  ])('a write that fails in a worker (%s, disk full): the migration fails typed, storage, naming the file; nothing left alive', async (_, policy) => {
    const before = resourceSnapshot();
    const dir = join(root, `d${dirs++}`);
    // Through the sink's fs seam, pc.ram's descriptor is /dev/full's: every write of it fails with ENOSPC — the
    // worker's own writes, which use the descriptor the sink opened (a device has no size to set).
    let full = -1;
    const io: DirectorySinkFs = {
      openSync: (p, f) => (p.endsWith(blockFileName('pc.ram')) ? (full = fs.openSync('/dev/full', 'w')) : fs.openSync(p, f)),
      ftruncateSync: (fd, l) => (fd === full ? undefined : fs.ftruncateSync(fd, l)),
      readSync: (fd, b, o, l, p) => fs.readSync(fd, b, o, l, p),
      write: (fd, b, o, l, p, cb) => fs.write(fd, b, o, l, p, cb),
      fsync: (fd, cb) => fs.fsync(fd, cb),
      close: (fd, cb) => fs.close(fd, cb),
    };
    const sink = new DirectorySink(dir, { fs: io });
    const postcopy = policy !== 'never';
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, postcopy, threads: 'on', idleTimeoutMs: 20_000 });
    const g = writingGuest(RAM);
    const src = new SourceSession({ to: dst.uri, memory: g.source, machineType: 'pc-q35-10.0', devices: [], postcopy: policy, preempt: postcopy, threads: 'on' });
    src.start();
    const e = await dst.done.then(
      () => undefined,
      (x: unknown) => x,
    );
    await src.done.catch(() => undefined);
    await sink.close().catch(() => undefined);
    expect(e).toBeInstanceOf(MigrationError);
    const err = e as MigrationError;
    expect(err.code).toBe('storage');
    expect(err.kind).toBe('storage');
    expect(err.cause).toBeInstanceOf(StorageError);
    expect(err.cause).toMatchObject({ operation: 'write', errno: 'ENOSPC' });
    expect((err.cause as StorageError).file).toMatch(/pc\.ram\.bin$/);
    expect(dst.stats().status).toBe('failed');
    dst.close();
    expect(await leftAfter(before, 4000)).toEqual([]);
  });
});
