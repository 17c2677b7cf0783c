import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { Worker, type TransferListItem } from 'node:worker_threads';

/**
 * Starts a worker thread on one of the library's worker entries. `entry` is
 * the module's path under `src` without extension, e.g.
 * `'protocol/source/threads/main-worker'`; every such entry is also an entry
 * of tsup.config.ts, built to the same path under `dist`.
 *
 * Running from source (vitest, tsx) this file is a .ts file: the worker then
 * registers tsx itself before it imports the .ts entry (a worker does not
 * inherit the parent's loader), found from here rather than from the
 * working directory (which may have no node_modules). Built, the bundle that
 * holds this code may be `dist/index.js`, `dist/index.cjs` or
 * `dist/cli/main.js`: the entry is looked up from the bundle's directory
 * upwards. `transfer` goes with `data` (sockets, MessagePorts).
 */
export function spawnWorker(entry: string, data: unknown, transfer: readonly TransferListItem[] = []): Worker {
  const self = import.meta.url;
  const opts = { workerData: data, transferList: [...transfer] };
  if (self.endsWith('.ts')) {
    const file = new URL(`../../${entry}.ts`, self).href;
    const tsxApi = pathToFileURL(join(dirname(createRequire(self).resolve('tsx/package.json')), 'dist', 'esm', 'api', 'index.mjs')).href;
    const boot = `import(${JSON.stringify(tsxApi)}).then((api) => { api.register(); return import(${JSON.stringify(file)}); });`;
    return new Worker(boot, { ...opts, eval: true });
  }
  return new Worker(builtEntry(entry, fileURLToPath(self)), opts);
}

function builtEntry(entry: string, bundle: string): string {
  let dir = dirname(bundle);
  for (let up = 0; up < 4; up++) {
    const candidate = join(dir, `${entry}.js`);
    if (existsSync(candidate)) return candidate;
    dir = dirname(dir);
  }
  throw new Error(`worker entry ${entry}.js not found near ${bundle} (is it an entry of tsup.config.ts?)`);
}
