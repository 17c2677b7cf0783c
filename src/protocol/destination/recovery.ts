import { MigrationListener, type ListenOptions, type TransportOptions } from '../../transport/connection.js';
import { TransportError } from '../../transport/errors.js';
import { MigrationError, type MigrationPhase } from '../errors.js';

/**
 * Postcopy recovery on the destination (QEMU's postcopy-paused →
 * postcopy-recover → postcopy-active): the outage's clock and timeout, and
 * the listener that waits for the source's new connection.
 */
export class Outage {
  /** performance.now() of the failure that ended postcopy-active. */
  readonly since: number;
  private timer: NodeJS.Timeout | undefined;

  /**
   * `timeoutMs`: fail (`onTimeout`) when no recovery has completed this long
   * after the pause. A manual pause that nobody resumes ends as a timeout, not
   * as 'paused'.
   */
  constructor(
    readonly error: MigrationError,
    since: number,
    timeoutMs: number | undefined,
    onTimeout: (e: MigrationError) => void,
  ) {
    this.since = since;
    if (timeoutMs !== undefined) {
      const code = error.code === 'paused' ? 'idle-timeout' : error.code;
      this.timer = setTimeout(
        () => onTimeout(new MigrationError(code, error.phase, `no postcopy recovery within ${timeoutMs} ms of the pause (${error.reason})`, { cause: error })),
        timeoutMs,
      );
    }
  }

  /** Recovered, or the session ended. */
  end(): void {
    clearTimeout(this.timer);
  }
}

/**
 * Listens for the recovery connection at `uri` (its first bytes are a
 * command, not a stream header). The listener just closed may hold the port
 * a moment: address-in-use is retried briefly.
 */
export async function listenForRecovery<L = MigrationListener>(
  uri: string,
  transport: TransportOptions,
  listen: (uri: string, transport: TransportOptions, opts: ListenOptions) => Promise<L> = (u, t, o) => MigrationListener.listen(u, t, o) as Promise<L>,
): Promise<L> {
  for (let i = 0; ; i++) {
    try {
      return await listen(uri, transport, { start: 'resume' });
    } catch (e) {
      if (i >= 20 || !(e instanceof TransportError && e.code === 'address-in-use')) throw e;
      await new Promise((r) => setTimeout(r, 50));
    }
  }
}

/** RECV_BITMAP and POSTCOPY_RESUME belong to a recovery connection only. */
export function requireRecovering(recovering: boolean, what: string, phase: MigrationPhase): void {
  if (!recovering) throw new MigrationError('protocol', phase, `${what} outside a postcopy recovery`);
}
