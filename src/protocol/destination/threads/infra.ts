/**
 * Stand-ins for the shared thread infrastructure (src/transport/worker/, by
 * threads-src) until it lands: the same names and signatures as contract C,
 * so that switching is an import change. Only what the destination needs.
 */
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { Worker } from 'node:worker_threads';

export type ThreadMode = 'auto' | 'on' | 'off';

let supported: boolean | undefined;

/** Node ≥ 26.6 passes a fresh net.Socket to a worker in postMessage's transfer list (older Node refuses it). */
export function socketTransferSupported(): boolean {
  if (supported === undefined) {
    const [major, minor] = process.versions.node.split('.').map(Number) as [number, number];
    supported = major > 26 || (major === 26 && minor >= 6);
  }
  return supported;
}

/**
 * Starts the worker whose entry is `url` (a module next to the caller): the
 * built .js file in dist, or under tsx the .ts file when running from source
 * (vitest), registered inside the worker (as src/cli/demo.ts does).
 */
export function spawnWorker(url: URL, data: unknown): Worker {
  const file = url.href;
  if (!file.endsWith('.ts')) return new Worker(url, { workerData: data });
  const tsxApi = pathToFileURL(join(dirname(createRequire(import.meta.url).resolve('tsx/package.json')), 'dist', 'esm', 'api', 'index.mjs')).href;
  const boot = `import(${JSON.stringify(tsxApi)}).then((api) => { api.register(); return import(${JSON.stringify(file)}); });`;
  return new Worker(boot, { eval: true, workerData: data });
}

type WaitAsync = (a: Int32Array, index: number, value: number, timeoutMs?: number) => { async: false; value: string } | { async: true; value: Promise<string> };
/** Atomics.waitAsync (ES2024; the library's lib setting predates it). */
export const waitAsync = (Atomics as unknown as { waitAsync: WaitAsync }).waitAsync;

/** Resolves once `a[index]` is no longer `value` (or at once when it already is not). */
export function whenChanged(a: Int32Array, index: number, value: number): Promise<void> {
  const w = waitAsync(a, index, value);
  return w.async ? w.value.then(() => undefined) : Promise.resolve();
}

const HEAD = 0;
const TAIL = 1;
const CLOSED = 2;
const HEADER_WORDS = 4;

/**
 * Single-producer single-consumer ring of fixed-size entries (numbers) in a
 * SharedArrayBuffer: the producer pushes and notifies, the consumer pops and
 * waits with Atomics.waitAsync — no MessagePort message per entry.
 */
export class AtomicRing {
  private readonly ctl: Int32Array;
  private readonly slots: Float64Array;
  private readonly entries: number;
  private readonly entryWords: number;

  private constructor(readonly sab: SharedArrayBuffer) {
    this.ctl = new Int32Array(sab, 0, HEADER_WORDS);
    this.entries = this.ctl[3]! >>> 16;
    this.entryWords = this.ctl[3]! & 0xffff;
    this.slots = new Float64Array(sab, HEADER_WORDS * 4, this.entries * this.entryWords);
  }

  static create(entries: number, entryWords: number): AtomicRing {
    const sab = new SharedArrayBuffer(HEADER_WORDS * 4 + entries * entryWords * 8);
    new Int32Array(sab, 0, HEADER_WORDS)[3] = (entries << 16) | entryWords;
    return new AtomicRing(sab);
  }

  static attach(sab: SharedArrayBuffer): AtomicRing {
    return new AtomicRing(sab);
  }

  /** False when full (or closed). */
  push(entry: ArrayLike<number>): boolean {
    const c = this.ctl;
    if (Atomics.load(c, CLOSED) !== 0) return false;
    const tail = Atomics.load(c, TAIL);
    if (tail - Atomics.load(c, HEAD) >= this.entries) return false;
    const at = (tail % this.entries) * this.entryWords;
    for (let i = 0; i < this.entryWords; i++) this.slots[at + i] = entry[i] ?? 0;
    Atomics.store(c, TAIL, tail + 1);
    Atomics.notify(c, TAIL);
    return true;
  }

  /** False when empty. */
  pop(out: Float64Array | Int32Array): boolean {
    const c = this.ctl;
    const head = Atomics.load(c, HEAD);
    if (head === Atomics.load(c, TAIL)) return false;
    const at = (head % this.entries) * this.entryWords;
    for (let i = 0; i < this.entryWords; i++) out[i] = this.slots[at + i]!;
    Atomics.store(c, HEAD, head + 1);
    return true;
  }

  /** Resolves once an entry may be there (or the ring is closed). */
  wait(): Promise<void> {
    const c = this.ctl;
    const tail = Atomics.load(c, TAIL);
    if (tail !== Atomics.load(c, HEAD) || Atomics.load(c, CLOSED) !== 0) return Promise.resolve();
    return whenChanged(c, TAIL, tail);
  }

  get closed(): boolean {
    return Atomics.load(this.ctl, CLOSED) !== 0;
  }

  /** Wakes the consumer for good. */
  close(): void {
    Atomics.store(this.ctl, CLOSED, 1);
    Atomics.add(this.ctl, TAIL, 0);
    Atomics.notify(this.ctl, TAIL);
  }
}
