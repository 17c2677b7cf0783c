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
/** The demo guest's vCPUs at the destination: each faults on one page at a time (postcopy-blocktime counts when all 16 wait). */
const DEMO_VCPUS = 16;
const port = parentPort!;
const data = workerData as DemoDestinationData;
let touches: DemoTouches | undefined;
let touchesArrived: (() => void) | undefined;
port.on('message', (m: { type: 'touches'; touches: DemoTouches }) => {
  touches = m.touches;
  touchesArrived?.();
});

const sink = new InMemorySink({ shared: true });
const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, transport: data.transport, postcopy: data.postcopy, threads: data.threads, vcpus: DEMO_VCPUS });
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
    // DEMO_VCPUS vCPUs, each waiting on one fault at a time, take the next page of the order as they free up.
    let next = 0;
    const vcpu = async (id: number) => {
      while (next < order.length) {
        const off = order[next++]!;
        if (dst.hasPage('pc.ram', off)) continue;
        await dst.requestPage('pc.ram', off, { vcpu: id }).then(
          (r) => r.requested && faults.record(r.latencyUs),
          () => undefined,
        );
      }
    };
    await Promise.all(Array.from({ length: DEMO_VCPUS }, (_, id) => vcpu(id)));
  })();
});
try {
  const result = await dst.done;
  await running;
  port.postMessage({
    type: 'done',
    postcopy: result.postcopy,
    faults: faults.summary(),
    blocktime: { total: result.stats['postcopy-blocktime'], perVcpu: result.stats['postcopy-vcpu-blocktime'] },
    returnPathBytes: result.stats.channels.main?.bytesSent ?? 0,
    blocks: [...sink.blocks].map(([name, buf]) => [name, buf.buffer]),
    threads: result.stats.threads,
  });
} catch (e) {
  port.postMessage({ type: 'failed', message: e instanceof Error ? e.message : String(e) });
}
