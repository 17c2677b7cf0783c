/**
 * `qmt tap` in a child process of its own (`node --import tsx
 * bench/lib/tap-peer.ts`), so that its event loop competes with neither
 * migrating side: one session, plain TCP, every answered request's latency
 * kept for the CDF (the report itself has percentiles only).
 */
import { startTap, type Tap, type TapReport } from '../../src/protocol/tap/index.js';
import { serve } from './child-server.js';

export type TapCommand = { cmd: 'tap-start'; listen: string; to: string } | { cmd: 'tap-wait'; timeoutMs: number };

export interface TapRun {
  report: TapReport;
  /** Request (last byte at the tap) → page (last byte at the tap), µs, per answered request. */
  samplesUs: number[];
}

let tap: Tap | undefined;
const samplesUs: number[] = [];

async function start(c: Extract<TapCommand, { cmd: 'tap-start' }>): Promise<{ uri: string }> {
  if (tap) throw new Error('a tap is running');
  tap = await startTap({ listen: c.listen, to: c.to });
  tap.on('page-answered', (a) => {
    if (a.session === 1) samplesUs.push(Math.round(a.latencyUs));
  });
  return { uri: tap.uri };
}

async function wait(c: Extract<TapCommand, { cmd: 'tap-wait' }>): Promise<TapRun> {
  const t = tap;
  if (!t) throw new Error('tap-start first');
  let timer: NodeJS.Timeout | undefined;
  try {
    const report = await Promise.race([
      t.sessionEnd(1),
      new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`tap: session still open after ${c.timeoutMs} ms`)), c.timeoutMs))),
    ]);
    return { report, samplesUs };
  } finally {
    clearTimeout(timer);
    await t.close();
  }
}

serve(
  'tap',
  {
    'tap-start': (c) => start(c as Extract<TapCommand, { cmd: 'tap-start' }>),
    'tap-wait': (c) => wait(c as Extract<TapCommand, { cmd: 'tap-wait' }>),
  },
  () => void tap?.close(),
);
