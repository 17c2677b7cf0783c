/**
 * `qmt tap`: relay one live migration between two QEMUs and report what went
 * through (see src/tap).
 */
import { Writable } from 'node:stream';
import type { Command } from 'commander';
import type { LatencySummary } from '../protocol/latency.js';
import { startTap, type Tap, type TapReport } from '../protocol/tap/index.js';
import { endpointArg } from './args.js';
import { describeError } from './errors.js';
import { formatBytes, formatDuration, formatMicros } from './progress.js';
import { rerunWithoutTls13Tickets } from './reexec.js';
import { run } from './run.js';

export interface TapCommandOptions {
  listen: string;
  to: string;
  tlsIn?: string;
  tlsOut?: string;
  tlsHostname?: string;
  json?: boolean;
  /** Keep relaying after a migration completed (one report per main connection). */
  keepListening?: boolean;
  /** Write every direction of every connection to a file in this directory (see src/protocol/tap/capture.ts). */
  capture?: string;
}

/** What `qmt tap --json` prints: one object when the tap stops. */
export interface TapCommandReport {
  /** The last migration through the tap completed (EOF and SHUT 0). */
  ok: boolean;
  listen: string | null;
  to: string;
  /** One per main connection: the migration, then any postcopy recovery. */
  sessions: TapReport[];
  /** Connections dropped before they became a channel (a probe, an HTTP request, a client of another CA …): how many, and the latest 100. */
  strangers: { count: number; latest: Array<{ reason: string; code: string; message: string; remote?: string }> };
  error?: { code: string; message: string };
}

export interface TapCommandIo {
  stdout: NodeJS.WritableStream;
  stderr: NodeJS.WritableStream;
  /** Aborting stops the tap (a running migration through it fails). */
  signal?: AbortSignal;
  /** Called with the tap once it listens. */
  onListening?: (tap: Tap) => void;
}

function describe(e: unknown): { code: string; message: string } {
  const { code, message } = describeError(e);
  return { code, message };
}

/**
 * Runs the tap until a migration through it has completed (or, with
 * `keepListening`, until `signal` aborts), printing event lines on stderr
 * and the report(s) on stdout. Resolves with the report.
 */
export async function runTapCommand(o: TapCommandOptions, io: TapCommandIo): Promise<TapCommandReport> {
  const log = (line: string): void => void io.stderr.write(`qmt: ${line}\n`);
  let tap: Tap;
  try {
    tap = await startTap({
      listen: o.listen,
      to: o.to,
      ...(o.tlsIn ? { tlsIn: o.tlsIn } : {}),
      ...(o.tlsOut ? { tlsOut: o.tlsOut } : {}),
      ...(o.tlsHostname ? { tlsHostname: o.tlsHostname } : {}),
      ...(o.capture ? { capture: o.capture } : {}),
    });
  } catch (e) {
    return { ok: false, listen: null, to: o.to, sessions: [], strangers: { count: 0, latest: [] }, error: describe(e) };
  }
  log(`tap listening on ${tap.uri}, relaying to ${tap.to}${o.tlsIn ? ' (TLS from the source)' : ''}${o.tlsOut ? ' (TLS to the destination)' : ''}`);
  tap.on('session', ({ session }) => log(`session ${session}: main connection`));
  tap.on('channel', (c) => log(`session ${c.session}: ${c.role} channel forwarding${c.tlsIn ? `, in ${c.tlsIn.protocol}` : ''}${c.tlsOut ? `, out ${c.tlsOut.protocol}` : ''}`));
  tap.on('milestone', (m) => {
    if (m.name === 'switchover-start' || m.name === 'postcopy-run' || m.name === 'eof') log(`session ${m.session}: ${m.name} at ${formatDuration(m.atMs)}`);
  });
  tap.on('parse-error', (e) =>
    log(
      `session ${e.session}: cannot parse the ${e.direction}${e.channel === undefined ? '' : ` ${e.channel}`} direction any further (${e.error.code} at byte ${e.error.offset}: ${e.error.message}); still forwarding`,
    ),
  );
  tap.on('error', (e) => log(`${e.code}${e.channel ? ` (${e.channel} channel)` : ''}: ${e.message}`));
  tap.on('stranger', (ev) => log(`stranger${ev.remote ? ` from ${ev.remote}` : ''} dropped (${ev.reason}): ${ev.error.describe()}`));
  io.onListening?.(tap);

  const done = new Promise<void>((resolve) => {
    tap.on('session-end', (r) => {
      if (!o.json) io.stdout.write(`${formatTapReport(r).join('\n')}\n`);
      if (r.complete && !o.keepListening) resolve();
    });
    if (io.signal?.aborted) resolve();
    io.signal?.addEventListener('abort', () => resolve(), { once: true });
  });
  await done;
  const sessions = await tap.close();
  const last = sessions[sessions.length - 1];
  const dropped = tap.strangers();
  const strangers = {
    count: dropped.count,
    latest: dropped.latest.map((ev) => ({ reason: ev.reason, code: ev.error.code, message: ev.error.message, ...(ev.remote ? { remote: ev.remote } : {}) })),
  };
  const report: TapCommandReport = { ok: last?.complete ?? false, listen: tap.uri, to: tap.to, sessions, strangers };
  if (o.json) io.stdout.write(`${JSON.stringify(report, null, 2)}\n`);
  return report;
}

const pct = (l: LatencySummary): string =>
  l.count === 0
    ? 'none'
    : `p50 ${formatMicros(l.p50)}, p90 ${formatMicros(l.p90)}, p99 ${formatMicros(l.p99)}, p99.9 ${formatMicros(l.p999)}, max ${formatMicros(l.max)} (${l.count})`;

const at = (ms: number | null): string => (ms === null ? '-' : formatDuration(ms));

const pages = (p: { normal: number; zero: number; xbzrle: number }): string => `${p.normal} normal, ${p.zero} zero${p.xbzrle ? `, ${p.xbzrle} xbzrle` : ''}`;

/** The report as text lines. */
export function formatTapReport(r: TapReport): string[] {
  const mode = !r.postcopy ? 'precopy' : r.preempt ? 'postcopy with preempt' : 'postcopy';
  const tls = r.tls.in || r.tls.out ? `, TLS ${[r.tls.in ? 'in' : '', r.tls.out ? 'out' : ''].filter(Boolean).join('+')}` : '';
  const lines = [
    `session ${r.session} (${r.kind}${r.machineType ? `, ${r.machineType}` : ''}): ${r.complete ? 'complete' : r.state === 'running' ? 'running' : 'incomplete'} after ${formatDuration(r.durationMs)}, ${mode}${tls}`,
  ];
  const m = r.main;
  const rate = (b: number): string => `${formatBytes(b)}/s`;
  lines.push(`  main       ${formatBytes(m.bytes)} at ${rate(m.bytesPerSecond)}; pages ${pages(m.pages)}${r.postcopy ? ` (after LISTEN: ${pages(m.postcopyPages)})` : ''}`);
  const pre = r.passes.filter((p) => p.phase === 'precopy').length;
  const post = r.passes.length - pre;
  lines.push(`             RAM PART sections: ${m.ramParts.precopy} precopy, ${m.ramParts.postcopy} postcopy; passes: ${pre} precopy${post ? `, ${post} postcopy` : ''}; ${m.devices.count} device sections (${formatBytes(m.devices.bytes)})`);
  const msgs = Object.entries(r.returnPath.messages).map(([k, v]) => `${k} ${v}`).join(', ');
  lines.push(`  return     ${formatBytes(r.returnPath.bytes)}${msgs ? `; ${msgs}` : ''}${r.returnPath.shut !== null ? ` (SHUT ${r.returnPath.shut})` : ''}`);
  if (r.preempt) lines.push(`  preempt    ${formatBytes(r.preempt.bytes)}; pages ${pages(r.preempt.pages)}`);
  if (r.multifd) {
    const t = r.multifd.total;
    lines.push(
      `  multifd    ${t.channels} channels, ${formatBytes(t.multifdBytes)} in ${t.packets} packets (${t.syncs} SYNC, ${r.main.multifdFlushes} MULTIFD_FLUSH on main); pages ${t.pages.normal} normal, ${t.pages.zero} zero`,
    );
    for (const c of r.multifd.channels) {
      lines.push(
        `    channel ${c.id ?? '?'} (connection ${c.connection}) ${formatBytes(c.bytes)} at ${rate(c.bytesPerSecond)}; ${c.packets} packets (${c.syncs} SYNC); pages ${c.pages.normal} normal, ${c.pages.zero} zero`,
      );
    }
  }
  const s = r.switchover;
  lines.push(
    `  switchover SWITCHOVER_START at ${at(s.switchoverStartMs)}, PACKAGED ${at(s.packagedMs)}, RUN ${at(s.postcopyRunMs)}, EOF ${at(s.eofMs)}${s.wireMs !== null ? `; on the wire ${formatMicros(s.wireMs * 1000)}` : ''}`,
  );
  const q = r.requests;
  if (q.count > 0) {
    lines.push(`  requests   ${q.count}: answered on preempt ${q.answered.preempt}, on main ${q.answered.main}; crossed in flight ${q.alreadyForwarded}; unanswered ${q.unanswered}`);
    lines.push(`    request → page  ${pct(q.latency.all)}`);
    lines.push(`    blocktime       ${q.blocktimeMs.toFixed(1)} ms with a request waiting (the network's part of a one-vCPU guest's postcopy-blocktime)`);
    if (q.latency.preempt.count) lines.push(`      on preempt    ${pct(q.latency.preempt)}`);
    if (q.latency.main.count) lines.push(`      on main       ${pct(q.latency.main)}`);
  }
  const o = r.overhead;
  lines.push(`  tap        forward delay ${pct(o.forwardDelay.all)}`);
  lines.push(
    `             taken by the kernel at once ${pct(o.forwardDelayUnqueued)}; analysis per chunk p50 ${formatMicros(o.analysisPerChunk.p50)}, p99 ${formatMicros(o.analysisPerChunk.p99)}`,
  );
  lines.push(
    `             paused ${o.backpressure.pauses}× (${formatDuration(o.backpressure.pausedMs)}) for a full outgoing socket; peak queued ${formatBytes(o.peakQueuedBytes)}; event loop p99 ${formatMicros(o.eventLoopDelay.p99)}; CPU ${o.processCpu.percentOfOneCore}% of one core`,
  );
  for (const e of r.parseErrors) lines.push(`  parse error (${e.direction}${e.channel === undefined ? '' : ` ${e.channel}`}) at byte ${e.offset}: ${e.code}: ${e.message}`);
  if (r.capture) {
    const failed = r.capture.files.filter((f) => f.error);
    lines.push(`  capture    ${r.capture.files.length} files in ${r.capture.dir}${failed.length ? `; not written: ${failed.map((f) => `${f.name} (${f.error!.code})`).join(', ')}` : ''}`);
  }
  for (const e of r.transportErrors) lines.push(`  ${e.side} ${e.channel} connection: ${e.code}: ${e.message}${e.afterComplete ? ' (after completion)' : ''}`);
  return lines;
}

/** Adds `qmt tap` to a commander program. */
export function registerTapCommand(program: Command): Command {
  return program
    .command('tap')
    .description('relay a live migration between two QEMUs, byte for byte, and report what went through (pages, passes, switchover, postcopy request latency)')
    .requiredOption('--listen <uri>', 'where the source QEMU migrates to: tcp:HOST:PORT (port 0: any free port) or unix:PATH', endpointArg)
    .requiredOption('--to <uri>', "the destination QEMU's migrate-incoming URI: tcp:HOST:PORT or unix:PATH", endpointArg)
    .option('--tls-in <dir>', 'tls-creds-x509 directory with server credentials: terminate the source\'s TLS')
    .option('--tls-out <dir>', 'tls-creds-x509 directory with client credentials: TLS to the destination')
    .option('--tls-hostname <name>', "name the destination's certificate must carry (default: the host of --to)")
    .option('--json', 'print one machine-readable report on stdout when the tap stops')
    .option('--keep-listening', 'relay further migrations after one completed (stop with SIGINT)')
    .option('--capture <dir>', 'write every channel direction to a file in DIR (session-N-main.bin, -return-path, -preempt, -multifd-K), for qmt inspect')
    .action(
      run('tap', async (ctx, o: TapCommandOptions) => {
        // A QEMU source never reads TLS 1.3 session tickets on a channel without a
        // return path; unread, they make its close a reset (openssl/no-tls13-tickets.cnf).
        if (o.tlsIn) {
          const code = rerunWithoutTls13Tickets();
          if (code !== undefined) process.exit(code);
        }
        // The reports go to stdout as the runner's one JSON object (`--json`) or as text.
        const r = await runTapCommand({ ...o, json: false }, { stdout: ctx.json ? devNull : ctx.stdout, stderr: ctx.stderr, signal: ctx.signal });
        return { ok: r.ok, ...(r.error ? { error: r.error } : {}), json: tapJson(r) };
      }),
    );
}

/** The fields of `qmt tap --json` after the envelope (README "JSON output"); TapReport names its units. */
export function tapJson(r: TapCommandReport): Omit<TapCommandReport, 'ok' | 'error'> {
  return { listen: r.listen, to: r.to, sessions: r.sessions, strangers: r.strangers };
}

const devNull: NodeJS.WritableStream = new Writable({ write: (_c, _e, cb) => cb() });
