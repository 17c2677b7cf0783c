/**
 * `qmt tunnel entry` and `qmt tunnel exit`: the two ends of a resumable hop
 * between a source QEMU and a destination QEMU that cannot reach each other
 * (src/protocol/tunnel). Each runs until SIGINT or SIGTERM, printing one line
 * per event on stderr; `--json` prints the stats of every carried connection
 * when it stops. Exit 0 once stopped: a carried connection that failed (its
 * QEMU side failed, or the hop stayed down past --outage-timeout) is an
 * event and a line of the stats, not a failure of the tunnel.
 */
import { Option, type Command } from 'commander';
import { TunnelEntry, TunnelExit, type TunnelEvents, type TunnelLimits, type TunnelStats } from '../protocol/tunnel/index.js';
import { endpointArg, intArg } from './args.js';
import { formatBytes, formatMicros } from './progress.js';
import { run } from './run.js';

interface CommonOptions {
  listen: string;
  to: string;
  tls: string;
  outageTimeout: number;
  silenceTimeout: number;
  replayBuffer: number;
  whenFull: 'wait' | 'close';
}

interface EntryOptions extends CommonOptions {
  tlsHostname?: string;
  multifd?: number;
}

function limitsOf(o: CommonOptions): TunnelLimits {
  return { outageMs: o.outageTimeout, silenceMs: o.silenceTimeout, replayBytes: o.replayBuffer * 1024 * 1024, whenFull: o.whenFull };
}

/** Event lines on stderr, the same at both ends. */
type On = <K extends keyof TunnelEvents>(k: K, f: (...a: TunnelEvents[K]) => void) => void;

function logEvents(on: On, log: (line: string) => void): { failed: () => number } {
  let failed = 0;
  const t = { on };
  t.on('connection', (c) => log(`connection ${c.index} (${c.role}) crossed the hop`));
  t.on('lost', (c) => log(`connection ${c.index} (${c.role}): hop lost (${c.error.code}: ${c.error.message}); the QEMU side stays open`));
  t.on('resumed', (c) => log(`connection ${c.index} (${c.role}): resumed after ${Math.round(c.outageMs)} ms, ${formatBytes(c.replayed)} sent again`));
  t.on('ended', (c) => log(`connection ${c.index} (${c.role}) ended`));
  t.on('failed', (c) => {
    failed++;
    log(`connection ${c.index} (${c.role}) failed: ${c.error.describe()}; its QEMU sides are closed`);
  });
  return { failed: () => failed };
}

function summary(s: TunnelStats): string {
  return `${s.connections.length} connection(s), ${formatBytes(s.bytesUp)} toward the destination, ${formatBytes(s.bytesDown)} back; ${s.outages} outage(s), ${formatBytes(s.replayedBytes)} sent again`;
}

/** One line per migration as this end parsed it. */
function migrationLines(s: TunnelStats): string[] {
  return s.migrations.map((m, i) => {
    const passes = m.passes.filter((p) => p.phase === 'precopy').length;
    const q = m.requests;
    const lat = q.count > 0 ? `; ${q.count} page requests, request → page p50 ${formatMicros(q.latency.all.p50)}, p99 ${formatMicros(q.latency.all.p99)} (${q.answered.preempt} on preempt)` : '';
    return `migration ${i + 1} (${m.kind}${m.machineType ? `, ${m.machineType}` : ''}): ${m.complete ? 'complete' : 'incomplete'}, ${m.postcopy ? 'postcopy' : 'precopy'}, ${passes} precopy pass(es), main ${formatBytes(m.main.bytes)}${m.preempt ? `, preempt ${formatBytes(m.preempt.bytes)}` : ''}${m.multifd ? `, ${m.multifd.total.channels} multifd channels` : ''}${lat}`;
  });
}

/** Waits for SIGINT/SIGTERM (the runner's signal), then closes the end. */
function untilStopped(signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal.aborted) resolve();
    signal.addEventListener('abort', () => resolve(), { once: true });
  });
}

function common(cmd: Command): Command {
  return cmd
    .requiredOption('--tls <dir>', 'our PKI directory (qmt pki init): mutual TLS on the hop, the same CA at both ends')
    .option('--outage-timeout <ms>', 'close the QEMU side of a connection whose hop stays down longer (QEMU then pauses or fails on its own)', intArg('--outage-timeout', 100, 24 * 3600 * 1000), 30_000)
    .option('--silence-timeout <ms>', 'a hop connection silent this long is taken as cut (a link that goes silent instead of resetting)', intArg('--silence-timeout', 100, 600_000), 2000)
    .option('--replay-buffer <MiB>', 'bytes per connection and direction kept until the other end acknowledges them; reading QEMU waits beyond', intArg('--replay-buffer', 1, 4096), 64)
    .addOption(new Option('--when-full <what>', 'a replay buffer that fills during an outage: wait (for the hop, up to --outage-timeout) or close the QEMU side at once').choices(['wait', 'close']).default('wait'))
    .option('--json', 'print the stats of every carried connection on stdout when stopped');
}

/** Adds `qmt tunnel entry|exit` to a commander program. */
export function registerTunnelCommand(program: Command): Command {
  const tunnel = program.command('tunnel').description('carry a live migration across a network between two QEMUs through a resumable, mutually authenticated hop that survives cuts');
  common(
    tunnel
      .command('entry')
      .description("the source host's end: QEMU migrates to --listen; every QEMU connection crosses to the exit on its own TLS connection")
      .requiredOption('--listen <uri>', "where the source QEMU's migrate connects: unix:PATH or tcp:HOST:PORT (binds only there; port 0: any free port)", endpointArg)
      .requiredOption('--to <uri>', "the exit's address: tcp:HOST:PORT", endpointArg)
      .option('--tls-hostname <name>', "name the exit's certificate must carry (default: the host of --to)")
      .option('--multifd <n>', 'with QEMU TLS end to end (its bytes hidden): the first N connections after main are multifd channels (bulk tuning)', intArg('--multifd', 0, 255)),
  ).action(
    run('tunnel entry', async (ctx, o: EntryOptions) => {
      const log = (line: string): void => void ctx.stderr.write(`qmt: ${line}\n`);
      const entry = await TunnelEntry.start({
        listen: o.listen,
        to: o.to,
        tls: { dir: o.tls, ...(o.tlsHostname ? { hostname: o.tlsHostname } : {}) },
        limits: limitsOf(o),
        ...(o.multifd !== undefined ? { multifdChannels: o.multifd } : {}),
      });
      log(`tunnel entry listening on ${entry.uri}, exit at ${o.to}`);
      const ev = logEvents((k, f) => entry.on(k, f as never), log);
      await untilStopped(ctx.signal);
      await entry.close();
      const stats = entry.stats();
      log(`tunnel entry stopped: ${summary(stats)}`);
      for (const l of migrationLines(stats)) log(l);
      return { ok: true, json: { listen: entry.uri, to: o.to, stats, failedConnections: ev.failed() } };
    }),
  );
  common(
    tunnel
      .command('exit')
      .description("the destination host's end: accepts the entry's hop connections and connects each to the destination QEMU, in the order the source QEMU opened them")
      .requiredOption('--listen <uri>', "where the entry connects: tcp:HOST:PORT (port 0: any free port)", endpointArg)
      .requiredOption('--to <uri>', "the destination QEMU's migrate-incoming URI: unix:PATH or tcp:HOST:PORT", endpointArg),
  ).action(
    run('tunnel exit', async (ctx, o: CommonOptions) => {
      const log = (line: string): void => void ctx.stderr.write(`qmt: ${line}\n`);
      const exit = await TunnelExit.start({ listen: o.listen, to: o.to, tls: { dir: o.tls }, limits: limitsOf(o) });
      log(`tunnel exit listening on ${exit.uri}, destination ${o.to}`);
      const ev = logEvents((k, f) => exit.on(k, f as never), log);
      exit.on('stranger', (s) => log(`stranger${s.remote ? ` from ${s.remote}` : ''} dropped (${s.reason}): ${s.error.describe()}`));
      await untilStopped(ctx.signal);
      await exit.close();
      const stats = exit.stats();
      log(`tunnel exit stopped: ${summary(stats)}; ${exit.strangers} stranger(s) dropped`);
      for (const l of migrationLines(stats)) log(l);
      return { ok: true, json: { listen: exit.uri, to: o.to, stats, failedConnections: ev.failed(), strangers: exit.strangers } };
    }),
  );
  return tunnel;
}
