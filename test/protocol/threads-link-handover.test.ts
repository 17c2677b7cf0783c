/**
 * ThreadLink.drop(): what a failed connection of a threaded destination hands
 * to the recovery connection after it (`resumeState`). The workers are fakes
 * that answer (or not) the link's messages, so each case is the one order of
 * events it names, deterministically:
 * - a recovery link dropped before it was served (it was still waiting for
 *   the previous link's state) hands that state on: its main thread never
 *   decoded a byte, so it has none of its own to export;
 * - with a sink of files, the pages the workers took must be in the files
 *   before a recovery trusts the received bits: a failed write, or a thread
 *   that exits before its writes are drained, rejects with a StorageError,
 *   and a recovery link given that rejection fails the migration
 *   (`malformed`), it does not pause it again (`lost`).
 */
import { describe, expect, it } from 'vitest';
import { StorageError } from '../../src/protocol/errors.js';
import { ThreadLink, type ThreadLinkEvents } from '../../src/protocol/destination/threads/link.js';
import type { ThreadConnection } from '../../src/protocol/destination/threads/listener.js';
import { errorToData, type FromWorker, type SharedBlock, type ToWorker } from '../../src/protocol/destination/threads/wire.js';
import type { DecoderResumeState } from '../../src/stream/decoder.js';
import type { PageTracker } from '../../src/protocol/page-tracker.js';

const PAGE = 4096;

/** A main thread that answers as told: 'export' with `state`, 'drain' with `drained` (undefined: never). */
function fakeWorker(answers: { state?: DecoderResumeState; drained?: FromWorker | 'exit' }) {
  let exit!: () => void;
  const exited = new Promise<void>((r) => (exit = r));
  const posted: ToWorker['t'][] = [];
  const w = {
    role: 'main' as const,
    onMessage: undefined as ((m: FromWorker) => void) | undefined,
    exited,
    worker: { unref: () => undefined },
    post(m: ToWorker) {
      posted.push(m.t);
      if (m.t === 'export' && answers.state) queueMicrotask(() => w.onMessage?.({ t: 'state', state: answers.state! }));
      if (m.t === 'drain') {
        const d = answers.drained;
        if (d === 'exit') queueMicrotask(exit);
        else if (d) queueMicrotask(() => w.onMessage?.(d));
      }
    },
    end: () => (exit(), exited),
  };
  return { w, posted };
}

function fakeConnection(main: ReturnType<typeof fakeWorker>['w']) {
  let destroyed = 0;
  const conn = {
    main,
    multifd: undefined,
    multifdOptions: undefined,
    bulkComplete: true,
    preemptExpected: false,
    waitMultifd: () => new Promise(() => undefined),
    waitPreempt: () => new Promise(() => undefined),
    destroy: () => {
      destroyed++;
    },
  };
  return { conn: conn as unknown as ThreadConnection, destroyed: () => destroyed };
}

function blocks(file: boolean): SharedBlock[] {
  const words = new SharedArrayBuffer(8);
  return [
    {
      idstr: 'pc.ram',
      length: 16 * PAGE,
      index: 0,
      ...(file ? { file: { idstr: 'pc.ram', length: 16 * PAGE, path: '/saved/pc.ram', fd: -1 } as never } : { memory: new SharedArrayBuffer(16 * PAGE) }),
      received: words,
      written: new SharedArrayBuffer(8),
      byPreempt: new SharedArrayBuffer(8),
    },
  ];
}

const state = { sections: [], startedIds: [], ramBlocks: [], ramFormat: 'legacy', postcopy: true } as unknown as DecoderResumeState;

function link(conn: ThreadConnection, file: boolean, resume?: Promise<DecoderResumeState | undefined>) {
  const calls: string[] = [];
  const events = {
    records: () => undefined,
    blocks: () => undefined,
    mainClosed: () => undefined,
    preemptArrived: () => false,
    preemptCommand: () => undefined,
    preemptEnded: () => undefined,
    multifdArrived: () => undefined,
    malformed: (_l: ThreadLink, e: Error) => calls.push(`malformed: ${e.name}`),
    lost: (_l: ThreadLink, e: unknown) => calls.push(`lost: ${(e as Error).name}`),
  } as unknown as ThreadLinkEvents;
  const l = new ThreadLink(conn, events, {
    idleTimeoutMs: 60_000,
    idleError: () => new Error('idle') as never,
    ...(resume ? { resume } : {}),
    blocks: () => blocks(file),
    pages: { outstanding: 0 } as unknown as PageTracker,
  });
  return { l, calls };
}

const settle = async <T>(p: Promise<T> | undefined): Promise<{ ok: T } | { error: unknown }> => {
  try {
    return { ok: await p! };
  } catch (error) {
    return { error };
  }
};

describe('ThreadLink.drop(): the state a recovery connection continues', () => {
  it('a recovery link dropped before it was served hands on the state it was waiting for (it used to export nothing: the recovery after it failed)', async () => {
    const { w, posted } = fakeWorker({});
    const { conn, destroyed } = fakeConnection(w);
    let give!: (s: DecoderResumeState) => void;
    const previous = new Promise<DecoderResumeState | undefined>((r) => (give = r));
    const { l } = link(conn, true, previous);
    l.start();
    l.drop();
    give(state);
    expect(await settle(l.resumeState)).toEqual({ ok: state });
    expect(posted, 'never served, never asked to export or drain').toEqual([]);
    expect(destroyed()).toBe(1);
  });

  it('a served link with a sink of files: the state once every writer drained', async () => {
    const { w, posted } = fakeWorker({ state, drained: { t: 'drained' } });
    const { conn, destroyed } = fakeConnection(w);
    const { l } = link(conn, true);
    l.start();
    l.drop();
    expect(await settle(l.resumeState)).toEqual({ ok: state });
    expect(posted).toEqual(['serve-main', 'export', 'drain']);
    expect(destroyed()).toBe(1);
  });

  it('a failed write in a worker: the state is refused with its StorageError (it used to be handed on, pages missing from the files)', async () => {
    const failed = new StorageError('write', '/saved/pc.ram', 0x3000, Object.assign(new Error('no space left on device'), { code: 'ENOSPC' }));
    const { w } = fakeWorker({ state, drained: { t: 'drained', error: errorToData(failed) } });
    const { conn, destroyed } = fakeConnection(w);
    const { l } = link(conn, true);
    l.start();
    l.drop();
    const r = await settle(l.resumeState);
    expect(r).toMatchObject({ error: { code: 'storage', message: expect.stringContaining('/saved/pc.ram') } });
    expect(destroyed()).toBe(1);
  });

  it('a thread that exits before its writes are drained: refused with a StorageError naming the channel and the files', async () => {
    const { w } = fakeWorker({ state, drained: 'exit' });
    const { conn } = fakeConnection(w);
    const { l } = link(conn, true);
    l.start();
    l.drop();
    const r = await settle(l.resumeState);
    expect(r).toMatchObject({ error: expect.any(StorageError) });
    const message = (r as { error: Error }).error.message;
    expect(message).toContain('/saved/pc.ram');
    expect(message).toContain("the main channel's thread exited before its pages were written");
  });

  it('a shared-memory sink: no drain, the state as exported', async () => {
    const { w, posted } = fakeWorker({ state });
    const { conn } = fakeConnection(w);
    const { l } = link(conn, false);
    l.start();
    l.drop();
    expect(await settle(l.resumeState)).toEqual({ ok: state });
    expect(posted).toEqual(['serve-main', 'export']);
  });

  it("a recovery link given the last link's storage failure fails the migration (malformed), it does not pause again (lost)", async () => {
    const { w, posted } = fakeWorker({});
    const { conn } = fakeConnection(w);
    const previous = Promise.reject(new StorageError('write', '/saved/pc.ram', 0, new Error('EIO')));
    previous.catch(() => undefined);
    const { l, calls } = link(conn, true, previous);
    l.start();
    await new Promise((r) => setTimeout(r, 10));
    expect(calls).toEqual(['malformed: StorageError']);
    expect(posted).toEqual([]);
    l.drop();
  });
});
