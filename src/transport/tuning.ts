import { createRequire } from 'node:module';
import type { Socket } from 'node:net';

/**
 * Per-channel socket options. The bulk channel is tuned for throughput, the
 * urgent (preempt) channel for latency: a page request's answer must not wait
 * behind megabytes queued in the kernel's send buffer.
 */
export interface TuningProfile {
  /** SO_SNDBUF in bytes as requested (the kernel doubles it); undefined = kernel autotuning. */
  readonly sndbuf?: number;
  /** SO_RCVBUF in bytes as requested; undefined = kernel autotuning. */
  readonly rcvbuf?: number;
  /** TCP_NODELAY: send small segments at once (Nagle off). */
  readonly noDelay?: boolean;
  /** Coalesce a batch of writes in user space (socket.cork/uncork) before the kernel sees them. */
  readonly cork?: boolean;
  /** TCP_NOTSENT_LOWAT in bytes: how much unsent data the kernel may hold before the socket stops being writable. */
  readonly notSentLowat?: number;
  /** SO_PRIORITY (0–6 without CAP_NET_ADMIN): picks the band of a `prio` qdisc. */
  readonly priority?: number;
  /** IP_TOS / IPV6_TCLASS byte, e.g. 0xb8 = DSCP EF (46). */
  readonly tos?: number;
}

/** Throughput: large buffers, Nagle on, writes coalesced. */
export const BULK_PROFILE: TuningProfile = Object.freeze({
  sndbuf: 4 * 1024 * 1024,
  rcvbuf: 4 * 1024 * 1024,
  noDelay: false,
  cork: true,
});

/** Latency: Nagle off, a small send buffer, little unsent data in the kernel, high priority, DSCP EF. */
export const URGENT_PROFILE: TuningProfile = Object.freeze({
  sndbuf: 64 * 1024,
  noDelay: true,
  cork: false,
  notSentLowat: 16 * 1024,
  priority: 6,
  tos: 0xb8,
});

/** What the kernel reports after tuning (getsockopt), and what could not be set. */
export interface EffectiveTuning {
  sndbuf?: number;
  rcvbuf?: number;
  noDelay?: boolean;
  cork: boolean;
  notSentLowat?: number;
  priority?: number;
  tos?: number;
  /** One line per option that could not be set or read, with the reason. */
  warnings: string[];
}

// Linux values (socket.h, in.h, tcp.h); exported for tools that read sockets back (bench).
export const SOL_SOCKET = 1;
export const SO_SNDBUF = 7;
export const SO_RCVBUF = 8;
export const SO_PRIORITY = 12;
export const IPPROTO_IP = 0;
export const IP_TOS = 1;
export const IPPROTO_TCP = 6;
export const TCP_NODELAY = 1;
export const TCP_NOTSENT_LOWAT = 25;
export const IPPROTO_IPV6 = 41;
export const IPV6_TCLASS = 67;

interface SockoptAddon {
  setsockopt(socket: Socket, level: number, name: number, value: number): void;
  getsockopt(socket: Socket, level: number, name: number): number;
}

/** `process.emitWarning` code of the one warning a process without the sockopt addon gets. */
export const SOCKOPT_UNAVAILABLE_WARNING = 'QMT_SOCKOPT_UNAVAILABLE';

let addon: SockoptAddon | null | undefined;
let addonError = '';
/**
 * The native addon, loaded on first use: sockopt is an optional dependency (its
 * install compiles or fetches a native module, which may fail), so a platform
 * without it degrades to untuned sockets with one process warning instead of
 * failing to import.
 */
function loadAddon(): SockoptAddon | null {
  if (addon !== undefined) return addon;
  try {
    const require = createRequire(import.meta.url);
    addon = require('sockopt') as SockoptAddon;
  } catch (e) {
    addon = null;
    addonError = e instanceof Error ? e.message.split('\n')[0]! : String(e);
    process.emitWarning(
      `the optional dependency sockopt did not load (${addonError}): sockets keep the kernel's defaults ` +
        '(no SO_SNDBUF/SO_RCVBUF, TCP_NOTSENT_LOWAT, SO_PRIORITY or IP_TOS tuning; TCP_NODELAY and corking still apply)',
      { code: SOCKOPT_UNAVAILABLE_WARNING },
    );
  }
  return addon;
}

/**
 * Applies `profile` to a connected socket (a TLSSocket works too: the addon
 * finds the descriptor underneath) and reads every value back. Options that
 * the platform lacks, or that do not apply (TCP options on a unix socket),
 * become warnings, never exceptions.
 */
export function applyTuning(socket: Socket, profile: TuningProfile, kind: 'tcp' | 'unix'): EffectiveTuning {
  const eff: EffectiveTuning = { cork: profile.cork ?? false, warnings: [] };
  const so = loadAddon();
  const isTcp = kind === 'tcp';
  const v6 = socket.remoteFamily === 'IPv6' || socket.localAddress?.includes(':') === true;

  if (isTcp && profile.noDelay !== undefined) socket.setNoDelay(profile.noDelay);
  if (!so) {
    eff.warnings.push(`socket tuning unavailable: the sockopt addon did not load (${addonError})`);
    if (isTcp && profile.noDelay !== undefined) eff.noDelay = profile.noDelay;
    return eff;
  }
  const set = (what: string, level: number, name: number, value: number | undefined): number | undefined => {
    try {
      if (value !== undefined) so.setsockopt(socket, level, name, value);
    } catch (e) {
      eff.warnings.push(`${what}=${value}: ${e instanceof Error ? e.message : String(e)}`);
    }
    try {
      return so.getsockopt(socket, level, name);
    } catch (e) {
      if (value !== undefined) eff.warnings.push(`${what}: cannot read back (${e instanceof Error ? e.message : String(e)})`);
      return undefined;
    }
  };
  eff.sndbuf = set('SO_SNDBUF', SOL_SOCKET, SO_SNDBUF, profile.sndbuf);
  eff.rcvbuf = set('SO_RCVBUF', SOL_SOCKET, SO_RCVBUF, profile.rcvbuf);
  if (isTcp) {
    const nd = set('TCP_NODELAY', IPPROTO_TCP, TCP_NODELAY, undefined);
    if (nd !== undefined) eff.noDelay = nd !== 0;
    eff.notSentLowat = set('TCP_NOTSENT_LOWAT', IPPROTO_TCP, TCP_NOTSENT_LOWAT, profile.notSentLowat);
    // IP_TOS before SO_PRIORITY: Linux derives the socket priority from the TOS
    // byte when IP_TOS is set (EF → 4), which would undo a priority set earlier.
    eff.tos = v6 ? set('IPV6_TCLASS', IPPROTO_IPV6, IPV6_TCLASS, profile.tos) : set('IP_TOS', IPPROTO_IP, IP_TOS, profile.tos);
  }
  eff.priority = set('SO_PRIORITY', SOL_SOCKET, SO_PRIORITY, profile.priority);
  if (!isTcp) {
    for (const [k, v] of [['TCP_NODELAY', profile.noDelay], ['TCP_NOTSENT_LOWAT', profile.notSentLowat], ['IP_TOS', profile.tos]] as const) {
      if (v !== undefined && v !== false) eff.warnings.push(`${k}: not applicable to a unix socket`);
    }
  }
  return eff;
}

/** Merges caller overrides into a default profile (an explicit `undefined` resets an option to the kernel default). */
export function mergeProfile(base: TuningProfile, override: Partial<TuningProfile> | undefined): TuningProfile {
  return override ? { ...base, ...override } : base;
}

/**
 * Sets TCP_NOTSENT_LOWAT on a connected TCP socket at run time (the source
 * bounds its main channel's unsent kernel bytes at the postcopy switch) and
 * reads it back into `eff.notSentLowat`. `undefined` restores the kernel's
 * default (0 = net.ipv4.tcp_notsent_lowat). Without the sockopt addon, or on
 * a unix socket, nothing is set and a warning says so.
 */
export function setNotSentLowat(socket: Socket, bytes: number | undefined, eff: EffectiveTuning): void {
  const so = loadAddon();
  const what = `TCP_NOTSENT_LOWAT=${bytes ?? 'default'}`;
  if (!so) {
    eff.warnings.push(`${what}: the sockopt addon did not load (${addonError})`);
    return;
  }
  if (socket.remotePort === undefined) {
    eff.warnings.push(`${what}: not applicable to a unix socket`);
    return;
  }
  try {
    so.setsockopt(socket, IPPROTO_TCP, TCP_NOTSENT_LOWAT, bytes ?? 0);
    eff.notSentLowat = so.getsockopt(socket, IPPROTO_TCP, TCP_NOTSENT_LOWAT);
  } catch (e) {
    eff.warnings.push(`${what}: ${e instanceof Error ? e.message : String(e)}`);
  }
}

/** SO_ERROR: the error pending on a socket. */
const SO_ERROR = 4;

/**
 * The error the kernel holds for a socket nobody reads (SO_ERROR: a reset
 * arrived, say), as its errno number; 0 when none, undefined when it cannot
 * be asked (no addon, the socket gone). A paused socket learns of a reset
 * only when it reads again: a multifd channel held at its barrier is one.
 */
export function pendingSocketError(socket: Socket): number | undefined {
  const so = loadAddon();
  if (!so || socket.destroyed) return undefined;
  try {
    return so.getsockopt(socket, SOL_SOCKET, SO_ERROR);
  } catch {
    return undefined;
  }
}
