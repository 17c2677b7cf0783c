/**
 * Strangers for a destination's port (issue 11 §3): what a port scanner, a
 * health probe, an HTTP client, a TLS client of another CA or an idle client
 * does. Each is real network traffic to the listening port.
 */
import { readFile } from 'node:fs/promises';
import net from 'node:net';
import { join } from 'node:path';
import tls from 'node:tls';

export type StrangerKind = 'connect-close' | 'http' | 'tls-foreign-ca' | 'silent';

/**
 * Plays one stranger against `port` and returns once it has done its part:
 * connected and closed; sent an HTTP request; tried a TLS handshake with a
 * client certificate of `foreignTlsDir` (another CA; it trusts nobody, so it
 * never judges the server); connected and stays silent (the returned socket:
 * destroy it when done). The other kinds return undefined.
 */
export async function playStranger(kind: StrangerKind, port: number, foreignTlsDir?: string): Promise<net.Socket | undefined> {
  if (kind === 'tls-foreign-ca') {
    if (!foreignTlsDir) throw new Error('tls-foreign-ca needs a credentials directory');
    const [cert, key] = await Promise.all([readFile(join(foreignTlsDir, 'client-cert.pem')), readFile(join(foreignTlsDir, 'client-key.pem'))]);
    const t = tls.connect({ host: '127.0.0.1', port, cert, key, rejectUnauthorized: false, servername: '' });
    t.on('error', () => undefined);
    // TLS 1.3: our side of the handshake completes before the server judges our certificate.
    await Promise.race([closed(t), new Promise((r) => setTimeout(r, 3000))]);
    t.destroy();
    return undefined;
  }
  const s = net.connect(port, '127.0.0.1');
  s.on('error', () => undefined);
  // A listener that drops us may reset the connection at any moment: a reset is an outcome here, not an error.
  await Promise.race([new Promise((r) => s.once('connect', r)), closed(s)]);
  if (s.destroyed) return undefined;
  if (kind === 'connect-close') {
    s.end();
    await closed(s);
    return undefined;
  }
  if (kind === 'http') {
    s.write(`GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\nConnection: close\r\n\r\n`);
    await Promise.race([closed(s), new Promise((r) => setTimeout(r, 3000))]);
    s.destroy();
    return undefined;
  }
  return s;
}

/** Resolves when the socket has closed, however (events.once would reject on a reset's 'error'). */
function closed(s: net.Socket): Promise<void> {
  return s.closed ? Promise.resolve() : new Promise((r) => s.once('close', () => r()));
}
