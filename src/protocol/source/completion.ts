import { performance } from 'node:perf_hooks';
import type { SourceRun } from './run.js';
import type { SourceStats } from './stats.js';

/** Completion: the destination answers SHUT 0 once it has everything. */
export async function waitForShut(run: SourceRun): Promise<void> {
  const link = run.live;
  await link.waitFor('SHUT', () => link.shut === 0, { deliveredIsProgress: true });
}

/** The end of a migration that succeeded: from here on the destination may close first. */
export async function finish(run: SourceRun): Promise<SourceStats> {
  const link = run.live;
  run.state = { kind: 'completed' };
  run.stallWatch.stop();
  link.quiet();
  run.t.endedAt = performance.now();
  if (run.t.downtimeMs === undefined && run.t.stoppedAt !== undefined) run.t.downtimeMs = Math.round(run.t.endedAt - run.t.stoppedAt);
  await link.close();
  return run.stats();
}
