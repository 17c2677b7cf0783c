import { TARGET_PAGE_SIZE } from '../../stream/constants.js';
import type { TransportOptions } from '../../transport/connection.js';
import { usageError } from '../../errors.js';
import type { GuestMemorySource } from '../memory-source.js';
import { checkEndpoint, checkNumber, checkPostcopyPolicy, checkSignal, checkTransport } from '../options.js';
import type { PostcopyPolicy } from '../postcopy-policy.js';
import type { SourceRecoveryOptions } from '../recovery.js';
import type { ThreadMode } from '../../transport/worker/support.js';
import { checkThreadMode } from './threads/plan.js';

/** One device (non-RAM) section to send: opaque bytes, as captured from a source. */
export interface DeviceStateSection {
  /** Section id to use on the wire (default: assigned in order). */
  readonly sectionId?: number;
  readonly idstr: string;
  readonly instanceId: number;
  readonly versionId: number;
  readonly data: Uint8Array;
}

export interface SourceOptions {
  /** Where the destination listens: `tcp:HOST:PORT` or `unix:PATH`. */
  to: string;
  transport?: TransportOptions;
  memory: GuestMemorySource;
  /** Sent in the configuration record; a QEMU destination must run the same machine type. */
  machineType: string;
  /** Device state, read after the VM stopped (a function) or given up front. */
  devices: readonly DeviceStateSection[] | (() => readonly DeviceStateSection[] | Promise<readonly DeviceStateSection[]>);
  /** When to switch to postcopy (default 'never'). */
  postcopy?: PostcopyPolicy;
  /** Open the preempt channel at the switch and answer page requests on it (needs postcopy). */
  preempt?: boolean;
  /** Stops the caller's VM at the switchover point; the `stopped` event follows at once. */
  stopVm?: () => void | Promise<void>;
  /** Precopy bandwidth cap in bytes/s (QEMU's max-bandwidth; default none). */
  bandwidthLimit?: number;
  /** Background bandwidth cap during postcopy (QEMU's max-postcopy-bandwidth; default none). */
  postcopyBandwidthLimit?: number;
  /** Precopy completes when the dirty set can be sent within this many ms (default 300). */
  downtimeLimitMs?: number;
  /** Complete (stop and send the rest) after this many passes without converging, when postcopy is not used (default unlimited, as QEMU). */
  maxPasses?: number;
  /** XBZRLE for pages resent in later precopy passes, with a cache of this many bytes (default off). */
  xbzrleCacheBytes?: number;
  /** Send SWITCHOVER_START before the final sections (default: when the machine type is 10.0 or newer, as QEMU). */
  switchoverStart?: boolean;
  /** The VM description sent after EOF in precopy; default: one generated from the device sizes. */
  vmdesc?: Uint8Array;
  /**
   * QEMU's multifd (capability `multifd`, parameter `multifd-channels` on a
   * QEMU destination): `channels` connections (1–255) opened right after the
   * main one carry the precopy pages in packets, zero pages in each packet's
   * zero list; main carries the block list, a MULTIFD_FLUSH after each pass
   * and the device state. `uuid`: QEMU's `-uuid` of the destination, which
   * it checks in each channel's init message (16 bytes; default zeros, as a
   * QEMU started without `-uuid`). With postcopy (library ↔ library only:
   * QEMU 10.0 refuses multifd with postcopy; this follows QEMU 10.1) the
   * channels are idle once postcopy starts and the preempt channel connects
   * after them. Not with `xbzrleCacheBytes` (multifd sends whole pages).
   */
  multifd?: { readonly channels: number; readonly uuid?: Uint8Array };
  /**
   * Each channel in its own worker thread (default 'auto'): the main channel
   * (its socket, TLS, the bulk pages and the return path) and the preempt
   * channel (requested pages, claimed against the bulk producer through the
   * shared page bitmaps; a request goes from the main thread's worker to the
   * preempt one through a shared ring, not through this thread). Needs Node
   * 26.6+ (sockets transferred to workers) and shared memory (an
   * InMemorySource with `{ shared: true }`); not with XBZRLE. With multifd
   * every multifd channel has its own worker too (socket, TLS, packets).
   * 'auto' falls back to one thread otherwise, and on a machine with fewer
   * than AUTO_THREADS_MIN_CORES (4) cores, where threads measured slower
   * (`stats.threads.why` says why); 'on' where a condition fails throws a
   * RangeError 'threads-unavailable' at the call (few cores are no reason).
   * Events, state and the API are the same either way.
   */
  threads?: ThreadMode;
  /** Bytes of page data per RAM PART section (default 8 MiB). */
  sectionBytes?: number;
  /**
   * How long an answer from the destination (PONG 1 before the preempt channel
   * opens, SHUT at the end) may be outstanding with nothing moving: no
   * return-path message and, where the kernel tells, none of our bytes
   * acknowledged (default 30 s). A slow link is not a timeout; a dead peer is.
   * Once the destination's kernel has acknowledged the whole stream, the wait
   * for SHUT goes on until SHUT or the connection's end (a destination may
   * take long to flush its RAM; TCP keepalive finds a dead host).
   *
   * The same window detects a silent partition in postcopy: when our bytes
   * wait to be delivered and nothing moves for this long (no return-path
   * message, no byte newly acknowledged by the destination's kernel, no byte
   * newly written), the link is taken as dead and postcopy pauses and
   * reconnects, as after a reset (see `recovery`).
   */
  replyTimeoutMs?: number;
  /**
   * Postcopy recovery: once the destination runs the VM, a network failure
   * pauses the migration ('paused') and the source reconnects with backoff
   * until the destination takes the new connection ('resumed'). Default: on
   * whenever postcopy is possible; `false` makes such a failure final.
   */
  recovery?: SourceRecoveryOptions | false;
  /**
   * Aborting it cancels the migration, as `cancel()`: `done` rejects with a
   * MigrationError 'cancelled' whose `cause` is the signal's reason.
   */
  signal?: AbortSignal;
}

/**
 * Bytes of guest pages a source may hold by reference, not yet handed to the
 * kernel: the main channel's bound plus an encoder batch, and with multifd
 * per channel its bulk window plus a packet beyond it (the producer is pulled
 * by the windows) and one in the socket's hands. A memory source that
 * recycles its buffers must keep pages valid for twice this.
 */
export function sourceUnsentBytes(o: Pick<SourceOptions, 'transport' | 'multifd'>): number {
  const main = o.transport?.main;
  let n = (main?.maxQueuedBytes ?? 8 << 20) + (main?.socketBufferBytes ?? 1 << 20) + (1 << 20);
  if (o.multifd) n += o.multifd.channels * ((o.transport?.multifd?.bulkWindowBytes ?? 256 << 10) + 2 * MULTIFD_PACKET_BYTES);
  return n;
}

/** A full multifd packet: its 1344-byte header and 128 pages. */
const MULTIFD_PACKET_BYTES = 1344 + 128 * TARGET_PAGE_SIZE;

/** Most multifd channels: QEMU's `multifd-channels` limit (the id is one byte). */
export const MAX_MULTIFD_CHANNELS = 255;

function checkMultifd(o: SourceOptions): void {
  const m = o.multifd;
  if (m === undefined) return;
  if (typeof m !== 'object' || m === null) throw usageError('type', 'bad-option', 'multifd', 'multifd must be an object { channels, uuid? }');
  const n = m.channels;
  if (typeof n !== 'number' || !Number.isInteger(n) || n < 1 || n > MAX_MULTIFD_CHANNELS) {
    throw usageError('range', 'bad-option', 'multifd.channels', `multifd.channels must be an integer from 1 to ${MAX_MULTIFD_CHANNELS}, got ${String(n)}`);
  }
  if (m.uuid !== undefined && (!(m.uuid instanceof Uint8Array) || m.uuid.length !== 16)) {
    throw usageError('type', 'bad-option', 'multifd.uuid', 'multifd.uuid must be a Uint8Array of 16 bytes (QEMU\'s -uuid)');
  }
  if (o.xbzrleCacheBytes) throw usageError('type', 'bad-option', 'multifd', 'multifd and xbzrleCacheBytes do not go together: multifd packets carry whole pages');
}

export function validateSourceOptions(o: SourceOptions): void {
  if (typeof o !== 'object' || o === null) throw usageError('type', 'bad-option', 'options', 'SourceSession needs an options object');
  checkEndpoint(o.to, 'to');
  if (typeof o.memory !== 'object' || o.memory === null || typeof o.memory.blocks !== 'function' || typeof o.memory.readPage !== 'function' || typeof o.memory.syncDirty !== 'function') {
    throw usageError('type', 'bad-option', 'memory', 'memory must be a GuestMemorySource (blocks, readPage, syncDirty)');
  }
  if (typeof o.machineType !== 'string' || o.machineType.length === 0) throw usageError('type', 'bad-option', 'machineType', 'machineType must be a non-empty string');
  if (!Array.isArray(o.devices) && typeof o.devices !== 'function') throw usageError('type', 'bad-option', 'devices', 'devices must be an array of sections or a function returning them');
  checkPostcopyPolicy(o.postcopy);
  checkTransport(o.transport);
  checkSignal(o.signal);
  checkNumber(o.bandwidthLimit, 'bandwidthLimit', { min: 1, fractional: true });
  checkNumber(o.postcopyBandwidthLimit, 'postcopyBandwidthLimit', { min: 1, fractional: true });
  checkNumber(o.downtimeLimitMs, 'downtimeLimitMs', { fractional: true });
  checkNumber(o.maxPasses, 'maxPasses', { min: 1 });
  checkNumber(o.xbzrleCacheBytes, 'xbzrleCacheBytes');
  checkNumber(o.sectionBytes, 'sectionBytes', { min: 1 });
  checkNumber(o.replyTimeoutMs, 'replyTimeoutMs', { min: 1 });
  checkMultifd(o);
  checkThreadMode(o.threads);
  if (o.recovery) {
    if (o.recovery.to !== undefined) checkEndpoint(o.recovery.to, 'recovery.to');
    checkNumber(o.recovery.initialDelayMs, 'recovery.initialDelayMs');
    checkNumber(o.recovery.maxDelayMs, 'recovery.maxDelayMs');
    checkNumber(o.recovery.maxAttempts, 'recovery.maxAttempts', { min: 1 });
  }
  for (const b of o.memory.blocks()) {
    if (b.length <= 0 || b.length % TARGET_PAGE_SIZE !== 0) throw usageError('range', 'bad-option', 'memory', `RAM block "${b.idstr}" has ${b.length} bytes: a positive multiple of ${TARGET_PAGE_SIZE} is needed`);
  }
}
