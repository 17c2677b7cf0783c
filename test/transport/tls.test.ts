import { mkdtemp, rm } from 'node:fs/promises';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import tls from 'node:tls';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { TransportError } from '../../src/transport/errors.js';
import { generatePki, loadTlsDir, writePkiDir, type Pki, type TlsMaterial } from '../../src/transport/pki.js';
import {
  classifyTlsError,
  clientTlsOptions,
  secureAccept,
  secureConnect,
  serverTlsOptions,
  waitSession,
  type AcceptOptions,
  type TlsSettings,
} from '../../src/transport/tls.js';

// ---------------------------------------------------------------------------
// Material
// ---------------------------------------------------------------------------

let A: Pki; // our PKI
let B: Pki; // another CA
let expiredA: Pki; // leaves signed by A's CA, expired yesterday
let futureA: Pki; // leaves signed by A's CA, valid from tomorrow
let dnsOnlyA: Pki; // leaves signed by A's CA with only DNS:localhost
let tmp: string;

const DAY = 86_400_000;

function serverMat(p: Pki, ca: Pki = p): TlsMaterial {
  return { ca: Buffer.from(ca.caCert), cert: Buffer.from(p.serverCert), key: Buffer.from(p.serverKey) };
}
function clientMat(p: Pki, ca: Pki = p): TlsMaterial {
  return { ca: Buffer.from(ca.caCert), cert: Buffer.from(p.clientCert), key: Buffer.from(p.clientKey) };
}

const client = (over: Partial<TlsSettings> = {}): TlsSettings => ({ dir: '-', endpoint: 'client', ...over });
const server = (over: Partial<TlsSettings> = {}): TlsSettings => ({ dir: '-', endpoint: 'server', ...over });

beforeAll(async () => {
  [A, B] = await Promise.all([generatePki(), generatePki({ caName: 'someone else' })]);
  const ca = { cert: A.caCert, key: A.caKey };
  const now = Date.now();
  [expiredA, futureA, dnsOnlyA] = await Promise.all([
    generatePki({ ca, notBefore: new Date(now - 10 * DAY), notAfter: new Date(now - DAY) }),
    generatePki({ ca, notBefore: new Date(now + DAY), notAfter: new Date(now + 10 * DAY) }),
    generatePki({ ca, hostnames: ['localhost'] }),
  ]);
  tmp = await mkdtemp(join(tmpdir(), 'qmt-tls-test-'));
});

afterAll(async () => {
  await rm(tmp, { recursive: true, force: true });
});

// ---------------------------------------------------------------------------
// Nothing left open
// ---------------------------------------------------------------------------

function openHandles(): number {
  return process.getActiveResourcesInfo().filter((r) => /TCP|Pipe|TLS/.test(r)).length;
}

let baseline = 0;
const cleanups: Array<() => Promise<void> | void> = [];

beforeEach(() => {
  baseline = openHandles();
});

afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
  // Closed handles leave the active list within a few turns of the event loop.
  const deadline = Date.now() + 2000;
  while (openHandles() > baseline && Date.now() < deadline) await sleep(10);
  expect(openHandles(), `sockets left open: ${process.getActiveResourcesInfo().join(', ')}`).toBe(baseline);
});

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

type Outcome = { ok: true; sock: tls.TLSSocket } | { ok: false; err: TransportError };

function outcome(p: Promise<tls.TLSSocket>): Promise<Outcome> {
  return p.then(
    (sock) => ({ ok: true as const, sock }),
    (err: unknown) => {
      if (!(err instanceof TransportError)) throw err;
      return { ok: false as const, err };
    },
  );
}

interface Listener {
  /** For tls.connect: { host, port } or { path }. */
  address: { host: string; port: number } | { path: string };
  /** Outcome of each accepted connection, in accept order. */
  accepted: Array<Promise<Outcome>>;
  nextAccepted(): Promise<Outcome>;
  /** Accepted raw sockets not yet closed. */
  openRaw(): number;
}

/**
 * Without any help from the test, every connection of these listeners ends:
 * no raw socket left on the server side and no handle beyond the listeners
 * themselves (a client socket or a server socket left open would show).
 */
async function expectAllClosed(...ls: Listener[]): Promise<void> {
  const want = baseline + ls.length;
  const deadline = Date.now() + 2000;
  while ((openHandles() > want || ls.some((l) => l.openRaw() > 0)) && Date.now() < deadline) await sleep(10);
  expect(ls.map((l) => l.openRaw())).toEqual(ls.map(() => 0));
  expect(openHandles(), `handles: ${process.getActiveResourcesInfo().join(', ')}`).toBe(want);
}

/** A net.Server whose connections go through secureAccept (or `raw` for a plain listener). */
async function listen(
  kind: 'tcp' | 'unix',
  onConnection: (raw: net.Socket) => Promise<tls.TLSSocket> | void,
): Promise<Listener> {
  const accepted: Array<Promise<Outcome>> = [];
  const waiters: Array<() => void> = [];
  const raws = new Set<net.Socket>();
  const srv = net.createServer((raw) => {
    raws.add(raw);
    raw.on('close', () => raws.delete(raw));
    raw.on('error', () => undefined);
    const p = onConnection(raw);
    if (p) accepted.push(outcome(p));
    waiters.splice(0).forEach((w) => w());
  });
  const address =
    kind === 'tcp'
      ? await new Promise<{ host: string; port: number }>((resolve) =>
          srv.listen(0, '127.0.0.1', () => resolve({ host: '127.0.0.1', port: (srv.address() as net.AddressInfo).port })),
        )
      : await new Promise<{ path: string }>((resolve) => {
          const path = join(tmp, `s${Math.random().toString(16).slice(2)}.sock`);
          srv.listen(path, () => resolve({ path }));
        });
  let next = 0;
  cleanups.push(async () => {
    // TLS sockets first: destroying a raw socket under a live TLSSocket and then the TLSSocket
    // crashes Node 20 (SIGSEGV). Destroying the TLSSocket also destroys its raw socket.
    for (const a of accepted) {
      const o = await a;
      if (o.ok) o.sock.destroy();
    }
    for (const r of raws) r.destroy();
    await new Promise<void>((r) => srv.close(() => r()));
  });
  return {
    address,
    accepted,
    openRaw: () => raws.size,
    async nextAccepted() {
      const i = next++;
      while (accepted.length <= i) await new Promise<void>((r) => waiters.push(r));
      return accepted[i] as Promise<Outcome>;
    },
  };
}

function tlsListen(kind: 'tcp' | 'unix', opts: tls.TlsOptions, accept: AcceptOptions = {}): Promise<Listener> {
  return listen(kind, (raw) => secureAccept(raw, opts, accept));
}

async function connect(l: Listener, opts: tls.ConnectionOptions, timeoutMs?: number): Promise<Outcome> {
  const o = await outcome(secureConnect({ ...opts, ...l.address }, { channel: 'main', ...(timeoutMs ? { timeoutMs } : {}) }));
  if (o.ok) cleanups.push(() => void o.sock.destroy());
  return o;
}

/** The first thing that happens to an established socket: data, a typed error, or a close. */
function fate(sock: tls.TLSSocket, timeoutMs = 3000): Promise<string> {
  return new Promise((resolve) => {
    const t = setTimeout(() => resolve('nothing'), timeoutMs);
    sock.once('data', (d: Buffer) => {
      clearTimeout(t);
      resolve(`data:${d.toString()}`);
    });
    sock.once('error', (e) => {
      clearTimeout(t);
      resolve(`error:${classifyTlsError(e, 'main', { side: 'client', established: true }).code}`);
    });
    sock.once('close', () => {
      clearTimeout(t);
      resolve('close');
    });
  });
}

function expectRefused(o: Outcome, code: TransportError['code']): TransportError {
  if (o.ok) throw new Error(`expected ${code}, but the handshake succeeded`);
  expect(o.err.code, o.err.message).toBe(code);
  return o.err;
}

function expectOk(o: Outcome): tls.TLSSocket {
  if (!o.ok) throw new Error(`expected success, got ${o.err.describe()}`);
  return o.sock;
}

/** Echo one line both ways and end cleanly: proves the channel carries data. */
async function roundTrip(c: tls.TLSSocket, s: tls.TLSSocket): Promise<void> {
  s.once('data', (d: Buffer) => s.write(`echo:${d.toString()}`));
  const got = new Promise<string>((r) => c.once('data', (d: Buffer) => r(d.toString())));
  c.write('QEVM');
  expect(await got).toBe('echo:QEVM');
  const closed = new Promise((r) => s.once('close', r));
  s.on('end', () => s.end());
  c.end();
  await closed;
}

// ---------------------------------------------------------------------------
// Option builders and classification (no sockets)
// ---------------------------------------------------------------------------

describe('clientTlsOptions / serverTlsOptions', () => {
  it('client: our CA only, our certificate, no SNI, no ALPN, TLS 1.3 by default', () => {
    const m = clientMat(A);
    const o = clientTlsOptions(m, client(), '127.0.0.1');
    expect(o.ca).toBe(m.ca);
    expect(o.cert).toBe(m.cert);
    expect(o.key).toBe(m.key);
    expect(o.servername).toBe('');
    expect(o.ALPNProtocols).toBeUndefined();
    expect(o.rejectUnauthorized).toBe(true);
    expect(o.minVersion).toBe('TLSv1.3');
    expect(o.maxVersion).toBe('TLSv1.3');
    expect(o.session).toBeUndefined();
    const s = Buffer.from('ticket');
    expect(clientTlsOptions(m, client({ minVersion: 'TLSv1.2' }), 'h', s)).toMatchObject({ minVersion: 'TLSv1.2', session: s });
    // no client certificate in the directory: none presented
    expect(clientTlsOptions({ ca: m.ca }, client(), 'h').cert).toBeUndefined();
  });

  it('client: hostname from tls-hostname, else the URI host; none with verify-peer is refused like QEMU', () => {
    const m = clientMat(A);
    expect(() => clientTlsOptions(m, client())).toThrow(expect.objectContaining({ code: 'tls-no-hostname' }));
    expect(() => clientTlsOptions(m, client({ hostname: '' }), '')).toThrow(expect.objectContaining({ code: 'tls-no-hostname' }));
    expect(clientTlsOptions(m, client({ verifyPeer: false })).rejectUnauthorized).toBe(false);
    // the identity check uses tls-hostname, ignoring what Node passes
    const check = clientTlsOptions(m, client({ hostname: 'example.com' }), '127.0.0.1').checkServerIdentity;
    const peer = { subject: { CN: 'localhost' }, subjectaltname: 'DNS:localhost, IP Address:127.0.0.1' } as unknown as tls.PeerCertificate;
    expect(check?.('127.0.0.1', peer)).toMatchObject({ code: 'ERR_TLS_CERT_ALTNAME_INVALID' });
    const byUri = clientTlsOptions(m, client(), '[127.0.0.1]').checkServerIdentity;
    expect(byUri?.('ignored', peer)).toBeUndefined();
    expect(() => clientTlsOptions(m, server(), 'h')).toThrow(expect.objectContaining({ code: 'tls-bad-credentials' }));
    expect(() => clientTlsOptions(m, client({ minVersion: 'TLSv1.3', maxVersion: 'TLSv1.2' }), 'h')).toThrow(
      expect.objectContaining({ code: 'tls-bad-credentials' }),
    );
  });

  it('server: always requests a client certificate, requires it with verify-peer, our CA only, resumable', () => {
    const m = serverMat(A);
    const o = serverTlsOptions(m, server());
    expect(o).toMatchObject({ ca: m.ca, cert: m.cert, key: m.key, requestCert: true, rejectUnauthorized: true, minVersion: 'TLSv1.3' });
    expect(typeof o.sessionIdContext).toBe('string');
    expect(o.ALPNProtocols).toBeUndefined();
    expect(o.SNICallback).toBeUndefined();
    expect(serverTlsOptions(m, server({ verifyPeer: false }))).toMatchObject({ requestCert: true, rejectUnauthorized: false });
    expect(() => serverTlsOptions({ ca: m.ca }, server())).toThrow(expect.objectContaining({ code: 'tls-bad-credentials' }));
    expect(() => serverTlsOptions(m, client())).toThrow(expect.objectContaining({ code: 'tls-bad-credentials' }));
  });
});

describe('classifyTlsError', () => {
  const e = (code: string, message = code): Error => Object.assign(new Error(message), { code });
  it.each([
    ['UNABLE_TO_VERIFY_LEAF_SIGNATURE', 'tls-unknown-ca'],
    ['SELF_SIGNED_CERT_IN_CHAIN', 'tls-unknown-ca'],
    ['DEPTH_ZERO_SELF_SIGNED_CERT', 'tls-unknown-ca'],
    ['UNABLE_TO_GET_ISSUER_CERT_LOCALLY', 'tls-unknown-ca'],
    ['ERR_SSL_TLSV1_ALERT_UNKNOWN_CA', 'tls-unknown-ca'],
    ['CERT_HAS_EXPIRED', 'tls-certificate-expired'],
    ['CERT_NOT_YET_VALID', 'tls-certificate-expired'],
    ['ERR_SSL_SSLV3_ALERT_CERTIFICATE_EXPIRED', 'tls-certificate-expired'],
    ['ERR_TLS_CERT_ALTNAME_INVALID', 'tls-hostname-mismatch'],
    ['ERR_SSL_PEER_DID_NOT_RETURN_A_CERTIFICATE', 'tls-no-peer-certificate'],
    ['ERR_SSL_TLSV13_ALERT_CERTIFICATE_REQUIRED', 'tls-no-peer-certificate'],
    ['ERR_SSL_WRONG_VERSION_NUMBER', 'tls-not-tls'],
    ['ERR_SSL_HTTP_REQUEST', 'tls-not-tls'],
    ['ERR_SSL_PACKET_LENGTH_TOO_LONG', 'tls-not-tls'],
    ['ECONNRESET', 'tls-not-tls'],
    ['ECONNREFUSED', 'connect-failed'],
    ['ENOENT', 'connect-failed'],
    ['ERR_SSL_TLSV1_ALERT_PROTOCOL_VERSION', 'tls-handshake-failed'],
    ['ERR_SSL_SSLV3_ALERT_HANDSHAKE_FAILURE', 'tls-handshake-failed'],
  ] as const)('%s → %s', (code, want) => {
    const err = e(code);
    const t = classifyTlsError(err, 'preempt');
    expect(t).toBeInstanceOf(TransportError);
    expect(t.code).toBe(want);
    expect(t.channel).toBe('preempt');
    expect(t.cause).toBe(err);
  });
  it('uses the phase, the socket of a tls.Server, and passes TransportErrors through', () => {
    expect(classifyTlsError(e('ECONNRESET'), 'main', { established: true }).code).toBe('reset');
    expect(classifyTlsError(e('EPIPE'), undefined, { established: true }).code).toBe('reset');
    const sock = { authorizationError: 'CERT_HAS_EXPIRED' } as unknown as tls.TLSSocket;
    expect(classifyTlsError(e('ECONNRESET', 'socket hang up'), 'main', { socket: sock, side: 'server' }).code).toBe('tls-certificate-expired');
    const t = new TransportError('closed', 'x');
    expect(classifyTlsError(t)).toBe(t);
    expect(classifyTlsError('weird').code).toBe('tls-handshake-failed');
    expect(classifyTlsError(e('UNABLE_TO_VERIFY_LEAF_SIGNATURE'), 'main', { side: 'client' }).describe()).toBe(
      "tls-unknown-ca (main channel): the server's certificate is not signed by our CA (ca-cert.pem): UNABLE_TO_VERIFY_LEAF_SIGNATURE",
    );
  });
});

// ---------------------------------------------------------------------------
// Handshakes over loopback
// ---------------------------------------------------------------------------

describe('successful handshakes', () => {
  it('TCP: mutual authentication, TLS 1.3 by default, data both ways', async () => {
    const l = await tlsListen('tcp', serverTlsOptions(serverMat(A), server()));
    const c = expectOk(await connect(l, clientTlsOptions(clientMat(A), client(), '127.0.0.1')));
    const s = expectOk(await l.nextAccepted());
    expect(c.getProtocol()).toBe('TLSv1.3');
    expect(s.getProtocol()).toBe('TLSv1.3');
    expect(c.authorized).toBe(true);
    expect(s.authorized).toBe(true);
    expect(c.alpnProtocol).toBe(false);
    expect(c.getPeerX509Certificate()?.subject).toContain('CN=localhost');
    expect(s.getPeerX509Certificate()?.subject).toContain('CN=qmt migration client');
    expect(s.getPeerX509Certificate()?.fingerprint256).toBe(new (await import('node:crypto')).X509Certificate(A.clientCert).fingerprint256);
    await roundTrip(c, s);
  });

  it('TLS 1.2 when both sides ask for it; a 1.3-only client and a 1.2-only server do not agree', async () => {
    const l = await tlsListen('tcp', serverTlsOptions(serverMat(A), server({ minVersion: 'TLSv1.2', maxVersion: 'TLSv1.2' })));
    const c = expectOk(await connect(l, clientTlsOptions(clientMat(A), client({ minVersion: 'TLSv1.2', maxVersion: 'TLSv1.2' }), '127.0.0.1')));
    const s = expectOk(await l.nextAccepted());
    expect(c.getProtocol()).toBe('TLSv1.2');
    await roundTrip(c, s);
    const bad = await connect(l, clientTlsOptions(clientMat(A), client(), '127.0.0.1'));
    expectRefused(bad, 'tls-handshake-failed');
    expect((bad as { err: TransportError }).err.message).toMatch(/protocol version/);
    expectRefused(await l.nextAccepted(), 'tls-handshake-failed');
  });

  it('unix socket with tls-hostname; without a hostname the client refuses before connecting', async () => {
    const l = await tlsListen('unix', serverTlsOptions(serverMat(A), server()));
    const c = expectOk(await connect(l, clientTlsOptions(clientMat(A), client({ hostname: 'localhost' }))));
    const s = expectOk(await l.nextAccepted());
    expect(c.getProtocol()).toBe('TLSv1.3');
    await roundTrip(c, s);
    expect(() => clientTlsOptions(clientMat(A), client())).toThrow(expect.objectContaining({ code: 'tls-no-hostname' }));
    expect(l.accepted).toHaveLength(1);
    // verify-peer off on the client: no name needed (the server still checks the client)
    const c2 = expectOk(await connect(l, clientTlsOptions(clientMat(A), client({ verifyPeer: false }))));
    expectOk(await l.nextAccepted());
    c2.destroy();
  });

  it('credentials read from a directory written by writePkiDir', async () => {
    const dir = join(tmp, 'dir');
    await writePkiDir(dir, A);
    const l = await tlsListen('tcp', serverTlsOptions(await loadTlsDir(dir, 'server'), server({ dir })));
    const c = expectOk(await connect(l, clientTlsOptions(await loadTlsDir(dir, 'client'), client({ dir, hostname: 'localhost' }), '127.0.0.1')));
    await roundTrip(c, expectOk(await l.nextAccepted()));
  });

  it('a tls.Server built from serverTlsOptions', async () => {
    const srv = tls.createServer(serverTlsOptions(serverMat(A), server()));
    const secured: tls.TLSSocket[] = [];
    srv.on('secureConnection', (s) => secured.push(s));
    await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
    cleanups.push(async () => {
      secured.forEach((s) => s.destroy());
      await new Promise<void>((r) => srv.close(() => r()));
    });
    const port = (srv.address() as net.AddressInfo).port;
    const c = await secureConnect({ ...clientTlsOptions(clientMat(A), client(), '127.0.0.1'), host: '127.0.0.1', port });
    const session = await waitSession(c);
    expect(session).toBeInstanceOf(Buffer);
    c.end();
    const c2 = await secureConnect({ ...clientTlsOptions(clientMat(A), client(), '127.0.0.1', session), host: '127.0.0.1', port });
    expect(c2.isSessionReused()).toBe(true);
    c2.end();
    await sleep(50);
    expect(secured.length).toBe(2);
    expect(secured.every((s) => s.authorized)).toBe(true);
  });
});

describe('session resumption (second channel)', () => {
  it.each(['TLSv1.3', 'TLSv1.2'] as const)('%s: the second connection resumes the first one\'s session', async (v) => {
    const opts = serverTlsOptions(serverMat(A), server({ minVersion: v, maxVersion: v }));
    const l = await tlsListen('tcp', opts);
    const cs = client({ minVersion: v, maxVersion: v });
    const main = expectOk(await connect(l, clientTlsOptions(clientMat(A), cs, '127.0.0.1')));
    const mainSrv = expectOk(await l.nextAccepted());
    expect(main.isSessionReused()).toBe(false);
    const session = await waitSession(main, 2000);
    expect(session).toBeInstanceOf(Buffer);
    const preempt = expectOk(await connect(l, clientTlsOptions(clientMat(A), cs, '127.0.0.1', session)));
    const preemptSrv = expectOk(await l.nextAccepted());
    expect(preempt.isSessionReused()).toBe(true);
    expect(preemptSrv.isSessionReused()).toBe(true);
    expect(preempt.getProtocol()).toBe(v);
    // the resumed session still carries the verified client identity
    expect(preemptSrv.authorized).toBe(true);
    expect(preemptSrv.getPeerX509Certificate()?.subject).toContain('CN=qmt migration client');
    await roundTrip(preempt, preemptSrv);
    await roundTrip(main, mainSrv);
  });

  it('a session from another server is not resumed but the handshake still succeeds', async () => {
    const l1 = await tlsListen('tcp', serverTlsOptions(serverMat(A), server()));
    const l2 = await tlsListen('tcp', serverTlsOptions(serverMat(A), server()));
    const c1 = expectOk(await connect(l1, clientTlsOptions(clientMat(A), client(), '127.0.0.1')));
    const session = await waitSession(c1);
    const c2 = expectOk(await connect(l2, clientTlsOptions(clientMat(A), client(), '127.0.0.1', session)));
    expect(c2.isSessionReused()).toBe(false);
    c1.destroy();
    c2.destroy();
  });
});

describe('refusals: typed errors, nothing left open', () => {
  it('server certificate from another CA → tls-unknown-ca on the client', async () => {
    const l = await tlsListen('tcp', serverTlsOptions(serverMat(B, A), server()));
    expectRefused(await connect(l, clientTlsOptions(clientMat(A), client(), '127.0.0.1')), 'tls-unknown-ca');
    const s = await l.nextAccepted();
    // The server only sees the client go away (Node's client sends no alert).
    expect(s.ok).toBe(false);
    await expectAllClosed(l);
  });

  it('client certificate from another CA → tls-unknown-ca on the server; the client is dropped', async () => {
    const l = await tlsListen('tcp', serverTlsOptions(serverMat(A), server()));
    const c = expectOk(await connect(l, clientTlsOptions(clientMat(B, A), client(), '127.0.0.1'))); // TLS 1.3: our side is done first
    expectRefused(await l.nextAccepted(), 'tls-unknown-ca');
    expect(await fate(c)).toMatch(/^(close|error:reset)$/);
    await expectAllClosed(l);
  });

  it('a tls.Server reports a refused client certificate only through tlsClientError + the socket', async () => {
    const srv = tls.createServer(serverTlsOptions(serverMat(A), server()));
    const errors: TransportError[] = [];
    srv.on('tlsClientError', (err, sock) => errors.push(classifyTlsError(err, 'main', { side: 'server', socket: sock })));
    await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
    cleanups.push(() => new Promise<void>((r) => srv.close(() => r())));
    const port = (srv.address() as net.AddressInfo).port;
    for (const m of [clientMat(B, A), { ca: Buffer.from(A.caCert) }, clientMat(expiredA)]) {
      const c = await outcome(secureConnect({ ...clientTlsOptions(m, client(), '127.0.0.1'), host: '127.0.0.1', port }));
      if (c.ok) await fate(c.sock);
    }
    const deadline = Date.now() + 2000;
    while (errors.length < 3 && Date.now() < deadline) await sleep(10);
    expect(errors.map((e) => e.code)).toEqual(['tls-unknown-ca', 'tls-no-peer-certificate', 'tls-certificate-expired']);
    const until = Date.now() + 2000;
    while (openHandles() > baseline + 1 && Date.now() < until) await sleep(10);
    expect(openHandles()).toBe(baseline + 1); // the server only
  });

  it('missing client certificate → tls-no-peer-certificate on both sides (TLS 1.3 certificate_required alert)', async () => {
    const l = await tlsListen('tcp', serverTlsOptions(serverMat(A), server()));
    const c = expectOk(await connect(l, clientTlsOptions({ ca: Buffer.from(A.caCert) }, client(), '127.0.0.1')));
    expectRefused(await l.nextAccepted(), 'tls-no-peer-certificate');
    expect(await fate(c)).toBe('error:tls-no-peer-certificate');
    await expectAllClosed(l);
  });

  it('missing client certificate with TLS 1.2: the client handshake itself fails', async () => {
    const l = await tlsListen('tcp', serverTlsOptions(serverMat(A), server({ minVersion: 'TLSv1.2', maxVersion: 'TLSv1.2' })));
    const o = await connect(l, clientTlsOptions({ ca: Buffer.from(A.caCert) }, client({ minVersion: 'TLSv1.2', maxVersion: 'TLSv1.2' }), '127.0.0.1'));
    expectRefused(o, 'tls-handshake-failed'); // a TLS 1.2 handshake_failure alert does not say why
    expectRefused(await l.nextAccepted(), 'tls-no-peer-certificate');
    await expectAllClosed(l);
  });

  it('without verify-peer the server accepts a client without a certificate (QEMU verify-peer=off)', async () => {
    const l = await tlsListen('tcp', serverTlsOptions(serverMat(A), server({ verifyPeer: false })));
    const c = expectOk(await connect(l, clientTlsOptions({ ca: Buffer.from(A.caCert) }, client(), '127.0.0.1')));
    const s = expectOk(await l.nextAccepted());
    expect(s.authorized).toBe(false);
    await roundTrip(c, s);
  });

  it('expired or not yet valid certificates → tls-certificate-expired (both directions)', async () => {
    const l = await tlsListen('tcp', serverTlsOptions(serverMat(expiredA), server()));
    const e = expectRefused(await connect(l, clientTlsOptions(clientMat(A), client(), '127.0.0.1')), 'tls-certificate-expired');
    expect(e.message).toContain('expired');
    await l.nextAccepted();
    const l2 = await tlsListen('tcp', serverTlsOptions(serverMat(A), server()));
    const c = expectOk(await connect(l2, clientTlsOptions(clientMat(expiredA), client(), '127.0.0.1')));
    expectRefused(await l2.nextAccepted(), 'tls-certificate-expired');
    await fate(c);
    const c2 = expectOk(await connect(l2, clientTlsOptions(clientMat(futureA), client(), '127.0.0.1')));
    const f = expectRefused(await l2.nextAccepted(), 'tls-certificate-expired');
    expect(f.message).toContain('not yet valid');
    await fate(c2);
    await expectAllClosed(l, l2);
  });

  it('hostname mismatch → tls-hostname-mismatch; an IP literal must be an IP subjectAltName', async () => {
    const l = await tlsListen('tcp', serverTlsOptions(serverMat(A), server()));
    expectRefused(await connect(l, clientTlsOptions(clientMat(A), client({ hostname: 'dst.example' }), '127.0.0.1')), 'tls-hostname-mismatch');
    await l.nextAccepted();
    const l2 = await tlsListen('tcp', serverTlsOptions(serverMat(dnsOnlyA), server()));
    expectRefused(await connect(l2, clientTlsOptions(clientMat(A), client(), '127.0.0.1')), 'tls-hostname-mismatch');
    await l2.nextAccepted();
    // ... and tls-hostname overrides the URI host
    const c = expectOk(await connect(l2, clientTlsOptions(clientMat(A), client({ hostname: 'localhost' }), '127.0.0.1')));
    await roundTrip(c, expectOk(await l2.nextAccepted()));
    await expectAllClosed(l, l2);
  });

  it('a plain TCP peer talking to the TLS listener → tls-not-tls', async () => {
    const l = await tlsListen('tcp', serverTlsOptions(serverMat(A), server()));
    const { host, port } = l.address as { host: string; port: number };
    const plain = async (send: Buffer | string | null): Promise<void> => {
      const s = net.connect(port, host);
      s.on('error', () => undefined);
      await new Promise((r) => s.once('connect', r));
      if (send === null) s.end();
      else s.write(send);
      const o = await l.nextAccepted();
      expectRefused(o, 'tls-not-tls');
    };
    await plain(Buffer.from([0x51, 0x45, 0x56, 0x4d, 0, 0, 0, 3])); // a QEMU stream header
    await plain('GET / HTTP/1.1\r\n\r\n');
    await plain(null); // connects and hangs up without a byte
    await expectAllClosed(l); // our plain sockets too: the listener closed them
  });

  it('our TLS client talking to a plain listener → tls-not-tls (or connect-timeout if it stays silent)', async () => {
    const closer = await listen('tcp', (raw) => void raw.destroy());
    expectRefused(await connect(closer, clientTlsOptions(clientMat(A), client(), '127.0.0.1')), 'tls-not-tls');
    // (resume(): a plain listener that reads sees the client's close)
    const talker = await listen('tcp', (raw) => {
      raw.resume().end(Buffer.from([0x51, 0x45, 0x56, 0x4d, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0]));
    });
    expectRefused(await connect(talker, clientTlsOptions(clientMat(A), client(), '127.0.0.1')), 'tls-not-tls');
    const silent = await listen('tcp', (raw) => void raw.resume());
    expectRefused(await connect(silent, clientTlsOptions(clientMat(A), client(), '127.0.0.1'), 200), 'connect-timeout');
    await expectAllClosed(closer, talker, silent);
  });

  it('nothing listening → connect-failed', async () => {
    const l = await listen('tcp', () => undefined);
    const { port } = l.address as { port: number };
    const dead = { address: { host: '127.0.0.1', port: port === 1 ? 2 : 1 } } as Listener;
    expectRefused(await connect(dead, clientTlsOptions(clientMat(A), client(), '127.0.0.1')), 'connect-failed');
    const nowhere = { address: { path: join(tmp, 'nothing.sock') } } as Listener;
    expectRefused(await connect(nowhere, clientTlsOptions(clientMat(A), client({ hostname: 'localhost' }))), 'connect-failed');
    await expectAllClosed(l);
  });

  it('unusable credentials → tls-bad-credentials, and a wrapped socket is destroyed', async () => {
    const l = await listen('tcp', () => undefined);
    const { host, port } = l.address as { host: string; port: number };
    const raw = net.connect(port, host);
    await new Promise((r) => raw.once('connect', r));
    const bad = { ca: Buffer.from('junk'), cert: Buffer.from('junk'), key: Buffer.from('junk') };
    const o = await outcome(secureConnect({ ...clientTlsOptions(bad, client(), host), socket: raw }));
    expectRefused(o, 'tls-bad-credentials');
    expect(raw.destroyed).toBe(true);
    await expectAllClosed(l);
  });
});

describe('secureAccept awaitData', () => {
  it('resolves with the first bytes still readable; rejects a client that leaves right after the handshake', async () => {
    const l = await tlsListen('tcp', serverTlsOptions(serverMat(A), server()), { awaitData: true, channel: 'main' });
    const c = expectOk(await connect(l, clientTlsOptions(clientMat(A), client(), '127.0.0.1')));
    c.write('QEVM');
    const s = expectOk(await l.nextAccepted());
    const first = await new Promise<Buffer>((r) => s.once('data', r));
    expect(first.toString()).toBe('QEVM');
    await roundTrip(c, s);
    // a client that finishes the handshake and closes without a byte (QEMU refusing our certificate)
    const c2 = expectOk(await connect(l, clientTlsOptions(clientMat(A), client(), '127.0.0.1')));
    await sleep(20); // let the final handshake flight go out
    c2.end();
    const e = expectRefused(await l.nextAccepted(), 'tls-handshake-failed');
    expect(e.message).toMatch(/refused our certificate/);
    expect(e.channel).toBe('main');
    await expectAllClosed(l);
  });
});

describe('ClientHello', () => {
  /** Extension types of the ClientHello our options produce. */
  async function helloExtensions(opts: tls.ConnectionOptions): Promise<number[]> {
    let hello: Buffer | undefined;
    const l = await listen('tcp', (raw) => {
      raw.once('data', (d: Buffer) => {
        hello = d;
        raw.destroy();
      });
    });
    await connect(l, opts);
    if (!hello) throw new Error('no ClientHello');
    const h = hello;
    expect(h[0]).toBe(22); // handshake record
    expect(h[5]).toBe(1); // ClientHello
    let p = 5 + 4 + 2 + 32;
    p += 1 + (h[p] ?? 0); // session id
    p += 2 + h.readUInt16BE(p); // cipher suites
    p += 1 + (h[p] ?? 0); // compression methods
    const end = p + 2 + h.readUInt16BE(p);
    p += 2;
    const types: number[] = [];
    while (p < end) {
      types.push(h.readUInt16BE(p));
      p += 4 + h.readUInt16BE(p + 2);
    }
    return types;
  }
  const SNI = 0;
  const ALPN = 16;
  const PRE_SHARED_KEY = 41;

  it('carries no server_name and no ALPN, for DNS and IP hosts (like QEMU); a session adds pre_shared_key', async () => {
    for (const [host, settings] of [
      ['127.0.0.1', client()],
      ['localhost', client()],
      ['127.0.0.1', client({ hostname: 'dst.example' })],
    ] as const) {
      const ext = await helloExtensions({ ...clientTlsOptions(clientMat(A), settings, host), timeout: 1000 });
      expect(ext).not.toContain(SNI);
      expect(ext).not.toContain(ALPN);
      expect(ext).not.toContain(PRE_SHARED_KEY);
    }
    // get a real TLS 1.3 ticket, then offer it
    const l = await tlsListen('tcp', serverTlsOptions(serverMat(A), server()));
    const c = expectOk(await connect(l, clientTlsOptions(clientMat(A), client(), '127.0.0.1')));
    const session = await waitSession(c);
    c.destroy();
    const ext = await helloExtensions(clientTlsOptions(clientMat(A), client(), '127.0.0.1', session));
    expect(ext).toContain(PRE_SHARED_KEY);
    expect(ext).not.toContain(SNI);
    expect(ext).not.toContain(ALPN);
  });
});
