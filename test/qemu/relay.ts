/**
 * A recording relay for live migrations between two QEMUs.
 *
 * The source QEMU connects to the relay; for every accepted connection the
 * relay opens a connection to the real destination (in accept order, one at a
 * time, so the destination accepts them in the same order: 1st = main, 2nd =
 * preempt) and forwards both directions. Each direction of each connection is
 * recorded (in memory and/or to files) with receive timestamps. An optional
 * token-bucket cap limits the source → destination byte rate, e.g. to keep a
 * precopy from converging so that postcopy can be started. `cut()` destroys
 * every socket (RST on TCP) to simulate a network failure.
 */
import { createWriteStream, type WriteStream } from 'node:fs';
import { mkdir, rm } from 'node:fs/promises';
import { Socket, type Server } from 'node:net';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Endpoint as TransportEndpoint } from '../../src/transport/endpoint.js';
import { dial, listen } from '../../src/transport/sockets.js';

export type Endpoint = { host: string; port: number } | { path: string };

/** Parses a QEMU migration URI `tcp:HOST:PORT` or `unix:PATH` into an endpoint. */
export function parseEndpoint(uri: string): Endpoint {
  if (uri.startsWith('unix:')) return { path: uri.slice(5) };
  const m = /^tcp:(\[[^\]]+\]|[^:]+):(\d+)(?:,.*)?$/.exec(uri);
  if (m && m[1] && m[2]) return { host: m[1].replace(/^\[|\]$/g, ''), port: Number(m[2]) };
  throw new Error(`relay: unsupported URI ${uri} (use tcp:HOST:PORT or unix:PATH)`);
}

/** The socket factory's form of an endpoint. */
function factoryEndpoint(ep: Endpoint | { host?: string; port?: number }): TransportEndpoint {
  if ('path' in ep) return { kind: 'unix', path: ep.path };
  return { kind: 'tcp', host: ep.host ?? '127.0.0.1', port: ep.port ?? 0 };
}

/** Formats an endpoint as a QEMU migration URI. */
export function endpointUri(ep: Endpoint): string {
  return 'path' in ep ? `unix:${ep.path}` : `tcp:${ep.host.includes(':') ? `[${ep.host}]` : ep.host}:${ep.port}`;
}

export interface RelayChunk {
  /** Milliseconds since the relay started (performance.now() based, fractional). */
  t: number;
  /** Byte offset of this chunk within the direction's stream. */
  offset: number;
  length: number;
}

export interface RelayRateLimit {
  /** Source → destination cap in bytes per second. */
  bytesPerSecond: number;
  /** Bucket size in bytes (default max(4096, bytesPerSecond / 50)). */
  burstBytes?: number;
  /** 'connection' (default): each connection has its own bucket; 'shared': one bucket for all. */
  scope?: 'connection' | 'shared';
  /** Only limit the main channel (first connection of each generation). */
  mainOnly?: boolean;
}

export interface RelayOptions {
  /** Where the real destination listens (endpoint or `tcp:`/`unix:` URI). */
  target: Endpoint | string;
  /** Where the relay listens (default TCP 127.0.0.1, ephemeral port). */
  listen?: Endpoint | { host?: string; port?: number };
  /** Keep every direction's bytes in memory (default true). */
  record?: boolean;
  /** Also stream every direction to files `conn<i>-src-to-dst.bin` / `conn<i>-dst-to-src.bin` in this dir. */
  recordDir?: string;
  /** Optional source → destination rate cap. */
  rateLimit?: RelayRateLimit;
}

class TokenBucket {
  private tokens: number;
  private last: number;
  constructor(
    public rate: number,
    public burst: number,
  ) {
    this.tokens = burst;
    this.last = performance.now();
  }
  private refill(): void {
    const now = performance.now();
    this.tokens = Math.min(this.burst, this.tokens + ((now - this.last) * this.rate) / 1000);
    this.last = now;
  }
  /** Takes up to `want` bytes; returns how many were granted (0 if none available). */
  take(want: number): number {
    this.refill();
    const n = Math.min(want, Math.floor(this.tokens));
    if (n > 0) this.tokens -= n;
    return n;
  }
  /** Milliseconds until at least `bytes` tokens are available. */
  waitMs(bytes: number): number {
    this.refill();
    const need = Math.min(bytes, this.burst) - this.tokens;
    return need <= 0 ? 0 : Math.ceil((need * 1000) / this.rate);
  }
}

/** One direction of one relayed connection. */
export class RelayDirection {
  readonly chunks: RelayChunk[] = [];
  bytes = 0;
  private readonly buffers: Buffer[] | undefined;
  private file: WriteStream | undefined;
  constructor(
    keep: boolean,
    readonly filePath: string | undefined,
  ) {
    this.buffers = keep ? [] : undefined;
    if (filePath) this.file = createWriteStream(filePath);
  }
  /** @internal */
  record(chunk: Buffer, t: number): void {
    this.chunks.push({ t, offset: this.bytes, length: chunk.length });
    this.bytes += chunk.length;
    this.buffers?.push(chunk);
    this.file?.write(chunk);
  }
  /** All bytes of this direction so far (requires `record`). */
  data(): Buffer {
    if (!this.buffers) throw new Error('relay: recording in memory is off');
    return Buffer.concat(this.buffers);
  }
  /** Time (ms since relay start) at which byte `offset` was received, or undefined. */
  timeOfOffset(offset: number): number | undefined {
    let lo = 0;
    let hi = this.chunks.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      const c = this.chunks[mid];
      if (!c) break;
      if (offset < c.offset) hi = mid - 1;
      else if (offset >= c.offset + c.length) lo = mid + 1;
      else return c.t;
    }
    return undefined;
  }
  /** @internal */
  async closeFile(): Promise<void> {
    const f = this.file;
    this.file = undefined;
    if (f) await new Promise<void>((resolve) => f.end(resolve));
  }
}

export type RelayRole = 'main' | 'preempt' | 'extra';

export interface RelayConnection {
  /** 0-based accept index over the relay's lifetime. */
  index: number;
  /** Incremented by `cut()`; roles are assigned per generation. */
  generation: number;
  /** 1st connection of a generation: main; 2nd: preempt; later: extra. */
  role: RelayRole;
  acceptedAt: number;
  connectedAt: number | undefined;
  closedAt: number | undefined;
  /** Source → destination bytes. */
  srcToDst: RelayDirection;
  /** Destination → source bytes (return path on the main connection). */
  dstToSrc: RelayDirection;
  /** Error that ended the connection, if any. */
  error: Error | undefined;
}

interface ConnState {
  info: RelayConnection;
  client: Socket;
  upstream: Socket;
  queue: Buffer[];
  queued: number;
  bucket: TokenBucket | undefined;
  clientEnded: boolean;
  clientPaused: boolean;
  timer: NodeJS.Timeout | undefined;
  waitingDrain: boolean;
  closed: boolean;
}

const HIGH_WATER = 256 * 1024;

export class MigrationRelay {
  readonly connections: RelayConnection[] = [];
  /** URI for the source QEMU's `migrate` (e.g. `tcp:127.0.0.1:40123`). */
  uri = '';
  readonly target: Endpoint;
  private readonly t0 = performance.now();
  private server: Server | undefined;
  private readonly states: ConnState[] = [];
  private generation = 0;
  private perGeneration = 0;
  private rateLimit: RelayRateLimit | undefined;
  private sharedBucket: TokenBucket | undefined;
  private connectChain: Promise<void> = Promise.resolve();
  private closed = false;
  private listenPath: string | undefined;

  private constructor(private readonly opts: RelayOptions) {
    this.target = typeof opts.target === 'string' ? parseEndpoint(opts.target) : opts.target;
    this.rateLimit = opts.rateLimit;
  }

  /** Creates the relay and starts listening. */
  static async start(opts: RelayOptions): Promise<MigrationRelay> {
    const r = new MigrationRelay(opts);
    if (opts.recordDir) await mkdir(opts.recordDir, { recursive: true });
    r.setRateLimit(opts.rateLimit);
    const at = opts.listen ?? {};
    if ('path' in at) r.listenPath = at.path;
    // The socket factory's listen (a stale unix socket file is removed first).
    const l = await listen(factoryEndpoint(at), { allowHalfOpen: true, pauseOnConnect: true });
    r.server = l.server;
    l.server.on('connection', (sock: Socket) => r.onAccept(sock));
    const addr = l.server.address();
    if (typeof addr === 'string') r.uri = `unix:${addr}`;
    else if (addr) r.uri = endpointUri({ host: addr.address, port: addr.port });
    return r;
  }

  /** Milliseconds since the relay started (the clock of all recorded timestamps). */
  now(): number {
    return performance.now() - this.t0;
  }

  /** Changes (or removes, with undefined/null) the source → destination rate cap; applies immediately. */
  setRateLimit(limit: RelayRateLimit | number | null | undefined): void {
    const l = typeof limit === 'number' ? { bytesPerSecond: limit } : (limit ?? undefined);
    this.rateLimit = l;
    this.sharedBucket = l ? new TokenBucket(l.bytesPerSecond, this.burstOf(l)) : undefined;
    for (const s of this.states) {
      s.bucket = this.bucketFor(s.info.role);
      this.pump(s);
    }
  }

  private burstOf(l: RelayRateLimit): number {
    return l.burstBytes ?? Math.max(4096, Math.floor(l.bytesPerSecond / 50));
  }

  private bucketFor(role: RelayRole): TokenBucket | undefined {
    const l = this.rateLimit;
    if (!l) return undefined;
    if (l.mainOnly && role !== 'main') return undefined;
    if (l.scope === 'shared') return this.sharedBucket;
    return new TokenBucket(l.bytesPerSecond, this.burstOf(l));
  }

  private onAccept(client: Socket): void {
    if (this.closed) {
      client.destroy();
      return;
    }
    const index = this.connections.length;
    const n = this.perGeneration++;
    const role: RelayRole = n === 0 ? 'main' : n === 1 ? 'preempt' : 'extra';
    const dir = this.opts.recordDir;
    const keep = this.opts.record ?? true;
    const info: RelayConnection = {
      index,
      generation: this.generation,
      role,
      acceptedAt: this.now(),
      connectedAt: undefined,
      closedAt: undefined,
      srcToDst: new RelayDirection(keep, dir ? join(dir, `conn${index}-src-to-dst.bin`) : undefined),
      dstToSrc: new RelayDirection(keep, dir ? join(dir, `conn${index}-dst-to-src.bin`) : undefined),
      error: undefined,
    };
    this.connections.push(info);
    const upstream = new Socket({ allowHalfOpen: true });
    const s: ConnState = {
      info,
      client,
      upstream,
      queue: [],
      queued: 0,
      bucket: this.bucketFor(role),
      clientEnded: false,
      clientPaused: true,
      timer: undefined,
      waitingDrain: false,
      closed: false,
    };
    this.states.push(s);

    client.on('data', (chunk: Buffer) => {
      info.srcToDst.record(chunk, this.now());
      s.queue.push(chunk);
      s.queued += chunk.length;
      if (s.queued > HIGH_WATER) this.pauseClient(s);
      this.pump(s);
    });
    client.on('end', () => {
      s.clientEnded = true;
      this.pump(s);
    });
    upstream.on('data', (chunk: Buffer) => {
      info.dstToSrc.record(chunk, this.now());
      if (!client.destroyed && !client.write(chunk)) {
        upstream.pause();
        client.once('drain', () => upstream.resume());
      }
    });
    upstream.on('end', () => {
      if (!client.destroyed) client.end();
    });
    const onError = (err: Error): void => {
      info.error ??= err;
      this.destroyConn(s, false);
    };
    client.on('error', onError);
    upstream.on('error', onError);
    const onClose = (hadError: boolean): void => {
      // An abnormal close of either side tears down the other; a normal close
      // (both directions ended) needs nothing more.
      if (hadError) this.destroyConn(s, false);
      this.finish(s);
    };
    client.on('close', onClose);
    upstream.on('close', onClose);

    // Connect upstream strictly in accept order so the destination sees the same order.
    this.connectChain = this.connectChain.then(
      () =>
        new Promise<void>((resolve) => {
          if (s.closed) return resolve();
          // Settle on connect, error, or close (a socket destroyed while connecting, e.g. by
          // cut(), emits neither 'connect' nor 'error'); otherwise the chain would stall.
          const done = (): void => {
            upstream.off('connect', onConnect);
            upstream.off('error', done);
            upstream.off('close', done);
            resolve();
          };
          const onConnect = (): void => {
            info.connectedAt = this.now();
            this.resumeClient(s);
            this.pump(s);
            done();
          };
          upstream.once('connect', onConnect);
          upstream.once('error', done);
          upstream.once('close', done);
          // The socket factory's connect, on the socket whose listeners are already in place.
          dial(factoryEndpoint(this.target), { socket: upstream, timeoutMs: 30_000 }).connected.catch(() => undefined);
        }),
    );
  }

  private pump(s: ConnState): void {
    if (s.closed || s.waitingDrain || s.timer || s.info.connectedAt === undefined) return;
    const up = s.upstream;
    while (s.queue.length) {
      const head = s.queue[0];
      if (!head) break;
      let n = head.length;
      if (s.bucket) {
        n = s.bucket.take(head.length);
        if (n === 0) {
          s.timer = setTimeout(
            () => {
              s.timer = undefined;
              this.pump(s);
            },
            Math.max(1, s.bucket.waitMs(Math.min(head.length, 16 * 1024))),
          );
          return;
        }
      }
      const part = n === head.length ? head : head.subarray(0, n);
      if (n === head.length) s.queue.shift();
      else s.queue[0] = head.subarray(n);
      s.queued -= n;
      const ok = up.write(part);
      if (s.queued <= HIGH_WATER / 2) this.resumeClient(s);
      if (!ok) {
        s.waitingDrain = true;
        up.once('drain', () => {
          s.waitingDrain = false;
          this.pump(s);
        });
        return;
      }
    }
    if (s.queue.length === 0) {
      this.resumeClient(s);
      if (s.clientEnded && !up.destroyed && !up.writableEnded) up.end();
    }
  }

  private pauseClient(s: ConnState): void {
    if (!s.clientPaused) {
      s.clientPaused = true;
      s.client.pause();
    }
  }

  private resumeClient(s: ConnState): void {
    if (s.clientPaused && !s.closed && s.info.connectedAt !== undefined) {
      s.clientPaused = false;
      s.client.resume();
    }
  }

  private finish(s: ConnState): void {
    if (s.client.destroyed && s.upstream.destroyed && s.info.closedAt === undefined) {
      s.closed = true;
      s.info.closedAt = this.now();
      if (s.timer) clearTimeout(s.timer);
      s.timer = undefined;
      void s.info.srcToDst.closeFile();
      void s.info.dstToSrc.closeFile();
    }
  }

  private destroyConn(s: ConnState, reset: boolean): void {
    s.closed = true;
    if (s.timer) clearTimeout(s.timer);
    s.timer = undefined;
    s.queue = [];
    s.queued = 0;
    for (const sock of [s.client, s.upstream]) {
      if (sock.destroyed) continue;
      // After end() (a FIN on its way) libuv refuses the reset and Node never closes the handle.
      if (reset && !sock.connecting && !sock.writableEnded) {
        try {
          sock.resetAndDestroy(); // RST on TCP; throws for unix sockets
          continue;
        } catch {
          /* not a TCP socket: plain destroy */
        }
      }
      sock.destroy();
    }
  }

  /**
   * Simulates a network failure: destroys every socket (RST for TCP), drops
   * queued bytes, and starts a new generation (the next connection is 'main').
   * The relay keeps listening, so recovery can go through it again.
   */
  cut(): void {
    for (const s of this.states) if (!s.client.destroyed || !s.upstream.destroyed) this.destroyConn(s, true);
    this.generation++;
    this.perGeneration = 0;
  }

  /** Resets one connection (RST on TCP, both sides), the others untouched: a single channel's failure. */
  cutConnection(index: number): void {
    const s = this.states.find((x) => x.info.index === index);
    if (s && (!s.client.destroyed || !s.upstream.destroyed)) this.destroyConn(s, true);
  }

  /** Connections with the given role (across generations unless `generation` is given). */
  byRole(role: RelayRole, generation?: number): RelayConnection[] {
    return this.connections.filter((c) => c.role === role && (generation === undefined || c.generation === generation));
  }

  /** Waits until at least `n` connections were accepted. */
  async waitConnections(n: number, timeoutMs = 30_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (this.connections.length < n) {
      if (Date.now() > deadline) throw new Error(`relay: ${this.connections.length} of ${n} connections after ${timeoutMs} ms`);
      await sleep(10);
    }
  }

  /** Waits until every accepted connection is fully closed. */
  async waitAllClosed(timeoutMs = 30_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (this.connections.some((c) => c.closedAt === undefined)) {
      if (Date.now() > deadline) throw new Error(`relay: connections still open after ${timeoutMs} ms`);
      await sleep(10);
    }
  }

  /** Stops listening and destroys all sockets; flushes record files. Idempotent. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    for (const s of this.states) this.destroyConn(s, false);
    await new Promise<void>((resolve) => (this.server ? this.server.close(() => resolve()) : resolve()));
    await Promise.all(this.connections.flatMap((c) => [c.srcToDst.closeFile(), c.dstToSrc.closeFile()]));
    if (this.listenPath) await rm(this.listenPath, { force: true });
  }
}

/** Shorthand for {@link MigrationRelay.start}. */
export function startRelay(opts: RelayOptions): Promise<MigrationRelay> {
  return MigrationRelay.start(opts);
}
