/**
 * Progress of a long-running command on stderr: a cli-progress bar on a TTY,
 * plain lines otherwise (log lines as they come, plus the status at most once
 * per interval when it changed). Shared by `qmt receive` and later commands.
 */
import cliProgress from 'cli-progress';

/** 'auto': a bar when the stream is a TTY, plain lines otherwise. */
export type ProgressMode = 'auto' | 'bar' | 'plain' | 'none';

export const PROGRESS_MODES: readonly ProgressMode[] = ['auto', 'bar', 'plain', 'none'];

/** What a command is doing now. */
export interface ProgressStatus {
  /** A short word for the current step ("precopy", "postcopy", ...). */
  phase: string;
  /** Bytes moved so far. */
  bytes: number;
  /** Units of work done so far (pages). */
  done: number;
  /** Units of work expected, when known; the bar is `done / total` (capped at 100%). */
  total?: number;
  /** Free text shown after the numbers. */
  detail?: string;
}

export interface ProgressOptions {
  /** Where to write (default process.stderr). Its `isTTY` decides the 'auto' mode. */
  stream?: NodeJS.WritableStream & { isTTY?: boolean };
  /** Default 'auto'. */
  mode?: ProgressMode;
  /** Plain mode: print the status at most this often, when it changed (default 5000 ms; 0 = log lines only). */
  intervalMs?: number;
  /** Prefix of every plain line and log line (default 'qmt: '). */
  prefix?: string;
  /** Name of the `done`/`total` unit (default 'pages'). */
  unit?: string;
}

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;

/** 1536 → "1.5 KiB", 5 MiB → "5.0 MiB". */
export function formatBytes(n: number): string {
  if (n >= GiB) return `${(n / GiB).toFixed(2)} GiB`;
  if (n >= MiB) return `${(n / MiB).toFixed(1)} MiB`;
  if (n >= KiB) return `${(n / KiB).toFixed(1)} KiB`;
  return `${n} B`;
}

/** Milliseconds as "850 ms", "12.3 s", "4 min 05 s". */
export function formatDuration(ms: number): string {
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 60_000) return `${(ms / 1000).toFixed(1)} s`;
  const s = Math.round(ms / 1000);
  return `${Math.floor(s / 60)} min ${String(s % 60).padStart(2, '0')} s`;
}

/** Microseconds as "850 µs" or "12.3 ms". */
export function formatMicros(us: number): string {
  return us < 1000 ? `${Math.round(us)} µs` : `${(us / 1000).toFixed(us < 10_000 ? 2 : 1)} ms`;
}

/** Bytes per second over the last few seconds of samples. */
class RateMeter {
  private readonly samples: { t: number; bytes: number }[] = [];

  add(t: number, bytes: number): void {
    this.samples.push({ t, bytes });
    // Keep about three seconds of history.
    while (this.samples.length > 2 && t - this.samples[1]!.t > 3000) this.samples.shift();
  }

  perSecond(): number {
    const first = this.samples[0];
    const last = this.samples[this.samples.length - 1];
    if (!first || !last || last.t - first.t < 200) return 0;
    return ((last.bytes - first.bytes) * 1000) / (last.t - first.t);
  }
}

/**
 * One progress display. `update()` as often as you like (it only stores the
 * status; the display redraws on its own schedule), `log()` for lines that
 * must stay, `stop()` once at the end (it leaves no timer behind).
 */
export class Progress {
  /** The mode in use ('auto' resolved). */
  readonly mode: 'bar' | 'plain' | 'none';
  private readonly stream: NodeJS.WritableStream & { isTTY?: boolean };
  private readonly prefix: string;
  private readonly unit: string;
  private readonly intervalMs: number;
  private readonly rate = new RateMeter();
  private readonly startedAt = Date.now();
  private status: ProgressStatus | undefined;
  private printed: string | undefined;
  private lastPlainAt = 0;
  private multi: cliProgress.MultiBar | undefined;
  private bar: cliProgress.SingleBar | undefined;
  private timer: NodeJS.Timeout | undefined;
  private stopped = false;

  constructor(opts: ProgressOptions = {}) {
    this.stream = opts.stream ?? process.stderr;
    const mode = opts.mode ?? 'auto';
    this.mode = mode === 'auto' ? (this.stream.isTTY ? 'bar' : 'plain') : mode;
    this.prefix = opts.prefix ?? 'qmt: ';
    this.unit = opts.unit ?? 'pages';
    this.intervalMs = opts.intervalMs ?? 5000;
    if (this.mode === 'plain' && this.intervalMs > 0) {
      this.timer = setInterval(() => this.plainTick(), Math.min(this.intervalMs, 1000));
      this.timer.unref();
    }
  }

  /** The latest status (shown on the bar, or as a plain line at the next interval). */
  update(s: ProgressStatus): void {
    if (this.stopped) return;
    this.status = s;
    this.rate.add(Date.now(), s.bytes);
    if (this.mode !== 'bar') return;
    const total = Math.max(1, s.total ?? 0, s.done);
    const payload = this.payload(s);
    if (!this.multi) {
      this.multi = new cliProgress.MultiBar(
        {
          stream: this.stream,
          format: `{phase} |{bar}| {percentage}% | {bytes} | {done}{of_total} ${this.unit} | {rate} | {duration_formatted}{detail}`,
          hideCursor: true,
          clearOnComplete: false,
          barsize: 30,
          fps: 10,
        },
        cliProgress.Presets.shades_classic,
      );
      this.bar = this.multi.create(total, Math.min(s.done, total), payload);
    } else {
      this.bar?.setTotal(total);
      this.bar?.update(Math.min(s.done, total), payload);
    }
  }

  /** A line that stays (above the bar on a TTY). `prefix` is added. */
  log(line: string): void {
    if (this.stopped || this.mode === 'none') return;
    const text = `${this.prefix}${line}\n`;
    if (this.multi) {
      this.multi.log(text);
      this.multi.update();
    } else {
      this.stream.write(text);
    }
    this.lastPlainAt = Date.now();
  }

  /** Removes the bar (leaving its last state on screen) and every timer. Idempotent. */
  stop(): void {
    if (this.stopped) return;
    this.stopped = true;
    clearInterval(this.timer);
    this.timer = undefined;
    if (this.multi) {
      // MultiBar.stop() does not flush lines logged since the last redraw.
      this.multi.update();
      this.multi.stop();
      this.multi = undefined;
    }
  }

  /** The status as one line ("precopy: 12.0 MiB, 3072/16384 pages, 25.1 MiB/s"). */
  formatStatus(s: ProgressStatus): string {
    // `done` may pass `total` (pages sent again in later passes): then the total says nothing.
    const parts = [formatBytes(s.bytes), `${s.done}${s.total && s.done <= s.total ? `/${s.total}` : ''} ${this.unit}`];
    const r = this.rate.perSecond();
    if (r > 0) parts.push(`${formatBytes(r)}/s`);
    return `${s.phase}: ${parts.join(', ')}${s.detail ? `, ${s.detail}` : ''}`;
  }

  private payload(s: ProgressStatus): Record<string, string | number> {
    const r = this.rate.perSecond();
    return {
      phase: s.phase.padEnd(12),
      bytes: formatBytes(s.bytes).padStart(10),
      done: s.done,
      of_total: s.total && s.done <= s.total ? `/${s.total}` : '',
      rate: `${formatBytes(r)}/s`.padStart(12),
      detail: s.detail ? ` | ${s.detail}` : '',
    };
  }

  private plainTick(): void {
    const s = this.status;
    if (!s || Date.now() - this.lastPlainAt < this.intervalMs) return;
    const key = `${s.phase}|${s.bytes}|${s.done}|${s.detail ?? ''}`;
    if (key === this.printed) return;
    this.printed = key;
    this.log(this.formatStatus(s));
  }

  /** Milliseconds since the display was created. */
  get elapsedMs(): number {
    return Date.now() - this.startedAt;
  }
}
