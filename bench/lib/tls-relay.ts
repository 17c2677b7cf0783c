/**
 * The baseline of the tunnel bench: a plain per-connection TLS byte relay,
 * the way KubeVirt's migration proxy carries a migration (no framing, no
 * resumption, no per-channel tuning). Two processes, as the tunnel's two ends:
 *
 *   node --import tsx bench/lib/tls-relay.ts in  LISTEN TO PKI   # plain in, TLS out
 *   node --import tsx bench/lib/tls-relay.ts out LISTEN TO PKI   # TLS in (client certificate required), plain out
 *
 * Each accepted connection gets one onward connection, opened at once, and
 * the bytes are piped both ways (half-closes passed on); prints
 * "listening on tcp:HOST:PORT" once it listens.
 */
import net from 'node:net';
import tls from 'node:tls';
import { loadTlsDir } from '../../src/transport/pki.js';
import { parseEndpoint } from '../../src/transport/endpoint.js';

const [side, listenUri, toUri, pki] = process.argv.slice(2);
if ((side !== 'in' && side !== 'out') || !listenUri || !toUri || !pki) {
  console.error('usage: tls-relay.ts in|out LISTEN TO PKI');
  process.exit(2);
}
const listenEp = parseEndpoint(listenUri);
const to = parseEndpoint(toUri);
const target = to.kind === 'tcp' ? { host: to.host, port: to.port } : { path: to.path };

function pipeBoth(a: net.Socket, b: net.Socket): void {
  a.on('error', () => b.destroy());
  b.on('error', () => a.destroy());
  a.on('close', () => b.destroy());
  b.on('close', () => a.destroy());
  a.pipe(b);
  b.pipe(a);
}

if (side === 'in') {
  const m = await loadTlsDir(pki, 'client');
  const server = net.createServer({ allowHalfOpen: true }, (s) => {
    const up = tls.connect({ ...target, ca: m.ca, cert: m.cert, key: m.key, servername: 'localhost' } as tls.ConnectionOptions);
    // Go's sockets (KubeVirt's proxy) have TCP_NODELAY on by default: so do these.
    s.setNoDelay(true);
    up.setNoDelay(true);
    pipeBoth(s, up);
  });
  server.listen(listenEp.kind === 'tcp' ? { host: listenEp.host, port: listenEp.port } : { path: listenEp.path }, () => {
    const a = server.address() as net.AddressInfo;
    console.log(`listening on tcp:${listenEp.kind === 'tcp' ? listenEp.host : ''}:${a.port}`);
  });
} else {
  const m = await loadTlsDir(pki, 'server');
  const server = tls.createServer({ ca: m.ca, cert: m.cert, key: m.key, requestCert: true, rejectUnauthorized: true, allowHalfOpen: true }, (s) => {
    const down = net.connect({ ...target, allowHalfOpen: true } as net.NetConnectOpts);
    s.setNoDelay(true);
    if (to.kind === 'tcp') down.setNoDelay(true);
    pipeBoth(s, down);
  });
  server.listen(listenEp.kind === 'tcp' ? { host: listenEp.host, port: listenEp.port } : { path: listenEp.path }, () => {
    const a = server.address() as net.AddressInfo;
    console.log(`listening on tcp:${listenEp.kind === 'tcp' ? listenEp.host : ''}:${a.port}`);
  });
}
