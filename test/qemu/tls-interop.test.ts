/**
 * Our PKI and TLS options against QEMU 10.0's tls-creds-x509 (GnuTLS): QEMU
 * accepts the directory written by initPkiDir, migrates over it, handshakes
 * with our client and our server, and refuses another CA's certificates.
 */
import { X509Certificate } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import tls from 'node:tls';
import { afterAll, afterEach, beforeAll, expect, it } from 'vitest';
import { TransportError } from '../../src/transport/errors.js';
import { initPkiDir, loadTlsDir, type Pki, type TlsMaterial } from '../../src/transport/pki.js';
import { classifyTlsError, clientTlsOptions, secureAccept, secureConnect, serverTlsOptions } from '../../src/transport/tls.js';
import { compareGuestRam, liveQemus, readGuestRam, startQemu, stopAll, type QemuProcess } from './harness.js';
import { describeWithQemu } from './require-qemu.js';

const MiB = 1024 * 1024;
const QEVM = 0x5145564d;

function tlsCreds(dir: string, endpoint: 'server' | 'client', verifyPeer = true): string[] {
  return ['-object', `tls-creds-x509,id=tls0,dir=${dir},endpoint=${endpoint},verify-peer=${verifyPeer ? 'on' : 'off'}`];
}

/** The port QEMU bound for `migrate-incoming tcp:127.0.0.1:0`. */
async function incomingPort(q: QemuProcess): Promise<number> {
  const info = await q.queryMigrate();
  const addrs = info['socket-address'] as Array<{ port?: string }> | undefined;
  const port = Number(addrs?.[0]?.port);
  if (!Number.isInteger(port) || port <= 0) throw new Error(`no incoming port in ${JSON.stringify(info)}`);
  return port;
}

/** A QEMU destination listening with TLS on 127.0.0.1 (port chosen by QEMU); stays alive if the migration fails. */
async function tlsDestination(name: string, dir: string, extra: { paused?: boolean; memoryMiB?: number; guest?: { startMiB: number; endMiB: number } } = {}): Promise<{ q: QemuProcess; port: number }> {
  const q = await startQemu({
    name,
    memoryMiB: extra.memoryMiB ?? 16,
    incoming: true,
    paused: extra.paused ?? false,
    ...(extra.guest ? { guest: extra.guest } : {}),
    extraArgs: tlsCreds(dir, 'server'),
  });
  await q.setParameters({ 'tls-creds': 'tls0' });
  await q.migrateIncoming('tcp:127.0.0.1:0', { 'exit-on-error': false });
  return { q, port: await incomingPort(q) };
}

/** A QEMU source with client credentials and tls-hostname set. */
async function tlsSource(name: string, dir: string, opts: { guest?: { startMiB: number; endMiB: number }; memoryMiB?: number } = {}): Promise<QemuProcess> {
  const q = await startQemu({
    name,
    memoryMiB: opts.memoryMiB ?? 16,
    ...(opts.guest ? { guest: opts.guest } : {}),
    extraArgs: tlsCreds(dir, 'client'),
  });
  await q.setParameters({ 'tls-creds': 'tls0', 'tls-hostname': 'localhost' });
  return q;
}

async function waitStatus(q: QemuProcess, want: (s: string) => boolean, timeoutMs = 10_000): Promise<{ status: string; error: string }> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const m = await q.queryMigrate();
    const status = m.status ?? 'none';
    if (want(status)) return { status, error: m['error-desc'] ?? '' };
    if (Date.now() > deadline) throw new Error(`${q.name}: migration status still ${status} after ${timeoutMs} ms`);
    await sleep(20);
  }
}

async function waitStderr(q: QemuProcess, re: RegExp, timeoutMs = 5000): Promise<string> {
  const deadline = Date.now() + timeoutMs;
  while (!re.test(q.stderrTail())) {
    if (Date.now() > deadline) throw new Error(`${q.name}: stderr does not match ${re}: ${q.stderrTail(500)}`);
    await sleep(20);
  }
  return q.stderrTail();
}

/** What happens to an established socket first: a typed error, or a plain close. */
function fate(sock: tls.TLSSocket, timeoutMs = 5000): Promise<TransportError | 'close' | 'nothing'> {
  return new Promise((resolve) => {
    const t = setTimeout(() => resolve('nothing'), timeoutMs);
    sock.once('error', (e) => {
      clearTimeout(t);
      resolve(classifyTlsError(e, 'main', { side: 'client', established: true }));
    });
    sock.once('close', () => {
      clearTimeout(t);
      resolve('close');
    });
    sock.resume();
  });
}

describeWithQemu('TLS interop with QEMU 10.0 (tls-creds-x509)', () => {
  let tmp: string;
  let dir: string; // our PKI, written by initPkiDir
  let otherDir: string; // another CA
  let pki: Pki;
  let client: TlsMaterial;
  let server: TlsMaterial;
  let other: Pki;
  const closers: Array<() => Promise<void> | void> = [];

  beforeAll(async () => {
    tmp = await mkdtemp(join(tmpdir(), 'qmt-tls-interop-'));
    dir = join(tmp, 'pki');
    otherDir = join(tmp, 'other');
    [{ pki }, { pki: other }] = await Promise.all([initPkiDir(dir), initPkiDir(otherDir, { caName: 'another CA' })]);
    [client, server] = await Promise.all([loadTlsDir(dir, 'client'), loadTlsDir(dir, 'server')]);
  });

  afterEach(async () => {
    for (const c of closers.splice(0).reverse()) await c();
    await stopAll();
  });

  afterAll(async () => {
    await stopAll();
    expect(liveQemus()).toEqual([]);
    await rm(tmp, { recursive: true, force: true });
  });

  it('(a) two QEMUs migrate over TLS with a directory from initPkiDir; the paused destination equals the stopped source', async () => {
    const guest = { startMiB: 1, endMiB: 16 };
    const src = await tlsSource('tls-src', dir, { guest, memoryMiB: 32 });
    const { q: dst, port } = await tlsDestination('tls-dst', dir, { paused: true, memoryMiB: 32, guest });
    await src.waitSerialPasses(3, 15_000); // let the guest dirty its range
    await src.setParameters({ 'downtime-limit': 2000 });
    await src.migrate(`tcp:127.0.0.1:${port}`);
    const s = await src.waitMigration(['completed'], 30_000);
    await dst.waitMigration(['completed'], 30_000);
    expect(s.ram?.normal).toBeGreaterThan(15 * 256); // the guest's pages went through TLS
    expect((await src.queryStatus()).status).toBe('postmigrate');
    expect((await dst.queryStatus()).status).toBe('paused');
    const [a, b] = await Promise.all([readGuestRam(src, 32 * MiB), readGuestRam(dst, 32 * MiB)]);
    const diff = compareGuestRam(a, b);
    expect(diff.equal, `differing pages: ${diff.pages.map((p) => p.toString(16)).join(',')}`).toBe(true);
    expect(a.subarray(MiB, 16 * MiB).some((v) => v !== 0)).toBe(true);
  });

  it('(b) our TLS client handshakes with a QEMU destination, which accepts our client certificate', async () => {
    const { q: dst, port } = await tlsDestination('tls-b-dst', dir);
    const sock = await secureConnect({ ...clientTlsOptions(client, { dir, endpoint: 'client' }, '127.0.0.1'), host: '127.0.0.1', port }, { channel: 'main' });
    try {
      expect(sock.getProtocol()).toBe('TLSv1.3');
      expect(sock.authorized).toBe(true);
      expect(sock.getPeerX509Certificate()?.fingerprint256).toBe(new X509Certificate(pki.serverCert).fingerprint256);
      // QEMU checks our certificate after its handshake; only then does the incoming migration become active.
      sock.write(Buffer.from([0x51, 0x45, 0x56, 0x4d, 0, 0, 0, 3]));
      await waitStatus(dst, (st) => st === 'active');
    } finally {
      sock.destroy();
    }
    const end = await waitStatus(dst, (st) => st === 'failed');
    expect(end.error).not.toMatch(/certificate/i);
    await dst.stop();
    expect(dst.isRunning).toBe(false);
  });

  it('(c) a QEMU source handshakes with our tls.Server, presents its client certificate, and sends QEVM', async () => {
    const srv = tls.createServer(serverTlsOptions(server, { dir, endpoint: 'server' }));
    const errors: TransportError[] = [];
    srv.on('tlsClientError', (e, s) => errors.push(classifyTlsError(e, 'main', { side: 'server', socket: s })));
    const first = new Promise<{ sock: tls.TLSSocket; bytes: Buffer }>((resolve) => {
      srv.once('secureConnection', (sock: tls.TLSSocket) => {
        sock.once('data', (bytes: Buffer) => resolve({ sock, bytes }));
      });
    });
    await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
    closers.push(() => new Promise<void>((r) => srv.close(() => r())));
    const src = await tlsSource('tls-c-src', dir);
    // With a return path the source waits for our answer, so it cannot report 'completed' just
    // because the whole (small, mostly zero) stream fitted into the socket buffers.
    await src.setCapabilities({ 'return-path': true });
    await src.migrate(`tcp:127.0.0.1:${(srv.address() as net.AddressInfo).port}`);
    const { sock, bytes } = await first;
    try {
      expect(sock.authorized).toBe(true);
      expect(sock.getProtocol()).toBe('TLSv1.3');
      expect(sock.getPeerX509Certificate()?.fingerprint256).toBe(new X509Certificate(pki.clientCert).fingerprint256);
      expect((sock as tls.TLSSocket & { servername?: string | false }).servername).toBe(false); // QEMU sends no SNI
      expect(sock.alpnProtocol).toBe(false);
      expect(bytes.length).toBeGreaterThanOrEqual(4);
      expect(bytes.readUInt32BE(0)).toBe(QEVM);
    } finally {
      sock.destroy();
    }
    const end = await waitStatus(src, (st) => st === 'failed');
    expect(end.error).not.toMatch(/certificate/i);
    expect(errors).toEqual([]);
  });

  it('(d) another CA: QEMU refuses our certificates, we refuse QEMU\'s, and every side gets a typed error', async () => {
    const otherClient: TlsMaterial = { ca: client.ca, cert: Buffer.from(other.clientCert), key: Buffer.from(other.clientKey) };
    const otherServer: TlsMaterial = { ca: server.ca, cert: Buffer.from(other.serverCert), key: Buffer.from(other.serverKey) };

    // 1. QEMU destination, our client certificate from another CA. With TLS 1.3 our handshake ends
    //    first; GnuTLS/QEMU then checks the certificate and drops the connection.
    const { q: dst, port } = await tlsDestination('tls-d-dst', dir);
    const s1 = await secureConnect({ ...clientTlsOptions(otherClient, { dir, endpoint: 'client' }, '127.0.0.1'), host: '127.0.0.1', port });
    s1.write(Buffer.from([0x51, 0x45, 0x56, 0x4d, 0, 0, 0, 3]));
    const f1 = await fate(s1);
    s1.destroy();
    expect(f1 === 'close' || (f1 instanceof TransportError && f1.code === 'reset'), String(f1)).toBe(true);
    await waitStderr(dst, /hasn't got a known issuer/);
    expect((await dst.queryMigrate()).status).toBe('setup'); // still waiting for a good source

    // 2. The same destination, our client without a certificate.
    const s2 = await secureConnect({ ...clientTlsOptions({ ca: client.ca }, { dir, endpoint: 'client' }, '127.0.0.1'), host: '127.0.0.1', port });
    s2.write(Buffer.from([0x51, 0x45, 0x56, 0x4d]));
    const f2 = await fate(s2);
    s2.destroy();
    expect(f2 === 'close' || (f2 instanceof TransportError && f2.code === 'reset'), String(f2)).toBe(true);
    await waitStderr(dst, /No certificate was found/);

    // 3. We refuse: QEMU's server certificate for the wrong name.
    await expect(
      secureConnect({ ...clientTlsOptions(client, { dir, endpoint: 'client', hostname: 'dst.example' }, '127.0.0.1'), host: '127.0.0.1', port }),
    ).rejects.toMatchObject({ code: 'tls-hostname-mismatch' });
    expect((await dst.queryMigrate()).status).toBe('setup');
    await dst.stop();

    // 4. We refuse: a QEMU destination whose server certificate is from another CA.
    const { q: dst2, port: port2 } = await tlsDestination('tls-d-dst2', otherDir);
    await expect(
      secureConnect({ ...clientTlsOptions(client, { dir, endpoint: 'client' }, '127.0.0.1'), host: '127.0.0.1', port: port2 }, { channel: 'main' }),
    ).rejects.toMatchObject({ code: 'tls-unknown-ca', channel: 'main' });
    await dst2.stop();

    // 5. A QEMU source refuses our server certificate from another CA: it completes the handshake,
    //    checks, and leaves without sending a byte; secureAccept (awaitData) reports it.
    const accepted: Array<Promise<tls.TLSSocket | unknown>> = [];
    const raw = net.createServer((r) =>
      accepted.push(
        secureAccept(r, serverTlsOptions(otherServer, { dir, endpoint: 'server' }), { awaitData: true, channel: 'main', timeoutMs: 10_000 }).then(
          (sock) => {
            sock.destroy();
            return sock;
          },
          (e: unknown) => e,
        ),
      ),
    );
    await new Promise<void>((r) => raw.listen(0, '127.0.0.1', r));
    closers.push(() => new Promise<void>((r) => raw.close(() => r())));
    const src = await tlsSource('tls-d-src', dir);
    await src.migrate(`tcp:127.0.0.1:${(raw.address() as net.AddressInfo).port}`);
    const end = await waitStatus(src, (st) => st === 'failed');
    expect(end.error).toMatch(/hasn't got a known issuer/);
    while (accepted.length === 0) await sleep(10);
    const refusal = await accepted[0];
    expect(refusal).toBeInstanceOf(TransportError);
    expect(refusal).toMatchObject({ code: 'tls-handshake-failed', channel: 'main', message: expect.stringMatching(/refused our certificate/) });
    await src.stop();
  });
});
