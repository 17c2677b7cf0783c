/**
 * `qmt send`: restore a saved VM (the directory `qmt receive` writes, or a
 * mapped-ram file QEMU or `qmt receive --format mapped-ram` wrote) into a
 * waiting QEMU 10.0 destination (or `qmt receive`), as the source of a live
 * migration. With postcopy the destination runs the VM at once and its memory
 * follows on demand (a lazy restore: `--postcopy after:0`).
 */
import { readFileSync, statSync } from 'node:fs';
import { stat } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { Command, InvalidArgumentError, Option } from 'commander';
import { MigrationError } from '../protocol/errors.js';
import { MappedRamFile } from '../protocol/mapped-ram-file.js';
import { SavedVmSource, type SavedVmSourceOptions } from '../protocol/memory-source.js';
import type { ThreadMode } from '../transport/worker/support.js';
import { parsePostcopyPolicy, type PostcopyPolicy } from '../protocol/postcopy-policy.js';
import { readSavedVmManifest, type SavedVmManifest } from '../protocol/saved-vm.js';
import { SourceSession, type DeviceStateSection, type SourceStats } from '../protocol/source.js';
import { MAX_MULTIFD_CHANNELS, sourceUnsentBytes } from '../protocol/source/options.js';
import { TARGET_PAGE_SIZE } from '../stream/constants.js';
import { StreamError } from '../stream/errors.js';
import { parseEndpoint } from '../transport/endpoint.js';
import { asArgParser, endpointArg } from './args.js';
import { CliError, describeError } from './errors.js';
import { sourceStatsJson, type SourceStatsJson } from './json.js';
import { run, type CommandContext, type CommandOutcome } from './run.js';
import { PROGRESS_MODES, Progress, formatBytes, formatDuration, formatMicros, type ProgressMode } from './progress.js';

export interface SendOptions {
  /**
   * The saved VM: a directory `qmt receive` wrote (manifest.json, ram/,
   * devices/), or a mapped-ram file (QEMU's `migrate file:` with capability
   * mapped-ram, or `qmt receive --format mapped-ram`).
   */
  from: string;
  /** Where the destination listens: `tcp:HOST:PORT` or `unix:PATH`. */
  to: string;
  /** A QEMU tls-creds-x509 directory with the client's files: TLS on every channel (we are the TLS client). */
  tls?: string;
  /** Name the destination's certificate must carry (QEMU's `tls-hostname`; default: the host of `to`). Needs `tls`. */
  tlsHostname?: string;
  /** With `tls`: accept only a destination whose certificate carries one of these names (see TlsSettings.allowedPeers). */
  tlsAllow?: readonly string[];
  /**
   * When to switch to postcopy (default 'never'). `{ afterPasses: 0 }` is a
   * lazy restore: the destination runs at once and pages follow on demand.
   * 'manual': on `switchNow()` (the command: Enter on a TTY, or SIGUSR1). A
   * saved VM never changes, so after one complete pass nothing is left to
   * send: a switch later than the first pass only starts the VM sooner by the
   * device-state transfer.
   */
  postcopy?: PostcopyPolicy;
  /** Answer page requests on a separate preempt channel (needs postcopy; the destination needs `postcopy-preempt`). */
  preempt?: boolean;
  /**
   * QEMU's multifd with this many channels (1–255): the precopy pages go in
   * multifd packets on their own connections (the destination needs the
   * `multifd` capability and `multifd-channels` set to the same number).
   */
  multifd?: number;
  /**
   * Each channel in its own worker thread (SourceOptions.threads, default
   * 'auto': threads on Node 26.6 and later). Each channel's thread reads the
   * pages it sends from the saved VM's files itself (a few MiB of buffers
   * per thread, whatever the guest size).
   */
  threads?: ThreadMode;
  /** Cap in bytes/s of the precopy passes and, unless `postcopyBandwidth` is given, of the postcopy background stream (default none). Pages asked for on the preempt channel are never capped. */
  bandwidth?: number;
  /** Cap in bytes/s of the postcopy background stream (default: `bandwidth`). Without preempt, requested pages share this stream. */
  postcopyBandwidth?: number;
  /**
   * Postcopy recovery (default: on with postcopy): after a network failure,
   * reconnect to `to` (default: the `to` above; QEMU's destination listens
   * where `migrate-recover` told it), retrying with backoff up to
   * `maxAttempts` (default: until cancelled); `false` fails at once instead.
   */
  recovery?: { to?: string; maxAttempts?: number } | false;
  /** Progress display on `stderr` (default 'auto'). */
  progress?: ProgressMode;
  /** Where progress goes (default process.stderr). */
  stderr?: NodeJS.WritableStream & { isTTY?: boolean };
  /** Aborting fails the migration as `cancelled` (what SIGINT does in the command). */
  signal?: AbortSignal;
  /**
   * With postcopy 'manual': called once the session exists, with a function
   * that switches to postcopy now; what it returns is shown as a progress line.
   */
  onSwitchReady?: (switchNow: () => void) => string | void;
  /**
   * Called once the session exists with the operator's controls of postcopy
   * recovery (what SIGUSR1 and SIGUSR2 do in the command): `pause()` forces
   * the paused state now (SourceSession.pause(), QEMU's migrate-pause) and
   * makes no reconnection attempt until `resume()`, which tries at once.
   * `postcopy` tells whether postcopy has started. Refusals are logged.
   */
  onPauseReady?: (control: SendPauseControl) => void;
}

/** See {@link SendOptions.onPauseReady}. */
export interface SendPauseControl {
  readonly postcopy: boolean;
  pause(): void;
  resume(): void;
}

/** The `--json` report: one object, also returned by {@link sendSavedVm}. */
export interface SendReport {
  ok: boolean;
  from: string;
  /** What `from` is: a saved-VM directory or a mapped-ram file (null when it could not be read). */
  format: SavedVmFormat | null;
  to: string;
  tls: boolean;
  /** The policy as given: never | manual | auto | after:N. */
  policy: string;
  preempt: boolean;
  /** Multifd channels (0: none). */
  multifd: number;
  machineType: string | null;
  /** Whether the migration went through postcopy. */
  postcopy: boolean;
  /** Why it failed (absent when ok). */
  error?: { code: string; phase?: string; message: string };
  /** Page requests answered, by the channel the page went out on. */
  answered: { main: number; preempt: number };
  /**
   * The source's counters (null when nothing was sent): transferred, downtime,
   * passes, postcopy-requests, postcopy-latency percentiles (µs, request
   * arrival → page handed to the kernel), per-channel bytes...
   */
  stats: SourceStats | null;
}

/** Why a send cannot start. */
export class SendError extends Error {
  override readonly name = 'SendError';
  constructor(
    /** 'incomplete-saved-vm' (the capture failed), 'saved-vm' (missing, damaged or unsupported) or 'usage' (options that do not go together). */
    readonly code: 'incomplete-saved-vm' | 'saved-vm' | 'usage',
    message: string,
  ) {
    super(message);
  }
}

function policyName(p: PostcopyPolicy): string {
  return typeof p === 'object' ? `after:${p.afterPasses}` : p;
}

/**
 * Reads and checks a saved VM before anything is sent: a complete capture,
 * a machine type, device sections QEMU can load as FULL sections, and every
 * file present with the size the manifest says.
 */
export async function checkSavedVm(dir: string, policy: PostcopyPolicy): Promise<SavedVmInput> {
  let m: SavedVmManifest;
  try {
    m = await readSavedVmManifest(dir);
  } catch (e) {
    const errno = (e as NodeJS.ErrnoException).code;
    if (errno === 'ENOENT') throw new SendError('saved-vm', `${dir}: not a saved VM (no manifest.json; write one with qmt receive)`);
    if (e instanceof SyntaxError) throw new SendError('saved-vm', `${dir}: manifest.json is not valid JSON (${e.message})`);
    throw new SendError('saved-vm', e instanceof Error ? e.message : String(e));
  }
  if (!m.complete) {
    const why = m.error ? `the capture failed in ${m.error.phase}: ${m.error.code}: ${m.error.message}` : 'the capture did not complete';
    throw new SendError('incomplete-saved-vm', `${dir}: the saved VM is incomplete (${why}); only a complete capture can be restored`);
  }
  if (!m.machineType) throw new SendError('saved-vm', `${dir}: the manifest names no machine type`);
  if (!Array.isArray(m.devices)) throw new SendError('saved-vm', `${dir}: the manifest lists no device sections`);
  if (!Array.isArray(m.blocks) || m.blocks.length === 0) throw new SendError('saved-vm', `${dir}: the manifest lists no RAM blocks`);
  for (const b of m.blocks) {
    if (b.length % TARGET_PAGE_SIZE !== 0) throw new SendError('saved-vm', `${dir}: RAM block "${b.idstr}" is ${b.length} bytes, not a multiple of ${TARGET_PAGE_SIZE}`);
    if (policy !== 'never' && b.pageSize !== undefined && b.pageSize !== TARGET_PAGE_SIZE) {
      throw new SendError('saved-vm', `${dir}: RAM block "${b.idstr}" uses ${b.pageSize}-byte host pages: postcopy is supported with ${TARGET_PAGE_SIZE}-byte pages only (use --postcopy never)`);
    }
    const size = fileSize(join(dir, b.file));
    if (size === undefined) throw new SendError('saved-vm', `${dir}: ${b.file} (RAM block "${b.idstr}") is missing`);
    if (size > b.length) throw new SendError('saved-vm', `${dir}: ${b.file} holds ${size} bytes, more than RAM block "${b.idstr}" (${b.length})`);
  }
  const devices: DeviceStateSection[] = [];
  for (const d of m.devices) {
    if (d.kind !== 'full') throw new SendError('saved-vm', `${dir}: device section "${d.idstr}" is a ${d.kind.toUpperCase()} section: only FULL device sections can be sent`);
    let data: Buffer;
    try {
      data = readFileSync(join(dir, d.file));
    } catch {
      throw new SendError('saved-vm', `${dir}: ${d.file} (device "${d.idstr}") is missing or unreadable`);
    }
    if (data.length !== d.size) throw new SendError('saved-vm', `${dir}: ${d.file} holds ${data.length} bytes, the manifest says ${d.size}`);
    devices.push({ sectionId: d.sectionId, idstr: d.idstr, instanceId: d.instanceId, versionId: d.versionId, data });
  }
  let vmdesc: Uint8Array | undefined;
  if (m.vmdesc) {
    try {
      vmdesc = readFileSync(join(dir, m.vmdesc));
    } catch {
      throw new SendError('saved-vm', `${dir}: ${m.vmdesc} (the VM description) is missing or unreadable`);
    }
  }
  return {
    format: 'directory',
    machineType: m.machineType,
    blocks: m.blocks.map((b) => ({ idstr: b.idstr, length: b.length })),
    devices,
    vmdesc,
    source: (opts) => SavedVmSource.fromManifest(dir, m, opts),
  };
}

/**
 * Reads and checks a mapped-ram file before anything is sent: a complete,
 * well-formed file (its stream parts and bitmaps; pages are read as they are
 * sent), a machine type, and device sections QEMU can load as FULL sections.
 */
export async function checkMappedRamVm(path: string): Promise<SavedVmInput> {
  let file: MappedRamFile;
  try {
    file = await MappedRamFile.open(path);
  } catch (e) {
    if (e instanceof StreamError) {
      if (e.code === 'incomplete') throw new SendError('incomplete-saved-vm', `${path}: the mapped-ram file is incomplete (${e.message}); only a complete capture can be restored`);
      throw new SendError('saved-vm', `${path}: not a saved VM (a directory from qmt receive, or a complete mapped-ram file): ${e.code} at offset ${e.offset}: ${e.message}`);
    }
    throw e;
  }
  try {
    const machineType = file.configuration?.machineType;
    if (!machineType) throw new SendError('saved-vm', `${path}: the mapped-ram file has no configuration section (no machine type)`);
    const devices: DeviceStateSection[] = [];
    for (const d of file.devices) {
      if (d.kind !== 'full') throw new SendError('saved-vm', `${path}: device section "${d.idstr}" is a ${d.kind.toUpperCase()} section: only FULL device sections can be sent`);
      // Copied: the file's read buffers are not ours to keep.
      devices.push({ sectionId: d.sectionId, idstr: d.idstr, instanceId: d.instanceId, versionId: d.versionId, data: Buffer.from(d.data) });
    }
    return {
      format: 'mapped-ram',
      machineType,
      blocks: file.blocks.map((b) => ({ idstr: b.idstr, length: b.length })),
      devices,
      vmdesc: file.vmdesc ? Buffer.from(file.vmdesc) : undefined,
      source: (opts) => SavedVmSource.fromMappedRam(path, file, opts),
    };
  } finally {
    await file.close();
  }
}

/** What `--from` names. */
export type SavedVmFormat = 'directory' | 'mapped-ram';

/** A saved VM read and checked, ready to send: what the session needs, and its pages' source. */
export interface SavedVmInput {
  readonly format: SavedVmFormat;
  readonly machineType: string;
  readonly blocks: readonly { idstr: string; length: number }[];
  readonly devices: DeviceStateSection[];
  readonly vmdesc: Uint8Array | undefined;
  /** Opens the files to read the pages from (close() it afterwards). */
  source(opts: SavedVmSourceOptions): SavedVmSource;
}

/** A saved VM at `path`: a directory (qmt's) or a file (mapped-ram), each read and checked. */
export async function readSavedVmInput(path: string, policy: PostcopyPolicy): Promise<SavedVmInput> {
  let st;
  try {
    st = await stat(path);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') throw new CliError('not-found', `${path}: no such file or directory (--from, the saved VM)`, { cause: e });
    throw e;
  }
  return st.isDirectory() ? checkSavedVm(path, policy) : checkMappedRamVm(path);
}

function fileSize(path: string): number | undefined {
  try {
    return statSync(path).size;
  } catch {
    return undefined;
  }
}

function pagesOf(s: SourceStats): number {
  return s.normal + s.duplicate + s.xbzrle;
}

/**
 * Sends the saved VM in `opts.from` to `opts.to`. Never throws: a failure is
 * in the report (`ok: false`).
 */
export async function sendSavedVm(opts: SendOptions): Promise<SendReport> {
  const from = resolve(opts.from);
  const policy = opts.postcopy ?? 'never';
  const report: SendReport = {
    ok: false,
    from,
    format: null,
    to: opts.to,
    tls: opts.tls !== undefined,
    policy: policyName(policy),
    preempt: opts.preempt ?? false,
    multifd: opts.multifd ?? 0,
    machineType: null,
    postcopy: false,
    answered: { main: 0, preempt: 0 },
    stats: null,
  };
  const stderr = opts.stderr ?? process.stderr;
  const progress = new Progress({ mode: opts.progress ?? 'auto', stream: stderr });

  let source: SavedVmSource | undefined;
  let session: SourceSession;
  let saved: SavedVmInput;
  try {
    parseEndpoint(opts.to);
    if (opts.preempt && policy === 'never') throw new SendError('usage', '--preempt needs --postcopy manual, auto or after:N');
    if (opts.tlsHostname !== undefined && opts.tls === undefined) throw new SendError('usage', '--tls-hostname needs --tls');
    if (opts.tlsAllow?.length && opts.tls === undefined) throw new SendError('usage', '--tls-allow needs --tls');
    saved = await readSavedVmInput(from, policy);
    report.format = saved.format;
    report.machineType = saved.machineType;
    const multifd = opts.multifd ? { channels: opts.multifd } : undefined;
    // The saved VM's read buffers must outlast every page the channels may still hold by reference
    // (one thread; with threads each channel's worker reads into buffers of its own).
    source = saved.source(multifd ? { reuseAfterBytes: Math.max(32 << 20, 2 * sourceUnsentBytes({ multifd })) } : {});
    session = new SourceSession({
      threads: opts.threads ?? 'auto',
      to: opts.to,
      transport: opts.tls
        ? { tls: { dir: opts.tls, ...(opts.tlsHostname ? { hostname: opts.tlsHostname } : {}), ...(opts.tlsAllow?.length ? { allowedPeers: opts.tlsAllow } : {}) } }
        : {},
      memory: source,
      machineType: saved.machineType,
      devices: saved.devices,
      ...(saved.vmdesc ? { vmdesc: saved.vmdesc } : {}),
      postcopy: policy,
      preempt: opts.preempt ?? false,
      ...(multifd ? { multifd } : {}),
      ...(opts.bandwidth ? { bandwidthLimit: opts.bandwidth } : {}),
      ...((opts.postcopyBandwidth ?? opts.bandwidth) ? { postcopyBandwidthLimit: opts.postcopyBandwidth ?? opts.bandwidth } : {}),
      ...(opts.recovery !== undefined ? { recovery: opts.recovery } : {}),
    });
  } catch (e) {
    progress.stop();
    source?.close();
    report.error = describeError(e);
    return report;
  }

  const m = saved;
  const s = session;
  const totalPages = m.blocks.reduce((n, b) => n + b.length / TARGET_PAGE_SIZE, 0);
  const ramBytes = m.blocks.reduce((n, b) => n + b.length, 0);
  progress.log(`saved VM ${from}${m.format === 'mapped-ram' ? ' (mapped-ram)' : ''}: ${m.machineType}, ${m.blocks.length} RAM blocks (${formatBytes(ramBytes)}), ${m.devices.length} device sections`);

  let phase: string = 'connecting';
  const refresh = (): void => {
    const st = s.stats();
    const requests = st['postcopy-requests'];
    progress.update({ phase, bytes: st.transferred, done: pagesOf(st), total: totalPages, ...(requests ? { detail: `${requests} page requests` } : {}) });
  };
  const ticker = setInterval(refresh, 100);
  ticker.unref();

  s.on('connected', ({ uri }) => {
    phase = 'precopy';
    progress.log(`connected to ${uri}${opts.tls ? ' (TLS)' : ''}${opts.multifd ? ` with ${opts.multifd} multifd channel${opts.multifd === 1 ? '' : 's'}` : ''}; postcopy ${report.policy}${report.preempt ? ' with preempt' : ''}`);
  });
  s.on('pass', (p) => {
    progress.log(`pass ${p.pass}: ${p.pagesSent} pages, ${formatBytes(p.bytes)} in ${formatDuration(p.durationMs)}${p.dirtyPages ? `, ${p.dirtyPages} pages dirty again` : ''}`);
  });
  s.on('stopped', () => {
    phase = 'switchover';
    progress.log('switchover: sending the device state');
  });
  s.on('postcopy-active', () => {
    phase = 'postcopy';
    report.postcopy = true;
    progress.log('postcopy active: the destination runs the VM; the rest of RAM follows, requested pages first');
  });
  s.on('page-request', (r) => report.answered[r.channel]++);
  s.on('paused', (p) => {
    phase = 'paused';
    progress.log(p.error.code === 'paused' ? 'postcopy paused (asked): no reconnection until resumed' : `postcopy paused (${p.error.reason}): reconnecting`);
  });
  s.on('recovering', (r) => {
    if (r.attempt === 1 || r.attempt % 10 === 0) progress.log(`recovery attempt ${r.attempt}: connecting to ${r.to}`);
  });
  s.on('resumed', (r) => {
    phase = 'postcopy';
    progress.log(`postcopy resumed after ${Math.round(r.pausedMs)} ms (recovery ${r.recoveries})`);
  });

  let switched = false;
  function switchNow(): void {
    if (switched || phase === 'postcopy' || phase === 'switchover') return;
    switched = true;
    progress.log('switching to postcopy (asked)');
    s.startPostcopy();
  }

  if (policy === 'manual') {
    const hint = opts.onSwitchReady?.(switchNow);
    if (hint) progress.log(hint);
  }
  opts.onPauseReady?.({
    get postcopy() {
      return report.postcopy;
    },
    pause: () => {
      const wasPaused = s.stats().status === 'postcopy-paused';
      try {
        s.pause();
        if (wasPaused) progress.log('postcopy stays paused (asked): no reconnection until resumed');
      } catch (e) {
        progress.log(`cannot pause: ${e instanceof MigrationError ? e.reason : String(e)}`);
      }
    },
    resume: () => {
      if (s.stats().status !== 'postcopy-paused') {
        progress.log('resume: nothing to resume (postcopy is not paused)');
        return;
      }
      progress.log('resuming postcopy (asked): reconnecting now');
      s.resume();
    },
  });

  const cancel = (): void => void s.cancel();
  let failure: unknown;
  if (opts.signal?.aborted) {
    // Not started: nothing to close.
    failure = new MigrationError('cancelled', 'setup', 'the migration was cancelled');
  } else {
    opts.signal?.addEventListener('abort', cancel, { once: true });
    try {
      s.start();
      await s.done;
    } catch (e) {
      failure = e;
    }
  }
  opts.signal?.removeEventListener('abort', cancel);
  clearInterval(ticker);
  phase = failure ? 'failed' : 'completed';
  refresh();
  progress.stop();
  source.close();
  report.stats = s.stats();
  report.ok = failure === undefined;
  if (failure !== undefined) report.error = describeError(failure);
  return report;
}

/** The closing lines of a send, for stderr (the error line, if any, is printed by the caller). */
export function formatSendSummary(r: SendReport): string[] {
  const st = r.stats;
  // Nothing was sent (no connection): the error line says it all.
  if (!st || st.transferred === 0) return [];
  const lines: string[] = [];
  const passes = st.passes;
  lines.push(
    `${r.ok ? 'completed' : 'stopped'} after ${formatDuration(st['total-time'])}: ${formatBytes(st.transferred)} sent, ${pagesOf(st)} pages (${st.normal} normal, ${st.duplicate} zero${st.xbzrle ? `, ${st.xbzrle} xbzrle` : ''}), ` +
      `${passes} precopy pass${passes === 1 ? '' : 'es'}${r.postcopy ? ', then postcopy' : ''}${st.downtime !== undefined ? `, downtime ${formatDuration(st.downtime)}` : ''}`,
  );
  if (r.postcopy) {
    const l = st['postcopy-latency'];
    lines.push(
      `postcopy: ${st['postcopy-requests']} page requests, ${r.answered.preempt} answered on the preempt channel, ${r.answered.main} on the main channel ` +
        `(${st['requests-answered']['main-in-flight']} already in flight there, ${st['requests-answered']['main-no-preempt']} with no preempt channel)` +
        (l.count ? `; latency p50 ${formatMicros(l.p50)}, p90 ${formatMicros(l.p90)}, p99 ${formatMicros(l.p99)}, max ${formatMicros(l.max)}` : ''),
    );
  }
  if (st.threads?.used) lines.push(`threads: ${st.threads.channels.map((t) => `${t.role} (thread ${t.threadId}, ${t.cpuSeconds.toFixed(2)} s CPU${t.reads ? `, read ${formatBytes(t.reads.bytes)} of the saved VM in ${t.reads.reads} reads` : ''})`).join(', ')}`);
  const ch = st.channels;
  const mf = ch.multifd?.length ? `; multifd ${ch.multifd.length} channels, ${formatBytes(ch.multifd.reduce((n, c) => n + c.bytesSent, 0))} sent` : '';
  lines.push(`channels: main ${formatBytes(ch.main?.bytesSent ?? 0)} sent, ${formatBytes(ch.main?.bytesReceived ?? 0)} received${ch.preempt ? `; preempt ${formatBytes(ch.preempt.bytesSent)} sent` : ''}${mf}`);
  return lines;
}

/** `--threads auto|on|off`. */
export function parseThreadMode(v: string): ThreadMode {
  if (v !== 'auto' && v !== 'on' && v !== 'off') throw new InvalidArgumentError('must be auto, on or off');
  return v;
}

/** `--multifd N`: QEMU's multifd-channels range. */
export function parseMultifdChannels(v: string): number {
  const n = Number(v);
  if (!/^\d+$/.test(v.trim()) || n < 1 || n > MAX_MULTIFD_CHANNELS) throw new InvalidArgumentError(`must be a number of channels from 1 to ${MAX_MULTIFD_CHANNELS}`);
  return n;
}

/** Bytes per second: an integer with an optional K, M or G suffix (powers of 1024; "32M", "1G", "500000"). */
export function parseRate(v: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*([kmg])?(?:i?b)?(?:\/s)?$/i.exec(v.trim());
  const unit = { k: 1024, m: 1024 ** 2, g: 1024 ** 3 } as const;
  const n = m ? Math.round(Number(m[1]) * (m[2] ? unit[m[2].toLowerCase() as keyof typeof unit] : 1)) : NaN;
  if (!Number.isSafeInteger(n) || n < 4096) throw new InvalidArgumentError('must be bytes per second, at least 4096, e.g. 500000, 32M or 1G');
  return n;
}

interface SendCliOptions {
  from: string;
  to: string;
  tls?: string;
  tlsHostname?: string;
  tlsAllow?: string[];
  postcopy: PostcopyPolicy;
  preempt?: boolean;
  multifd?: number;
  threads?: ThreadMode;
  bandwidth?: number;
  postcopyBandwidth?: number;
  /** commander: false with --no-recovery. */
  recovery?: boolean;
  recoverTo?: string;
  recoveryAttempts?: number;
  json?: boolean;
  progress: ProgressMode;
}

/** The fields of `qmt send --json` after the envelope (README "JSON output"). */
export interface SendJson {
  from: string;
  /** directory | mapped-ram (null when --from could not be read). */
  format: SavedVmFormat | null;
  to: string;
  tls: boolean;
  policy: string;
  preempt: boolean;
  /** Multifd channels (0: none). */
  multifd: number;
  machineType: string | null;
  postcopy: boolean;
  /** Page requests answered, by the channel the page went out on. */
  answered: { main: number; preempt: number };
  stats: SourceStatsJson | null;
}

export function sendJson(r: SendReport): SendJson {
  return {
    from: r.from,
    format: r.format,
    to: r.to,
    tls: r.tls,
    policy: r.policy,
    preempt: r.preempt,
    multifd: r.multifd,
    machineType: r.machineType,
    postcopy: r.postcopy,
    answered: r.answered,
    stats: r.stats ? sourceStatsJson(r.stats) : null,
  };
}

/** Runs `qmt send` with parsed options (SIGINT/SIGTERM: `ctx.signal`; SIGUSR1 with manual postcopy: switch). */
export async function runSendCommand(ctx: CommandContext, o: SendCliOptions): Promise<CommandOutcome> {
  // 'manual': Enter on a TTY or SIGUSR1 switches to postcopy.
  let switchNow: (() => void) | undefined;
  let control: SendPauseControl | undefined;
  // SIGUSR1: before postcopy with --postcopy manual, switch; otherwise pause postcopy now. SIGUSR2: resume now.
  // Always handled: by default either signal would kill the process.
  ctx.onSignal('SIGUSR1', () => {
    if (switchNow && !control?.postcopy) switchNow();
    else control?.pause();
  });
  ctx.onSignal('SIGUSR2', () => control?.resume());
  const onLine = (): void => switchNow?.();
  const stdin = process.stdin;
  const readEnter = o.postcopy === 'manual' && stdin.isTTY === true;
  let r: SendReport;
  try {
    r = await sendSavedVm({
      from: o.from,
      to: o.to,
      ...(o.tls !== undefined ? { tls: o.tls } : {}),
      ...(o.tlsHostname !== undefined ? { tlsHostname: o.tlsHostname } : {}),
      ...(o.tlsAllow?.length ? { tlsAllow: o.tlsAllow } : {}),
      postcopy: o.postcopy,
      preempt: o.preempt ?? false,
      ...(o.multifd !== undefined ? { multifd: o.multifd } : {}),
      ...(o.threads !== undefined ? { threads: o.threads } : {}),
      ...(o.bandwidth !== undefined ? { bandwidth: o.bandwidth } : {}),
      ...(o.postcopyBandwidth !== undefined ? { postcopyBandwidth: o.postcopyBandwidth } : {}),
      ...(o.recovery === false
        ? { recovery: false as const }
        : { recovery: { ...(o.recoverTo ? { to: o.recoverTo } : {}), ...(o.recoveryAttempts !== undefined ? { maxAttempts: o.recoveryAttempts } : {}) } }),
      progress: o.progress,
      signal: ctx.signal,
      onSwitchReady: (fn) => {
        switchNow = fn;
        if (readEnter) {
          stdin.setEncoding('utf8');
          stdin.on('data', onLine);
          stdin.resume();
        }
        return `postcopy is manual: ${readEnter ? 'press Enter or ' : ''}send SIGUSR1 (kill -USR1 ${process.pid}) to switch`;
      },
      onPauseReady: (c) => (control = c),
    });
  } finally {
    if (readEnter) {
      stdin.off('data', onLine);
      stdin.pause();
    }
  }
  if (o.progress !== 'none') for (const line of formatSendSummary(r)) ctx.stderr.write(`qmt: ${line}\n`);
  return { ok: r.ok, ...(r.error ? { error: r.error } : {}), json: sendJson(r) };
}

/**
 * Adds `qmt send` to a commander program.
 *
 * `--postcopy manual` switches when the user presses Enter (stdin a TTY) or
 * when the process receives SIGUSR1 (`kill -USR1 PID`; the PID is printed).
 */
export function registerSendCommand(program: Command): Command {
  return program
    .command('send')
    .description("restore a saved VM (from qmt receive, or QEMU's own mapped-ram file) into a waiting QEMU 10 destination; with postcopy the VM runs at once and its memory follows on demand")
    .requiredOption('--from <path>', 'the saved VM: a directory written by qmt receive, or a mapped-ram file (QEMU migrate file: with mapped-ram, or qmt receive --format mapped-ram)')
    .requiredOption('--to <uri>', 'where the destination listens: tcp:HOST:PORT or unix:PATH', endpointArg)
    .option('--tls <dir>', 'QEMU tls-creds-x509 directory (client side: ca-cert.pem, client-cert.pem, client-key.pem): TLS on every channel')
    .option('--tls-hostname <name>', "name the destination's certificate must carry (default: the host of --to)")
    .option('--tls-allow <name>', "with --tls: accept only a destination whose certificate names NAME (subject DN, CN or subjectAltName; repeatable)", (v: string, all: string[]) => [...all, v], [] as string[])
    .addOption(
      new Option('--postcopy <policy>', 'never | manual (Enter on a TTY, or SIGUSR1) | auto | after:N (after:0 = lazy restore: the VM runs at once)')
        .default('never' as PostcopyPolicy, 'never')
        .argParser(asArgParser(parsePostcopyPolicy)),
    )
    .option('--preempt', 'answer page requests on a separate preempt channel (the destination needs postcopy-preempt)')
    .option('--multifd <n>', "QEMU's multifd: precopy pages on N more connections, 1-255 (the destination needs capability multifd, multifd-channels N)", parseMultifdChannels)
    .option('--threads <mode>', "each channel in its own worker thread, reading the pages it sends from the saved files: auto (when possible: Node 26.6+ and 4 or more cores), on, off (default auto)", parseThreadMode)
    .option('--bandwidth <bytes/s>', 'cap the stream (precopy passes and postcopy background), e.g. 32M; requested pages on the preempt channel are never capped', parseRate)
    .option('--postcopy-bandwidth <bytes/s>', 'cap the postcopy background stream (default: --bandwidth)', parseRate)
    .option('--recover-to <uri>', "postcopy recovery: reconnect here after a network failure (the destination's migrate-recover address; default: --to)", endpointArg)
    .option('--recovery-attempts <n>', 'postcopy recovery: give up after this many failed reconnections (default: keep trying)', (v: string) => {
      const n = Number(v);
      if (!/^\d+$/.test(v.trim()) || n < 1) throw new InvalidArgumentError('--recovery-attempts must be a positive integer');
      return n;
    })
    .option('--no-recovery', 'postcopy: fail on a network failure instead of pausing and reconnecting')
    .option('--json', 'print a machine-readable report on stdout at the end')
    .addOption(new Option('--progress <mode>', 'progress on stderr: a bar on a TTY, plain lines otherwise').choices([...PROGRESS_MODES]).default('auto'))
    .addHelpText(
      'after',
      [
        '',
        'The destination must be waiting: QEMU started with -incoming defer, the same machine type, RAM size',
        'and devices, capabilities postcopy-ram (with --postcopy), postcopy-preempt (with --preempt) and multifd',
        '(with --multifd N, and the parameter multifd-channels N) set before migrate-incoming. QEMU 10.0 refuses',
        'multifd with postcopy.',
        '',
        "--postcopy manual: press Enter (when stdin is a terminal) or send SIGUSR1 (kill -USR1 PID; the PID is",
        'printed) to switch. A saved VM does not change: after one complete pass nothing is left to send, so',
        'a lazy restore (the VM runs at once, memory follows on demand) is --postcopy after:0.',
        '',
        'Postcopy recovery: a network failure in postcopy — a reset, or a destination that stops acknowledging',
        'for 30 s (a silent partition) — pauses the migration and reconnects (--recover-to, default --to) with',
        "backoff. Once postcopy runs, SIGUSR1 pauses it now (QEMU's migrate-pause) and no reconnection is tried",
        "until SIGUSR2 (kill -USR2 PID), which reconnects at once (QEMU's migrate … resume=true).",
        '',
        'Example:',
        '  qmt send --from ./vm --to tcp:127.0.0.1:4444 --postcopy after:0 --preempt',
      ].join('\n'),
    )
    // The runner exits 2 s after the report even if a socket is still closing
    // (a destination that never answers its close, a connection cancelled mid-connect).
    .action(run('send', runSendCommand));
}
