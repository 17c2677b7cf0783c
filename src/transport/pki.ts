/**
 * A small X.509 PKI for migration over TLS: one CA, one server (destination)
 * and one client (source) certificate, written in the layout QEMU's
 * `tls-creds-x509` object reads (`dir=...`), and read back for our own
 * endpoints.
 *
 * The certificates carry what GnuTLS and QEMU's credential checks
 * (`crypto/tlscredsx509.c`) look at: X.509 v3, basicConstraints, keyUsage,
 * extKeyUsage, subjectAltName, key identifiers, SHA-256 signatures.
 * Tried against QEMU 10.0.2 (`object-add tls-creds-x509`), each of these
 * makes QEMU refuse the directory: a CA without basicConstraints CA:TRUE
 * (so any v1 CA), a leaf with CA:TRUE, a critical leaf keyUsage without
 * both digitalSignature and keyEncipherment, a critical extKeyUsage without
 * the endpoint's purpose, SHA-1 signatures ("insecure algorithm"). QEMU
 * loads a directory lacking any of: CA keyUsage, leaf keyUsage,
 * extKeyUsage, subjectAltName, key identifiers (only the loading was tried
 * for these). Node/OpenSSL, unlike QEMU, refuses a server certificate whose
 * extKeyUsage lacks serverAuth even when not critical.
 */
import { createPrivateKey, generateKeyPair, randomBytes, sign, X509Certificate, type KeyObject } from 'node:crypto';
import { chmod, mkdir, readFile, stat, writeFile } from 'node:fs/promises';
import { isIP } from 'node:net';
import { join } from 'node:path';
import { promisify } from 'node:util';
import type forge from 'node-forge';
import { TransportError } from './errors.js';

const generateKeyPairAsync = promisify(generateKeyPair);

type Forge = typeof forge;
let forgeLoading: Promise<Forge> | undefined;
/**
 * node-forge takes tens of milliseconds to load and only certificate
 * generation uses it, so it is imported on the first {@link generatePki}, not
 * with the package.
 */
function loadForge(): Promise<Forge> {
  // A CommonJS module: its exports object is the default export, in the ESM and the CJS build alike.
  forgeLoading ??= import('node-forge').then((m) => (m as unknown as { default: Forge }).default);
  return forgeLoading;
}

/** File names inside a `tls-creds-x509` directory (QEMU's `QCRYPTO_TLS_CREDS_X509_*`). */
export const PKI_FILES = {
  caCert: 'ca-cert.pem',
  serverCert: 'server-cert.pem',
  serverKey: 'server-key.pem',
  clientCert: 'client-cert.pem',
  clientKey: 'client-key.pem',
} as const;

/** Hostnames put into both leaf certificates when none are given. */
export const DEFAULT_PKI_HOSTNAMES: readonly string[] = ['localhost', '127.0.0.1', '::1'];

/** Validity window of one certificate; either bound may be left to the default. */
export interface CertValidity {
  notBefore?: Date;
  notAfter?: Date;
}

export interface GeneratePkiOptions {
  /**
   * DNS names and IP literals (v4 or v6) for the subjectAltName of the server
   * and client certificates; the first one is also the server's CN.
   * Default: localhost, 127.0.0.1, ::1. At least one, at most 100.
   */
  hostnames?: readonly string[];
  /** Validity in days from `now` (1 … 36500, default 365). */
  days?: number;
  /** RSA modulus length in bits for all three keys (2048 … 8192, default 2048). */
  keyBits?: number;
  /** The current time (default: the clock); certificates start 5 minutes before it to tolerate clock skew. */
  now?: Date;
  /** Overrides the validity of all three certificates (tests: expired or not yet valid certificates). */
  notBefore?: Date;
  notAfter?: Date;
  /** Per-certificate overrides, applied after `notBefore`/`notAfter`. */
  validity?: { ca?: CertValidity; server?: CertValidity; client?: CertValidity };
  /** Common name of a new CA (default "qmt migration CA"). */
  caName?: string;
  /** Sign the leaf certificates with this existing CA (PEM) instead of making a new one. */
  ca?: { cert: string; key: string };
}

/** PEM text of every certificate and key; the keys are unencrypted PKCS#8. */
export interface Pki {
  caCert: string;
  caKey: string;
  serverCert: string;
  serverKey: string;
  clientCert: string;
  clientKey: string;
}

const MIN_KEY_BITS = 2048;
const MAX_KEY_BITS = 8192;
const MAX_DAYS = 36_500;
const MAX_HOSTNAMES = 100;
const SKEW_MS = 5 * 60 * 1000;
const DAY_MS = 24 * 60 * 60 * 1000;

interface KeyPair {
  privatePem: string;
  publicPem: string;
}

async function rsaKeyPair(bits: number): Promise<KeyPair> {
  // Node's native generator takes a few tens of milliseconds; forge's pure-JS one takes seconds.
  const { privateKey, publicKey } = await generateKeyPairAsync('rsa', {
    modulusLength: bits,
    publicExponent: 0x10001,
    privateKeyEncoding: { type: 'pkcs8', format: 'pem' },
    publicKeyEncoding: { type: 'spki', format: 'pem' },
  });
  return { privatePem: privateKey, publicPem: publicKey };
}

/** A positive, minimally encoded 128-bit serial (RFC 5280: at most 20 octets). */
function randomSerialHex(): string {
  const b = randomBytes(16);
  b[0] = ((b[0] ?? 0) & 0x7f) | 0x01;
  return b.toString('hex');
}

function ipBytes(ip: string): string {
  const v = isIP(ip);
  if (v === 4) return String.fromCharCode(...ip.split('.').map((p) => Number(p)));
  if (v !== 6 || ip.includes('%')) throw new TransportError('tls-bad-credentials', `"${ip}" is not an IP address for a certificate`);
  let text = ip;
  // An embedded IPv4 tail (::ffff:1.2.3.4) stands for the last two words.
  const m = /^(.*:)(\d+)\.(\d+)\.(\d+)\.(\d+)$/.exec(text);
  if (m) {
    const [a, b, c, d] = [m[2], m[3], m[4], m[5]].map(Number) as [number, number, number, number];
    text = `${m[1]}${((a << 8) | b).toString(16)}:${((c << 8) | d).toString(16)}`;
  }
  const [head = '', tail] = text.split('::');
  const parse = (s: string): number[] => (s === '' ? [] : s.split(':').map((w) => parseInt(w, 16)));
  const hi = parse(head);
  const lo = tail === undefined ? [] : parse(tail);
  const words = [...hi, ...new Array<number>(8 - hi.length - lo.length).fill(0), ...lo];
  let out = '';
  for (const w of words) out += String.fromCharCode((w >> 8) & 0xff, w & 0xff);
  return out;
}

function altNames(hostnames: readonly string[]): Array<{ type: number; value: string }> {
  return hostnames.map((h) => (isIP(h) ? { type: 7, value: ipBytes(h) } : { type: 2, value: h }));
}

function checkHostnames(hostnames: readonly string[]): void {
  if (hostnames.length === 0) throw new TransportError('tls-bad-credentials', 'at least one hostname is needed');
  if (hostnames.length > MAX_HOSTNAMES) throw new TransportError('tls-bad-credentials', `at most ${MAX_HOSTNAMES} hostnames`);
  for (const h of hostnames) {
    if (isIP(h)) continue;
    // DNS names (a leading "*." wildcard allowed); no spaces, no URI syntax.
    if (!/^(\*\.)?[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?(\.[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?)*\.?$/.test(h) || h.length > 253) {
      throw new TransportError('tls-bad-credentials', `"${h}" is neither a DNS name nor an IP address`);
    }
  }
}

interface CertSpec {
  subjectCn: string;
  publicPem: string;
  /** The issuing CA, or undefined for the self-signed CA; `key` signs. */
  issuer: forge.pki.Certificate | undefined;
  key: KeyObject;
  notBefore: Date;
  notAfter: Date;
  kind: 'ca' | 'server' | 'client';
  hostnames: readonly string[];
}

function makeCert(forge: Forge, spec: CertSpec): forge.pki.Certificate {
  const cert = forge.pki.createCertificate();
  cert.version = 2; // v3
  cert.serialNumber = randomSerialHex();
  cert.publicKey = forge.pki.publicKeyFromPem(spec.publicPem);
  cert.validity.notBefore = spec.notBefore;
  cert.validity.notAfter = spec.notAfter;
  const subject = [
    { shortName: 'O', value: 'qemu-migration-transport' },
    { shortName: 'CN', value: spec.subjectCn },
  ];
  cert.setSubject(subject);
  const isCa = spec.kind === 'ca';
  const issuerCert = spec.issuer;
  cert.setIssuer(issuerCert ? issuerCert.subject.attributes : subject);
  // The authority key id must equal the issuer's subject key id (OpenSSL matches issuers by it); take the
  // CA's own extension when it has one, since a CA made elsewhere may derive it differently.
  const caSki = (issuerCert?.getExtension('subjectKeyIdentifier') as { subjectKeyIdentifier?: string } | undefined)?.subjectKeyIdentifier;
  const aki = !issuerCert ? true : caSki ? forge.util.hexToBytes(caSki) : issuerCert.generateSubjectKeyIdentifier().getBytes();
  const extensions: object[] = [
    isCa ? { name: 'basicConstraints', cA: true, critical: true } : { name: 'basicConstraints', cA: false, critical: true },
    isCa
      ? { name: 'keyUsage', keyCertSign: true, cRLSign: true, critical: true }
      : { name: 'keyUsage', digitalSignature: true, keyEncipherment: true, critical: true },
  ];
  if (!isCa) {
    extensions.push(
      spec.kind === 'server' ? { name: 'extKeyUsage', serverAuth: true } : { name: 'extKeyUsage', clientAuth: true },
      { name: 'subjectAltName', altNames: altNames(spec.hostnames) },
    );
  }
  extensions.push({ name: 'subjectKeyIdentifier' }, { name: 'authorityKeyIdentifier', keyIdentifier: aki });
  cert.setExtensions(extensions);
  signSha256(forge, cert, spec.key);
  return cert;
}

/**
 * What `cert.sign(key, sha256)` does, with the RSA operation done by Node's
 * native crypto: forge's pure-JS signing costs 100-300 ms per certificate.
 */
function signSha256(forge: Forge, cert: forge.pki.Certificate, key: KeyObject): void {
  const getTbsCertificate = (forge.pki as unknown as { getTBSCertificate(c: forge.pki.Certificate): forge.asn1.Asn1 }).getTBSCertificate;
  cert.signatureOid = cert.siginfo.algorithmOid = forge.pki.oids.sha256WithRSAEncryption as string;
  cert.tbsCertificate = getTbsCertificate(cert);
  const tbs = Buffer.from(forge.asn1.toDer(cert.tbsCertificate).getBytes(), 'binary');
  cert.signature = sign('sha256', tbs, key).toString('binary');
}

function parseCa(forge: Forge, given: { cert: string; key: string }): { cert: forge.pki.Certificate; key: KeyObject; keyPem: string } {
  let cert: forge.pki.Certificate;
  let key: KeyObject;
  try {
    cert = forge.pki.certificateFromPem(given.cert);
    key = createPrivateKey(given.key);
  } catch (e) {
    throw new TransportError('tls-bad-credentials', `the given CA is not an RSA certificate and key in PEM form: ${(e as Error).message}`, { cause: e });
  }
  if (key.asymmetricKeyType !== 'rsa' || !new X509Certificate(given.cert).checkPrivateKey(key)) {
    throw new TransportError('tls-bad-credentials', 'the given CA key is not the RSA key of the given CA certificate');
  }
  return { cert, key, keyPem: given.key };
}

function checkNumber(name: string, v: number, min: number, max: number): void {
  if (!Number.isInteger(v) || v < min || v > max) {
    throw new TransportError('tls-bad-credentials', `${name} must be an integer in ${min} … ${max}, got ${v}`);
  }
}

/**
 * Generates a CA and a server and a client certificate signed by it. The three
 * RSA keys are generated in parallel by Node's native crypto; node-forge
 * builds the certificates, Node signs them (SHA-256 with RSA).
 */
export async function generatePki(opts: GeneratePkiOptions = {}): Promise<Pki> {
  const hostnames = opts.hostnames ?? DEFAULT_PKI_HOSTNAMES;
  checkHostnames(hostnames);
  const days = opts.days ?? 365;
  checkNumber('days', days, 1, MAX_DAYS);
  const keyBits = opts.keyBits ?? MIN_KEY_BITS;
  checkNumber('keyBits', keyBits, MIN_KEY_BITS, MAX_KEY_BITS);
  const now = (opts.now ?? new Date()).getTime();
  const window = (which: 'ca' | 'server' | 'client'): { notBefore: Date; notAfter: Date } => {
    const o = opts.validity?.[which];
    return {
      notBefore: o?.notBefore ?? opts.notBefore ?? new Date(now - SKEW_MS),
      notAfter: o?.notAfter ?? opts.notAfter ?? new Date(now + days * DAY_MS),
    };
  };

  const forge = await loadForge();
  const given = opts.ca ? parseCa(forge, opts.ca) : undefined;
  const [caPair, serverPair, clientPair] = await Promise.all([
    given ? undefined : rsaKeyPair(keyBits),
    rsaKeyPair(keyBits),
    rsaKeyPair(keyBits),
  ]);
  let ca: forge.pki.Certificate;
  let caKey: KeyObject;
  let caKeyPem: string;
  if (given) {
    ({ cert: ca, key: caKey, keyPem: caKeyPem } = given);
  } else {
    const pair = caPair as KeyPair;
    caKey = createPrivateKey(pair.privatePem);
    caKeyPem = pair.privatePem;
    ca = makeCert(forge, {
      subjectCn: opts.caName ?? 'qmt migration CA',
      publicPem: pair.publicPem,
      issuer: undefined,
      key: caKey,
      ...window('ca'),
      kind: 'ca',
      hostnames,
    });
  }
  const server = makeCert(forge, {
    subjectCn: hostnames[0] ?? 'localhost',
    publicPem: serverPair.publicPem,
    issuer: ca,
    key: caKey,
    ...window('server'),
    kind: 'server',
    hostnames,
  });
  const client = makeCert(forge, {
    subjectCn: 'qmt migration client',
    publicPem: clientPair.publicPem,
    issuer: ca,
    key: caKey,
    ...window('client'),
    kind: 'client',
    hostnames,
  });
  return {
    caCert: opts.ca ? opts.ca.cert : forge.pki.certificateToPem(ca),
    caKey: caKeyPem,
    serverCert: forge.pki.certificateToPem(server),
    serverKey: serverPair.privatePem,
    clientCert: forge.pki.certificateToPem(client),
    clientKey: clientPair.privatePem,
  };
}

export interface WritePkiOptions {
  /** Replace files that already exist (default false: refuse with 'tls-bad-credentials'). */
  force?: boolean;
}

/**
 * Writes the five files of QEMU's x509 layout into `dir` (created with mode
 * 0700 if missing): certificates 0644, keys 0600. The CA key is not written.
 * Returns the paths written, in a fixed order.
 */
export async function writePkiDir(dir: string, pki: Pki, opts: WritePkiOptions = {}): Promise<string[]> {
  await mkdir(dir, { recursive: true, mode: 0o700 });
  const files: Array<[string, string, number]> = [
    [PKI_FILES.caCert, pki.caCert, 0o644],
    [PKI_FILES.serverCert, pki.serverCert, 0o644],
    [PKI_FILES.serverKey, pki.serverKey, 0o600],
    [PKI_FILES.clientCert, pki.clientCert, 0o644],
    [PKI_FILES.clientKey, pki.clientKey, 0o600],
  ];
  if (!opts.force) {
    for (const [name] of files) {
      const exists = await stat(join(dir, name)).then(
        () => true,
        () => false,
      );
      if (exists) throw new TransportError('tls-bad-credentials', `${join(dir, name)} already exists (use force to replace it)`);
    }
  }
  const written: string[] = [];
  for (const [name, text, mode] of files) {
    const path = join(dir, name);
    // mode only applies when the file is created; chmod covers a replaced file.
    await writeFile(path, text, { mode });
    await chmod(path, mode);
    written.push(path);
  }
  return written;
}

/** {@link generatePki} then {@link writePkiDir}; returns the certificates and the paths written. */
export async function initPkiDir(
  dir: string,
  opts: GeneratePkiOptions & WritePkiOptions = {},
): Promise<{ pki: Pki; files: string[] }> {
  const pki = await generatePki(opts);
  const files = await writePkiDir(dir, pki, opts);
  return { pki, files };
}

/** TLS material of one endpoint, as Node's tls options take it. */
export interface TlsMaterial {
  /** ca-cert.pem: the only trusted root(s). */
  ca: Buffer;
  /** Our certificate (server-cert.pem or client-cert.pem); absent for a client without one. */
  cert?: Buffer;
  /** Our private key (server-key.pem or client-key.pem). */
  key?: Buffer;
}

async function readCredential(dir: string, name: string, required: boolean): Promise<Buffer | undefined> {
  const path = join(dir, name);
  try {
    return await readFile(path);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' && !required) return undefined;
    const what = code === 'ENOENT' ? 'is missing' : `cannot be read (${code ?? (e as Error).message})`;
    throw new TransportError('tls-bad-credentials', `${path} ${what}`, { cause: e });
  }
}

/**
 * Reads the credentials of one endpoint from a `tls-creds-x509` directory,
 * like QEMU: a server needs ca-cert.pem, server-cert.pem and server-key.pem; a
 * client needs ca-cert.pem, and client-cert.pem with client-key.pem when the
 * server verifies peers. Unlike QEMU, a client certificate without its key (or
 * the reverse) is refused instead of silently ignored. Also checks that the
 * files parse and that the key belongs to the certificate.
 * @throws TransportError 'tls-bad-credentials' naming the file.
 */
export async function loadTlsDir(dir: string, endpoint: 'server' | 'client'): Promise<TlsMaterial> {
  const server = endpoint === 'server';
  const certName = server ? PKI_FILES.serverCert : PKI_FILES.clientCert;
  const keyName = server ? PKI_FILES.serverKey : PKI_FILES.clientKey;
  const ca = await readCredential(dir, PKI_FILES.caCert, true);
  const cert = await readCredential(dir, certName, server);
  const key = await readCredential(dir, keyName, server);
  if (!ca) throw new TransportError('tls-bad-credentials', `${join(dir, PKI_FILES.caCert)} is missing`);
  if ((cert === undefined) !== (key === undefined)) {
    const missing = cert === undefined ? certName : keyName;
    const present = cert === undefined ? keyName : certName;
    throw new TransportError('tls-bad-credentials', `${join(dir, missing)} is missing but ${present} is present`);
  }
  parseCertificate(dir, PKI_FILES.caCert, ca);
  if (cert && key) {
    const x509 = parseCertificate(dir, certName, cert);
    let keyObject: KeyObject;
    try {
      keyObject = createPrivateKey(key);
    } catch (e) {
      throw new TransportError('tls-bad-credentials', `${join(dir, keyName)} is not a private key in PEM form`, { cause: e });
    }
    if (!x509.checkPrivateKey(keyObject)) {
      throw new TransportError('tls-bad-credentials', `${join(dir, keyName)} does not belong to ${certName}`);
    }
    return { ca, cert, key };
  }
  return { ca };
}

function parseCertificate(dir: string, name: string, pem: Buffer): X509Certificate {
  try {
    return new X509Certificate(pem);
  } catch (e) {
    throw new TransportError('tls-bad-credentials', `${join(dir, name)} is not a certificate in PEM form`, { cause: e });
  }
}
