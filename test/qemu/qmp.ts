/**
 * Minimal QMP (QEMU Machine Protocol) client over a unix socket.
 *
 * Protocol: the server sends a greeting line, the client sends
 * `qmp_capabilities`, then one JSON object per line in each direction. Replies
 * carry the request `id`; asynchronous events (`{"event": ...}`) may arrive
 * between them at any time and are collected in `events`.
 */
import { connect, type Socket } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';

export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };
export type JsonObject = { [key: string]: Json };

export interface QmpEvent {
  event: string;
  data?: JsonObject;
  timestamp: { seconds: number; microseconds: number };
  /** Date.now() when the client received the event. */
  receivedAt: number;
}

export interface QmpGreeting {
  QMP: { version: JsonObject; capabilities: Json[] };
}

/** A QMP `error` reply, turned into an exception. */
export class QmpError extends Error {
  readonly errorClass: string;
  readonly desc: string;
  readonly command: string;
  constructor(command: string, errorClass: string, desc: string) {
    super(`QMP ${command} failed: ${errorClass}: ${desc}`);
    this.name = 'QmpError';
    this.command = command;
    this.errorClass = errorClass;
    this.desc = desc;
  }
}

interface Pending {
  command: string;
  resolve: (value: Json) => void;
  reject: (err: Error) => void;
  timer: NodeJS.Timeout | undefined;
}

interface EventWaiter {
  name: string;
  predicate: ((ev: QmpEvent) => boolean) | undefined;
  resolve: (ev: QmpEvent) => void;
  reject: (err: Error) => void;
  timer: NodeJS.Timeout;
}

export interface QmpConnectOptions {
  /** How long to keep retrying the connection while QEMU creates the socket (default 10 s). */
  timeoutMs?: number;
  /** Default timeout of `execute` (default 60 s). */
  commandTimeoutMs?: number;
}

export class QmpClient {
  /** Every event received so far, in order. */
  readonly events: QmpEvent[] = [];
  greeting: QmpGreeting | undefined;

  private socket: Socket | undefined;
  private buffer = '';
  private nextId = 1;
  private readonly pending = new Map<string, Pending>();
  private waiters: EventWaiter[] = [];
  private closedError: Error | undefined;
  private greetingResolve: ((g: QmpGreeting) => void) | undefined;
  private readonly commandTimeoutMs: number;

  private constructor(
    readonly path: string,
    commandTimeoutMs: number,
  ) {
    this.commandTimeoutMs = commandTimeoutMs;
  }

  /**
   * Connects to the QMP unix socket at `path` (retrying until QEMU has created
   * it), reads the greeting and negotiates capabilities.
   */
  static async connect(path: string, opts: QmpConnectOptions = {}): Promise<QmpClient> {
    const client = new QmpClient(path, opts.commandTimeoutMs ?? 60_000);
    const deadline = Date.now() + (opts.timeoutMs ?? 10_000);
    let lastErr: unknown;
    for (;;) {
      try {
        await client.open();
        break;
      } catch (err) {
        lastErr = err;
        if (Date.now() > deadline) {
          throw new Error(`QMP: cannot connect to ${path}: ${(lastErr as Error).message}`);
        }
        await sleep(25);
      }
    }
    await client.execute('qmp_capabilities');
    return client;
  }

  private open(): Promise<void> {
    return new Promise((resolve, reject) => {
      const sock = connect(this.path);
      let settled = false;
      const onEarlyEnd = (err?: Error): void => {
        if (settled) return;
        settled = true;
        this.greetingResolve = undefined;
        sock.destroy();
        reject(err ?? new Error('QMP connection closed before the greeting'));
      };
      sock.once('error', onEarlyEnd);
      sock.once('close', () => onEarlyEnd());
      sock.setEncoding('utf8');
      this.buffer = '';
      this.greetingResolve = (g) => {
        if (settled) return;
        settled = true;
        sock.removeAllListeners('error');
        sock.removeAllListeners('close');
        sock.on('error', (err) => this.fail(err));
        sock.on('close', () => this.fail(new Error('QMP connection closed')));
        this.greeting = g;
        this.socket = sock;
        resolve();
      };
      sock.on('data', (chunk: string) => this.onData(chunk));
    });
  }

  private onData(chunk: string): void {
    this.buffer += chunk;
    let nl: number;
    while ((nl = this.buffer.indexOf('\n')) >= 0) {
      const line = this.buffer.slice(0, nl).trim();
      this.buffer = this.buffer.slice(nl + 1);
      if (line) this.onMessage(line);
    }
  }

  private onMessage(line: string): void {
    let msg: JsonObject;
    try {
      msg = JSON.parse(line) as JsonObject;
    } catch {
      return; // not JSON: ignore
    }
    if ('QMP' in msg) {
      this.greetingResolve?.(msg as unknown as QmpGreeting);
      this.greetingResolve = undefined;
      return;
    }
    if (typeof msg.event === 'string') {
      const ev: QmpEvent = {
        event: msg.event,
        timestamp: msg.timestamp as unknown as QmpEvent['timestamp'],
        receivedAt: Date.now(),
        ...(msg.data !== undefined ? { data: msg.data as JsonObject } : {}),
      };
      this.events.push(ev);
      const still: EventWaiter[] = [];
      for (const w of this.waiters) {
        if (w.name === ev.event && (!w.predicate || w.predicate(ev))) {
          clearTimeout(w.timer);
          w.resolve(ev);
        } else {
          still.push(w);
        }
      }
      this.waiters = still;
      return;
    }
    const id = typeof msg.id === 'string' ? msg.id : undefined;
    const p = id !== undefined ? this.pending.get(id) : undefined;
    if (!p || id === undefined) return;
    this.pending.delete(id);
    if (p.timer) clearTimeout(p.timer);
    if ('error' in msg) {
      const e = (msg.error ?? {}) as JsonObject;
      p.reject(new QmpError(p.command, String(e.class ?? 'Unknown'), String(e.desc ?? '')));
    } else {
      p.resolve(msg.return ?? null);
    }
  }

  private fail(err: Error): void {
    if (this.closedError) return;
    this.closedError = err;
    for (const p of this.pending.values()) {
      if (p.timer) clearTimeout(p.timer);
      p.reject(new Error(`QMP ${p.command}: ${err.message}`));
    }
    this.pending.clear();
    for (const w of this.waiters) {
      clearTimeout(w.timer);
      w.reject(new Error(`waiting for QMP event ${w.name}: ${err.message}`));
    }
    this.waiters = [];
  }

  /** True once the connection is closed or broken. */
  get closed(): boolean {
    return this.closedError !== undefined;
  }

  /**
   * Runs a QMP command. Resolves with its `return` value, rejects with a
   * {@link QmpError} for an `error` reply, or with an Error on timeout/close.
   */
  execute<T = Json>(command: string, args?: Record<string, unknown>, timeoutMs?: number): Promise<T> {
    if (this.closedError) return Promise.reject(new Error(`QMP ${command}: ${this.closedError.message}`));
    const sock = this.socket;
    if (!sock) return Promise.reject(new Error(`QMP ${command}: not connected`));
    const id = `q${this.nextId++}`;
    const msg: Record<string, unknown> = { execute: command, id };
    if (args !== undefined) msg.arguments = args;
    const limit = timeoutMs ?? this.commandTimeoutMs;
    return new Promise<T>((resolve, reject) => {
      const timer =
        limit > 0
          ? setTimeout(() => {
              this.pending.delete(id);
              reject(new Error(`QMP ${command}: no reply within ${limit} ms`));
            }, limit)
          : undefined;
      this.pending.set(id, { command, resolve: resolve as (v: Json) => void, reject, timer });
      sock.write(`${JSON.stringify(msg)}\n`);
    });
  }

  /** Runs an HMP command through `human-monitor-command` and returns its text output. */
  async hmp(commandLine: string, timeoutMs?: number): Promise<string> {
    const out = await this.execute<string>('human-monitor-command', { 'command-line': commandLine }, timeoutMs);
    return typeof out === 'string' ? out : '';
  }

  /** Number of events received so far; pass it as `since` to only wait for newer events. */
  eventCursor(): number {
    return this.events.length;
  }

  /**
   * Resolves with the first event named `name` (matching `predicate`) among the
   * events received at index >= `since` (default 0: the whole history), waiting
   * up to `timeoutMs` for it to arrive.
   */
  waitEvent(
    name: string,
    predicate?: (ev: QmpEvent) => boolean,
    timeoutMs = 30_000,
    since = 0,
  ): Promise<QmpEvent> {
    for (let i = since; i < this.events.length; i++) {
      const ev = this.events[i];
      if (ev && ev.event === name && (!predicate || predicate(ev))) return Promise.resolve(ev);
    }
    if (this.closedError) {
      return Promise.reject(new Error(`waiting for QMP event ${name}: ${this.closedError.message}`));
    }
    return new Promise<QmpEvent>((resolve, reject) => {
      const waiter: EventWaiter = {
        name,
        predicate,
        resolve,
        reject,
        timer: setTimeout(() => {
          this.waiters = this.waiters.filter((w) => w !== waiter);
          reject(new Error(`QMP event ${name} not received within ${timeoutMs} ms`));
        }, timeoutMs),
      };
      this.waiters.push(waiter);
    });
  }

  /** Closes the connection (pending commands are rejected). */
  close(): void {
    this.fail(new Error('QMP client closed'));
    this.socket?.destroy();
  }
}
