/**
 * `qmt receive`: be the destination of one live migration from a QEMU 10.0
 * source (or `qmt send`) and keep what arrives as a saved-VM directory.
 */
import { mkdir } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { Command, Option } from 'commander';
import { DestinationSession, type DestinationResult, type DestinationStats } from '../protocol/destination.js';
import { DirectorySink } from '../protocol/directory-sink.js';
import { MigrationError } from '../protocol/errors.js';
import { MappedRamSink, type MappedRamSaveSummary } from '../protocol/mapped-ram-sink.js';
import { RAM_DIR, writeSavedVm, type SavedVmManifest } from '../protocol/saved-vm.js';
import { TARGET_PAGE_SIZE } from '../stream/constants.js';
import type { RamBlockInfo } from '../stream/records.js';
import { parseEndpoint } from '../transport/endpoint.js';
import type { ThreadMode } from '../transport/worker/support.js';
import { checkOutputDirectory, checkOutputFile, endpointArg, intArg } from './args.js';
import { describeError as describeAny, type DescribedError } from './errors.js';
import { FAULT_PATTERNS, FaultGenerator, MAX_FAULT_RATE, type FaultPattern, type FaultReport } from './fault.js';
import { destinationStatsJson, latencyJson, type DestinationStatsJson, type LatencyJson } from './json.js';
import { PROGRESS_MODES, Progress, formatBytes, formatDuration, formatMicros, type ProgressMode } from './progress.js';
import { run, type CommandContext, type CommandOutcome } from './run.js';

/** What `qmt receive` writes (`--format`). */
export const RECEIVE_FORMATS = ['saved-vm', 'mapped-ram'] as const;
export type ReceiveFormat = (typeof RECEIVE_FORMATS)[number];

export interface ReceiveOptions {
  /** `tcp:HOST:PORT` (port 0: any free port) or `unix:PATH`. */
  listen: string;
  /** The saved-VM directory to write (created if missing; RAM goes to OUT/ram), or with format 'mapped-ram' the file. */
  out: string;
  /** 'saved-vm' (default): our directory; 'mapped-ram': QEMU's own saved-VM file, which a plain QEMU 10 loads (MappedRamSink). */
  format?: ReceiveFormat;
  /** A QEMU tls-creds-x509 directory with the server's files: TLS on every channel, client certificates verified. */
  tls?: string;
  /** With `tls`: accept only clients whose certificate carries one of these names (QEMU's tls-authz; see TlsSettings.allowedPeers). */
  tlsAllow?: readonly string[];
  /** Accept postcopy (QEMU's `postcopy-ram` capability on the destination). */
  postcopy?: boolean;
  /** QEMU's multifd with this many channels (1–255; the source's `multifd-channels`). */
  multifd?: number;
  /**
   * Channels in worker threads (DestinationOptions.threads). 'on' (Node
   * 26.6 and later): each channel's thread (multifd channels' too) writes the
   * pages it decodes into the saved VM's block files itself. 'auto' (default)
   * does so with 4 or more cores.
   */
  threads?: ThreadMode;
  /** Make demand page requests once postcopy runs (needs `postcopy`). */
  fault?: FaultPattern;
  /** Demand requests per second with `fault`, 1 .. 100 000 (default 100). */
  faultRate?: number;
  /** Fail when no byte arrives for this long once connected (default 60 000 ms; 0 = never). */
  idleTimeoutMs?: number;
  /**
   * Postcopy recovery (default: on with `postcopy`): where to wait for the
   * source's new connection after a network failure (default: `listen`), and
   * how long (default: forever); `false` fails at once instead.
   */
  recovery?: { listen?: string; timeoutMs?: number } | false;
  /** Progress display on `stderr` (default 'auto'). */
  progress?: ProgressMode;
  /** Where progress and the listen line go (default process.stderr). */
  stderr?: NodeJS.WritableStream & { isTTY?: boolean };
  /** Aborting fails the migration as `cancelled` (what SIGINT does in the command). */
  signal?: AbortSignal;
  /** Called with the actual listen URI (the real port when 0 was asked). */
  onListening?: (uri: string) => void;
  /**
   * Called once the session exists with a function that pauses postcopy now
   * (DestinationSession.pause(), QEMU's migrate-pause; what SIGUSR1 does in
   * the command). Outside postcopy the function only logs why it cannot.
   */
  onPauseReady?: (pause: () => void) => void;
}

/** The `--json` report: one object, also returned by {@link receiveMigration}. */
export interface ReceiveReport {
  ok: boolean;
  /** The URI actually listened on (null when listening failed). */
  listen: string | null;
  out: string;
  /** Why it failed (absent when ok). */
  error?: { code: string; phase?: string; message: string };
  /** What manifest.json says, in short (null when nothing was written). */
  manifest: {
    complete: boolean;
    machineType: string | null;
    postcopy: boolean;
    capabilities: string[];
    blocks: { idstr: string; length: number; file: string }[];
    devices: { count: number; bytes: number; idstrs: string[] };
    vmdesc: string | null;
    error?: { code: string; phase: string; message: string };
  } | null;
  /** The destination's counters (null when listening failed). */
  stats: DestinationStats | null;
  /** With `fault`: what the generator did and the latency of its requests (µs). */
  faults?: FaultReport;
}

/** A failure as the CLI prints it (`qmt: <code>: <message>`) and reports it (`error`). */
export function describeError(e: unknown): DescribedError {
  // Disk trouble ends a session as 'storage'; the CLI says the same of its own.
  const errno = (e as NodeJS.ErrnoException | undefined)?.code;
  if (typeof errno === 'string' && /^E[A-Z]/.test(errno) && MigrationError.from(e, 'setup').code === 'storage') {
    return { ...describeAny(e), code: 'storage' };
  }
  return describeAny(e);
}

function manifestSummary(m: SavedVmManifest): NonNullable<ReceiveReport['manifest']> {
  return {
    complete: m.complete,
    machineType: m.machineType,
    postcopy: m.postcopy,
    capabilities: m.capabilities,
    blocks: m.blocks.map((b) => ({ idstr: b.idstr, length: b.length, file: b.file })),
    devices: { count: m.devices.length, bytes: m.devices.reduce((s, d) => s + d.size, 0), idstrs: [...new Set(m.devices.map((d) => d.idstr))] },
    vmdesc: m.vmdesc,
    ...(m.error ? { error: m.error } : {}),
  };
}

/** What a mapped-ram save holds, in the report's manifest shape (every block's `file` is the one file). */
function mappedRamSummary(m: MappedRamSaveSummary, r: DestinationResult, out: string): NonNullable<ReceiveReport['manifest']> {
  return {
    complete: m.complete,
    machineType: r.machineType ?? null,
    postcopy: r.postcopy,
    capabilities: ['mapped-ram'],
    blocks: m.blocks.map((b) => ({ idstr: b.idstr, length: b.length, file: out })),
    devices: { count: m.devices.count, bytes: m.devices.bytes, idstrs: [...new Set(r.devices.map((d) => d.idstr))] },
    vmdesc: r.vmdesc ? out : null,
    ...(r.error ? { error: { code: r.error.code, phase: r.error.phase, message: r.error.message } } : {}),
  };
}

/** Pages of `blocks` the session does not have. */
export function missingPages(s: Pick<DestinationSession, 'hasPage'>, blocks: readonly RamBlockInfo[]): { count: number; first?: { block: string; offset: number } } {
  let count = 0;
  let first: { block: string; offset: number } | undefined;
  for (const b of blocks) {
    for (let offset = 0; offset < b.length; offset += TARGET_PAGE_SIZE) {
      if (s.hasPage(b.idstr, offset)) continue;
      count++;
      first ??= { block: b.idstr, offset };
    }
  }
  return first ? { count, first } : { count };
}

function pagesOf(s: DestinationStats): number {
  return s.normal + s.duplicate + s.xbzrle;
}

/**
 * Receives one migration into `opts.out`: RAM into OUT/ram (one sparse file
 * per block), then devices, VM description and manifest.json, on success and
 * on failure alike (manifest `complete: false` with the error; what arrived
 * stays on disk). Never throws: a failure is in the report (`ok: false`).
 */
export async function receiveMigration(opts: ReceiveOptions): Promise<ReceiveReport> {
  const out = resolve(opts.out);
  const progress = new Progress({ mode: opts.progress ?? 'auto', ...(opts.stderr ? { stream: opts.stderr } : {}) });
  const report: ReceiveReport = { ok: false, listen: null, out, manifest: null, stats: null };
  let session: DestinationSession | undefined;
  let sink: DirectorySink | MappedRamSink | undefined;
  const mapped = opts.format === 'mapped-ram';
  try {
    // Check the URI before anything is created on disk.
    parseEndpoint(opts.listen);
    if (opts.tlsAllow?.length && !opts.tls) {
      report.error = { code: 'usage', message: '--tls-allow needs --tls' };
      progress.stop();
      return report;
    }
    if (opts.fault && !opts.postcopy) {
      report.error = { code: 'usage', message: '--fault needs --postcopy (fault generation happens in postcopy)' };
      progress.stop();
      return report;
    }
    await mkdir(mapped ? dirname(out) : out, { recursive: true });
    sink = mapped ? new MappedRamSink(out) : new DirectorySink(join(out, RAM_DIR));
    session = await DestinationSession.listen({
      listen: opts.listen,
      sink,
      transport: {
        ...(opts.tls ? { tls: { dir: opts.tls, ...(opts.tlsAllow?.length ? { allowedPeers: opts.tlsAllow } : {}) } } : {}),
        // Here the main channel's outgoing direction is the return path: with Nagle a
        // REQ_PAGES waits for the ACK of the previous one (measured: p90 30 ms → 0.3 ms).
        main: { tuning: { noDelay: true } },
      },
      postcopy: opts.postcopy ?? false,
      ...(opts.multifd !== undefined ? { multifd: { channels: opts.multifd } } : {}),
      ...(opts.idleTimeoutMs !== undefined ? { idleTimeoutMs: opts.idleTimeoutMs } : {}),
      ...(opts.recovery !== undefined ? { recovery: opts.recovery } : {}),
      ...(opts.threads ? { threads: opts.threads } : {}),
    });
  } catch (e) {
    progress.stop();
    await sink?.close().catch(() => undefined);
    report.error = describeError(e);
    return report;
  }

  const s = session;
  report.listen = s.uri;
  const listening = `listening on ${s.uri}${opts.tls ? ' (TLS)' : ''}${opts.multifd ? `, multifd ${opts.multifd} channels` : ''}${opts.postcopy ? ', postcopy enabled' : ''}`;
  // Printed even without progress: with port 0 it is the only way to learn the port.
  if (progress.mode === 'none') (opts.stderr ?? process.stderr).write(`qmt: ${listening}\n`);
  else progress.log(listening);
  // One line per dropped connection, even without progress: a stranger on the port is worth knowing.
  s.on('stranger', (ev) => {
    const line = `dropped a connection${ev.remote ? ` from ${ev.remote}` : ''} that is not a migration channel (${ev.reason}): ${ev.error.describe()}`;
    if (progress.mode === 'none') (opts.stderr ?? process.stderr).write(`qmt: ${line}\n`);
    else progress.log(line);
  });
  opts.onListening?.(s.uri);

  let blocks: RamBlockInfo[] = [];
  let totalPages = 0;
  let phase: string = s.currentPhase;
  let faults: FaultGenerator | undefined;
  // One RAM PART section per QEMU iteration (every ~50 ms, or per rate-limit slice): a line a second at most.
  let lastPass: { iteration: number; pages: number; transferred: number; at: number; shown: boolean } | undefined;
  const showPass = (): void => {
    if (!lastPass || lastPass.shown) return;
    lastPass.shown = true;
    progress.log(`precopy iteration ${lastPass.iteration}: ${lastPass.pages} pages, ${pagesOf(s.stats())} in all, ${formatBytes(lastPass.transferred)} received`);
  };
  const showPhase = (): void => {
    const now = s.currentPhase;
    if (now === phase) return;
    if (phase === 'precopy') showPass();
    phase = now;
    progress.log(`phase ${now}`);
  };
  const refresh = (): void => {
    showPhase();
    const st = s.stats();
    const f = faults?.report();
    progress.update({
      phase: st.status === 'postcopy-active' && phase !== 'completion' ? 'postcopy' : phase,
      bytes: st.transferred,
      done: pagesOf(st),
      total: totalPages,
      ...(f ? { detail: `${f.answered} faults served` } : {}),
    });
  };
  const ticker = setInterval(refresh, 100);
  ticker.unref();

  s.on('channel', (c) => {
    const tls = c.stats.tls ? ` (${c.stats.tls.protocol ?? 'TLS'}${c.stats.tls.resumed ? ', resumed' : ''})` : '';
    progress.log(`${c.role === 'multifd' ? `multifd-${c.stats.id ?? 0}` : c.role} channel connected${tls}`);
  });
  s.on('configuration', (c) => progress.log(`machine ${c.machineType}`));
  s.on('ram-blocks', (list) => {
    blocks = list;
    totalPages = list.reduce((n, b) => n + Math.ceil(b.length / TARGET_PAGE_SIZE), 0);
    progress.log(`${list.length} RAM blocks, ${formatBytes(list.reduce((n, b) => n + b.length, 0))}`);
    showPhase();
  });
  s.on('pass', (p) => {
    showPhase();
    const now = Date.now();
    const due = !lastPass || now - lastPass.at >= 1000;
    lastPass = { ...p, at: due ? now : lastPass!.at, shown: false };
    if (due) showPass();
  });
  s.on('postcopy-advise', () => progress.log('postcopy advised'));
  s.on('postcopy-listen', () => {
    showPhase();
    progress.log('postcopy listening');
  });
  s.on('postcopy-run', () => {
    showPhase();
    if (opts.fault) {
      faults = new FaultGenerator(s, { pattern: opts.fault, rate: opts.faultRate ?? 100, blocks });
      faults.start();
      progress.log(`postcopy running (source stopped): requesting ${opts.faultRate ?? 100} pages/s (${opts.fault})`);
    } else {
      progress.log('postcopy running (source stopped)');
    }
  });
  // Stop requesting the moment the migration ends, before anything else runs.
  s.on('paused', (p) => progress.log(`postcopy paused (${p.error.reason}); waiting for the source to recover at ${p.uri}`));
  s.on('resumed', (r) => progress.log(`postcopy resumed after ${Math.round(r.pausedMs)} ms (recovery ${r.recoveries})`));
  s.on('completed', () => faults?.stop());
  s.on('failed', () => faults?.stop());

  opts.onPauseReady?.(() => {
    try {
      s.pause();
      progress.log('pausing postcopy (asked)');
    } catch (e) {
      progress.log(`cannot pause: ${e instanceof MigrationError ? e.reason : String(e)}`);
    }
  });

  const cancel = (): void => void s.close();
  if (opts.signal?.aborted) cancel();
  opts.signal?.addEventListener('abort', cancel, { once: true });

  let result: DestinationResult;
  let failure: MigrationError | undefined;
  try {
    result = await s.done;
    const missing = missingPages(s, result.blocks);
    if (missing.count > 0) {
      // A "completed" session with holes must not become a complete saved VM.
      const first = missing.first!;
      failure = new MigrationError('protocol', 'completion', `the migration ended with ${missing.count} page${missing.count === 1 ? '' : 's'} never received (first: ${first.block} +0x${first.offset.toString(16)})`);
      result = { ...result, complete: false, error: failure };
    }
  } catch (e) {
    failure = MigrationError.from(e, s.currentPhase);
    result = s.snapshot(failure);
  }
  opts.signal?.removeEventListener('abort', cancel);
  clearInterval(ticker);
  if (faults) report.faults = faults.stop();
  refresh();
  progress.stop();

  try {
    // The session flushes RAM only when it completes; what a failure leaves must be durable too.
    // A sink that failed itself (disk full) rejects flush() after syncing what it could: the manifest still says what happened.
    if (sink instanceof MappedRamSink) {
      report.manifest = mappedRamSummary(await sink.finish(result), result, out);
    } else {
      if (failure) await sink.flush().catch(() => undefined);
      const manifest = await writeSavedVm(out, result);
      report.manifest = manifestSummary(manifest);
    }
  } catch (e) {
    failure ??= MigrationError.from(e, 'completion');
  } finally {
    await sink.close().catch(() => undefined);
  }
  report.stats = result.stats;
  report.ok = failure === undefined;
  if (failure) report.error = describeError(failure);
  return report;
}

/** The closing lines of a receive, for stderr (the error line, if any, is printed by the caller). */
export function formatReceiveSummary(r: ReceiveReport): string[] {
  const lines: string[] = [];
  const st = r.stats;
  if (st) {
    const pages = pagesOf(st);
    const iter = st['precopy-iterations'];
    lines.push(
      `${r.ok ? 'completed' : 'stopped'} after ${formatDuration(st['total-time'])}: ${formatBytes(st.transferred)}, ${pages} pages (${st.normal} normal, ${st.duplicate} zero${st.xbzrle ? `, ${st.xbzrle} xbzrle` : ''}), ${iter} precopy iteration${iter === 1 ? '' : 's'}${st['preempt-pages'] ? `, ${st['preempt-pages']} pages on the preempt channel` : ''}${st.runs.count ? `, in ${st.runs.count} runs (${(st.runs.pages / st.runs.count).toFixed(1)} pages per run)` : ''}${st['sink-waits'] ? `, reading paused ${st['sink-waits']} times for the disk` : ''}`,
    );
  }
  const m = st?.multifd;
  if (m) lines.push(`multifd: ${m.channels} channels, ${m.packets} packets, ${m.syncs} barriers (${m.perChannel.map((c) => formatBytes(c.bytes)).join(' / ')})`);
  const f = r.faults;
  if (f) {
    const l = f.latency;
    lines.push(
      `faults (${f.pattern}, ${f.rate}/s): ${f.issued} issued, ${f.answered} answered${f.satisfied ? `, ${f.satisfied} arrived unasked` : ''}${f.unanswered ? `, ${f.unanswered} unanswered` : ''}${f.skipped ? `, ${f.skipped} skipped (nothing missing)` : ''}${f.throttled ? `, ${f.throttled} throttled` : ''}` +
        (l.count ? `; latency p50 ${formatMicros(l.p50)}, p90 ${formatMicros(l.p90)}, p99 ${formatMicros(l.p99)}, p99.9 ${formatMicros(l.p999)}, max ${formatMicros(l.max)}` : ''),
    );
    // The generator is one faulting context (vCPU 0): its blocktime is the time it had a request waiting.
    if (st) lines.push(`postcopy blocktime ${st['postcopy-blocktime'].toFixed(1)} ms (the fault generator, as one vCPU, waited on missing pages)`);
  }
  if (r.manifest) {
    const m = r.manifest;
    lines.push(`saved to ${r.out} (${m.complete ? 'complete' : 'incomplete'}: ${m.blocks.length} RAM blocks, ${m.devices.count} device sections)`);
  }
  return lines;
}

interface ReceiveCliOptions {
  listen: string;
  out: string;
  tls?: string;
  tlsAllow?: string[];
  postcopy?: boolean;
  multifd?: number;
  threads?: ThreadMode;
  fault?: FaultPattern;
  faultRate?: number;
  idleTimeout?: number;
  /** commander: false with --no-recovery. */
  recovery?: boolean;
  recoverListen?: string;
  recoveryTimeout?: number;
  format?: ReceiveFormat;
  json?: boolean;
  progress: ProgressMode;
}

/** The fields of `qmt receive --json` after the envelope (README "JSON output"). */
export interface ReceiveJson {
  listen: string | null;
  out: string;
  manifest:
    | (Omit<NonNullable<ReceiveReport['manifest']>, 'blocks' | 'devices'> & {
        blocks: { idstr: string; lengthBytes: number; file: string }[];
        devices: { count: number; bytes: number; idstrs: string[] };
      })
    | null;
  stats: DestinationStatsJson | null;
  faults?: Omit<FaultReport, 'latency'> & { latency: LatencyJson };
}

export function receiveJson(r: ReceiveReport): ReceiveJson {
  const m = r.manifest;
  return {
    listen: r.listen,
    out: r.out,
    manifest: m ? { ...m, blocks: m.blocks.map((b) => ({ idstr: b.idstr, lengthBytes: b.length, file: b.file })) } : null,
    stats: r.stats ? destinationStatsJson(r.stats) : null,
    ...(r.faults ? { faults: { ...r.faults, latency: latencyJson(r.faults.latency) } } : {}),
  };
}

/** Runs `qmt receive` with parsed options (SIGINT/SIGTERM: `ctx.signal`). */
export async function runReceiveCommand(ctx: CommandContext, o: ReceiveCliOptions): Promise<CommandOutcome> {
  if (o.faultRate !== undefined && !o.fault) return { ok: false, error: { code: 'usage', message: '--fault-rate needs --fault' } };
  if (o.format === 'mapped-ram') await checkOutputFile(o.out, '--out, the mapped-ram file to write');
  else await checkOutputDirectory(o.out, '--out, the saved VM to write');
  // SIGUSR1: pause postcopy now (the operator knows the link is dead); without a handler it would kill us.
  let pauseNow: (() => void) | undefined;
  ctx.onSignal('SIGUSR1', () => pauseNow?.());
  const r = await receiveMigration({
    listen: o.listen,
    out: o.out,
    ...(o.format ? { format: o.format } : {}),
    ...(o.tls ? { tls: o.tls } : {}),
    ...(o.tlsAllow?.length ? { tlsAllow: o.tlsAllow } : {}),
    postcopy: o.postcopy ?? false,
    ...(o.multifd !== undefined ? { multifd: o.multifd } : {}),
    ...(o.threads ? { threads: o.threads } : {}),
    ...(o.fault ? { fault: o.fault, faultRate: o.faultRate ?? 100 } : {}),
    ...(o.idleTimeout !== undefined ? { idleTimeoutMs: o.idleTimeout } : {}),
    ...(o.recovery === false
      ? { recovery: false as const }
      : { recovery: { ...(o.recoverListen ? { listen: o.recoverListen } : {}), ...(o.recoveryTimeout !== undefined ? { timeoutMs: o.recoveryTimeout } : {}) } }),
    progress: o.progress,
    signal: ctx.signal,
    onPauseReady: (fn) => (pauseNow = fn),
  });
  if (o.progress !== 'none') for (const line of formatReceiveSummary(r)) ctx.stderr.write(`qmt: ${line}\n`);
  return { ok: r.ok, ...(r.error ? { error: r.error } : {}), json: receiveJson(r) };
}

/** Adds `qmt receive` to a commander program. */
export function registerReceiveCommand(program: Command): Command {
  return program
    .command('receive')
    .description('receive one live migration (a QEMU 10 source) into a saved-VM directory')
    .requiredOption('--listen <uri>', 'tcp:HOST:PORT (port 0: any free port) or unix:PATH', endpointArg)
    .requiredOption('--out <path>', 'saved-VM directory to write (RAM in DIR/ram, devices, manifest.json), or with --format mapped-ram the file')
    .addOption(new Option('--format <format>', "saved-vm (default): our directory; mapped-ram: QEMU's saved-VM file, loaded by QEMU 10 with migrate-incoming file: (capability mapped-ram)").choices([...RECEIVE_FORMATS]))
    .option('--tls <dir>', 'QEMU tls-creds-x509 directory (server side): TLS on every channel')
    .option('--tls-allow <name>', "with --tls: accept only a source whose certificate names NAME (subject DN, CN or subjectAltName; repeatable; QEMU's tls-authz)", (v: string, all: string[]) => [...all, v], [] as string[])
    .option('--postcopy', "accept postcopy (QEMU's postcopy-ram capability)")
    .option('--multifd <n>', "QEMU's multifd: the source opens N more channels for the pages (its multifd-channels, 1..255)", intArg('--multifd', 1, 255))
    .addOption(new Option('--threads <mode>', 'each channel in a worker thread that writes the pages it decodes into the block files: on | off | auto (default: auto, threads with 4 or more cores; on needs Node 26.6+)').choices(['auto', 'on', 'off']))
    .addOption(new Option('--fault <pattern>', 'during postcopy, request missing pages like a faulting guest').choices([...FAULT_PATTERNS]))
    .option('--fault-rate <n>', `demand requests per second with --fault (1..${MAX_FAULT_RATE}, default 100)`, intArg('--fault-rate', 1, MAX_FAULT_RATE))
    .option('--idle-timeout <ms>', 'fail when no byte arrives for this long once connected (default 60000; 0 = never); once postcopy runs, pause instead', intArg('--idle-timeout', 0, 2_147_483_647))
    .option('--recover-listen <uri>', 'postcopy recovery: wait for the source here after a network failure (default: --listen)', endpointArg)
    .option('--recovery-timeout <ms>', 'postcopy recovery: fail when no recovery came this long after the failure (default: wait)', intArg('--recovery-timeout', 1, 2_147_483_647))
    .option('--no-recovery', 'postcopy: fail on a network failure instead of pausing for a recovery')
    .option('--json', 'print a machine-readable report on stdout at the end')
    .addOption(new Option('--progress <mode>', 'progress on stderr: a bar on a TTY, plain lines otherwise').choices([...PROGRESS_MODES]).default('auto'))
    .addHelpText(
      'after',
      [
        '',
        'Postcopy recovery: once the VM runs here, a network failure — a reset, or no byte for --idle-timeout',
        "(a silent partition) — pauses the migration: every page is kept and qmt listens again (at",
        '--recover-listen, default --listen) for the source\'s `migrate … resume=true`.',
        'SIGUSR1 (kill -USR1 PID) pauses postcopy now, as QEMU\'s migrate-pause, for a link known to be dead.',
      ].join('\n'),
    )
    .action(run('receive', runReceiveCommand));
}
