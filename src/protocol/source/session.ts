import { EventEmitter } from 'node:events';
import { usageError } from '../../errors.js';
import { MigrationError, abortError, type MigrationPhase } from '../errors.js';
import { completePrecopy, switchToPostcopy } from './switchover.js';
import { finish, waitForShut } from './completion.js';
import { sourceUnsentBytes, validateSourceOptions, type SourceOptions } from './options.js';
import { runPostcopy } from './postcopy.js';
import { runPrecopy } from './precopy.js';
import { SourceRun } from './run.js';
import { runSetup } from './setup.js';
import type { SourceStats } from './stats.js';

export type { DeviceStateSection, SourceOptions } from './options.js';
export type { AnswerReason, RequestsAnswered, SourceStats } from './stats.js';
export type { SourceState } from './state.js';
export type { SourceEvents } from './events.js';
import type { SourceEvents } from './events.js';

/**
 * The sending half of a migration (QEMU's source), into a QEMU 10.0
 * destination or our own DestinationSession. Precopy passes over dirty pages,
 * then either completion (stop, last dirty pages, device state, EOF) or the
 * postcopy switch in QEMU 10.0's order (SWITCHOVER_START, discards, PING,
 * PACKAGED with LISTEN + devices + PING + RUN, remaining pages exactly once,
 * END, EOF). Page requests are answered on the preempt channel when there is
 * one, otherwise first thing at the next record boundary on the main channel.
 */
export class SourceSession extends EventEmitter<SourceEvents> {
  readonly done: Promise<SourceStats>;
  private resolveDone!: (s: SourceStats) => void;
  private rejectDone!: (e: MigrationError) => void;
  private readonly run: SourceRun;
  /** start() was called: a second call is misuse. */
  private started = false;
  /** Settles when the migration's steps have ended (close() waits for it). */
  private ran: Promise<unknown> = Promise.resolve();
  private readonly onAbort = () => this.run.fail(abortError(this.opts.signal!, this.run.phase));

  constructor(private readonly opts: SourceOptions) {
    super();
    validateSourceOptions(opts);
    this.done = new Promise((resolve, reject) => {
      this.resolveDone = resolve;
      this.rejectDone = reject;
    });
    this.done.catch(() => undefined);
    const policy = opts.postcopy ?? 'never';
    if (opts.preempt && policy === 'never') throw new TypeError('preempt needs a postcopy policy other than "never"');
    // Pages go out by reference: a source that recycles its buffers must outlast what we may hold unsent.
    const unsent = sourceUnsentBytes(opts);
    if (opts.memory.reuseAfterBytes !== undefined && unsent > opts.memory.reuseAfterBytes / 2) {
      const what = opts.multifd ? `the main and ${opts.multifd.channels} multifd channels` : 'the main channel';
      throw new TypeError(`the guest-memory source recycles its buffers after ${opts.memory.reuseAfterBytes} bytes; ${what} may hold ${unsent} unsent: lower transport.main.maxQueuedBytes${opts.multifd ? ' or the multifd channels' : ''}`);
    }
    this.run = new SourceRun(opts, this);
    this.run.onFailed = (e) => {
      this.release();
      if (this.listenerCount('failed') > 0) this.emit('failed', e);
      this.rejectDone(e);
    };
  }

  /** Connects and runs the migration; the same as awaiting `done` after `start()`. */
  static async migrate(opts: SourceOptions): Promise<SourceStats> {
    const s = new SourceSession(opts);
    s.start();
    return s.done;
  }

  /**
   * Starts the migration in the background; follow it with events and `done`.
   * Throws (an Error with code 'already-started') when called again or after
   * `cancel()`/`close()`, as `server.listen()` twice does.
   */
  start(): this {
    if (this.started) throw usageError('state', 'already-started', 'start', 'start() was already called on this SourceSession');
    if (this.run.over) throw usageError('state', 'already-started', 'start', 'this SourceSession was cancelled before it started');
    this.started = true;
    const signal = this.opts.signal;
    if (signal?.aborted) {
      this.run.fail(abortError(signal, this.run.phase));
      return this;
    }
    signal?.addEventListener('abort', this.onAbort, { once: true });
    this.ran = this.steps().then(
      (stats) => {
        this.emit('completed', stats);
        this.resolveDone(stats);
      },
      (e: unknown) => this.run.fail(MigrationError.from(e, this.run.phase)),
    );
    this.ran.finally(() => this.release()).catch(() => undefined);
    return this;
  }

  /** The sequence: setup, precopy, then completion or the postcopy switch and postcopy. */
  private async steps(): Promise<SourceStats> {
    const run = this.run;
    await runSetup(run);
    const next = await runPrecopy(run);
    if (next === 'postcopy') {
      await switchToPostcopy(run);
      await runPostcopy(run);
    } else {
      try {
        await completePrecopy(run);
      } catch (e) {
        // SHUT 0 came before a flush was answered (the destination closed at once): completed all the same.
        if (!run.destinationCompleted) throw e;
      }
      run.state = { kind: 'completing', postcopy: false };
      await waitForShut(run);
    }
    return finish(run);
  }

  /**
   * Switch to postcopy at the next record boundary. Callable at any moment,
   * from any async context; a no-op once postcopy is active.
   */
  startPostcopy(): void {
    if ((this.opts.postcopy ?? 'never') === 'never') throw new MigrationError('protocol', this.run.phase, 'postcopy is not enabled for this migration (policy "never")');
    this.run.postcopyRequested = true;
  }

  get currentPhase(): MigrationPhase {
    return this.run.phase;
  }

  stats(): SourceStats {
    return this.run.stats();
  }

  /**
   * Postcopy recovery: connect to `to` from now on (a destination's
   * `migrate-recover` address) and try at once if paused — the end of the
   * hold after `pause()`, or of the backoff wait after a failure. A no-op
   * when not paused.
   */
  resume(to?: string): void {
    const run = this.run;
    if (to !== undefined) run.recoverTo = to;
    if (run.state.kind === 'paused' && run.state.hold) run.state = { ...run.state, hold: false };
    run.wakeRecovery?.();
  }

  /**
   * Forces the paused state now, as QEMU's `migrate-pause`: for an operator
   * who knows the link is dead (or wants to move the destination). The
   * connection is dropped, every page and request state kept, and — unlike a
   * pause the session detected itself — no reconnection is attempted until
   * `resume(uri?)` (QEMU's `migrate … resume=true`); after that, failed
   * attempts are retried with backoff as usual. Called while already paused,
   * it stops the automatic retries until `resume()`.
   *
   * @throws MigrationError `invalid-state` (synchronously) outside postcopy,
   *   with `recovery: false`, or once the migration has ended.
   */
  pause(): void {
    const run = this.run;
    if (run.over || !run.canRecover()) {
      const why = run.over ? 'the migration is over' : this.opts.recovery === false ? 'postcopy recovery is off (recovery: false)' : 'postcopy has not started';
      throw new MigrationError('invalid-state', run.phase, `pause() needs a running postcopy migration: ${why}`);
    }
    run.enterPause(run.pausedBy ?? new MigrationError('paused', run.phase, 'paused by the operator (pause())'), true);
  }

  /**
   * Aborts the migration (the destination sees the connection drop): `done`
   * rejects with 'cancelled'. Resolves once the session has let go of every
   * socket and timer (while connecting, at most `transport.connectTimeoutMs`
   * later). After completion it only waits for that. The same as `close()`.
   */
  async cancel(): Promise<void> {
    this.run.fail(new MigrationError('cancelled', this.run.phase, 'the migration was cancelled'));
    await this.ran.catch(() => undefined);
    this.release();
  }

  /** The same as `cancel()` (one name for both sessions: `close()`, as sockets and servers). */
  close(): Promise<void> {
    return this.cancel();
  }

  /** `await using src = new SourceSession(…)`: cancelled (if still running) when the scope ends. */
  async [Symbol.asyncDispose](): Promise<void> {
    await this.cancel();
  }

  /** Drops the signal listener and the link's watchdog: nothing of ours outlives the session. */
  private release(): void {
    this.opts.signal?.removeEventListener('abort', this.onAbort);
    this.run.link?.quiet();
  }
}
