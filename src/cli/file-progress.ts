/**
 * Progress of a command that reads one file front to back (`qmt inspect`,
 * `qmt recode`): a bar on a TTY for a file large enough to take a while.
 */
import { Progress, PROGRESS_MODES, type ProgressMode } from './progress.js';

/** Below this size a file is read in well under a second: no bar in 'auto' mode. */
export const LARGE_FILE_BYTES = 64 * 1024 * 1024;

export { PROGRESS_MODES, type ProgressMode };

const MiB = 1024 * 1024;

export interface FileProgress {
  update(bytesRead: number): void;
  stop(): void;
}

/**
 * 'auto': a bar when stderr is a TTY and the file has at least LARGE_FILE_BYTES,
 * nothing otherwise (plain lines would only clutter a script's stderr);
 * 'bar' and 'plain' force a display, 'none' turns it off.
 */
export function fileProgress(mode: ProgressMode, sizeBytes: number, phase: string, stream: NodeJS.WritableStream & { isTTY?: boolean } = process.stderr): FileProgress {
  const resolved = mode === 'auto' ? (stream.isTTY && sizeBytes >= LARGE_FILE_BYTES ? 'bar' : 'none') : mode;
  if (resolved === 'none') return { update: () => undefined, stop: () => undefined };
  const p = new Progress({ mode: resolved, stream, unit: 'MiB', intervalMs: 2000 });
  const total = Math.max(1, Math.ceil(sizeBytes / MiB));
  return {
    // Whole MiB on the bar; the last partial one counts once the file is read.
    update: (bytes) => p.update({ phase, bytes, done: bytes >= sizeBytes ? total : Math.floor(bytes / MiB), total }),
    stop: () => p.stop(),
  };
}
