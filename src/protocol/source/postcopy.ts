import { RAM_IDSTR, RAM_VERSION } from '../../stream/constants.js';
import { waitForShut } from './completion.js';
import { sendPass } from './pass.js';
import { recover } from './recovery.js';
import type { SourceRun } from './run.js';

/**
 * Postcopy: the rest of RAM in the background (requests overtake it), END,
 * EOF, and the destination's SHUT. A network failure on the way pauses; the
 * loop then recovers and sends again whatever the destination says it lacks.
 */
export async function runPostcopy(run: SourceRun): Promise<void> {
  const sectionId = run.ramSection.sectionId;
  for (;;) {
    try {
      // The destination may have completed meanwhile: it says so on the recovery connection.
      if (run.pausedBy && (await recover(run)) === 'completed') return;
      run.state = { kind: 'postcopy' };
      await sendPass(run, { precopy: false, kind: 'part' });
      // Requested pages still queued for the preempt channel go before the end of RAM.
      await run.requests.drained(run.live);
      run.check();
      run.write([{ type: 'section', kind: 'end', sectionId, idstr: RAM_IDSTR, instanceId: 0, versionId: RAM_VERSION }, { type: 'ram-eos' }, { type: 'footer', sectionId }, { type: 'eof' }]);
      const link = run.live;
      link.endSent = true;
      await run.flushMain();
      // A preempt channel that closes now is QEMU finishing (Link.endSent): SHUT on main decides.
      await Promise.all([link.main.flush(), link.preempt?.flush().catch((e: unknown) => link.preemptLost(e))]);
      run.state = { kind: 'completing', postcopy: true };
      await waitForShut(run);
      return;
    } catch (e) {
      // SHUT 0 came before the loss (QEMU closes at once; a flush of ours can fail with it): completed.
      if (run.destinationCompleted) return;
      run.pauseOrThrow(e);
    }
  }
}
