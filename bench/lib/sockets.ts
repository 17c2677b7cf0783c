/**
 * Socket options as the kernel sees them, read with the `sockopt` addon
 * (independently of the transport's own read-back), and the "kernel
 * defaults" tuning override used for mode (b).
 */
import { createRequire } from 'node:module';
import type { Socket } from 'node:net';
import { IPPROTO_IP, IPPROTO_TCP, IP_TOS, SOL_SOCKET, SO_PRIORITY, SO_RCVBUF, SO_SNDBUF, TCP_NODELAY, TCP_NOTSENT_LOWAT, type TuningProfile } from '../../src/transport/tuning.js';

/**
 * Overrides that reset every option of a profile to what the kernel does
 * without setsockopt: mergeProfile spreads the override, so an explicit
 * `undefined` removes the option, and applyTuning then only reads it back.
 * (Nagle is Node's and the kernel's default; cork is ours, off.)
 */
export const KERNEL_DEFAULTS: Partial<TuningProfile> = {
  sndbuf: undefined,
  rcvbuf: undefined,
  noDelay: false,
  cork: false,
  notSentLowat: undefined,
  priority: undefined,
  tos: undefined,
};

interface SockoptAddon {
  setsockopt(socket: Socket, level: number, name: number, value: number): void;
  getsockopt(socket: Socket, level: number, name: number): number;
}
const so = createRequire(import.meta.url)('sockopt') as SockoptAddon;

export interface SocketOptions {
  sndbuf?: number;
  rcvbuf?: number;
  priority?: number;
  tos?: number;
  noDelay?: boolean;
  notSentLowat?: number;
}

/** Reads the options that matter here; an option that cannot be read is left out. */
export function readSocketOptions(socket: Socket): SocketOptions {
  const get = (level: number, name: number): number | undefined => {
    try {
      return so.getsockopt(socket, level, name);
    } catch {
      return undefined;
    }
  };
  const out: SocketOptions = {};
  const put = <K extends keyof SocketOptions>(k: K, v: SocketOptions[K] | undefined): void => {
    if (v !== undefined) out[k] = v;
  };
  put('sndbuf', get(SOL_SOCKET, SO_SNDBUF));
  put('rcvbuf', get(SOL_SOCKET, SO_RCVBUF));
  put('priority', get(SOL_SOCKET, SO_PRIORITY));
  put('tos', get(IPPROTO_IP, IP_TOS));
  const nd = get(IPPROTO_TCP, TCP_NODELAY);
  put('noDelay', nd === undefined ? undefined : nd !== 0);
  put('notSentLowat', get(IPPROTO_TCP, TCP_NOTSENT_LOWAT));
  return out;
}

/** SO_PRIORITY, set after everything else (IP_TOS overwrites it, see the report). */
export function setSocketPriority(socket: Socket, priority: number): void {
  so.setsockopt(socket, SOL_SOCKET, SO_PRIORITY, priority);
}

/**
 * What the transport's default preempt profile really leaves in the kernel:
 * one loopback connection (main + preempt), SO_PRIORITY as reported in
 * `stats.tuning` next to a fresh getsockopt, then closed.
 */
export async function probeUrgentPriority(): Promise<{ reported?: number; actual?: number; tos?: number }> {
  const { MigrationListener, SourceConnection } = await import('../../src/transport/connection.js');
  const listener = await MigrationListener.listen('tcp:127.0.0.1:0', {}, { start: 'any' });
  let src: Awaited<ReturnType<typeof SourceConnection.connect>> | undefined;
  let dst: Awaited<ReturnType<typeof listener.accept>> | undefined;
  try {
    src = await SourceConnection.connect(listener.uri, { connectTimeoutMs: 5000 });
    dst = await listener.accept();
    const ch = await src.connectPreempt();
    const actual = readSocketOptions(ch.socket);
    const out: { reported?: number; actual?: number; tos?: number } = {};
    if (ch.stats.tuning.priority !== undefined) out.reported = ch.stats.tuning.priority;
    if (actual.priority !== undefined) out.actual = actual.priority;
    if (actual.tos !== undefined) out.tos = actual.tos;
    return out;
  } finally {
    src?.destroy();
    dst?.destroy();
    listener.close();
  }
}
