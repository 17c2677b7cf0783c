/**
 * Which connections to a migration listener may become a channel.
 *
 * A destination port is reachable by whoever is on the network: a health
 * probe, a port scanner, an HTTP client, a TLS client of another CA. None of
 * them may end the migration, so a connection gets a channel role only once
 * it qualifies, and one that closes, fails or stays silent before that is
 * dropped and reported as a {@link StrangerEvent}.
 *
 * What qualifies, and how this follows QEMU 10.0 (migration.c
 * `migration_ioc_process_incoming`, channel.c):
 *
 * - QEMU peeks at the first 4 bytes (the stream magic "QEVM") only with
 *   multifd without postcopy; with postcopy-preempt, or a single channel, it
 *   takes roles purely by accept order (`!mis->from_src_file`: the first
 *   connection is the main channel, the next the preempt channel), after the
 *   TLS handshake when TLS is on. A stranger that connects first therefore
 *   ends a QEMU destination's migration; we peek like QEMU's multifd mode
 *   does, always:
 * - main channel: the first connection whose first bytes are the stream
 *   magic (a new migration) or, on a postcopy-recovery listener, a
 *   RECV_BITMAP / POSTCOPY_RESUME command (a QEMU 10 source begins a recovery
 *   with RECV_BITMAP: `ram_resume_prepare`). With TLS the handshake must
 *   first succeed with a valid client certificate (and a name of the
 *   allow-list, when there is one). The bytes are peeked, never consumed:
 *   the decoder still sees them.
 * - preempt channel: it carries no magic, so QEMU takes it by order. With
 *   TLS we do the same: the next connection after the main channel whose
 *   handshake succeeds with a valid certificate (only a peer holding a
 *   certificate of our CA gets there). Plain TCP has no such proof, and the
 *   preempt channel stays silent until the first urgent page: so every
 *   connection accepted after the main channel is a candidate, and the first
 *   whose first bytes are a RAM page record naming its block (the first
 *   record on a new channel always does; `x-preempt-pre-7-2` channels may
 *   send only an EOS record) becomes the preempt channel; the others are
 *   dropped then. A connection accepted before the main channel qualified is
 *   never the preempt channel: QEMU's source opens it only after PONG 1, so
 *   after its main channel has spoken.
 *
 * - multifd channels (a listener for `multifd: { channels: N }`): QEMU 10.0
 *   peeks 4 bytes when it can (plain TCP/unix): "QEVM" is the main channel,
 *   anything else a multifd channel, whose 64-byte init message then gives
 *   its id (multifd.c `multifd_recv_initial_packet`); under TLS it goes by
 *   order. We judge by content on both: "QEVM" → main, the multifd magic
 *   0x11223344 → a multifd channel once its whole init message is in and
 *   agrees (version 1, our UUID, an id below N that no other channel holds);
 *   under TLS after the handshake, like the main channel. Content agrees
 *   with QEMU's order for a real source and keeps strangers out of the N
 *   slots. A wrong version, UUID or id is a stranger ('not-migration',
 *   `bad-multifd-init`); a second connection with a taken id is one too
 *   ('extra'). Until main and every multifd channel are in, a connection may
 *   be any of them; the preempt channel (10.1's order: multifd with postcopy)
 *   is offered only after all of them.
 *
 * Bounds: at most `maxPendingConnections` connections wait to qualify (at
 * the bound the oldest makes room: a real main channel speaks within
 * milliseconds, so silent connections cannot hold the port); each has
 * `qualifyTimeoutMs` (with TLS: for the handshake, then again for the first
 * bytes). A silent plain-TCP preempt candidate past its limit is dropped only
 * once a newer candidate waits: the real preempt channel is opened right
 * before the switchover and may stay silent until its first urgent page, so
 * the newest silent one keeps waiting. Plain TCP authenticates nothing: a
 * stranger that keeps opening silent connections after the real preempt
 * channel can still push it out; use TLS where the network is not trusted.
 * The mechanics (candidates, timers, peeking) are admission.ts.
 */
import { Command, FILE_MAGIC, RamFlag, RecordType } from '../stream/constants.js';
import { MULTIFD_INIT_BYTES, MULTIFD_MAGIC, MULTIFD_VERSION } from '../stream/multifd.js';
import { TransportError } from './errors.js';

/** Default of {@link QualifyOptions.maxPendingConnections}. */
export const DEFAULT_MAX_PENDING_CONNECTIONS = 16;
/** Default of {@link QualifyOptions.qualifyTimeoutMs}. */
export const DEFAULT_QUALIFY_TIMEOUT_MS = 10_000;

/** Limits on connections that are not (yet) a migration channel. Destination only. */
export interface QualifyOptions {
  /**
   * Most connections waiting to qualify at once (TLS handshake or first bytes
   * not yet in). One more makes room by dropping the oldest waiting candidate
   * (reason 'too-many'). Default 16, plus the multifd channels of a multifd
   * listener (a QEMU source opens them all at once).
   */
  readonly maxPendingConnections?: number;
  /**
   * Time a connection has to qualify, from its TCP accept (with TLS: for the
   * handshake, then again for the first bytes); then it is dropped with reason
   * 'timeout' — a silent plain-TCP preempt candidate only once a newer one
   * waits (see above). Default: `connectTimeoutMs` when set, else 10 s.
   */
  readonly qualifyTimeoutMs?: number;
}

/** Why a connection was dropped before it became a migration channel. */
export type StrangerReason =
  /** It closed or was reset before it qualified (a port scan, a health probe). */
  | 'closed'
  /** Its first bytes are not what the channel starts with (an HTTP request, TLS to a plain listener …). */
  | 'not-migration'
  /** Its TLS handshake failed or its certificate was refused; `error.code` says why (`tls-unknown-ca`, `tls-peer-not-allowed` …). */
  | 'tls'
  /** It did not qualify within `qualifyTimeoutMs`. */
  | 'timeout'
  /** `maxPendingConnections` connections were already waiting to qualify. */
  | 'too-many'
  /** Its role went to another connection, or every role is taken. */
  | 'extra'
  /**
   * A postcopy-recovery main channel (RECV_BITMAP first) while this
   * migration's connection still stands: the source has given that one up
   * (a partition it saw first, or its pause()) before the destination noticed.
   */
  | 'recovery';

/** A connection dropped before it became a migration channel; the listener keeps waiting. */
export interface StrangerEvent {
  reason: StrangerReason;
  /** What happened, typed; its `describe()` is the CLI's line. */
  error: TransportError;
  /** `HOST:PORT` of the peer (TCP), when known. */
  remote?: string;
}

/**
 * What makes a connection a channel: a main channel starting a new stream
 * (the magic), one resuming a postcopy migration (RECV_BITMAP or
 * POSTCOPY_RESUME first), or 'any': roles purely by order, as QEMU 10.0
 * itself does, for a listener that carries something else than a migration
 * stream (benchmarks, transport tests).
 */
export type ChannelStart = 'stream' | 'resume' | 'any';

/** The verdict on the bytes seen so far: a channel, not one, or undecided (wait for more). */
export type FirstBytesVerdict = 'yes' | 'no' | 'more';

const MAGIC = Buffer.alloc(4);
MAGIC.writeUInt32BE(FILE_MAGIC);

/** Does `b` begin a main channel: the stream magic, or (recovery) RECV_BITMAP / POSTCOPY_RESUME? */
export function judgeMainStart(start: ChannelStart, b: Uint8Array): FirstBytesVerdict {
  if (start === 'any') return 'yes';
  if (start === 'stream') {
    for (let i = 0; i < Math.min(b.length, MAGIC.length); i++) if (b[i] !== MAGIC[i]) return 'no';
    return b.length >= MAGIC.length ? 'yes' : 'more';
  }
  if (b.length === 0) return 'more';
  if (b[0] !== RecordType.COMMAND) return 'no';
  if (b.length < 3) return 'more';
  const cmd = (b[1]! << 8) | b[2]!;
  return cmd === Command.RECV_BITMAP || cmd === Command.POSTCOPY_RESUME ? 'yes' : 'no';
}

/**
 * Does `b` begin a preempt channel: a PAGE or ZERO record that names its
 * block (be64 offset|flags, then a non-empty idstr), or a lone EOS?
 */
export function judgePreemptStart(b: Uint8Array): FirstBytesVerdict {
  if (b.length < 8) return 'more';
  const flags = ((b[6]! << 8) | b[7]!) & 0xfff;
  if (flags === RamFlag.EOS) return 'yes';
  if (flags !== RamFlag.PAGE && flags !== RamFlag.ZERO) return 'no';
  if (b.length < 9) return 'more';
  return b[8]! > 0 ? 'yes' : 'no';
}

/** What a multifd listener expects of a channel's init message. */
export interface MultifdExpectation {
  /** multifd-channels: ids 0 … channels − 1. */
  readonly channels: number;
  /** The 16-byte UUID the source must send (QEMU's `-uuid`; zeros by default). */
  readonly uuid: Uint8Array;
  /** Whether channel `id` is already connected. */
  taken(id: number): boolean;
}

/** The verdict on a connection of a multifd listener that may be main or a multifd channel. */
export type MultifdStartVerdict =
  | { verdict: 'more' }
  | { verdict: 'main' }
  | { verdict: 'multifd'; id: number }
  /** Neither magic: not a channel of this migration. */
  | { verdict: 'no' }
  /** The multifd magic, but an init message this listener refuses (`taken`: a second channel with that id). */
  | { verdict: 'bad-init'; why: string; id?: number; taken?: boolean };

const MULTIFD_MAGIC_BYTES = [(MULTIFD_MAGIC >>> 24) & 0xff, (MULTIFD_MAGIC >>> 16) & 0xff, (MULTIFD_MAGIC >>> 8) & 0xff, MULTIFD_MAGIC & 0xff];

function hex(b: Uint8Array): string {
  return Buffer.from(b.buffer, b.byteOffset, b.byteLength).toString('hex');
}

/**
 * Main channel ("QEVM") or multifd channel (magic 0x11223344, then the rest
 * of its 64-byte init message checked against `m`), by the first bytes.
 */
export function judgeMainOrMultifd(b: Uint8Array, m: MultifdExpectation): MultifdStartVerdict {
  const n = Math.min(b.length, 4);
  let main = true;
  let multifd = true;
  for (let i = 0; i < n; i++) {
    if (b[i] !== MAGIC[i]) main = false;
    if (b[i] !== MULTIFD_MAGIC_BYTES[i]) multifd = false;
  }
  if (!main && !multifd) return { verdict: 'no' };
  if (b.length < 4) return { verdict: 'more' };
  if (main) return { verdict: 'main' };
  if (b.length < MULTIFD_INIT_BYTES) return { verdict: 'more' };
  const version = ((b[4]! << 24) | (b[5]! << 16) | (b[6]! << 8) | b[7]!) >>> 0;
  if (version !== MULTIFD_VERSION) return { verdict: 'bad-init', why: `multifd init message version ${version}, expected ${MULTIFD_VERSION}` };
  const uuid = b.subarray(8, 24);
  for (let i = 0; i < 16; i++) {
    if (uuid[i] !== (m.uuid[i] ?? 0)) return { verdict: 'bad-init', why: `multifd init message for UUID ${hex(uuid)}, this migration's is ${hex(m.uuid)}` };
  }
  const id = b[24]!;
  if (id >= m.channels) return { verdict: 'bad-init', id, why: `multifd channel id ${id}, but this migration has ${m.channels} channel(s) (ids 0 to ${m.channels - 1})` };
  if (m.taken(id)) return { verdict: 'bad-init', id, taken: true, why: `a second connection for multifd channel ${id}` };
  return { verdict: 'multifd', id };
}
