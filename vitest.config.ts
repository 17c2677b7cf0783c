import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    testTimeout: 120_000,
    hookTimeout: 120_000,
    // QEMU interop tests start real processes; keep them from competing for the 2 cores.
    fileParallelism: true,
    maxWorkers: 2,
  },
});
