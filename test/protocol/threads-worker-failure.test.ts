/**
 * A destination with threads whose channel worker cannot start (its module
 * fails to load: a broken install, a dist entry missing): the session fails
 * at once, typed (`thread-failed`, naming why), instead of handing the
 * source's connection to a dead thread and waiting for a channel that can
 * never qualify; nothing is left open.
 */
import { Worker } from 'node:worker_threads';
import { afterEach, describe, expect, it } from 'vitest';
import { DestinationSession } from '../../src/protocol/destination.js';
import { setChannelWorkerSpawn } from '../../src/protocol/destination/threads/listener.js';
import { InMemorySink } from '../../src/protocol/memory.js';
import { socketTransferSupported } from '../../src/transport/worker/support.js';
import { leftAfter, resourceSnapshot } from '../support/resources.js';

afterEach(() => setChannelWorkerSpawn(undefined));

describe.skipIf(!socketTransferSupported())('a channel worker that cannot start', () => {
  it("fails the destination at once with 'thread-failed', naming the worker's error; nothing left open", async () => {
    const before = resourceSnapshot();
    // What a worker whose module does not load does: it throws before it listens for messages.
    setChannelWorkerSpawn((_entry, data) => new Worker("throw new Error('Cannot find module channel-worker.js')", { eval: true, workerData: data }));
    const t0 = performance.now();
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink: new InMemorySink({ shared: true }), threads: 'on', idleTimeoutMs: 60_000 });
    const err = await dst.done.then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(err).toMatchObject({ code: 'thread-failed', phase: 'setup' });
    expect((err as Error).message).toMatch(/worker thread failed before it served a connection: Cannot find module channel-worker\.js/);
    expect(performance.now() - t0, 'at once, not after a timeout').toBeLessThan(5000);
    expect(await leftAfter(before, 3000)).toEqual([]);
  });
});
