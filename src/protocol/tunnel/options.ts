/**
 * Options both ends of a tunnel take, with their defaults and limits.
 */
import type { ChannelTuningOptions } from '../../transport/sockets.js';
import { RESUMABLE_DEFAULTS, type ResumableLinkOptions } from '../../transport/resumable.js';
import type { TunnelRole } from './session.js';

export interface TunnelCommonOptions {
  /**
   * The outage limit: a hop connection down for longer than this (no new hop
   * socket welcomed) closes its QEMU-side connection, so that QEMU's own
   * recovery (postcopy-paused, then `migrate-recover` / `migrate … resume=true`
   * through the tunnel again) or failure takes over. Default 30 000 ms.
   */
  maxOutageMs?: number;
  /** An ACK at least this often on every hop connection: the keepalive (default 1000 ms). */
  keepaliveMs?: number;
  /**
   * No frame from the peer for this long while reading: the hop socket is
   * dead and is replaced (a frozen path sends no RST). Default 10 000 ms, at
   * least 2 × keepaliveMs.
   */
  silenceMs?: number;
  /**
   * Bytes per connection and direction forwarded but not yet acknowledged
   * (default 16 MiB, at least 64 KiB). QEMU's connection is not read beyond
   * it: during an outage QEMU sees its socket stop taking bytes, never an error.
   */
  replayBufferBytes?: number;
  /** One TCP connect plus TLS handshake (default 10 000 ms); the exit: also one connection to its QEMU. */
  connectTimeoutMs?: number;
  /** Socket options per channel role, over the profiles (main: bulk, preempt: urgent, multifd: bulk). */
  transport?: ChannelTuningOptions;
}

/** The ResumableLink options of a connection of `role`. */
export function hopLinkOptions(o: TunnelCommonOptions, _role: TunnelRole): Pick<ResumableLinkOptions, 'capacityBytes' | 'keepaliveMs' | 'silenceMs' | 'maxOutageMs'> {
  return {
    capacityBytes: o.replayBufferBytes ?? RESUMABLE_DEFAULTS.capacityBytes,
    keepaliveMs: o.keepaliveMs ?? RESUMABLE_DEFAULTS.keepaliveMs,
    silenceMs: o.silenceMs ?? RESUMABLE_DEFAULTS.silenceMs,
    maxOutageMs: o.maxOutageMs ?? RESUMABLE_DEFAULTS.maxOutageMs,
  };
}
