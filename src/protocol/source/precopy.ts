import { performance } from 'node:perf_hooks';
import { TARGET_PAGE_SIZE } from '../../stream/constants.js';
import { autoWantsPostcopy } from '../postcopy-policy.js';
import { sendPass } from './pass.js';
import type { SourceRun } from './run.js';

/**
 * Precopy: passes over the dirty pages while the VM runs, until the rest
 * fits the downtime limit (→ 'complete'), the policy or the caller asks for
 * postcopy (→ 'postcopy'), or `maxPasses` is reached (→ 'complete').
 */
export async function runPrecopy(run: SourceRun): Promise<'complete' | 'postcopy'> {
  const o = run.opts;
  const policy = o.postcopy ?? 'never';
  const ram = run.ram;
  let previousDirty = ram.totalPages;
  // { afterPasses: 0 }: postcopy from the start (a lazy restore: the VM runs at once).
  if (typeof policy === 'object' && policy.afterPasses === 0) return 'postcopy';
  for (;;) {
    run.state = { kind: 'precopy', pass: run.c.passes + 1 };
    const passStart = performance.now();
    const bytesBefore = run.c.transferred;
    const sent = await sendPass(run, { precopy: true, kind: 'part' });
    if (run.postcopyRequested) return 'postcopy';
    run.c.passes++;
    ram.syncDirty();
    run.c.syncs++;
    const dirty = ram.dirtyPages();
    const durationMs = performance.now() - passStart;
    const bytes = run.c.transferred - bytesBefore;
    run.emit('pass', { pass: run.c.passes, pagesSent: sent, bytes, dirtyPages: dirty, durationMs });
    const bandwidth = bytes / Math.max(1, durationMs); // bytes per ms
    const expectedDowntimeMs = (dirty * TARGET_PAGE_SIZE) / Math.max(1, bandwidth);
    const downtimeLimitMs = o.downtimeLimitMs ?? 300;
    // { afterPasses: N } switches after N passes even when precopy could finish:
    // the caller asked for postcopy at that point (the VM runs sooner at the destination).
    if (typeof policy === 'object' && run.c.passes >= policy.afterPasses) return 'postcopy';
    if (dirty === 0 || expectedDowntimeMs <= downtimeLimitMs) return 'complete';
    if (policy === 'auto' && autoWantsPostcopy({ passes: run.c.passes, dirtyPages: dirty, previousDirtyPages: previousDirty, expectedDowntimeMs, downtimeLimitMs })) return 'postcopy';
    if (run.postcopyRequested) return 'postcopy';
    if (o.maxPasses !== undefined && run.c.passes >= o.maxPasses) return 'complete';
    previousDirty = dirty;
  }
}
