/**
 * Misuse refused where it happens (issue 11 §4), through the public API as a
 * user calls it: start() twice or after cancel(), requestPage() arguments,
 * options at construction, a RAM block list that differs from a preallocated
 * sink, pages written before start(), and a source that refuses a request
 * (it says so by ending the stream; the destination fails typed instead of
 * pausing).
 */
import { randomFillSync } from 'node:crypto';
import net from 'node:net';
import { describe, expect, it } from 'vitest';
import {
  DestinationSession,
  InMemorySink,
  InMemorySource,
  MigrationError,
  MigrationListener,
  ReturnPathDecoder,
  SourceSession,
  StreamDecoder,
  encodeReturnPathMessage,
  type SourceOptions,
  type StreamRecord,
} from '../../src/index.js';

const PAGE = 4096;
const MiB = 1 << 20;
const DEVICES = [{ idstr: 'timer', instanceId: 0, versionId: 2, data: Buffer.alloc(24, 3) }];

function guest(pages: number): InMemorySource {
  const buf = Buffer.alloc(pages * PAGE);
  for (let off = 0; off < buf.length; off += 2 * PAGE) randomFillSync(buf, off, PAGE);
  return new InMemorySource(new Map([['pc.ram', buf]]));
}

function sameMemory(src: InMemorySource, sink: InMemorySink): boolean {
  for (const [name, buf] of src.memory) if (!sink.blocks.get(name)?.equals(buf)) return false;
  return true;
}

/** What `fn` threw synchronously (fails the test if it returned). */
function thrown(fn: () => unknown): Error & { code?: string; option?: string } {
  try {
    fn();
  } catch (e) {
    return e as Error & { code?: string; option?: string };
  }
  throw new Error('did not throw');
}

describe('start()', () => {
  it('twice throws at once (already-started) and the running migration is unaffected; after cancel() it throws too', async () => {
    const sink = new InMemorySink();
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink });
    const memory = guest(256);
    const src = new SourceSession({ to: dst.uri, memory, machineType: 'pc-q35-10.0', devices: DEVICES });
    src.start();
    const e = thrown(() => src.start());
    expect(e).toMatchObject({ code: 'already-started', option: 'start' });
    const [stats, result] = await Promise.all([src.done, dst.done]);
    expect(result.complete).toBe(true);
    expect(stats.normal).toBe(128); // the random half; the rest are zero pages
    expect(sameMemory(memory, sink), 'memory identical').toBe(true);

    const cancelled = new SourceSession({ to: 'tcp:127.0.0.1:1', memory, machineType: 'pc-q35-10.0', devices: [] });
    await cancelled.cancel();
    expect(thrown(() => cancelled.start())).toMatchObject({ code: 'already-started' });
    await expect(cancelled.done).rejects.toMatchObject({ code: 'cancelled', phase: 'setup' });
  });
});

describe('options are checked at construction: a synchronous TypeError/RangeError with a code', () => {
  const base: SourceOptions = { to: 'tcp:127.0.0.1:4444', memory: new InMemorySource([{ idstr: 'pc.ram', length: 4 * PAGE }]), machineType: 'pc-q35-10.0', devices: [] };
  const cases: [string, Partial<Record<keyof SourceOptions, unknown>>, 'TypeError' | 'RangeError', string, string][] = [
    ['tcp:host without port', { to: 'tcp:localhost' }, 'TypeError', 'bad-endpoint', 'to'],
    ['tpc: scheme', { to: 'tpc:localhost:4444' }, 'TypeError', 'bad-endpoint', 'to'],
    ['port 99999', { to: 'tcp:localhost:99999' }, 'RangeError', 'bad-endpoint', 'to'],
    ['to not a string', { to: 4444 }, 'TypeError', 'bad-endpoint', 'to'],
    ['afterPasses -1', { postcopy: { afterPasses: -1 } }, 'RangeError', 'bad-postcopy-policy', 'postcopy.afterPasses'],
    ['policy "sometimes"', { postcopy: 'sometimes' }, 'TypeError', 'bad-postcopy-policy', 'postcopy'],
    ['bandwidth 0', { bandwidthLimit: 0 }, 'RangeError', 'bad-option', 'bandwidthLimit'],
    ['bandwidth "fast"', { bandwidthLimit: 'fast' }, 'TypeError', 'bad-option', 'bandwidthLimit'],
    ['sectionBytes NaN', { sectionBytes: Number.NaN }, 'TypeError', 'bad-option', 'sectionBytes'],
    ['replyTimeoutMs -5', { replyTimeoutMs: -5 }, 'RangeError', 'bad-option', 'replyTimeoutMs'],
    ['maxQueuedBytes 0', { transport: { main: { maxQueuedBytes: 0 } } }, 'RangeError', 'bad-option', 'transport.main.maxQueuedBytes'],
    ['recovery.to tcp:x', { recovery: { to: 'tcp:x' } }, 'TypeError', 'bad-endpoint', 'recovery.to'],
    ['signal not a signal', { signal: {} }, 'TypeError', 'bad-option', 'signal'],
  ];
  for (const [what, patch, type, code, option] of cases) {
    it(`SourceSession: ${what}`, () => {
      const e = thrown(() => new SourceSession({ ...base, ...patch } as SourceOptions));
      expect(e.constructor.name).toBe(type);
      expect(e).toMatchObject({ code, option });
    });
  }

  it('DestinationSession.listen throws synchronously (no listener is opened)', () => {
    const sink = new InMemorySink();
    for (const [opts, type, code, option] of [
      [{ listen: 'tcp:127.0.0.1' }, 'TypeError', 'bad-endpoint', 'listen'],
      [{ listen: 'tcp:127.0.0.1:99999' }, 'RangeError', 'bad-endpoint', 'listen'],
      [{ listen: 'tcp:127.0.0.1:0', idleTimeoutMs: -1 }, 'RangeError', 'bad-option', 'idleTimeoutMs'],
      [{ listen: 'tcp:127.0.0.1:0', acceptTimeoutMs: 'soon' }, 'TypeError', 'bad-option', 'acceptTimeoutMs'],
      [{ listen: 'tcp:127.0.0.1:0', recovery: { listen: 'udp:1' } }, 'TypeError', 'bad-endpoint', 'recovery.listen'],
      [{ listen: 'tcp:127.0.0.1:0', sink: {} }, 'TypeError', 'bad-option', 'sink'],
    ] as const) {
      const e = thrown(() => DestinationSession.listen({ sink, ...opts } as never));
      expect(e.constructor.name, JSON.stringify(opts)).toBe(type);
      expect(e, JSON.stringify(opts)).toMatchObject({ code, option });
    }
  });
});

describe('requestPage()', () => {
  it('unknown block, negative, past the end, unaligned: typed errors, nothing sent, the migration completes', async () => {
    const sink = new InMemorySink();
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, postcopy: true });
    const memory = guest(1024);
    // Postcopy from the start with a slow background stream: the VM runs here while we ask.
    const src = new SourceSession({ to: dst.uri, memory, machineType: 'pc-q35-10.0', devices: DEVICES, postcopy: { afterPasses: 0 }, postcopyBandwidthLimit: 2 * MiB });
    const refusals: unknown[] = [];
    const running = new Promise<void>((r) => dst.once('postcopy-run', () => r()));
    src.start();
    await running;
    const sentBefore = dst.stats()['postcopy-requests'];
    for (const [block, offset, code] of [
      ['pc.rom', 0, 'unknown-ram-block'],
      ['pc.ram', -PAGE, 'page-out-of-range'],
      ['pc.ram', 1024 * PAGE, 'page-out-of-range'],
      ['pc.ram', 100 * PAGE + 1, 'unaligned-offset'],
      ['pc.ram', Number.NaN, 'page-out-of-range'],
    ] as const) {
      const e = await dst.requestPage(block, offset).then(
        () => new Error('resolved'),
        (err: unknown) => err,
      );
      refusals.push(e);
      expect(e, `${block}+${offset}`).toMatchObject({ code });
      expect(e instanceof RangeError || e instanceof TypeError, `${block}+${offset}: ${String(e)}`).toBe(true);
    }
    expect(dst.stats()['postcopy-requests'], 'nothing was sent').toBe(sentBefore);
    // A valid request still works, then the migration completes intact.
    const ok = await dst.requestPage('pc.ram', 1000 * PAGE);
    expect(ok.offset).toBe(1000 * PAGE);
    const [stats, result] = await Promise.all([src.done, dst.done]);
    expect(result.complete).toBe(true);
    expect(stats.status).toBe('completed');
    expect(sameMemory(memory, sink), 'memory identical').toBe(true);
    expect(refusals).toHaveLength(5);
  });
});

describe('a RAM block list that differs from a preallocated sink', () => {
  for (const [what, blocks, code] of [
    ['another size', [{ idstr: 'pc.ram', length: 128 * PAGE }], 'length-mismatch'],
    ['another name', [{ idstr: 'ram0', length: 256 * PAGE }], 'unknown-ram-block'],
  ] as const) {
    it(`${what}: refused as QEMU refuses it (${code}), not replaced`, async () => {
      const sink = new InMemorySink();
      sink.preallocate(blocks);
      const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink });
      const src = new SourceSession({ to: dst.uri, memory: guest(256), machineType: 'pc-q35-10.0', devices: [] });
      src.start();
      const [s, d] = await Promise.allSettled([src.done, dst.done]);
      expect(d.status).toBe('rejected');
      expect((d as PromiseRejectedResult).reason).toMatchObject({ code, kind: 'protocol', phase: 'setup' });
      expect(s.status, 'the source learns it (SHUT 1)').toBe('rejected');
      expect(sink.blocks.get(blocks[0].idstr)!.length, 'the preallocated block is kept').toBe(blocks[0].length);
    });
  }
});

describe('InMemorySource', () => {
  it('pages written before start() are sent once', async () => {
    const memory = new InMemorySource([{ idstr: 'pc.ram', length: 2048 * PAGE }]);
    for (let p = 0; p < 1024; p++) memory.write('pc.ram', p * PAGE, Buffer.alloc(PAGE, (p % 255) + 1));
    const sink = new InMemorySink();
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink });
    const src = new SourceSession({ to: dst.uri, memory, machineType: 'pc-q35-10.0', devices: [] });
    src.start();
    const [stats, result] = await Promise.all([src.done, dst.done]);
    expect(stats.normal).toBe(1024);
    expect(result.stats.normal).toBe(1024);
    expect(stats.passes).toBe(1);
    expect(sameMemory(memory, sink)).toBe(true);
  });
});

// ---- a destination played by hand: asks what ours never would --------------------

interface HandDestination {
  listener: MigrationListener;
  records: StreamRecord[];
  /** Resolves when a record matching `pred` has been decoded. */
  until(pred: (r: StreamRecord) => boolean): Promise<StreamRecord>;
  ask(m: Parameters<typeof encodeReturnPathMessage>[0]): Promise<void>;
  /** How the main channel ended: 'end' (FIN) or 'error'. */
  ended: Promise<'end' | 'error'>;
}

async function handDestination(): Promise<HandDestination> {
  const listener = await MigrationListener.listen('tcp:127.0.0.1:0');
  const records: StreamRecord[] = [];
  const waits: { pred: (r: StreamRecord) => boolean; resolve: (r: StreamRecord) => void }[] = [];
  let conn: Awaited<ReturnType<MigrationListener['accept']>> | undefined;
  let endedResolve!: (how: 'end' | 'error') => void;
  const ended = new Promise<'end' | 'error'>((r) => (endedResolve = r));
  void listener.accept().then((c) => {
    conn = c;
    const dec = new StreamDecoder();
    c.main.on('end', () => endedResolve('end'));
    c.main.on('error', () => endedResolve('error'));
    c.main.read((chunk) => {
      for (const r of dec.push(chunk)) {
        records.push(r);
        if (r.type === 'command' && r.command.cmd === 'ping') void c.main.send([encodeReturnPathMessage({ type: 'pong', value: r.command.value })]);
        for (const w of [...waits]) {
          if (w.pred(r)) {
            waits.splice(waits.indexOf(w), 1);
            w.resolve(r);
          }
        }
      }
    });
  });
  return {
    listener,
    records,
    ended,
    until: (pred) => {
      const hit = records.find(pred);
      return hit ? Promise.resolve(hit) : new Promise((resolve) => waits.push({ pred, resolve }));
    },
    ask: async (m) => {
      await conn!.main.send([encodeReturnPathMessage(m)], 'urgent');
    },
  };
}

describe('a source asked for a page it does not have', () => {
  it('postcopy: fails with bad-page-request and says so: EOF at a record boundary, then FIN (no reset)', async () => {
    const hand = await handDestination();
    const src = new SourceSession({ to: hand.listener.uri, memory: guest(4096), machineType: 'pc-q35-10.0', devices: DEVICES, postcopy: { afterPasses: 0 }, postcopyBandwidthLimit: 4 * MiB });
    src.start();
    await hand.until((r) => r.type === 'command' && r.command.cmd === 'postcopy-run');
    await hand.ask({ type: 'req-pages-id', block: 'pc.ram', offset: 4096 * PAGE, length: PAGE }); // one past the end
    const e = await src.done.then(
      () => new Error('completed'),
      (err: unknown) => err,
    );
    expect(e).toBeInstanceOf(MigrationError);
    expect(e).toMatchObject({ code: 'bad-page-request', kind: 'protocol', phase: 'postcopy' });
    expect(await hand.ended, 'the main channel ends with a FIN').toBe('end');
    await hand.until((r) => r.type === 'eof');
    expect(hand.records.at(-1)?.type, 'the stream ends with EOF, parsed cleanly').toBe('eof');
    hand.listener.close();
  });

  it('library to library, the request injected on the way: the destination fails typed (not paused), the source with bad-page-request', async () => {
    const sink = new InMemorySink();
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, postcopy: true });
    const dstPort = Number(dst.uri.split(':').at(-1));
    // A relay that forwards both ways and, after POSTCOPY_RUN, adds one request past the end toward the source.
    let inject!: () => void;
    const relay = net.createServer((down) => {
      const up = net.connect(dstPort, '127.0.0.1');
      const rp = new ReturnPathDecoder();
      down.pipe(up);
      up.on('data', (chunk: Buffer) => {
        for (const m of rp.push(chunk)) down.write(encodeReturnPathMessage(m));
      });
      inject = () => down.write(encodeReturnPathMessage({ type: 'req-pages-id', block: 'pc.ram', offset: 0x7fff000, length: PAGE }));
      up.on('close', () => down.destroy());
      down.on('close', () => up.destroy());
      up.on('error', () => undefined);
      down.on('error', () => undefined);
    });
    await new Promise<void>((r) => relay.listen(0, '127.0.0.1', r));
    const memory = guest(4096);
    const src = new SourceSession({ to: `tcp:127.0.0.1:${(relay.address() as net.AddressInfo).port}`, memory, machineType: 'pc-q35-10.0', devices: DEVICES, postcopy: { afterPasses: 0 }, postcopyBandwidthLimit: 4 * MiB });
    let paused = false;
    dst.on('paused', () => (paused = true));
    dst.once('postcopy-run', () => {
      // A page the guest waits for while the source refuses another.
      void dst.requestPage('pc.ram', 4000 * PAGE).catch(() => undefined);
      setTimeout(() => inject(), 20);
    });
    src.start();
    const [s, d] = await Promise.allSettled([src.done, dst.done]);
    relay.close();
    expect(s.status).toBe('rejected');
    expect((s as PromiseRejectedResult).reason).toMatchObject({ code: 'bad-page-request' });
    expect(d.status).toBe('rejected');
    const de = (d as PromiseRejectedResult).reason as MigrationError;
    expect(de.code, de.message).toBe('source-refused');
    expect(de.kind).toBe('protocol');
    expect(paused, 'the destination did not pause').toBe(false);
  });

  it('a page requested again after it went out on main is counted (requested-pages-already-sent), not sent twice', async () => {
    const hand = await handDestination();
    const src = new SourceSession({ to: hand.listener.uri, memory: guest(2048), machineType: 'pc-q35-10.0', devices: DEVICES, postcopy: { afterPasses: 0 }, preempt: true });
    const already: { block: string; offset: number }[] = [];
    src.on('requested-page-already-sent', (e) => already.push(e));
    src.start();
    // Accept the preempt channel when it comes; it must carry nothing.
    let preemptBytes = 0;
    // (A plain preempt channel qualifies with its first page: one that carries none is never handed over.)
    void hand.listener
      .accept()
      .then((c) => c.waitPreempt().then((p) => p.read((chunk) => void (preemptBytes += chunk.length))))
      .catch(() => undefined);
    await hand.until((r) => r.type === 'command' && r.command.cmd === 'postcopy-run');
    const page = (await hand.until((r) => r.type === 'ram-page' && hand.records.some((x) => x.type === 'package-end'))) as Extract<StreamRecord, { type: 'ram-page' }>;
    await hand.ask({ type: 'req-pages-id', block: 'pc.ram', offset: page.offset, length: PAGE });
    await hand.until((r) => r.type === 'eof');
    await hand.ask({ type: 'shut', value: 0 });
    const stats = await src.done;
    expect(stats['postcopy-requests']).toBe(1);
    expect(stats['requested-pages-already-sent']).toBe(1);
    expect(already).toEqual([{ block: 'pc.ram', offset: page.offset }]);
    expect(preemptBytes, 'no page on the preempt channel').toBe(0);
    hand.listener.close();
  });
});
