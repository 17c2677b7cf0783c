/**
 * A worker entry that exercises the thread infrastructure from the other
 * side: fills a ring, sets bits of a shared bitmap, serves a transferred
 * socket. The tests spawn it (from source and from the build) to check
 * spawnWorker, AtomicRing and PageBitmap's atomic shared mode across real
 * threads; it does nothing a session needs.
 */
import type net from 'node:net';
import { parentPort, workerData } from 'node:worker_threads';
import { PageBitmap } from '../../stream/bitmap.js';
import { AtomicRing } from './ring.js';

export type SelftestTask =
  | { task: 'echo'; value: unknown }
  | { task: 'ring-produce'; sab: SharedArrayBuffer; count: number }
  | { task: 'ring-consume'; sab: SharedArrayBuffer }
  | { task: 'bitmap-set'; sab: SharedArrayBuffer; pages: number; parity: 0 | 1; control: SharedArrayBuffer }
  | { task: 'socket'; socket: net.Socket; reply: string };

async function run(t: SelftestTask): Promise<unknown> {
  switch (t.task) {
    case 'echo':
      return t.value;
    case 'ring-produce': {
      // Entry i is [i, 2i, -i]: the consumer checks order and content.
      const ring = AtomicRing.attach(t.sab);
      const e = new Float64Array(3);
      for (let i = 0; i < t.count; ) {
        e[0] = i;
        e[1] = 2 * i;
        e[2] = -i;
        if (ring.push(e)) i++;
        else await ring.room();
      }
      ring.close();
      return t.count;
    }
    case 'ring-consume': {
      const ring = AtomicRing.attach(t.sab);
      const e = new Float64Array(3);
      let n = 0;
      let sum = 0;
      for (;;) {
        while (ring.pop(e)) {
          if (e[0] !== n || e[1] !== 2 * n || e[2] !== -n) throw new Error(`entry ${n} is [${e.join(', ')}]`);
          sum += e[0];
          n++;
        }
        if (ring.closed && ring.length === 0) return { n, sum };
        await ring.wait();
      }
    }
    case 'bitmap-set': {
      // Sets every page of one parity, round after round, until told to stop (control[0]), while the
      // other thread clears the other parity; control[1] says it started (both then run at once).
      const bm = PageBitmap.attach(t.pages, t.sab);
      const control = new Int32Array(t.control);
      Atomics.store(control, 1, 1);
      let rounds = 0;
      while (Atomics.load(control, 0) === 0) {
        for (let p = t.parity; p < t.pages; p += 2) bm.set(p);
        rounds++;
      }
      return rounds;
    }
    case 'socket': {
      const s = t.socket;
      await new Promise<void>((resolve, reject) => {
        s.once('error', reject);
        s.once('data', (d: Buffer) => s.end(`${t.reply}:${d.toString()}`, resolve));
      });
      s.destroy();
      return 'served';
    }
  }
}

const port = parentPort!;
port.on('message', (t: SelftestTask) => {
  run(t).then(
    (result) => port.postMessage({ ok: true, result }),
    (e: unknown) => port.postMessage({ ok: false, error: String(e) }),
  );
});
// Ready once the message handler is in place (and with the first task, if given at start).
if (workerData) port.emit('message', workerData as SelftestTask);
