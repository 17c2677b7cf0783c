/**
 * One end of a raw socket pair, as a child process
 * (`node --import tsx bench/lib/raw-peer.ts`): the baseline of the bulk
 * benchmark. Plain `net` or `tls` sockets with Node's defaults and the same
 * certificates as the migration (TLS 1.3); the sender writes N bytes in 1 MiB
 * writes, the receiver counts and discards them. Times are CLOCK_MONOTONIC µs.
 */
import { once } from 'node:events';
import { readFile } from 'node:fs/promises';
import net from 'node:net';
import { join } from 'node:path';
import tls from 'node:tls';
import { monoUs, serve } from './child-server.js';

export type RawCommand =
  | { cmd: 'raw-listen'; host: string; tlsDir?: string; bytes: number }
  | { cmd: 'raw-wait'; timeoutMs: number }
  | { cmd: 'raw-send'; uri: string; tlsDir?: string; bytes: number };

export interface RawReceived {
  bytes: number;
  /** The connection was accepted (after the TLS handshake). */
  acceptedUs: number;
  lastByteUs: number;
  tls: string | null;
}

const CHUNK = Buffer.alloc(1024 * 1024, 0x5a);

async function tlsFiles(dir: string, side: 'server' | 'client'): Promise<{ ca: string; cert: string; key: string }> {
  const [ca, cert, key] = await Promise.all([
    readFile(join(dir, 'ca-cert.pem'), 'utf8'),
    readFile(join(dir, `${side}-cert.pem`), 'utf8'),
    readFile(join(dir, `${side}-key.pem`), 'utf8'),
  ]);
  return { ca, cert, key };
}

let server: net.Server | undefined;
let received: Promise<RawReceived> | undefined;
let sock: net.Socket | undefined;

async function listen(c: Extract<RawCommand, { cmd: 'raw-listen' }>): Promise<{ uri: string }> {
  const s = c.tlsDir ? tls.createServer({ ...(await tlsFiles(c.tlsDir, 'server')), requestCert: true, rejectUnauthorized: true, minVersion: 'TLSv1.3' }) : net.createServer();
  server = s;
  received = new Promise((resolve, reject) => {
    s.once(c.tlsDir ? 'secureConnection' : 'connection', (conn: net.Socket) => {
      sock = conn;
      const acceptedUs = monoUs();
      let n = 0;
      conn.on('data', (d: Buffer) => {
        n += d.length;
        if (n >= c.bytes) {
          const t = conn as tls.TLSSocket;
          resolve({ bytes: n, acceptedUs, lastByteUs: monoUs(), tls: typeof t.getProtocol === 'function' ? t.getProtocol() : null });
        }
      });
      conn.on('error', reject);
      conn.on('close', () => reject(new Error(`closed after ${n} of ${c.bytes} bytes`)));
    });
  });
  received.catch(() => undefined);
  await new Promise<void>((resolve, reject) => {
    s.once('error', reject);
    s.listen({ host: c.host, port: 0 }, () => resolve());
  });
  return { uri: `tcp:${c.host}:${(s.address() as net.AddressInfo).port}` };
}

async function wait(c: Extract<RawCommand, { cmd: 'raw-wait' }>): Promise<RawReceived> {
  if (!received) throw new Error('raw-listen first');
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([received, new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error('raw-wait: timeout')), c.timeoutMs)))]);
  } finally {
    clearTimeout(timer);
    sock?.destroy();
    server?.close();
  }
}

async function send(c: Extract<RawCommand, { cmd: 'raw-send' }>): Promise<{ startUs: number; connectedUs: number; writtenUs: number }> {
  const m = /^tcp:(.*):(\d+)$/.exec(c.uri);
  if (!m) throw new Error(`bad uri ${c.uri}`);
  const startUs = monoUs();
  const s = c.tlsDir
    ? tls.connect({ host: m[1]!, port: Number(m[2]), ...(await tlsFiles(c.tlsDir, 'client')), minVersion: 'TLSv1.3', servername: 'localhost' })
    : net.connect({ host: m[1]!, port: Number(m[2]) });
  sock = s;
  await once(s, c.tlsDir ? 'secureConnect' : 'connect');
  const connectedUs = monoUs();
  for (let sent = 0; sent < c.bytes; sent += CHUNK.length) {
    const n = Math.min(CHUNK.length, c.bytes - sent);
    if (!s.write(n === CHUNK.length ? CHUNK : CHUNK.subarray(0, n))) await once(s, 'drain');
  }
  await new Promise<void>((resolve) => s.end(resolve));
  return { startUs, connectedUs, writtenUs: monoUs() };
}

serve(
  'raw-peer',
  {
    'raw-listen': (c) => listen(c as Extract<RawCommand, { cmd: 'raw-listen' }>),
    'raw-wait': (c) => wait(c as Extract<RawCommand, { cmd: 'raw-wait' }>),
    'raw-send': (c) => send(c as Extract<RawCommand, { cmd: 'raw-send' }>),
  },
  () => {
    sock?.destroy();
    server?.close();
  },
);
