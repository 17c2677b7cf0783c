/**
 * The destination's listener with every channel in a worker thread: each
 * accepted socket goes to a worker of its own before anything reads it (a
 * socket that has read cannot be transferred), the worker runs the TLS
 * handshake and peeks at the first bytes, and the verdicts drive the same
 * admission as MigrationListener's (qualify.ts, admission.ts): a role offered
 * by order, judged by the first bytes, at most `maxPendingConnections`
 * candidates (so at most that many candidate workers), `qualifyTimeoutMs`
 * each, strangers reported and their workers ended.
 */
import type net from 'node:net';
import { EventEmitter } from 'node:events';
import type { Worker } from 'node:worker_threads';
import { describeBytes, judgeMainOrPreempt, remoteOf, type FirstBytesJudgement } from '../../../transport/admission.js';
/** The roles offered to a candidate (a 'main' candidate of a multifd listener may turn out a multifd channel). */
type ChannelRole = 'main' | 'preempt';
import type { ListenOptions, TransportOptions } from '../../../transport/connection.js';
import { formatEndpoint, parseEndpoint, type Endpoint } from '../../../transport/endpoint.js';
import { TransportError } from '../../../transport/errors.js';
import { loadTlsDir, type TlsMaterial } from '../../../transport/pki.js';
import { DEFAULT_MAX_PENDING_CONNECTIONS, DEFAULT_QUALIFY_TIMEOUT_MS, judgeMainOrMultifd, type StrangerEvent, type StrangerReason } from '../../../transport/qualify.js';
import { listen, type Listening } from '../../../transport/sockets.js';
import { spawnWorker } from '../../../transport/worker/spawn.js';
import { MigrationError } from '../../errors.js';
import { errorFromData, type ChannelWorkerData, type FromWorker, type ToWorker } from './wire.js';

const WORKER = 'protocol/destination/threads/channel-worker';

/** How channel workers start: spawnWorker, but for a test of a worker that fails to start. */
let spawnChannelWorker: typeof spawnWorker = spawnWorker;

/** @internal For tests only: start channel workers with `f` (undefined: spawnWorker again). */
export function setChannelWorkerSpawn(f: typeof spawnWorker | undefined): void {
  spawnChannelWorker = f ?? spawnWorker;
}

/** A worker that holds one connection: a candidate, then (qualified) a channel. */
export class ChannelWorker {
  /** Messages once the owner (the session's link) takes over from the admission. */
  onMessage: ((m: FromWorker) => void) | undefined;
  /** Set by the listener: takes this thread out of the candidates' bound (it qualified). */
  released: (() => void) | undefined;
  private ended = false;
  readonly exited: Promise<void>;

  constructor(
    readonly worker: Worker,
    public role: ChannelRole | 'multifd',
  ) {
    this.exited = new Promise((r) => worker.once('exit', () => r()));
    worker.on('message', (m: FromWorker) => this.onMessage?.(m));
    // A worker that fails (an exception) ends its channel: reported through 'lost' by the owner.
    worker.on('error', (e) => this.onMessage?.({ t: 'lost', error: { family: 'other', message: `the ${role} channel's thread failed: ${e.message}`, name: 'Error' } }));
  }

  post(m: ToWorker, transfer?: readonly unknown[]): void {
    if (!this.ended) this.worker.postMessage(m, transfer as never);
  }

  get threadId(): number {
    return this.worker.threadId;
  }

  /** Ends the thread (its socket with it). */
  end(): Promise<void> {
    if (!this.ended) {
      this.ended = true;
      this.onMessage = undefined;
      void this.worker.terminate();
    }
    return this.exited;
  }
}

/** The channels of one migration, as workers, in the order they qualified (as DestinationConnection). */
export class ThreadConnection {
  preempt: ChannelWorker | undefined;
  private waiters: { resolve: (w: ChannelWorker) => void; reject: (e: TransportError) => void }[] = [];

  private multifdWaiters: { resolve: (w: readonly ChannelWorker[]) => void; reject: (e: TransportError) => void }[] = [];

  constructor(
    readonly main: ChannelWorker,
    private readonly candidates: () => number,
    /** The multifd channels by id (a multifd listener; those in before main included), shared with the listener. */
    readonly multifd: (ChannelWorker | undefined)[] | undefined,
    readonly multifdOptions: { readonly channels: number; readonly uuid?: Uint8Array } | undefined,
  ) {}

  /** Main and every multifd channel are in. */
  get bulkComplete(): boolean {
    return this.multifd === undefined || this.multifd.every((w) => w !== undefined);
  }

  /** Resolves with the multifd channels by id once all are in (QEMU reads main only then). */
  waitMultifd(): Promise<readonly ChannelWorker[]> {
    if (this.bulkComplete) return Promise.resolve((this.multifd ?? []) as ChannelWorker[]);
    return new Promise((resolve, reject) => this.multifdWaiters.push({ resolve, reject }));
  }

  /** @internal the listener: channel `id` qualified. */
  multifdArrived(): void {
    if (this.bulkComplete) for (const x of this.multifdWaiters.splice(0)) x.resolve(this.multifd as ChannelWorker[]);
  }

  /** True when a preempt channel is here or may be (a silent plain-TCP candidate). */
  get preemptExpected(): boolean {
    return this.preempt !== undefined || this.candidates() > 0;
  }

  waitPreempt(): Promise<ChannelWorker> {
    if (this.preempt) return Promise.resolve(this.preempt);
    return new Promise((resolve, reject) => this.waiters.push({ resolve, reject }));
  }

  attachPreempt(w: ChannelWorker): void {
    this.preempt = w;
    for (const x of this.waiters.splice(0)) x.resolve(w);
  }

  abandonPreempt(e: TransportError): void {
    for (const x of this.waiters.splice(0)) x.reject(e);
    for (const x of this.multifdWaiters.splice(0)) x.reject(e);
  }

  destroy(): void {
    void this.main.end();
    void this.preempt?.end();
    for (const w of this.multifd ?? []) void w?.end();
  }
}

interface Candidate {
  /** Its thread, once it has one (at most maxPendingConnections candidates hold a thread). */
  w?: ChannelWorker;
  /** The socket, unread, while it waits for a thread. */
  raw?: net.Socket;
  readonly role: ChannelRole;
  readonly remote: string | undefined;
  timer?: NodeJS.Timeout;
  secure: boolean;
  expired?: boolean;
  doomed?: boolean;
}

interface Events {
  stranger: [StrangerEvent];
}

export class ThreadedListener extends EventEmitter<Events> {
  private conn: ThreadConnection | undefined;
  private acceptWaiters: { resolve: (c: ThreadConnection) => void; reject: (e: TransportError | MigrationError) => void }[] = [];
  private closing = false;
  private readonly pending = new Set<Candidate>();
  private readonly maxPending: number;
  private readonly qualifyMs: number;

  private constructor(
    private readonly listening: Listening,
    private readonly opts: TransportOptions,
    private readonly listenOpts: ListenOptions,
    private readonly material: TlsMaterial | undefined,
    private readonly multifdOpts: { readonly channels: number; readonly uuid?: Uint8Array } | undefined,
  ) {
    super();
    this.multifd = multifdOpts ? new Array<ChannelWorker | undefined>(multifdOpts.channels).fill(undefined) : undefined;
    this.maxPending = opts.maxPendingConnections ?? DEFAULT_MAX_PENDING_CONNECTIONS;
    this.qualifyMs = opts.qualifyTimeoutMs ?? opts.connectTimeoutMs ?? DEFAULT_QUALIFY_TIMEOUT_MS;
    listening.server.on('connection', (raw: net.Socket) => this.admit(raw));
    listening.server.on('error', (e) => this.report({ reason: 'closed', error: new TransportError('closed', e.message) }));
  }

  /** The multifd channels by id as they qualify (a multifd listener). */
  private readonly multifd: (ChannelWorker | undefined)[] | undefined;

  static async listen(uri: string, opts: TransportOptions = {}, listenOpts: ListenOptions = {}, multifd?: { readonly channels: number; readonly uuid?: Uint8Array }): Promise<ThreadedListener> {
    const ep = parseEndpoint(uri);
    for (const [name, v, min] of [
      ['maxPendingConnections', opts.maxPendingConnections, 1],
      ['qualifyTimeoutMs', opts.qualifyTimeoutMs, 1],
    ] as const) {
      if (v !== undefined && !(Number.isInteger(v) && v >= min && v <= 2_147_483_647)) throw new RangeError(`${name} must be an integer from ${min} to 2147483647, got ${String(v)}`);
    }
    const material = opts.tls ? await loadTlsDir(opts.tls.dir, 'server') : undefined;
    // A plain server even with TLS: the handshake runs in the channel's worker.
    // Paused: a socket waiting for a thread must not be read (it could not move to one then).
    const listening = await listen(ep, { pauseOnConnect: true });
    const l = new ThreadedListener(listening, opts, listenOpts, material, multifd);
    l.spare = l.spawn();
    return l;
  }

  /**
   * A worker started ahead of the next connection: one that connects is
   * served at once, not after a thread has started (tens of ms built, more
   * from source) — the preempt channel's first urgent page would wait for it.
   */
  private spare: Worker | undefined;

  private spawn(): Worker {
    const tls = this.opts.tls;
    const data: ChannelWorkerData = {
      kind: this.endpoint.kind,
      ...(this.material && tls ? { tls: { material: this.material, settings: { ...tls, endpoint: 'server' }, ...(tls.allowedPeers ? { allowedPeers: tls.allowedPeers } : {}) } } : {}),
      main: { ...(this.opts.main?.tuning ? { tuning: this.opts.main.tuning } : {}), limits: this.opts.main ?? {} },
      preempt: { ...(this.opts.preempt?.tuning ? { tuning: this.opts.preempt.tuning } : {}), limits: this.opts.preempt ?? {} },
      multifd: { ...(this.opts.multifd?.tuning ? { tuning: this.opts.multifd.tuning } : {}), limits: this.opts.multifd ?? {} },
    };
    const w = spawnChannelWorker(WORKER, data);
    // An idle spare must not keep the process alive.
    w.unref();
    // A spare that fails before it serves (its module did not load: a broken install, a missing
    // dist entry) would take a connection into a dead thread: no connection could ever qualify.
    w.once('error', (e) => this.spareLost(w, e.message));
    w.once('exit', (code) => this.spareLost(w, `it exited (code ${code})`));
    return w;
  }

  /** The spare ended before it was given a connection: the listener cannot serve any, typed. */
  private spareLost(w: Worker, why: string): void {
    if (w !== this.spare || this.closing) return;
    this.spare = undefined;
    this.failure = new MigrationError('thread-failed', 'setup', `a channel's worker thread failed before it served a connection: ${why}`);
    for (const x of this.acceptWaiters.splice(0)) x.reject(this.failure);
    this.close();
  }

  /** Why no connection can be served (a spare thread that failed): accept() rejects with it. */
  private failure: MigrationError | undefined;

  private takeSpare(): Worker {
    const w = this.spare ?? this.spawn();
    this.spare = undefined;
    w.ref();
    return w;
  }

  get endpoint(): Endpoint {
    return this.listening.endpoint;
  }

  get uri(): string {
    return formatEndpoint(this.endpoint);
  }

  get pendingConnections(): number {
    return this.pending.size;
  }

  private count(role: ChannelRole): number {
    let n = 0;
    for (const c of this.pending) if (c.role === role && !c.doomed) n++;
    return n;
  }

  /** Main and every multifd channel have qualified (no multifd: main alone). */
  private get allBulkIn(): boolean {
    return this.conn !== undefined && (this.multifd?.every((w) => w !== undefined) ?? true);
  }

  /** 10.1's order: the preempt channel comes after main and every multifd channel. */
  private offer(): ChannelRole | undefined {
    return this.conn?.preempt ? undefined : this.allBulkIn ? 'preempt' : 'main';
  }

  private admit(raw: net.Socket): void {
    const remote = remoteOf(raw);
    if (this.closing) {
      raw.destroy();
      return;
    }
    const role = this.offer();
    if (!role) {
      raw.destroy();
      this.report({ reason: 'extra', error: new TransportError('channel-order', 'a connection after every channel of this migration had arrived'), ...(remote ? { remote } : {}) });
      return;
    }
    if (this.pending.size >= this.maxPending) {
      const oldest = this.pending.values().next().value as Candidate;
      this.drop(oldest, 'too-many', new TransportError('too-many-connections', `${this.pending.size} connections were already waiting to qualify (maxPendingConnections)`, oldest.role === 'preempt' ? { channel: 'preempt' } : {}));
    }
    const c: Candidate = { raw, role, remote, secure: false };
    this.pending.add(c);
    this.startTimer(c);
    // Threads exiting (evicted candidates) still count: their number stays bounded, and the socket waits, unread.
    if (this.candidateThreads < this.maxPending) this.startThread(c);
  }

  /** Threads started for candidates that have neither qualified nor exited. */
  private candidateThreads = 0;

  /** Gives `c` a thread and its socket, before anything read it (a socket that has read cannot move). */
  private startThread(c: Candidate): void {
    const raw = c.raw!;
    c.raw = undefined;
    const w = new ChannelWorker(this.takeSpare(), c.role);
    c.w = w;
    this.candidateThreads++;
    let counted = true;
    const release = (): void => {
      if (!counted) return;
      counted = false;
      this.candidateThreads--;
      this.startWaiting();
    };
    void w.exited.then(release);
    w.released = release;
    w.post({ t: 'socket', socket: raw, role: c.role }, [raw]);
    this.spare = this.closing ? undefined : this.spawn();
    w.onMessage = (m) => this.onCandidate(c, m);
    if (!this.material) this.awaitFirstBytes(c);
  }

  /** A thread is free: the oldest candidate still waiting for one gets it. */
  private startWaiting(): void {
    if (this.closing) return;
    for (const c of this.pending) {
      if (this.candidateThreads >= this.maxPending) return;
      if (!c.w && c.raw) this.startThread(c);
    }
  }

  private onCandidate(c: Candidate, m: FromWorker): void {
    if (!this.pending.has(c)) return;
    switch (m.t) {
      case 'secured':
        c.secure = true;
        this.startTimer(c);
        this.awaitFirstBytes(c);
        return;
      case 'tls-failed': {
        const e = errorFromData(m.error);
        // A connection that never sent a byte is a probe that closed, not a TLS client.
        if (m.bytesRead === 0 && !(TransportError.is(e) && e.code === 'tls-peer-not-allowed')) this.drop(c, 'closed', this.closedError(c));
        else this.drop(c, 'tls', TransportError.is(e) ? e : new TransportError('tls-handshake-failed', e.message, { channel: c.role }));
        return;
      }
      case 'closed-early':
        this.drop(c, 'closed', this.closedError(c));
        return;
      case 'seen': {
        const judge = this.judge(c.role, c.secure);
        if (!judge) return;
        const j = judge(Buffer.from(m.bytes));
        if (j.verdict === 'more') return;
        if (j.verdict === 'yes') this.qualified(c, j.role === 'multifd' ? j.channelId : undefined);
        else this.drop(c, j.reason, j.error);
        return;
      }
      case 'lost':
        this.drop(c, 'closed', this.closedError(c));
        return;
      default:
        return;
    }
  }

  private closedError(c: Candidate): TransportError {
    return new TransportError('closed', 'the connection closed before it was a migration channel', c.role === 'preempt' ? { channel: 'preempt' } : {});
  }

  /** Qualifies at once when no bytes are to be judged (TLS preempt by order, 'any'); else the worker's 'seen' messages decide. */
  private awaitFirstBytes(c: Candidate): void {
    if (!this.judge(c.role, c.secure)) this.qualified(c);
  }

  private startTimer(c: Candidate): void {
    clearTimeout(c.timer);
    c.timer = setTimeout(() => this.expire(c), this.qualifyMs);
  }

  private expire(c: Candidate): void {
    if (!this.pending.has(c)) return;
    const error = (): TransportError =>
      c.secure || !this.material
        ? new TransportError('qualify-timeout', `no migration stream within ${this.qualifyMs} ms of connecting`, c.role === 'preempt' ? { channel: 'preempt' } : {})
        : new TransportError('qualify-timeout', `no TLS handshake within ${this.qualifyMs} ms`, { channel: c.role });
    if (c.role === 'main' || c.secure || this.material) {
      this.drop(c, 'timeout', error());
      return;
    }
    // A silent plain-TCP preempt candidate: dropped unless it is the newest (see admission.ts).
    c.expired = true;
    let newest: Candidate | undefined;
    for (const p of this.pending) newest = p;
    for (const p of [...this.pending]) if (p.expired && p !== newest) this.drop(p, 'timeout', error());
  }

  /** The same rules as MigrationListener (qualify.ts). */
  private judge(role: ChannelRole, secure: boolean): ((seen: Buffer) => FirstBytesJudgement) | undefined {
    const start = this.listenOpts.start ?? 'stream';
    if (start === 'any') return undefined;
    if (role === 'preempt' && secure) return undefined;
    const multifd = this.multifd;
    const mo = this.multifdOpts;
    if (role === 'main' && multifd && mo) {
      const uuid = mo.uuid ?? new Uint8Array(16);
      return (seen) => {
        const j = judgeMainOrMultifd(seen, { channels: mo.channels, uuid, taken: (id) => multifd[id] !== undefined });
        switch (j.verdict) {
          case 'more':
            return j;
          case 'main':
            return { verdict: 'yes', role: 'main' };
          case 'multifd':
            return { verdict: 'yes', role: 'multifd', channelId: j.id };
          case 'bad-init': {
            const ch = { channel: j.id !== undefined ? (`multifd-${j.id}` as const) : ('multifd' as const) };
            return j.taken
              ? { verdict: 'no', reason: 'extra', error: new TransportError('channel-order', j.why, ch) }
              : { verdict: 'no', reason: 'not-migration', error: new TransportError('bad-multifd-init', j.why, ch) };
          }
          case 'no':
            return { verdict: 'no', reason: 'not-migration', error: new TransportError('not-a-migration-channel', `first bytes ${describeBytes(seen)} are neither the migration stream magic QEVM nor a multifd channel's 0x11223344`) };
        }
      };
    }
    return judgeMainOrPreempt(role === 'main' ? 'main' : 'preempt', start);
  }

  private qualified(c: Candidate, multifdId?: number): void {
    this.forget(c);
    const w = c.w!;
    w.onMessage = undefined;
    if (this.closing) {
      void w.end();
      return;
    }
    // A channel now, no longer a candidate: its thread leaves the candidates' bound.
    w.released?.();
    if (multifdId !== undefined) {
      if (c.doomed || !this.takeMultifd(w, multifdId)) {
        void w.end();
        this.report({ reason: 'extra', error: new TransportError('channel-order', `multifd channel ${multifdId} was taken by another connection before this one qualified`, { channel: `multifd-${multifdId}` }), ...(c.remote ? { remote: c.remote } : {}) });
      }
      return;
    }
    if (c.doomed || !this.take(c)) {
      void w.end();
      this.report({ reason: 'extra', error: new TransportError('channel-order', `the ${c.role} channel was taken by another connection before this one qualified`, { channel: c.role }), ...(c.remote ? { remote: c.remote } : {}) });
    }
  }

  private takeMultifd(w: ChannelWorker, id: number): boolean {
    const m = this.multifd;
    if (!m || m[id] !== undefined) return false;
    w.role = 'multifd';
    m[id] = w;
    this.conn?.multifdArrived();
    this.bulkArrived();
    return true;
  }

  /** Main and every multifd channel are in: candidates still waiting are not the preempt channel (see MigrationListener). */
  private bulkArrived(): void {
    if (this.allBulkIn) this.dropAll(this.multifd ? 'the main channel and every multifd channel are connected' : 'another connection became the main channel');
  }

  private take(c: Candidate): boolean {
    if (c.role === 'main' ? this.conn !== undefined : !this.allBulkIn || this.conn!.preempt !== undefined) return false;
    if (c.role === 'main') {
      this.conn = new ThreadConnection(c.w!, () => this.count('preempt'), this.multifd, this.multifdOpts);
      this.bulkArrived();
      for (const w of this.acceptWaiters.splice(0)) w.resolve(this.conn);
    } else {
      this.dropAll('another connection became the preempt channel');
      this.conn!.attachPreempt(c.w!);
    }
    return true;
  }

  private dropAll(why: string): void {
    const doomed = [...this.pending];
    if (doomed.length === 0) return;
    for (const c of doomed) c.doomed = true;
    setImmediate(() => {
      for (const c of doomed) this.drop(c, 'extra', new TransportError('channel-order', why));
    });
  }

  private forget(c: Candidate): void {
    this.pending.delete(c);
    clearTimeout(c.timer);
  }

  private drop(c: Candidate, reason: StrangerReason, error: TransportError): void {
    if (!this.pending.has(c)) return;
    this.forget(c);
    if (c.w) void c.w.end();
    else c.raw?.destroy();
    this.report({ reason, error, ...(c.remote ? { remote: c.remote } : {}) });
  }

  private report(ev: StrangerEvent): void {
    if (!this.closing) this.emit('stranger', ev);
  }

  accept(): Promise<ThreadConnection> {
    if (this.conn) return Promise.resolve(this.conn);
    if (this.failure) return Promise.reject(this.failure);
    if (this.closing) return Promise.reject(new TransportError('closed', 'listener closed'));
    return new Promise((resolve, reject) => this.acceptWaiters.push({ resolve, reject }));
  }

  /** Stops listening and ends every candidate's worker; qualified channels stay (the link ends them). */
  /** Settles once the threads ended by close() (candidates, the spare) have exited. */
  get ended(): Promise<void> {
    return Promise.all(this.ending).then(() => undefined);
  }

  private readonly ending: Promise<unknown>[] = [];

  close(): void {
    if (this.closing) return;
    this.closing = true;
    const e = new TransportError('closed', 'listener closed');
    for (const c of [...this.pending]) {
      this.forget(c);
      if (c.w) this.ending.push(c.w.end());
      else c.raw?.destroy();
    }
    if (this.spare) this.ending.push(this.spare.terminate());
    this.spare = undefined;
    for (const w of this.acceptWaiters.splice(0)) w.reject(e);
    this.conn?.abandonPreempt(e);
    // Multifd channels in while no main channel came are ended here (else the connection ends them).
    if (!this.conn) for (const w of this.multifd ?? []) if (w) this.ending.push(w.end());
    // net.Server.close() calls back only once every accepted socket has ended: do not wait for it.
    this.listening.server.close();
  }
}
