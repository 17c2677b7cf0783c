import { performance } from 'node:perf_hooks';
import type { StreamRecord } from '../../stream/records.js';
import { MigrationError } from '../errors.js';
import { applyReceivedBitmap, isNetworkFailure, retryDelayMs } from '../recovery.js';
import type { SourceRun } from './run.js';
import { attachLink, connectSource } from './setup.js';
import { tunePostcopyLink } from './switchover.js';

/** pause() was called and resume() not yet: no attempt until then (QEMU's source waits for `migrate resume=true`). */
export function isHeld(run: SourceRun): boolean {
  return run.state.kind === 'paused' && run.state.hold;
}

/**
 * Reconnects until a recovery exchange completes (or the migration is
 * cancelled, or attempts run out). 'completed': the destination had
 * completed meanwhile and said so (SHUT 0) instead of resuming.
 */
export async function recover(run: SourceRun): Promise<'resumed' | 'completed'> {
  const opts = run.opts.recovery || {};
  let last: MigrationError = run.pausedBy!;
  for (let attempt = 1; ; attempt++) {
    run.check();
    if (isHeld(run)) {
      // Paused by the operator: the first attempt comes with resume().
      await holdUntilResume(run);
      run.check();
      attempt = 1;
    }
    if (attempt > 1) {
      if (opts.maxAttempts !== undefined && attempt > opts.maxAttempts) {
        const e = new MigrationError(last.code, 'postcopy', `postcopy recovery gave up after ${opts.maxAttempts} attempts; the last: ${last.reason}`, { cause: last });
        run.fail(e);
        throw e;
      }
      await sleepUnlessWoken(run, retryDelayMs(attempt, opts));
      run.check();
      if (isHeld(run)) {
        attempt = 0; // pause() while waiting: hold from the next turn
        continue;
      }
    }
    const to = run.recoverTo ?? opts.to ?? run.opts.to;
    run.emit('recovering', { attempt, to });
    try {
      return await reconnect(run, to);
    } catch (e) {
      run.check();
      last = MigrationError.from(e, 'postcopy');
      // pause() during the attempt: back to the hold (whatever the attempt ended with).
      if (isHeld(run)) continue;
      if (!isNetworkFailure(last)) {
        run.fail(last);
        throw last;
      }
      // The new connection failed too: paused again (QEMU: back to postcopy-paused).
      run.enterPause(last, false);
    }
  }
}

/**
 * One recovery exchange on a new link (QEMU 10.0's order): RECV_BITMAP for
 * every block back to back, their bitmaps back, the new preempt channel,
 * POSTCOPY_RESUME, RESUME_ACK.
 */
async function reconnect(run: SourceRun, to: string): Promise<'resumed' | 'completed'> {
  const conn = await connectSource(run, to);
  const paused = run.state;
  if (run.over || isHeld(run) || paused.kind !== 'paused') {
    conn.destroy();
    throw run.failure ?? run.pausedBy ?? new MigrationError('peer-disconnected', 'postcopy', 'the recovery was abandoned');
  }
  const link = attachLink(run, conn);
  run.state = { kind: 'recovering', since: paused.since };
  // New channels: the first page on each names its block again.
  run.enc.resetContinue();
  run.preemptEnc.resetContinue();
  const blocks = run.ram.blocks;
  run.write(blocks.map((st): StreamRecord => ({ type: 'command', command: { cmd: 'recv-bitmap', block: st.info.idstr } })));
  await run.flushMain();
  // A destination that completed while we were paused (our SHUT 0 was lost with the link) answers SHUT 0 instead.
  await link.waitFor('received bitmap', () => link.shut === 0 || blocks.every((st) => link.recvBitmaps.has(st.info.idstr)));
  if (link.shut === 0) return completedMeanwhile(run);
  for (const st of blocks) applyReceivedBitmap(st.info.idstr, st.pages, link.recvBitmaps.get(st.info.idstr)!, st.toSend, st.sentAfterListen);
  // A page answered on preempt that did not arrive goes again (maybe on main): it is no longer a preempt answer.
  for (const st of blocks) {
    const a = st.sentOnPreempt.words;
    const b = st.sentAfterListen.words;
    for (let i = 0; i < a.length; i++) a[i]! &= b[i] as number;
  }
  if (run.opts.preempt) {
    await link.connectPreempt();
    run.check();
  }
  run.write([{ type: 'command', command: { cmd: 'postcopy-resume' } }]);
  await run.flushMain();
  await link.waitFor('RESUME_ACK', () => link.resumeAcked);
  tunePostcopyLink(run);
  run.state = { kind: 'postcopy' };
  run.c.recoveries++;
  run.pacer.reset();
  run.emit('resumed', { recoveries: run.c.recoveries, pausedMs: performance.now() - paused.since });
  return 'resumed';
}

/**
 * SHUT 0 on a recovery connection: the destination has every page and has
 * ended (it read our EOF before the link was lost, and its SHUT 0 was lost
 * with it). Only a source that had sent everything can be told so.
 */
function completedMeanwhile(run: SourceRun): 'completed' {
  const unsent = run.ram.remainingBytes();
  if (unsent > 0) throw new MigrationError('protocol', 'postcopy', `the destination says it completed (SHUT 0 on a recovery connection), but ${unsent} bytes of RAM were never sent to it`);
  run.state = { kind: 'completing', postcopy: true };
  return 'completed';
}

/** After pause(): waits for resume() (or the migration's end). */
async function holdUntilResume(run: SourceRun): Promise<void> {
  // A held migration is not over, but no socket or timer is left to say so: without this
  // the process would exit under a caller awaiting `done`.
  const alive = setInterval(() => undefined, 1 << 30);
  try {
    while (isHeld(run) && !run.over) {
      await new Promise<void>((resolve) => {
        run.wakeRecovery = () => {
          run.wakeRecovery = undefined;
          resolve();
        };
      });
    }
  } finally {
    clearInterval(alive);
  }
}

function sleepUnlessWoken(run: SourceRun, ms: number): Promise<void> {
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      run.wakeRecovery = undefined;
      resolve();
    };
    const timer = setTimeout(done, ms);
    run.wakeRecovery = done;
  });
}
