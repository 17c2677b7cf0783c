/**
 * The destination half of `qmt demo`, in a worker thread: source and
 * destination run on their own event loops, as they would on two hosts. Once
 * the destination runs (POSTCOPY_RUN), the guest's workload touches its
 * working set there, and every page not yet received is a fault.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { DestinationSession } from '../protocol/destination.js';
import { LatencyHistogram } from '../protocol/latency.js';
import { InMemorySink } from '../protocol/memory.js';
import type { TransportOptions } from '../transport/connection.js';
import type { ThreadMode } from '../transport/worker/support.js';

export interface DemoTouches {
  hot: { start: number; length: number };
  stream: { start: number; length: number };
}

export interface DemoDestinationData {
  transport: TransportOptions;
  postcopy: boolean;
  threads: ThreadMode;
}

const PAGE = 4096;
const port = parentPort!;
const data = workerData as DemoDestinationData;
let touches: DemoTouches | undefined;
let touchesArrived: (() => void) | undefined;
port.on('message', (m: { type: 'touches'; touches: DemoTouches }) => {
  touches = m.touches;
  touchesArrived?.();
});

const sink = new InMemorySink({ shared: true });
const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, transport: data.transport, postcopy: data.postcopy, threads: data.threads });
port.postMessage({ type: 'listening', uri: dst.uri });
const faults = new LatencyHistogram();
let running: Promise<void> = Promise.resolve();
dst.on('postcopy-run', () => {
  port.postMessage({ type: 'log', line: 'destination: running (postcopy): the guest faults on pages not yet here' });
  running = (async () => {
    if (!touches) await new Promise<void>((r) => (touchesArrived = r));
    const t = touches!;
    // Top-down, against the background stream's order: where the stream has not reached yet.
    const order: number[] = [];
    for (let o = t.stream.length - PAGE; o >= 0; o -= PAGE) order.push(t.stream.start + o);
    for (let o = t.hot.length - PAGE; o >= 0; o -= PAGE) order.push(t.hot.start + o);
    const pending: Promise<unknown>[] = [];
    for (const off of order) {
      if (dst.hasPage('pc.ram', off)) continue;
      pending.push(
        dst.requestPage('pc.ram', off).then(
          (r) => r.requested && faults.record(r.latencyUs),
          () => undefined,
        ),
      );
      if (pending.length >= 16) await Promise.all(pending.splice(0)); // a few vCPUs' worth of outstanding faults
    }
    await Promise.all(pending);
  })();
});
try {
  const result = await dst.done;
  await running;
  port.postMessage({
    type: 'done',
    postcopy: result.postcopy,
    faults: faults.summary(),
    returnPathBytes: result.stats.channels.main?.bytesSent ?? 0,
    blocks: [...sink.blocks].map(([name, buf]) => [name, buf.buffer]),
    threads: result.stats.threads,
  });
} catch (e) {
  port.postMessage({ type: 'failed', message: e instanceof Error ? e.message : String(e) });
}
