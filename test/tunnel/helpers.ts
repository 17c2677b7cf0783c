/**
 * Plain peers for tunnel tests without QEMU: a "destination" server that
 * keeps every accepted connection's bytes (in accept order) and answers with
 * a reply of its own, and a "source" that connects through the entry and
 * writes a pattern. Bytes are deterministic per connection, so that what
 * arrives can be compared bit for bit.
 */
import { createHash } from 'node:crypto';
import net from 'node:net';

/** `n` deterministic bytes for stream `id` (the first byte is the id, so that a peer can tell streams apart). */
export function pattern(id: number, n: number): Buffer {
  const b = Buffer.allocUnsafe(n);
  let x = (id + 1) * 2654435761;
  for (let i = 0; i < n; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    b[i] = x >>> 24;
  }
  if (n > 0) b[0] = id;
  return b;
}

export function sha(b: Buffer): string {
  return createHash('sha256').update(b).digest('hex').slice(0, 16);
}

export interface Received {
  readonly socket: net.Socket;
  readonly chunks: Buffer[];
  bytes: number;
  ended: boolean;
  error: string | undefined;
  closed: boolean;
}

/** A destination: keeps what each connection sends; answers `reply(index)` bytes on each, then ends when the peer ends. */
export class Sink {
  readonly accepted: Received[] = [];
  private constructor(readonly server: net.Server) {}

  static async start(reply: (index: number) => Buffer): Promise<Sink> {
    const server = net.createServer({ allowHalfOpen: true });
    const sink = new Sink(server);
    server.on('connection', (s) => {
      const r: Received = { socket: s, chunks: [], bytes: 0, ended: false, error: undefined, closed: false };
      const index = sink.accepted.length;
      sink.accepted.push(r);
      s.on('data', (c: Buffer) => {
        r.chunks.push(c);
        r.bytes += c.length;
      });
      s.on('end', () => {
        r.ended = true;
        s.end();
      });
      s.on('error', (e) => (r.error = (e as NodeJS.ErrnoException).code ?? e.message));
      s.on('close', () => (r.closed = true));
      const out = reply(index);
      if (out.length > 0) s.write(out);
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    return sink;
  }

  get uri(): string {
    return `tcp:127.0.0.1:${(this.server.address() as net.AddressInfo).port}`;
  }

  data(i: number): Buffer {
    return Buffer.concat(this.accepted[i]?.chunks ?? []);
  }

  async close(): Promise<void> {
    for (const r of this.accepted) r.socket.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}

/** A source connection: writes `data` (respecting backpressure), then ends; collects what comes back. */
export class Sender {
  readonly back: Buffer[] = [];
  ended = false;
  error: string | undefined;
  closed = false;
  readonly done: Promise<void>;
  readonly socket: net.Socket;

  constructor(uri: string, data: Buffer, opts: { endAfterWrite?: boolean } = {}) {
    const port = Number(/:(\d+)$/.exec(uri)![1]);
    this.socket = net.connect({ port, host: '127.0.0.1', allowHalfOpen: true });
    const s = this.socket;
    s.on('data', (c: Buffer) => this.back.push(c));
    s.on('error', (e) => (this.error = (e as NodeJS.ErrnoException).code ?? e.message));
    this.done = new Promise((resolve) => {
      s.on('end', () => {
        this.ended = true;
      });
      s.on('close', () => {
        this.closed = true;
        resolve();
      });
    });
    s.once('connect', () => {
      // In pieces, as QEMU writes: the tunnel must keep their order and bytes whatever the chunking.
      let at = 0;
      const step = 32 << 10;
      const pump = (): void => {
        while (at < data.length) {
          const more = s.write(data.subarray(at, at + step));
          at += step;
          if (!more) {
            s.once('drain', pump);
            return;
          }
        }
        if (opts.endAfterWrite !== false) s.end();
      };
      pump();
    });
  }

  get received(): Buffer {
    return Buffer.concat(this.back);
  }
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Polls `cond` every 20 ms until it holds or `ms` pass (then throws with `what`). */
export async function until(cond: () => boolean, ms: number, what: string): Promise<void> {
  const deadline = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms: ${what}`);
    await sleep(20);
  }
}
