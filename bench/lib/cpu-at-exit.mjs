// Preloaded (`node --import`) into the built `qmt` by bench/lib/qmt-cli.ts: at
// exit, the process's own CPU time (process.cpuUsage: every thread, the libuv
// pool's file I/O included) goes to QMT_BENCH_CPU_DIR/cpu-<pid>.json. A
// process that re-runs itself (`qmt receive --tls`) passes its execArgv on, so
// the child writes a file of its own; the reader sums them.
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import process from 'node:process';

const dir = process.env.QMT_BENCH_CPU_DIR;
if (dir) {
  process.on('exit', () => {
    const u = process.cpuUsage();
    try {
      writeFileSync(join(dir, `cpu-${process.pid}.json`), JSON.stringify({ pid: process.pid, userUs: u.user, systemUs: u.system }));
    } catch {
      // the benchmark reports the figure as missing
    }
  });
}
