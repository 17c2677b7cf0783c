import { X509Certificate, createPrivateKey } from 'node:crypto';
import { spawnSync } from 'node:child_process';
import { mkdir, mkdtemp, readFile, rm, stat, unlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Command } from 'commander';
import forge from 'node-forge';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { registerPkiCommand } from '../../src/cli/pki.js';
import { TransportError } from '../../src/transport/errors.js';
import { DEFAULT_PKI_HOSTNAMES, generatePki, initPkiDir, loadTlsDir, PKI_FILES, writePkiDir, type Pki } from '../../src/transport/pki.js';

const OID = {
  basicConstraints: '2.5.29.19',
  keyUsage: '2.5.29.15',
  extKeyUsage: '2.5.29.37',
  subjectAltName: '2.5.29.17',
  subjectKeyIdentifier: '2.5.29.14',
  authorityKeyIdentifier: '2.5.29.35',
  serverAuth: '1.3.6.1.5.5.7.3.1',
  clientAuth: '1.3.6.1.5.5.7.3.2',
  sha256WithRSA: '1.2.840.113549.1.1.11',
};

interface Ext {
  id: string;
  critical: boolean;
  parsed: Record<string, unknown>;
}

/** Extensions as forge parses them, keyed by OID, with the critical flag as encoded. */
function extensions(pem: string): Map<string, Ext> {
  const cert = forge.pki.certificateFromPem(pem);
  const out = new Map<string, Ext>();
  for (const e of cert.extensions as Array<Record<string, unknown> & { id: string; critical?: boolean }>) {
    out.set(e.id, { id: e.id, critical: e.critical === true, parsed: e });
  }
  return out;
}

function ext(pem: string, oid: string): Ext {
  const e = extensions(pem).get(oid);
  if (!e) throw new Error(`extension ${oid} missing`);
  return e;
}

let pki: Pki;
let dir: string;

beforeAll(async () => {
  pki = await generatePki();
  dir = await mkdtemp(join(tmpdir(), 'qmt-pki-test-'));
});

afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe('generatePki', () => {
  it('makes v3 certificates that Node parses, with SHA-256 signatures and random positive serials', async () => {
    const certs = [pki.caCert, pki.serverCert, pki.clientCert];
    for (const pem of certs) {
      const x = new X509Certificate(pem);
      expect(x.publicKey.asymmetricKeyType).toBe('rsa');
      expect(x.publicKey.asymmetricKeyDetails?.modulusLength).toBe(2048);
      const f = forge.pki.certificateFromPem(pem);
      expect(f.version).toBe(2); // v3
      expect(f.siginfo.algorithmOid).toBe(OID.sha256WithRSA);
      expect(/^[0-7][0-9a-f]{31}$/i.test(f.serialNumber)).toBe(true);
    }
    const serials = new Set(certs.map((p) => new X509Certificate(p).serialNumber));
    expect(serials.size).toBe(3);
    const again = await generatePki({ hostnames: ['localhost'] });
    expect(new X509Certificate(again.caCert).serialNumber).not.toBe(new X509Certificate(pki.caCert).serialNumber);
  });

  it('CA: basicConstraints CA:true critical, keyUsage keyCertSign+cRLSign critical, self-signed, key ids', () => {
    const ca = new X509Certificate(pki.caCert);
    expect(ca.ca).toBe(true);
    expect(ca.checkIssued(ca)).toBe(true);
    expect(ca.verify(ca.publicKey)).toBe(true);
    const bc = ext(pki.caCert, OID.basicConstraints);
    expect(bc.critical).toBe(true);
    expect(bc.parsed.cA).toBe(true);
    const ku = ext(pki.caCert, OID.keyUsage);
    expect(ku.critical).toBe(true);
    expect(ku.parsed).toMatchObject({ keyCertSign: true, cRLSign: true, digitalSignature: false });
    const ski = ext(pki.caCert, OID.subjectKeyIdentifier).parsed.subjectKeyIdentifier as string;
    expect(ski).toMatch(/^[0-9a-f]{40}$/);
    expect(extensions(pki.caCert).has(OID.extKeyUsage)).toBe(false);
    // OpenSSL's text form shows the AKI equal to the SKI of a self-signed CA
    expect(ca.toLegacyObject().ext_key_usage).toBeUndefined();
  });

  it('leaves: CA:false, digitalSignature+keyEncipherment, serverAuth / clientAuth, SANs, AKI = CA SKI', () => {
    const ca = new X509Certificate(pki.caCert);
    const caSki = ext(pki.caCert, OID.subjectKeyIdentifier).parsed.subjectKeyIdentifier as string;
    for (const [pem, purpose, other] of [
      [pki.serverCert, OID.serverAuth, OID.clientAuth],
      [pki.clientCert, OID.clientAuth, OID.serverAuth],
    ] as const) {
      const x = new X509Certificate(pem);
      expect(x.ca).toBe(false);
      expect(x.checkIssued(ca)).toBe(true);
      expect(x.verify(ca.publicKey)).toBe(true);
      expect(x.issuer).toBe(ca.subject);
      const bc = ext(pem, OID.basicConstraints);
      expect(bc.critical).toBe(true);
      expect(bc.parsed.cA).toBe(false);
      const ku = ext(pem, OID.keyUsage);
      expect(ku.critical).toBe(true);
      expect(ku.parsed).toMatchObject({ digitalSignature: true, keyEncipherment: true, keyCertSign: false });
      expect(x.keyUsage).toEqual([purpose]); // X509Certificate.keyUsage lists the extended key usages
      expect(x.keyUsage).not.toContain(other);
      expect(x.subjectAltName).toBe('DNS:localhost, IP Address:127.0.0.1, IP Address:0:0:0:0:0:0:0:1');
      expect(x.checkHost('localhost')).toBe('localhost');
      expect(x.checkIP('127.0.0.1')).toBe('127.0.0.1');
      expect(x.checkIP('::1')).toBe('::1');
      expect(x.checkHost('example.com')).toBeUndefined();
      const aki = ext(pem, OID.authorityKeyIdentifier).parsed;
      expect(aki).toBeDefined();
      expect(ext(pem, OID.subjectKeyIdentifier).parsed.subjectKeyIdentifier).not.toBe(caSki);
      // AKI keyIdentifier [0] must be the CA's SKI: check the DER bytes
      const der = forge.asn1.fromDer((aki as { value: string }).value);
      const kid = (der.value as forge.asn1.Asn1[])[0];
      expect(forge.util.bytesToHex(kid?.value as string)).toBe(caSki);
    }
    expect(new X509Certificate(pki.serverCert).subject).toContain('CN=localhost');
  });

  it('keys are PKCS#8 PEM and match their certificates', () => {
    for (const [cert, key] of [
      [pki.caCert, pki.caKey],
      [pki.serverCert, pki.serverKey],
      [pki.clientCert, pki.clientKey],
    ] as const) {
      expect(key.startsWith('-----BEGIN PRIVATE KEY-----')).toBe(true);
      expect(new X509Certificate(cert).checkPrivateKey(createPrivateKey(key))).toBe(true);
    }
    expect(new X509Certificate(pki.serverCert).checkPrivateKey(createPrivateKey(pki.clientKey))).toBe(false);
  });

  it('puts DNS names and IPv4/IPv6 literals from hostnames into the SAN; dates from now/days or overrides', async () => {
    const now = new Date('2030-01-01T00:00:00Z');
    const p = await generatePki({
      hostnames: ['dst.example', '10.1.2.3', 'fd00::1:2', '::ffff:192.0.2.7', '*.migr.example'],
      days: 10,
      now,
    });
    const x = new X509Certificate(p.serverCert);
    expect(x.subjectAltName).toBe(
      'DNS:dst.example, IP Address:10.1.2.3, IP Address:FD00:0:0:0:0:0:1:2, IP Address:0:0:0:0:0:FFFF:C000:207, DNS:*.migr.example',
    );
    expect(x.subject).toContain('CN=dst.example');
    expect(x.checkIP('fd00::1:2')).toBe('fd00::1:2');
    expect(new Date(x.validFrom).getTime()).toBe(now.getTime() - 5 * 60_000);
    expect(new Date(x.validTo).getTime()).toBe(now.getTime() + 10 * 86_400_000);
    const expired = await generatePki({
      notBefore: new Date('2020-01-01T00:00:00Z'),
      validity: { client: { notAfter: new Date('2021-01-01T00:00:00Z') } },
    });
    expect(new X509Certificate(expired.clientCert).validTo).toBe('Jan  1 00:00:00 2021 GMT');
    expect(new X509Certificate(expired.clientCert).validFrom).toBe('Jan  1 00:00:00 2020 GMT');
    expect(new Date(new X509Certificate(expired.serverCert).validTo).getTime()).toBeGreaterThan(Date.now());
  });

  it('signs new leaves with an existing CA', async () => {
    const p = await generatePki({ ca: { cert: pki.caCert, key: pki.caKey }, hostnames: ['other.example'] });
    expect(p.caCert).toBe(pki.caCert);
    expect(p.caKey).toBe(pki.caKey);
    const ca = new X509Certificate(pki.caCert);
    expect(new X509Certificate(p.serverCert).checkIssued(ca)).toBe(true);
    expect(new X509Certificate(p.serverCert).verify(ca.publicKey)).toBe(true);
    expect(new X509Certificate(p.serverCert).subjectAltName).toBe('DNS:other.example');
  });

  it('refuses bad options with tls-bad-credentials', async () => {
    for (const opts of [{ hostnames: [] }, { hostnames: ['bad name'] }, { hostnames: ['fe80::1%eth0'] }, { days: 0 }, { days: 1.5 }, { keyBits: 1024 }]) {
      await expect(generatePki(opts)).rejects.toMatchObject({ code: 'tls-bad-credentials' });
    }
    await expect(generatePki({ ca: { cert: 'nope', key: 'nope' } })).rejects.toBeInstanceOf(TransportError);
    await expect(generatePki({ ca: { cert: pki.caCert, key: pki.serverKey } })).rejects.toMatchObject({
      code: 'tls-bad-credentials',
      message: expect.stringContaining('not the RSA key of the given CA'),
    });
  });

  it('verifies with the openssl CLI for the right purpose, when it is installed', async (ctx) => {
    if (spawnSync('openssl', ['version']).status !== 0) ctx.skip();
    const d = await mkdtemp(join(tmpdir(), 'qmt-pki-openssl-'));
    try {
      await writePkiDir(d, pki);
      const verify = (purpose: string, file: string): string => {
        const r = spawnSync('openssl', ['verify', '-x509_strict', '-purpose', purpose, '-CAfile', join(d, 'ca-cert.pem'), join(d, file)], {
          encoding: 'utf8',
        });
        return `${r.stdout}${r.stderr}`.trim();
      };
      expect(verify('sslserver', 'server-cert.pem')).toMatch(/: OK$/);
      expect(verify('sslclient', 'client-cert.pem')).toMatch(/: OK$/);
      expect(verify('sslserver', 'client-cert.pem')).toMatch(/unsuitable certificate purpose|unsupported certificate purpose/);
    } finally {
      await rm(d, { recursive: true, force: true });
    }
  });

  it("is fast (native key generation and signing)", async () => {
    const t0 = performance.now();
    await generatePki();
    // ~0.3-0.6 s on an idle 2-core machine (three native RSA-2048 key generations); generous for a loaded CI box.
    expect(performance.now() - t0).toBeLessThan(6000);
  });
});

describe('writePkiDir / initPkiDir', () => {
  it("writes QEMU's x509 layout with 0600 keys and 0644 certificates, and no CA key", async () => {
    const d = join(dir, 'layout');
    const files = await writePkiDir(d, pki);
    expect(files).toEqual(['ca-cert.pem', 'server-cert.pem', 'server-key.pem', 'client-cert.pem', 'client-key.pem'].map((f) => join(d, f)));
    const mode = async (f: string): Promise<number> => (await stat(join(d, f))).mode & 0o777;
    expect(await mode('server-key.pem')).toBe(0o600);
    expect(await mode('client-key.pem')).toBe(0o600);
    expect(await mode('ca-cert.pem')).toBe(0o644);
    expect(await mode('server-cert.pem')).toBe(0o644);
    expect((await stat(d)).mode & 0o777).toBe(0o700);
    expect(await readFile(join(d, PKI_FILES.caCert), 'utf8')).toBe(pki.caCert);
    await expect(stat(join(d, 'ca-key.pem'))).rejects.toMatchObject({ code: 'ENOENT' });
  });

  it('refuses to overwrite unless forced, and fixes the mode of a replaced key', async () => {
    const d = join(dir, 'force');
    await mkdir(d);
    await writeFile(join(d, 'server-key.pem'), 'old', { mode: 0o644 });
    await expect(writePkiDir(d, pki)).rejects.toMatchObject({ code: 'tls-bad-credentials', message: expect.stringContaining('server-key.pem') });
    await writePkiDir(d, pki, { force: true });
    expect((await stat(join(d, 'server-key.pem'))).mode & 0o777).toBe(0o600);
    expect(await readFile(join(d, 'server-key.pem'), 'utf8')).toBe(pki.serverKey);
  });

  it('initPkiDir generates and writes with the default hostnames', async () => {
    const d = join(dir, 'init');
    const { pki: p, files } = await initPkiDir(d, { days: 2 });
    expect(files).toHaveLength(5);
    expect(new X509Certificate(await readFile(join(d, 'server-cert.pem'))).subjectAltName).toBe(
      'DNS:localhost, IP Address:127.0.0.1, IP Address:0:0:0:0:0:0:0:1',
    );
    expect(DEFAULT_PKI_HOSTNAMES).toEqual(['localhost', '127.0.0.1', '::1']);
    expect(await readFile(join(d, 'client-key.pem'), 'utf8')).toBe(p.clientKey);
  });
});

describe('loadTlsDir', () => {
  let full: string;
  beforeAll(async () => {
    full = join(dir, 'load');
    await writePkiDir(full, pki);
  });

  it('loads server and client material as Buffers', async () => {
    const s = await loadTlsDir(full, 'server');
    expect(s.ca.toString()).toBe(pki.caCert);
    expect(s.cert?.toString()).toBe(pki.serverCert);
    expect(s.key?.toString()).toBe(pki.serverKey);
    const c = await loadTlsDir(full, 'client');
    expect(c.cert?.toString()).toBe(pki.clientCert);
    expect(c.key?.toString()).toBe(pki.clientKey);
  });

  it('a client needs only ca-cert.pem, as in QEMU', async () => {
    const d = join(dir, 'ca-only');
    await mkdir(d);
    await writeFile(join(d, 'ca-cert.pem'), pki.caCert);
    const c = await loadTlsDir(d, 'client');
    expect(c.cert).toBeUndefined();
    expect(c.key).toBeUndefined();
    // ... but a server needs its certificate and key
    await expect(loadTlsDir(d, 'server')).rejects.toMatchObject({
      code: 'tls-bad-credentials',
      message: `${join(d, 'server-cert.pem')} is missing`,
    });
  });

  it('names the missing or unreadable file', async () => {
    const d = join(dir, 'partial');
    await writePkiDir(d, pki);
    await unlink(join(d, 'server-key.pem'));
    await expect(loadTlsDir(d, 'server')).rejects.toMatchObject({ code: 'tls-bad-credentials', message: `${join(d, 'server-key.pem')} is missing` });
    await unlink(join(d, 'ca-cert.pem'));
    await expect(loadTlsDir(d, 'client')).rejects.toMatchObject({ code: 'tls-bad-credentials', message: `${join(d, 'ca-cert.pem')} is missing` });
    await writeFile(join(d, 'ca-cert.pem'), pki.caCert);
    await unlink(join(d, 'client-key.pem'));
    await expect(loadTlsDir(d, 'client')).rejects.toMatchObject({
      code: 'tls-bad-credentials',
      message: expect.stringContaining('client-key.pem is missing but client-cert.pem is present'),
    });
    // unreadable: a directory where a file should be (root can read any file mode)
    await mkdir(join(d, 'client-key.pem'));
    await expect(loadTlsDir(d, 'client')).rejects.toMatchObject({
      code: 'tls-bad-credentials',
      message: expect.stringMatching(/client-key\.pem cannot be read \(EISDIR\)/),
    });
    await expect(loadTlsDir(join(dir, 'no-such-dir'), 'client')).rejects.toMatchObject({ code: 'tls-bad-credentials' });
  });

  it('refuses files that do not parse, and a key that does not belong to the certificate', async () => {
    const d = join(dir, 'garbage');
    await writePkiDir(d, pki);
    await writeFile(join(d, 'server-key.pem'), pki.clientKey);
    await expect(loadTlsDir(d, 'server')).rejects.toMatchObject({
      code: 'tls-bad-credentials',
      message: `${join(d, 'server-key.pem')} does not belong to server-cert.pem`,
    });
    await writeFile(join(d, 'server-key.pem'), 'not a key');
    await expect(loadTlsDir(d, 'server')).rejects.toMatchObject({ message: expect.stringContaining('server-key.pem is not a private key') });
    await writeFile(join(d, 'ca-cert.pem'), 'not a cert');
    await expect(loadTlsDir(d, 'server')).rejects.toMatchObject({ message: expect.stringContaining('ca-cert.pem is not a certificate') });
  });
});

describe('qmt pki init', () => {
  async function run(args: string[]): Promise<{ out: string; err: string; exitCode: number | undefined }> {
    let out = '';
    let err = '';
    const program = new Command().name('qmt').exitOverride();
    program.configureOutput({ writeOut: (t) => (out += t), writeErr: (t) => (err += t) });
    registerPkiCommand(program, { out: (t) => (out += t), err: (t) => (err += t) });
    const before = process.exitCode;
    try {
      await program.parseAsync(['node', 'qmt', ...args]);
    } catch (e) {
      err += `[commander: ${(e as Error).message}]`;
    }
    const exitCode = process.exitCode === before ? undefined : (process.exitCode as number | undefined);
    process.exitCode = before;
    return { out, err, exitCode };
  }
  afterEach(() => {
    process.exitCode = undefined;
  });

  it('writes the five files, prints them, takes repeatable --hostname and --days', async () => {
    const d = join(dir, 'cli');
    const t0 = performance.now();
    const r = await run(['pki', 'init', d, '--hostname', 'dst.example', '--hostname', '192.0.2.10', '--days', '30']);
    const ms = performance.now() - t0;
    expect(r.exitCode).toBeUndefined();
    expect(r.out.trim().split('\n')).toEqual(['ca-cert.pem', 'server-cert.pem', 'server-key.pem', 'client-cert.pem', 'client-key.pem'].map((f) => join(d, f)));
    expect(r.err).toMatch(/certificates for dst\.example, 192\.0\.2\.10, valid until /);
    const x = new X509Certificate(await readFile(join(d, 'server-cert.pem')));
    expect(x.subjectAltName).toBe('DNS:dst.example, IP Address:192.0.2.10');
    const days = (new Date(x.validTo).getTime() - Date.now()) / 86_400_000;
    expect(days).toBeGreaterThan(29.9);
    expect(days).toBeLessThan(30.1);
    expect(ms).toBeLessThan(6000);
    // again without --force: refused, with the code, exit status 1
    const again = await run(['pki', 'init', d]);
    expect(again.exitCode).toBe(1);
    expect(again.err).toMatch(/^qmt: tls-bad-credentials: .*already exists/);
    const forced = await run(['pki', 'init', d, '--force']);
    expect(forced.exitCode).toBeUndefined();
    expect(new X509Certificate(await readFile(join(d, 'server-cert.pem'))).subjectAltName).toBe(
      'DNS:localhost, IP Address:127.0.0.1, IP Address:0:0:0:0:0:0:0:1',
    );
  });

  it('rejects bad --days and bad hostnames', async () => {
    const r = await run(['pki', 'init', join(dir, 'cli-bad'), '--days', 'ten']);
    expect(r.err).toMatch(/whole number of days/);
    const h = await run(['pki', 'init', join(dir, 'cli-bad'), '--hostname', 'no spaces allowed']);
    expect(h.exitCode).toBe(1);
    expect(h.err).toMatch(/neither a DNS name nor an IP address/);
  });
});
