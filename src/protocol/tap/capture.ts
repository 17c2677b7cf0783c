/**
 * `qmt tap --capture DIR`: every direction of every connection of a session
 * written to its own file, byte for byte as forwarded —
 * `session-N-main.bin`, `session-N-return-path.bin`, `session-N-preempt.bin`,
 * `session-N-multifd-K.bin` (K: the K-th multifd connection of the session,
 * 0-based; its channel id is in the report) — the form `qmt inspect` reads.
 * A file is created with its first byte (QEMU never writes on the reverse
 * direction of preempt and multifd connections: no file for them).
 *
 * A capture never changes the relay: a file that cannot be written is
 * reported (its `error`) and left behind, the forwarding goes on. A disk
 * slower than the migration holds the forwarding back (see `write`), so the
 * tap's memory stays bounded.
 */
import { createWriteStream, type WriteStream } from 'node:fs';
import { join } from 'node:path';

/** One capture file in the report. */
export interface CaptureFileReport {
  /** `main`, `return-path`, `preempt`, `multifd-0`, … */
  name: string;
  path: string;
  /** Bytes handed to the file. */
  bytes: number;
  /** Why the file stopped being written (the relay went on), else null. */
  error: { code: string; message: string } | null;
}

/** Bytes a capture file may hold in memory before the forwarding waits for the disk. */
const HIGH_WATER_BYTES = 4 * 1024 * 1024;

class CaptureFile {
  private stream: WriteStream | undefined;
  bytes = 0;
  error: CaptureFileReport['error'] = null;
  private closed: Promise<void> | undefined;

  constructor(
    readonly name: string,
    readonly path: string,
  ) {}

  /** Appends a chunk; returns a promise when the file is full (the caller waits for it before reading more). */
  write(chunk: Uint8Array): Promise<void> | undefined {
    if (this.error || this.closed) return undefined;
    if (!this.stream) {
      const s = createWriteStream(this.path, { highWaterMark: HIGH_WATER_BYTES });
      s.on('error', (e: NodeJS.ErrnoException) => {
        this.error ??= { code: e.code ?? 'EIO', message: e.message };
        s.destroy();
      });
      this.stream = s;
    }
    this.bytes += chunk.length;
    const s = this.stream;
    if (s.write(chunk)) return undefined;
    return new Promise<void>((resolve) => {
      const done = (): void => {
        s.off('drain', done);
        s.off('close', done);
        resolve();
      };
      s.on('drain', done);
      s.on('close', done);
    });
  }

  close(): Promise<void> {
    this.closed ??= new Promise<void>((resolve) => {
      const s = this.stream;
      if (!s || s.destroyed) return resolve();
      s.end(() => resolve());
      s.once('close', () => resolve());
    });
    return this.closed;
  }

  report(): CaptureFileReport {
    return { name: this.name, path: this.path, bytes: this.bytes, error: this.error ? { ...this.error } : null };
  }
}

/** The capture files of one session. */
export class SessionCapture {
  private readonly files = new Map<string, CaptureFile>();

  constructor(
    readonly dir: string,
    readonly session: number,
  ) {}

  /** Appends to file `name` (created at its first byte); a promise while the file is full. */
  write(name: string, chunk: Uint8Array): Promise<void> | undefined {
    let f = this.files.get(name);
    if (!f) {
      f = new CaptureFile(name, join(this.dir, `session-${this.session}-${name}.bin`));
      this.files.set(name, f);
    }
    return f.write(chunk);
  }

  /** Flushes and closes every file. */
  async close(): Promise<void> {
    await Promise.all([...this.files.values()].map((f) => f.close()));
  }

  report(): { dir: string; files: CaptureFileReport[] } {
    return { dir: this.dir, files: [...this.files.values()].map((f) => f.report()) };
  }
}
