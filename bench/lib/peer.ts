/**
 * One side of the latency benchmark, run as a child process (possibly inside a
 * network namespace): `node --import tsx bench/lib/peer.ts source|dest`.
 * Commands arrive as JSON lines on stdin, answers leave as JSON lines on
 * stdout; logs go to stderr. The process exits when stdin closes, on `exit`,
 * or after a hard time limit, so that nothing outlives the benchmark.
 */
import { once } from 'node:events';
import { readFile } from 'node:fs/promises';
import net from 'node:net';
import { join } from 'node:path';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { createInterface } from 'node:readline';
import tls from 'node:tls';
import type { Channel } from '../../src/transport/channel.js';
import { DestinationConnection, MigrationListener, SourceConnection, type TransportOptions } from '../../src/transport/connection.js';
import {
  BULK_CHUNK,
  FRAME_BULK,

  FRAME_REPLY,
  FrameParser,
  PAGE_BYTES,
  RequestParser,
  frameHeader,
  request,
  type CellKind,
  type LoopDelay,
  type PeerCommand,
  type PeerReply,
  type PeerRequest,
  type RunResult,
  type ThroughputVariant,
} from './protocol.js';
import { KERNEL_DEFAULTS, readSocketOptions, setSocketPriority } from './sockets.js';
import { delaySummaryUs } from './stats.js';

const role = process.argv[2];
if (role !== 'source' && role !== 'dest') {
  process.stderr.write('usage: peer.ts source|dest\n');
  process.exit(2);
}
const HARD_LIMIT_MS = 15 * 60 * 1000;
setTimeout(() => {
  process.stderr.write(`[${role}] hard time limit reached, exiting\n`);
  process.exit(3);
}, HARD_LIMIT_MS).unref();

const log = (msg: string): void => void process.stderr.write(`[${role}] ${msg}\n`);
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
const nowNs = (): bigint => process.hrtime.bigint();

/** Rejects after `ms` unless `p` settles first. */
function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  return Promise.race([
    p.finally(() => clearTimeout(timer)),
    new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${what}: no result within ${ms} ms`)), ms);
    }),
  ]);
}

function transportOptions(cell: CellKind, tlsDir: string | undefined): TransportOptions {
  if (cell.kind === 'throughput') return cell.variant === 'channel-tls' && tlsDir ? { tls: { dir: tlsDir } } : {};
  if (cell.mode === 'two-default') return { main: { tuning: KERNEL_DEFAULTS }, preempt: { tuning: KERNEL_DEFAULTS } };
  return {};
}

const isRaw = (v: ThroughputVariant): boolean => v === 'raw-tcp' || v === 'raw-tls';

async function rawTlsFiles(dir: string, side: 'server' | 'client'): Promise<{ ca: string; cert: string; key: string }> {
  const [ca, cert, key] = await Promise.all([
    readFile(join(dir, 'ca-cert.pem'), 'utf8'),
    readFile(join(dir, `${side}-cert.pem`), 'utf8'),
    readFile(join(dir, `${side}-key.pem`), 'utf8'),
  ]);
  return { ca, cert, key };
}

function describeTls(s: net.Socket): { protocol: string | null; cipher: string } | undefined {
  const t = s as tls.TLSSocket;
  return typeof t.getProtocol === 'function' ? { protocol: t.getProtocol(), cipher: t.getCipher()?.name ?? '' } : undefined;
}

// ---------------------------------------------------------------------------
// Destination
// ---------------------------------------------------------------------------

class Destination {
  private cell: CellKind | undefined;
  private listener: MigrationListener | undefined;
  private conn: DestinationConnection | undefined;
  private rawServer: net.Server | undefined;
  private rawSock: net.Socket | undefined;
  private rawArrived: Promise<net.Socket> | undefined;
  private bulkBytes = 0;
  private waiting: { seq: number; resolve: () => void } | undefined;
  private seq = 0;
  private mainEnded: Promise<void> | undefined;

  async listen(host: string, cell: CellKind, tlsDir: string | undefined): Promise<{ uri: string }> {
    if (this.cell) throw new Error('a cell is still open');
    this.cell = cell;
    this.bulkBytes = 0;
    if (cell.kind === 'throughput' && isRaw(cell.variant)) {
      const server =
        cell.variant === 'raw-tls'
          ? tls.createServer({ ...(await rawTlsFiles(tlsDir ?? '', 'server')), requestCert: true, rejectUnauthorized: true, minVersion: 'TLSv1.3' })
          : net.createServer();
      this.rawServer = server;
      this.rawArrived = new Promise((resolve) => {
        server.once(cell.variant === 'raw-tls' ? 'secureConnection' : 'connection', (s: net.Socket) => resolve(s));
      });
      server.on('error', (e) => log(`raw server: ${e.message}`));
      await new Promise<void>((resolve, reject) => {
        server.once('error', reject);
        server.listen({ host, port: 0 }, () => resolve());
      });
      const a = server.address() as net.AddressInfo;
      return { uri: `tcp:${host}:${a.port}` };
    }
    // Bench frames, not a migration stream: roles by order, as QEMU assigns them.
    this.listener = await MigrationListener.listen(`tcp:${host}:0`, transportOptions(cell, tlsDir), { start: 'any' });
    this.listener.on('stranger', (ev) => log(`dropped a connection (${ev.reason}): ${ev.error.describe()}`));
    return { uri: this.listener.uri };
  }

  async accept(timeoutMs: number): Promise<unknown> {
    const cell = this.cell;
    if (!cell) throw new Error('not listening');
    const count = (chunk: Buffer): void => {
      this.bulkBytes += chunk.length;
    };
    if (this.rawArrived) {
      const s = await withTimeout(this.rawArrived, timeoutMs, 'accept');
      this.rawSock = s;
      s.on('error', (e) => log(`raw socket: ${e.message}`));
      s.on('data', count);
      this.mainEnded = new Promise((resolve) => s.once('end', resolve).once('close', resolve));
      return { tls: describeTls(s) };
    }
    const conn = await withTimeout(this.listener!.accept(), timeoutMs, 'accept');
    this.conn = conn;
    conn.main.on('error', (e) => log(`main: ${e.describe()}`));
    this.mainEnded = new Promise((resolve) => conn.main.once('end', resolve).once('close', resolve));
    if (cell.kind === 'throughput') conn.main.read(count);
    else conn.main.read(this.parser().push.bind(this.parser()));
    return { tuning: conn.main.stats.tuning, tls: conn.main.stats.tls, actual: readSocketOptions(conn.main.socket) };
  }

  private parserInstance: FrameParser | undefined;
  private parser(): FrameParser {
    this.parserInstance ??= this.newParser();
    return this.parserInstance;
  }

  private newParser(): FrameParser {
    return new FrameParser(
      (n) => {
        this.bulkBytes += n;
      },
      (seq) => {
        const w = this.waiting;
        if (w && w.seq === seq) {
          this.waiting = undefined;
          w.resolve();
        }
      },
    );
  }

  async waitPreempt(timeoutMs: number): Promise<unknown> {
    const conn = this.conn;
    if (!conn) throw new Error('no connection');
    const ch = await withTimeout(conn.waitPreempt(), timeoutMs, 'wait-preempt');
    ch.on('error', (e) => log(`preempt: ${e.describe()}`));
    const p = this.newParser();
    ch.read((chunk) => p.push(chunk));
    return { tuning: ch.stats.tuning, actual: readSocketOptions(ch.socket) };
  }

  /** The channel requests go out on: the preempt channel when there is one, else the main channel's reverse direction. */
  private requestChannel(): Channel {
    const conn = this.conn;
    if (!conn) throw new Error('no connection');
    return conn.preempt ?? conn.main;
  }

  async run(c: Extract<PeerCommand, { cmd: 'run' }>): Promise<RunResult> {
    // Warm-up: with requests, the same loop with its samples thrown away (JIT, first-use costs).
    if (c.requests && c.warmupMs > 0) await this.requestLoop(nowNs() + BigInt(Math.round(c.warmupMs * 1e6)), c.gapMs, c.maxSamples);
    else await sleep(c.warmupMs);
    const b0 = this.bulkBytes;
    const t0 = nowNs();
    const endNs = t0 + BigInt(Math.round(c.durationMs * 1e6));
    let samples: number[] = [];
    let unanswered = 0;
    if (c.requests) ({ samples, unanswered } = await this.requestLoop(endNs, c.gapMs, c.maxSamples));
    else await sleep(c.durationMs);
    const t1 = nowNs();
    return { samples, bulkBytes: this.bulkBytes - b0, windowSec: Number(t1 - t0) / 1e9, unanswered };
  }

  /** One request outstanding at a time until `endNs`; round trips in µs. */
  private async requestLoop(endNs: bigint, gapMs: number, maxSamples: number): Promise<{ samples: number[]; unanswered: number }> {
    const ch = this.requestChannel();
    const samples: number[] = [];
    let unanswered = 0;
    const gapNs = BigInt(Math.round(gapMs * 1e6));
    while (samples.length < maxSamples && nowNs() < endNs) {
      const seq = ++this.seq;
      let timer: NodeJS.Timeout | undefined;
      const answered = new Promise<boolean>((resolve) => {
        this.waiting = { seq, resolve: () => resolve(true) };
        timer = setTimeout(() => resolve(false), 10_000);
      });
      const start = nowNs();
      ch.send([request(seq)], 'urgent').catch((e: unknown) => log(`request send: ${String(e)}`));
      const ok = await answered;
      const end = nowNs();
      clearTimeout(timer);
      if (!ok) {
        this.waiting = undefined;
        unanswered++;
        break;
      }
      samples.push(Number(end - start) / 1000);
      // Pace: one request outstanding, then a short pause before the next.
      if (end + gapNs >= endNs) break;
      await sleep(gapMs);
    }
    return { samples, unanswered };
  }

  async close(timeoutMs: number): Promise<unknown> {
    const stats = this.conn?.stats();
    try {
      if (this.mainEnded) await withTimeout(this.mainEnded, timeoutMs, 'waiting for the source to close').catch((e: unknown) => log(String(e)));
      if (this.conn) await withTimeout(this.conn.close(), timeoutMs, 'close').catch(() => this.conn?.destroy());
    } finally {
      this.conn?.destroy();
      this.rawSock?.destroy();
      this.listener?.close();
      this.rawServer?.close();
      this.conn = undefined;
      this.rawSock = undefined;
      this.rawArrived = undefined;
      this.listener = undefined;
      this.rawServer = undefined;
      this.parserInstance = undefined;
      this.mainEnded = undefined;
      this.cell = undefined;
    }
    return { stats };
  }

  shutdown(): void {
    this.conn?.destroy();
    this.rawSock?.destroy();
    this.listener?.close();
    this.rawServer?.close();
  }
}

// ---------------------------------------------------------------------------
// Source
// ---------------------------------------------------------------------------

const yieldToIo = (): Promise<void> => new Promise((r) => setImmediate(r));
const BULK_FRAME = Buffer.concat([frameHeader(FRAME_BULK, BULK_CHUNK, 0), Buffer.alloc(BULK_CHUNK, 0x5a)]);
const PAGE = Buffer.alloc(PAGE_BYTES, 0xa5);
const RAW_CHUNK = Buffer.alloc(1024 * 1024, 0x5a);
/** A bulk loop never runs longer than this, whatever the orchestrator does. */
const BULK_LIMIT_MS = 120_000;

class Source {
  private cell: CellKind | undefined;
  private conn: SourceConnection | undefined;
  private raw: net.Socket | undefined;
  private bulkOn = false;
  private bulkLoop: Promise<void> | undefined;
  private bulkSent = 0;
  private replies = 0;

  async connect(uri: string, cell: CellKind, tlsDir: string | undefined): Promise<unknown> {
    if (this.cell) throw new Error('a cell is still open');
    this.cell = cell;
    this.bulkSent = 0;
    this.replies = 0;
    if (cell.kind === 'throughput' && isRaw(cell.variant)) {
      const m = /^tcp:(.*):(\d+)$/.exec(uri);
      if (!m) throw new Error(`bad uri ${uri}`);
      const host = m[1]!;
      const port = Number(m[2]);
      const s =
        cell.variant === 'raw-tls'
          ? tls.connect({ host, port, ...(await rawTlsFiles(tlsDir ?? '', 'client')), minVersion: 'TLSv1.3', servername: '' })
          : net.connect({ host, port });
      this.raw = s;
      s.on('error', (e) => log(`raw socket: ${e.message}`));
      await withTimeout(once(s, cell.variant === 'raw-tls' ? 'secureConnect' : 'connect'), 10_000, 'raw connect');
      return { tls: describeTls(s) };
    }
    const conn = await SourceConnection.connect(uri, { ...transportOptions(cell, tlsDir), connectTimeoutMs: 10_000 });
    this.conn = conn;
    conn.main.on('error', (e) => log(`main: ${e.describe()}`));
    if (cell.kind === 'latency') this.serveRequests(conn.main);
    return { tuning: conn.main.stats.tuning, tls: conn.main.stats.tls, actual: readSocketOptions(conn.main.socket) };
  }

  /** Answers every request arriving on `ch` with a 4 KiB page on the same channel, ahead of queued bulk data. */
  private serveRequests(ch: Channel): void {
    const parser = new RequestParser((seq) => {
      this.replies++;
      ch.send([frameHeader(FRAME_REPLY, PAGE_BYTES, seq), PAGE], 'urgent').catch((e: unknown) => log(`reply send: ${String(e)}`));
    });
    ch.read((chunk) => parser.push(chunk));
  }

  async preempt(reassertPriority: number | undefined): Promise<unknown> {
    const conn = this.conn;
    if (!conn) throw new Error('no connection');
    const ch = await conn.connectPreempt();
    ch.on('error', (e) => log(`preempt: ${e.describe()}`));
    const before = readSocketOptions(ch.socket);
    if (reassertPriority !== undefined) setSocketPriority(ch.socket, reassertPriority);
    this.serveRequests(ch);
    return { tuning: ch.stats.tuning, actualAfterTuning: before, actual: readSocketOptions(ch.socket) };
  }

  bulk(on: boolean): void {
    if (!on) {
      this.bulkOn = false;
      return;
    }
    if (this.bulkOn) return;
    this.bulkOn = true;
    const deadline = Date.now() + BULK_LIMIT_MS;
    const run = async (): Promise<void> => {
      if (this.raw) {
        const s = this.raw;
        while (this.bulkOn && Date.now() < deadline && !s.destroyed) {
          this.bulkSent += RAW_CHUNK.length;
          if (!s.write(RAW_CHUNK)) {
            await new Promise<void>((resolve) => {
              const done = (): void => {
                s.off('drain', done);
                s.off('close', done);
                resolve();
              };
              s.on('drain', done);
              s.on('close', done);
            });
          }
        }
        return;
      }
      const main = this.conn?.main;
      if (!main) throw new Error('no connection');
      const latency = this.cell?.kind === 'latency';
      const frame = latency ? BULK_FRAME : RAW_CHUNK;
      const payload = latency ? BULK_CHUNK : RAW_CHUNK.length;
      while (this.bulkOn && Date.now() < deadline && !main.isClosed) {
        // Awaiting send() is the backpressure: it resolves once user-space buffering is under the bound.
        await main.send([frame]);
        this.bulkSent += payload;
        // Under the bound send() resolves as a microtask, so this loop alone would never let I/O run while
        // the kernel keeps taking data (loopback): requests would wait tens of ms to be read. Yield after
        // every group, as the source session does in postcopy (src/protocol/source.ts, flushMain).
        if (latency) await yieldToIo();
      }
    };
    this.bulkLoop = run().catch((e: unknown) => log(`bulk loop: ${String(e)}`));
  }

  async close(timeoutMs: number): Promise<unknown> {
    this.bulkOn = false;
    try {
      if (this.bulkLoop) await withTimeout(this.bulkLoop, timeoutMs, 'bulk loop end').catch((e: unknown) => log(String(e)));
      const stats = this.conn?.stats();
      const preemptActual = this.conn?.preempt ? readSocketOptions(this.conn.preempt.socket) : undefined;
      if (this.conn) await withTimeout(this.conn.close(), timeoutMs, 'close').catch((e: unknown) => log(String(e)));
      if (this.raw) {
        const s = this.raw;
        await withTimeout(
          new Promise<void>((resolve) => {
            if (s.destroyed) return resolve();
            s.once('close', () => resolve());
            s.end();
          }),
          timeoutMs,
          'raw close',
        ).catch((e: unknown) => log(String(e)));
      }
      return { stats, preemptActual, bulkSent: this.bulkSent, replies: this.replies };
    } finally {
      this.conn?.destroy();
      this.raw?.destroy();
      this.conn = undefined;
      this.raw = undefined;
      this.bulkLoop = undefined;
      this.cell = undefined;
    }
  }

  shutdown(): void {
    this.bulkOn = false;
    this.conn?.destroy();
    this.raw?.destroy();
  }
}

// ---------------------------------------------------------------------------
// Command loop
// ---------------------------------------------------------------------------

// Sampled every 1 ms: a late sample means the event loop was busy (or the process was not scheduled).
const loopDelay = monitorEventLoopDelay({ resolution: 1 });
loopDelay.enable();

function readLoopDelay(): LoopDelay {
  const r = delaySummaryUs(loopDelay);
  loopDelay.reset();
  return r;
}

const dest = role === 'dest' ? new Destination() : undefined;
const source = role === 'source' ? new Source() : undefined;

function reply(r: PeerReply): void {
  process.stdout.write(`${JSON.stringify(r)}\n`);
}

async function handle(c: PeerCommand): Promise<unknown> {
  switch (c.cmd) {
    case 'listen':
      return dest!.listen(c.host, c.cell, c.tlsDir);
    case 'accept':
      return dest!.accept(c.timeoutMs);
    case 'wait-preempt':
      return dest!.waitPreempt(c.timeoutMs);
    case 'run':
      return dest!.run(c);
    case 'connect':
      return source!.connect(c.uri, c.cell, c.tlsDir);
    case 'preempt':
      return source!.preempt(c.reassertPriority);
    case 'bulk':
      source!.bulk(c.on);
      return undefined;
    case 'close':
      return dest ? dest.close(c.timeoutMs) : source!.close(c.timeoutMs);
    case 'loop-delay':
      return readLoopDelay();
    case 'exit':
      shutdown(0);
      return undefined;
  }
}

function shutdown(code: number): void {
  dest?.shutdown();
  source?.shutdown();
  // Let the last answer leave, then go, whatever is still open.
  setTimeout(() => process.exit(code), 50);
}

const rl = createInterface({ input: process.stdin });
rl.on('line', (line) => {
  let req: PeerRequest;
  try {
    req = JSON.parse(line) as PeerRequest;
  } catch {
    log(`bad command line: ${line}`);
    return;
  }
  handle(req).then(
    (data) => reply({ id: req.id, ok: true, data }),
    (e: unknown) => reply({ id: req.id, ok: false, error: e instanceof Error ? `${e.name}: ${e.message}` : String(e) }),
  );
});
rl.on('close', () => shutdown(0));
process.on('SIGTERM', () => shutdown(143));
process.on('SIGINT', () => shutdown(130));

