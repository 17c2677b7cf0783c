import { defineConfig } from 'tsup';

export default defineConfig([
  {
    entry: { index: 'src/index.ts' },
    format: ['esm', 'cjs'],
    dts: true,
    sourcemap: true,
    clean: true,
    target: 'node22',
    // import.meta.url in the CJS build (the sockopt addon and the OpenSSL configuration are found relative to it).
    shims: true,
    // Class names are API (errors are told apart by `name` in logs and by users): keep them under any minification.
    keepNames: true,
  },
  {
    // demo-destination is the worker thread of `qmt demo`: its own file, loaded by URL.
    entry: { 'cli/main': 'src/cli/main.ts', 'cli/demo-destination': 'src/cli/demo-destination.ts' },
    format: ['esm'],
    sourcemap: true,
    target: 'node22',
    banner: { js: '#!/usr/bin/env node' },
  },
  {
    // Worker threads (src/transport/worker/spawn.ts): each its own file at its path under src, loaded by path.
    entry: {
      'transport/worker/selftest-worker': 'src/transport/worker/selftest-worker.ts',
      'protocol/destination/threads/channel-worker': 'src/protocol/destination/threads/channel-worker.ts',
      'protocol/source/threads/main-worker': 'src/protocol/source/threads/main-worker.ts',
      'protocol/source/threads/preempt-worker': 'src/protocol/source/threads/preempt-worker.ts',
      'protocol/source/threads/multifd-worker': 'src/protocol/source/threads/multifd-worker.ts',
    },
    format: ['esm'],
    sourcemap: true,
    target: 'node22',
    keepNames: true,
  },
]);
