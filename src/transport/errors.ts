import { QmtError } from '../errors.js';

/**
 * Stable codes of transport failures (sockets, TLS, channel setup). Like
 * StreamError for the wire format: callers switch on `code`, the CLI prints it.
 */
export type TransportErrorCode =
  | 'bad-endpoint' // an URI that is not tcp:HOST:PORT or unix:PATH
  | 'connect-failed' // ECONNREFUSED, ENOENT, EHOSTUNREACH ...
  | 'connect-timeout'
  | 'address-in-use' // listen: EADDRINUSE
  | 'closed' // the peer or the caller closed the channel
  | 'reset' // ECONNRESET / EPIPE
  | 'idle-timeout'
  | 'tls-unknown-ca' // peer certificate not signed by our CA
  | 'tls-no-peer-certificate' // the peer sent no certificate while we verify peers
  | 'tls-certificate-expired' // or not yet valid
  | 'tls-hostname-mismatch'
  | 'tls-no-hostname' // verify-peer on, but no tls-hostname and no host in the URI (unix socket)
  | 'tls-not-tls' // the peer does not speak TLS
  | 'tls-handshake-failed' // any other handshake failure
  | 'tls-bad-credentials' // missing or unreadable files in the credentials directory
  | 'tls-peer-not-allowed' // a valid certificate, but not one of the names allowed (QEMU's tls-authz)
  | 'not-a-migration-channel' // a connection whose first bytes are not a migration channel's
  | 'qualify-timeout' // a connection that did not qualify as a channel in time
  | 'too-many-connections' // more connections waiting to qualify than allowed
  | 'channel-order' // a channel used before its turn (preempt before main), or a role already taken (a multifd id twice)
  | 'bad-multifd-init' // a multifd channel's init message this listener refuses (version, UUID, channel id ≥ multifd-channels)
  | 'write-after-close'
  | 'hop-protocol' // qmt tunnel: bytes on a hop connection that are not hop frames (or a HELLO this exit refuses)
  | 'hop-refused' // qmt tunnel: the exit does not know the connection to resume, or could not reach its QEMU
  | 'outage-timeout'; // qmt tunnel: the hop stayed down longer than the outage limit

/**
 * A channel as errors and stats name it: the main channel, the preempt
 * channel, multifd channel N (`multifd-0` … `multifd-254`, QEMU's id), or
 * `multifd` for one whose id is not known yet (before its init message).
 */
export type ChannelName = 'main' | 'preempt' | 'multifd' | `multifd-${number}`;

/** The one error class of src/transport. `cause` keeps the system or OpenSSL error. */
export class TransportError extends QmtError {
  static readonly family = 'transport';
  override readonly name = 'TransportError';
  readonly family = 'transport';
  readonly code: TransportErrorCode;
  /** Which channel failed, when it is known. */
  readonly channel: ChannelName | undefined;

  constructor(code: TransportErrorCode, message: string, opts: { cause?: unknown; channel?: ChannelName } = {}) {
    super(message, { cause: opts.cause });
    this.code = code;
    this.channel = opts.channel;
  }

  /** The one-line form the CLI prints: `<code>: <what>`. */
  override describe(): string {
    return `${this.code}${this.channel ? ` (${this.channel} channel)` : ''}: ${this.message}`;
  }
}
