/**
 * TLS for both migration channels, shaped like QEMU's `tls-creds-x509`:
 * the source is always the TLS client and the destination the TLS server,
 * trust is ca-cert.pem alone (never the system roots), the server always asks
 * for a client certificate, the client checks the server certificate against
 * `tls-hostname` or the URI host, and no SNI or ALPN is sent.
 *
 * The option builders are pure; {@link secureConnect} and {@link secureAccept}
 * run one handshake and turn every failure into a {@link TransportError},
 * destroying the sockets.
 */
import type { X509Certificate } from 'node:crypto';
import { isIP, type Socket } from 'node:net';
import tls from 'node:tls';
import { TransportError, type ChannelName, type TransportErrorCode } from './errors.js';
import type { TlsMaterial } from './pki.js';

export type TlsVersion = 'TLSv1.2' | 'TLSv1.3';
export type TlsChannel = ChannelName;

/** One endpoint's TLS configuration, as QEMU's creds object plus the migration parameters. */
export interface TlsSettings {
  /** The `tls-creds-x509` directory (see `loadTlsDir`). */
  dir: string;
  /** 'client' on the source, 'server' on the destination (QEMU's `endpoint=`). */
  endpoint: 'client' | 'server';
  /**
   * Verify the peer (QEMU's `verify-peer`, default true). Client: the server
   * chain against ca-cert.pem and its name against `hostname`. Server: a client
   * certificate is then required and must chain to ca-cert.pem.
   */
  verifyPeer?: boolean;
  /** Name the server certificate must carry (QEMU's `tls-hostname`); overrides the URI host. Client only. */
  hostname?: string;
  /** Lowest protocol version accepted (default 'TLSv1.3'). */
  minVersion?: TlsVersion;
  /** Highest protocol version offered (default 'TLSv1.3'). */
  maxVersion?: TlsVersion;
  /**
   * Accept only a peer whose (valid) certificate carries one of these names,
   * as QEMU's `tls-authz` does with an exact-match authz list: its subject
   * distinguished name (`CN=…,O=…` in either order: OpenSSL and GnuTLS print
   * it differently), its common name, or one of its subjectAltName entries
   * (DNS name, IP address, e-mail, URI). On the server it applies to every
   * client; on the client to the server, on top of the hostname check.
   * Unset: any certificate that verifies. Refusal: 'tls-peer-not-allowed'.
   */
  allowedPeers?: readonly string[];
}

/**
 * Session id context of our servers. OpenSSL refuses to resume a session on
 * a server that verifies peers unless one is set.
 */
const SESSION_ID_CONTEXT = 'qemu-migration-transport';

/** Default time limit of one handshake in {@link secureConnect} / {@link secureAccept}. */
export const DEFAULT_HANDSHAKE_TIMEOUT_MS = 30_000;

function versions(settings: TlsSettings): { minVersion: TlsVersion; maxVersion: TlsVersion } {
  const minVersion = settings.minVersion ?? 'TLSv1.3';
  const maxVersion = settings.maxVersion ?? 'TLSv1.3';
  for (const v of [minVersion, maxVersion]) {
    if (v !== 'TLSv1.2' && v !== 'TLSv1.3') throw new TransportError('tls-bad-credentials', `unsupported TLS version "${String(v)}"`);
  }
  if (minVersion === 'TLSv1.3' && maxVersion === 'TLSv1.2') {
    throw new TransportError('tls-bad-credentials', 'minVersion TLSv1.3 is above maxVersion TLSv1.2');
  }
  return { minVersion, maxVersion };
}

/**
 * The name the server certificate is checked against: `settings.hostname`
 * (QEMU's `tls-hostname`), else the host of the `tcp:HOST:PORT` URI. An empty
 * string counts as unset, as in QEMU. Undefined for a unix socket without
 * `tls-hostname`.
 */
export function expectedServerName(settings: TlsSettings, uriHost?: string): string | undefined {
  if (settings.hostname) return settings.hostname;
  return uriHost ? uriHost.replace(/^\[(.*)\]$/, '$1') : undefined;
}

/**
 * Options for `tls.connect` on the source (TLS client). Add `host`/`port`,
 * `path` or `socket` yourself.
 *
 * - trust: `material.ca` only; our certificate and key are presented when present;
 * - with `verifyPeer` (default) the server name is checked against
 *   {@link expectedServerName} (an IP literal must be an IP subjectAltName);
 *   without any name this throws 'tls-no-hostname', as QEMU refuses;
 * - no SNI (`servername: ''`) and no ALPN, like QEMU/GnuTLS;
 * - `session`: a ticket from an earlier connection to the same destination
 *   (see {@link waitSession}), so that the second channel resumes. Node skips
 *   the name check on a resumed session: it was done on the first one.
 *
 * @throws TransportError 'tls-no-hostname' | 'tls-bad-credentials'
 */
export function clientTlsOptions(
  material: TlsMaterial,
  settings: TlsSettings,
  uriHost?: string,
  session?: Buffer,
): tls.ConnectionOptions {
  if (settings.endpoint !== 'client') {
    throw new TransportError('tls-bad-credentials', `TLS credentials for endpoint "${settings.endpoint}" used on the client (source) side`);
  }
  const verifyPeer = settings.verifyPeer ?? true;
  const name = expectedServerName(settings, uriHost);
  if (verifyPeer && !name) {
    throw new TransportError('tls-no-hostname', 'no hostname for certificate validation: set tls-hostname (needed with a unix socket)');
  }
  const opts: tls.ConnectionOptions = {
    ca: material.ca,
    ...versions(settings),
    rejectUnauthorized: verifyPeer,
    // Our check ignores the name Node passes (servername || host), which is empty or a socket path here.
    checkServerIdentity: verifyPeer && name ? (_host, cert) => tls.checkServerIdentity(name, cert) : () => undefined,
    // QEMU sends no server_name extension; '' keeps Node from ever deriving one from `host`.
    servername: '',
  };
  if (material.cert && material.key) {
    opts.cert = material.cert;
    opts.key = material.key;
  }
  if (session) opts.session = session;
  return opts;
}

/**
 * Options for a TLS server on the destination (`tls.createServer(opts)` or
 * {@link secureAccept}): our certificate and key, trust `material.ca` only,
 * always request a client certificate (`requestCert`), require a valid one
 * when `verifyPeer` (`rejectUnauthorized`; OpenSSL then aborts a handshake
 * without a client certificate). Session tickets stay enabled (Node's default)
 * and a session id context is set, so the preempt channel can resume the main
 * channel's session.
 *
 * With a `tls.Server`, a refused client certificate is only visible in the
 * 'tlsClientError' event: pass its socket to {@link classifyTlsError}.
 *
 * @throws TransportError 'tls-bad-credentials' (server certificate or key missing)
 */
export function serverTlsOptions(material: TlsMaterial, settings: TlsSettings): tls.TlsOptions {
  if (settings.endpoint !== 'server') {
    throw new TransportError('tls-bad-credentials', `TLS credentials for endpoint "${settings.endpoint}" used on the server (destination) side`);
  }
  if (!material.cert || !material.key) {
    throw new TransportError('tls-bad-credentials', 'a TLS server needs server-cert.pem and server-key.pem');
  }
  return {
    ca: material.ca,
    cert: material.cert,
    key: material.key,
    ...versions(settings),
    requestCert: true,
    rejectUnauthorized: settings.verifyPeer ?? true,
    sessionIdContext: SESSION_ID_CONTEXT,
  };
}

// ---------------------------------------------------------------------------
// Allow-list of peer names (QEMU's tls-authz)
// ---------------------------------------------------------------------------

/** One spelling of an IP literal, so that `::1` matches OpenSSL's `0:0:0:0:0:0:0:1`. */
function canonicalName(name: string): string {
  const bare = name.replace(/^\[(.*)\]$/, '$1');
  if (isIP(bare) === 6) return new URL(`http://[${bare}]`).hostname.slice(1, -1);
  return bare;
}

/**
 * The names a certificate can be allowed by (see {@link TlsSettings.allowedPeers}):
 * its subject DN in certificate order and reversed, its CN, its subjectAltName entries.
 */
export function certificateNames(cert: X509Certificate): string[] {
  const rdns = cert.subject.split('\n').filter((l) => l.length > 0);
  const names = [rdns.join(','), [...rdns].reverse().join(',')];
  for (const rdn of rdns) if (rdn.startsWith('CN=')) names.push(rdn.slice(3));
  // "DNS:a, IP Address:127.0.0.1, email:x@y, URI:…"
  for (const entry of (cert.subjectAltName ?? '').split(/,\s*/)) {
    const colon = entry.indexOf(':');
    if (colon > 0) names.push(canonicalName(entry.slice(colon + 1)));
  }
  return [...new Set(names)];
}

/**
 * Checks a completed handshake's peer against `allowed`; undefined when it is
 * allowed (or there is no list), else a 'tls-peer-not-allowed' error naming
 * the peer. A resumed session without a certificate passes: the session's
 * first handshake was checked.
 */
export function checkAllowedPeer(sock: tls.TLSSocket, allowed: readonly string[] | undefined, channel?: TlsChannel): TransportError | undefined {
  if (allowed === undefined) return undefined;
  const cert = sock.getPeerX509Certificate();
  if (!cert) {
    return sock.isSessionReused()
      ? undefined
      : new TransportError('tls-peer-not-allowed', 'the peer sent no certificate, and only named peers are allowed', channelOpt(channel));
  }
  const wanted = new Set(allowed.map(canonicalName));
  const names = certificateNames(cert);
  if (names.some((n) => wanted.has(n))) return undefined;
  return new TransportError(
    'tls-peer-not-allowed',
    `the peer's certificate (${cert.subject.split('\n').join(', ')}) names none of the allowed peers (${allowed.join(', ') || 'none'})`,
    channelOpt(channel),
  );
}

// ---------------------------------------------------------------------------
// Error classification
// ---------------------------------------------------------------------------

/** OpenSSL verification results (Node's `err.code` / `authorizationError`) meaning "not signed by our CA". */
const UNKNOWN_CA = new Set([
  'UNABLE_TO_VERIFY_LEAF_SIGNATURE',
  'SELF_SIGNED_CERT_IN_CHAIN',
  'DEPTH_ZERO_SELF_SIGNED_CERT',
  'UNABLE_TO_GET_ISSUER_CERT',
  'UNABLE_TO_GET_ISSUER_CERT_LOCALLY',
  'UNABLE_TO_DECRYPT_CERT_SIGNATURE',
  'CERT_SIGNATURE_FAILURE',
  'CERT_UNTRUSTED',
  'CERT_REJECTED',
  'INVALID_CA',
  'ERR_SSL_TLSV1_ALERT_UNKNOWN_CA', // the peer's alert: it does not trust our CA
]);

const EXPIRED = new Set([
  'CERT_HAS_EXPIRED',
  'CERT_NOT_YET_VALID',
  'ERR_SSL_SSLV3_ALERT_CERTIFICATE_EXPIRED', // the peer's alert about our certificate
]);

const NO_PEER_CERTIFICATE = new Set([
  'ERR_SSL_PEER_DID_NOT_RETURN_A_CERTIFICATE', // server side
  'ERR_SSL_TLSV13_ALERT_CERTIFICATE_REQUIRED', // client side, TLS 1.3 alert 116
]);

/** What OpenSSL says when the bytes it reads are not TLS records. */
const NOT_TLS = new Set([
  'ERR_SSL_WRONG_VERSION_NUMBER',
  'ERR_SSL_HTTP_REQUEST',
  'ERR_SSL_HTTPS_PROXY_REQUEST',
  'ERR_SSL_PACKET_LENGTH_TOO_LONG',
  'ERR_SSL_RECORD_LENGTH_MISMATCH',
  'ERR_SSL_UNKNOWN_PROTOCOL',
  'ERR_SSL_UNEXPECTED_MESSAGE',
  'ERR_SSL_UNEXPECTED_RECORD',
  'ERR_SSL_RECORD_LAYER_FAILURE',
  'ERR_SSL_BAD_PACKET_LENGTH',
  'ERR_SSL_LENGTH_MISMATCH',
]);

const CONNECT_FAILED = new Set(['ECONNREFUSED', 'ENOENT', 'EHOSTUNREACH', 'ENETUNREACH', 'EADDRNOTAVAIL', 'ENOTFOUND', 'EAI_AGAIN', 'EACCES']);

/** Where an error happened; improves the classification. */
export interface TlsErrorContext {
  /** Which side we are. */
  side?: 'client' | 'server';
  /** The TLS socket, e.g. from a tls.Server 'tlsClientError' event (its `authorizationError` names a refused certificate). */
  socket?: tls.TLSSocket;
  /** True once the handshake had completed: a reset is then a plain 'reset'. */
  established?: boolean;
  /** Bytes the peer sent on the raw (TCP/unix) socket before the error: more than 0 means it spoke first. */
  rawBytesRead?: number;
}

function errCode(err: unknown): string | undefined {
  const c = (err as { code?: unknown } | null | undefined)?.code;
  return typeof c === 'string' ? c : undefined;
}

function errMessage(err: unknown): string {
  if (err instanceof Error) return err.message.split('\n')[0]?.trim() ?? err.message;
  return String(err);
}

/**
 * Maps a Node.js / OpenSSL error from a TLS connection to a TransportError:
 * - another CA (UNABLE_TO_VERIFY_LEAF_SIGNATURE, SELF_SIGNED_CERT_IN_CHAIN, the
 *   peer's unknown_ca alert …) → 'tls-unknown-ca';
 * - CERT_HAS_EXPIRED / CERT_NOT_YET_VALID → 'tls-certificate-expired';
 * - ERR_TLS_CERT_ALTNAME_INVALID → 'tls-hostname-mismatch';
 * - no client certificate (server: "peer did not return a certificate";
 *   client: TLS 1.3 certificate_required alert) → 'tls-no-peer-certificate';
 * - non-TLS bytes (wrong version number, http request …) or a connection
 *   closed before any handshake → 'tls-not-tls';
 * - connect errors → 'connect-failed'; resets after the handshake → 'reset';
 * - anything else → 'tls-handshake-failed'.
 * A TransportError is returned unchanged. `cause` keeps the original error.
 */
export function classifyTlsError(err: unknown, channel?: TlsChannel, ctx: TlsErrorContext = {}): TransportError {
  if (err instanceof TransportError) return err;
  const make = (code: TransportErrorCode, message: string): TransportError =>
    new TransportError(code, message, channel ? { cause: err, channel } : { cause: err });
  let code = errCode(err);
  const msg = errMessage(err);
  const peer = ctx.side === 'client' ? "the server's certificate" : ctx.side === 'server' ? "the client's certificate" : "the peer's certificate";

  // A tls.Server that refused a client certificate reports only "socket hang up"; the reason is on the socket.
  const auth = ctx.socket?.authorizationError;
  if (!ctx.established && (code === 'ECONNRESET' || code === undefined) && auth) code = String(auth);

  if (code === undefined) return make('tls-handshake-failed', `TLS handshake failed: ${msg}`);
  if (code === 'ERR_TLS_CERT_ALTNAME_INVALID') return make('tls-hostname-mismatch', `${peer} does not match the hostname: ${msg}`);
  if (UNKNOWN_CA.has(code)) {
    return code.startsWith('ERR_SSL_')
      ? make('tls-unknown-ca', `the peer does not trust our certificate (unknown CA alert): ${msg}`)
      : make('tls-unknown-ca', `${peer} is not signed by our CA (ca-cert.pem): ${code}`);
  }
  if (EXPIRED.has(code)) {
    return code.startsWith('ERR_SSL_')
      ? make('tls-certificate-expired', `the peer says our certificate has expired: ${msg}`)
      : make('tls-certificate-expired', `${peer} is ${code === 'CERT_NOT_YET_VALID' ? 'not yet valid' : 'expired'} (${code})`);
  }
  if (NO_PEER_CERTIFICATE.has(code)) {
    return code === 'ERR_SSL_PEER_DID_NOT_RETURN_A_CERTIFICATE'
      ? make('tls-no-peer-certificate', 'the client sent no certificate, and peers are verified')
      : make('tls-no-peer-certificate', 'the server requires a client certificate and we sent none (client-cert.pem, client-key.pem)');
  }
  if (code === 'INVALID_PURPOSE') return make('tls-handshake-failed', `${peer} is not valid for this purpose (extKeyUsage): ${code}`);
  if (NOT_TLS.has(code)) return make('tls-not-tls', `the peer does not speak TLS: ${msg}`);
  if (CONNECT_FAILED.has(code)) return make('connect-failed', msg);
  if (code === 'ETIMEDOUT') return make('connect-timeout', msg);
  if (code === 'ECONNRESET' || code === 'EPIPE' || code === 'ERR_SSL_UNEXPECTED_EOF_WHILE_READING') {
    if (ctx.established) return make('reset', msg);
    // A client that sent its hello and then hung up speaks TLS: it refused the handshake
    // (a Node client that rejects our certificate closes without an alert).
    if (ctx.side === 'server' && (ctx.rawBytesRead ?? 0) > 0) {
      return make('tls-handshake-failed', `the client hung up during the handshake; it probably refused our certificate: ${msg}`);
    }
    return make('tls-not-tls', `the peer closed the connection before completing a TLS handshake (not TLS, or it refused the handshake): ${msg}`);
  }
  return make('tls-handshake-failed', `TLS handshake failed: ${msg}`);
}

// ---------------------------------------------------------------------------
// One handshake, typed errors, nothing left open
// ---------------------------------------------------------------------------

export interface HandshakeOptions {
  /** Reported in errors. */
  channel?: TlsChannel;
  /** Limit for the TCP connect plus handshake (default 30 s; 0 = none). Error: 'connect-timeout'. */
  timeoutMs?: number;
}

export interface AcceptOptions extends HandshakeOptions {
  /**
   * {@link secureAccept} only: resolve once the first application bytes have
   * arrived (they stay buffered in the socket), not at the end of the
   * handshake. A TLS client judges our certificate after its handshake has
   * finished (QEMU/GnuTLS always does): if it refuses it, it closes the
   * connection without sending anything, which then rejects with
   * 'tls-handshake-failed' instead of looking like a good but silent channel.
   * Use it where the client speaks first (a QEMU source sends the stream
   * header at once on the main channel). The time limit covers the wait.
   */
  awaitData?: boolean;
}

function noop(): void {}

/**
 * `tls.connect(options)` that resolves with the socket once the handshake and
 * our checks passed ('secureConnect'), and otherwise rejects with a
 * TransportError after destroying the TLS socket and any `options.socket`.
 * With TLS 1.3 the server judges our certificate after our side has finished:
 * such a refusal arrives later as an 'error' (certificate_required alert) or a
 * close on the returned socket.
 */
export function secureConnect(options: tls.ConnectionOptions, opts: HandshakeOptions = {}): Promise<tls.TLSSocket> {
  const ctx: TlsErrorContext = { side: 'client' };
  return new Promise((resolve, reject) => {
    let sock: tls.TLSSocket;
    try {
      sock = tls.connect(options);
    } catch (e) {
      options.socket?.destroy();
      reject(badOptions(e, opts.channel));
      return;
    }
    const timeoutMs = opts.timeoutMs ?? DEFAULT_HANDSHAKE_TIMEOUT_MS;
    let timer: NodeJS.Timeout | undefined;
    const cleanup = (): void => {
      if (timer) clearTimeout(timer);
      sock.off('secureConnect', onSecure);
      sock.off('error', onError);
      sock.off('close', onClose);
    };
    const fail = (e: TransportError): void => {
      cleanup();
      // A late error from the dying socket must not become an uncaught exception.
      sock.on('error', noop);
      sock.destroy();
      options.socket?.destroy();
      reject(e);
    };
    const onSecure = (): void => {
      cleanup();
      resolve(sock);
    };
    const onError = (e: Error): void => fail(classifyTlsError(e, opts.channel, ctx));
    const onClose = (): void =>
      fail(
        new TransportError('tls-not-tls', 'the connection closed before the TLS handshake completed', channelOpt(opts.channel)),
      );
    sock.on('session', (s: Buffer) => sessions.set(sock, s));
    sock.once('secureConnect', onSecure);
    sock.on('error', onError);
    sock.once('close', onClose);
    if (timeoutMs > 0) {
      timer = setTimeout(
        () => fail(new TransportError('connect-timeout', `TLS connect and handshake did not complete within ${timeoutMs} ms`, channelOpt(opts.channel))),
        timeoutMs,
      );
    }
  });
}

function channelOpt(channel: TlsChannel | undefined): { channel?: TlsChannel } {
  return channel ? { channel } : {};
}

function badOptions(e: unknown, channel: TlsChannel | undefined): TransportError {
  if (e instanceof TransportError) return e;
  return new TransportError('tls-bad-credentials', `cannot use the TLS credentials: ${errMessage(e)}`, {
    cause: e,
    ...channelOpt(channel),
  });
}

const contexts = new WeakMap<tls.TlsOptions, tls.SecureContext>();

function contextFor(options: tls.TlsOptions): tls.SecureContext {
  if (options.secureContext) return options.secureContext;
  let c = contexts.get(options);
  if (!c) {
    c = tls.createSecureContext(options);
    contexts.set(options, c);
  }
  return c;
}

/** Node's verification result of the peer certificate; the same internal call tls.Server makes. */
function verifyError(sock: tls.TLSSocket): { known: boolean; error: Error | null } {
  const handle = (sock as unknown as { _handle?: { verifyError?: () => Error | null } })._handle;
  if (typeof handle?.verifyError !== 'function') return { known: false, error: null };
  return { known: true, error: handle.verifyError() };
}

/**
 * Runs the server side of a handshake on an accepted socket (destination).
 * `options` is normally {@link serverTlsOptions}' result; its secure context
 * is created once per options object, so every socket accepted with the same
 * object shares session tickets (the preempt channel resumes the main one).
 *
 * Unlike a `tls.Server`, which drops a refused client silently, this rejects
 * with the reason ('tls-unknown-ca', 'tls-certificate-expired',
 * 'tls-no-peer-certificate', 'tls-not-tls' …). On any failure both the TLS and
 * the raw socket are destroyed. On success `authorized`/`authorizationError`
 * are set as a tls.Server would.
 *
 * Once it resolves, close the connection through the returned TLS socket
 * (which also closes `raw`), never by destroying `raw` first: destroying the
 * raw socket under a live TLS socket and then the TLS socket crashes Node 20
 * (SIGSEGV, seen with 20.20).
 */
export function secureAccept(raw: Socket, options: tls.TlsOptions, opts: AcceptOptions = {}): Promise<tls.TLSSocket> {
  const verifyPeer = options.rejectUnauthorized !== false;
  return new Promise((resolve, reject) => {
    let sock: tls.TLSSocket;
    try {
      sock = new tls.TLSSocket(raw, {
        isServer: true,
        secureContext: contextFor(options),
        requestCert: options.requestCert ?? true,
        rejectUnauthorized: verifyPeer,
      });
    } catch (e) {
      raw.destroy();
      reject(badOptions(e, opts.channel));
      return;
    }
    const timeoutMs = opts.timeoutMs ?? DEFAULT_HANDSHAKE_TIMEOUT_MS;
    let timer: NodeJS.Timeout | undefined;
    let secured = false;
    const cleanup = (): void => {
      if (timer) clearTimeout(timer);
      sock.off('secure', onSecure);
      sock.off('readable', onReadable);
      sock.off('error', onError);
      sock.off('close', onClose);
    };
    const fail = (e: TransportError): void => {
      cleanup();
      sock.on('error', noop);
      sock.destroy();
      raw.destroy();
      reject(e);
    };
    const onSecure = (): void => {
      const v = verifyError(sock);
      const peerCert = sock.getPeerCertificate();
      const hasPeer = peerCert !== null && typeof peerCert === 'object' && Object.keys(peerCert).length > 0;
      if (v.error) sock.authorizationError = (errCode(v.error) ?? v.error.message) as unknown as Error;
      sock.authorized = v.known && !v.error && hasPeer;
      if (verifyPeer) {
        if (!hasPeer) {
          fail(new TransportError('tls-no-peer-certificate', 'the client sent no certificate, and peers are verified', channelOpt(opts.channel)));
          return;
        }
        if (!v.known) {
          fail(new TransportError('tls-handshake-failed', 'cannot read the verification result of the client certificate', channelOpt(opts.channel)));
          return;
        }
        if (v.error) {
          fail(classifyTlsError(v.error, opts.channel, { side: 'server' }));
          return;
        }
      }
      secured = true;
      if (!opts.awaitData) {
        cleanup();
        resolve(sock);
        return;
      }
      // A 'readable' listener buffers without consuming; once it is removed the stream returns to its initial mode.
      sock.on('readable', onReadable);
    };
    const onReadable = (): void => {
      if (sock.readableLength === 0) {
        // End of stream: a read() at EOF lets 'end' and 'close' follow; nothing is consumed.
        sock.read();
        return;
      }
      cleanup();
      resolve(sock);
    };
    const refused = (): TransportError =>
      new TransportError(
        'tls-handshake-failed',
        'the peer closed the connection right after the TLS handshake without sending anything: it probably refused our certificate (see its log)',
        channelOpt(opts.channel),
      );
    const onError = (e: Error): void => {
      const code = errCode(e);
      fail(
        secured && (code === 'ECONNRESET' || code === 'EPIPE')
          ? refused()
          : classifyTlsError(e, opts.channel, { side: 'server', established: secured }),
      );
    };
    const onClose = (): void =>
      fail(
        secured
          ? refused()
          : raw.bytesRead === 0
          ? new TransportError('tls-not-tls', 'the peer closed the connection without starting a TLS handshake', channelOpt(opts.channel))
          : new TransportError(
              'tls-handshake-failed',
              'the peer closed the connection during the TLS handshake (did it refuse our certificate?)',
              channelOpt(opts.channel),
            ),
      );
    sock.once('secure', onSecure);
    sock.on('error', onError);
    sock.once('close', onClose);
    if (timeoutMs > 0) {
      timer = setTimeout(
        () =>
          fail(
            new TransportError(
              'connect-timeout',
              secured ? `no data within ${timeoutMs} ms after the TLS handshake` : `TLS handshake did not complete within ${timeoutMs} ms`,
              channelOpt(opts.channel),
            ),
          ),
        timeoutMs,
      );
    }
  });
}

const sessions = new WeakMap<tls.TLSSocket, Buffer>();

/** The latest session ticket a socket from {@link secureConnect} has received so far (it records them from the start). */
export function latestSession(sock: tls.TLSSocket): Buffer | undefined {
  return sessions.get(sock);
}

/**
 * Resolves with a session ticket for resuming `sock`'s session: the latest one
 * already received on a socket from {@link secureConnect} (which records them
 * from the start), else the next 'session' event; undefined when none arrives
 * within `timeoutMs` or the socket closes first. TLS 1.3 servers send tickets
 * just after the handshake. Pass it as `session` to {@link clientTlsOptions}
 * for the next channel.
 */
export function waitSession(sock: tls.TLSSocket, timeoutMs = 1000): Promise<Buffer | undefined> {
  const have = sessions.get(sock);
  if (have) return Promise.resolve(have);
  return new Promise((resolve) => {
    const done = (s: Buffer | undefined): void => {
      clearTimeout(timer);
      sock.off('session', done);
      sock.off('close', onClose);
      resolve(s);
    };
    const onClose = (): void => done(undefined);
    const timer = setTimeout(() => done(undefined), timeoutMs);
    sock.on('session', done);
    sock.once('close', onClose);
  });
}
