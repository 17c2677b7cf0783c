import { readFileSync } from 'node:fs';
import type { Socket } from 'node:net';

/**
 * Bytes a TCP socket has handed to the kernel that the peer has not yet
 * acknowledged (Linux: `tx_queue` of /proc/net/tcp{,6}), or undefined where
 * that cannot be read (not Linux, not TCP, the socket is gone).
 *
 * Why: once a sender has written its last byte it can only learn that the
 * stream is still moving from the kernel. A migration source waiting for the
 * destination's final answer uses it to tell a slow link (the queue shrinks)
 * from a dead peer (it does not). Node exposes neither SIOCOUTQ nor TCP_INFO;
 * this table is the one unprivileged view, read a few times a second at most.
 */
export function unackedBytes(socket: Socket): number | undefined {
  const { localPort, remotePort } = socket;
  if (localPort === undefined || remotePort === undefined || socket.destroyed) return undefined;
  const family = socket.remoteFamily === 'IPv6' ? 'tcp6' : 'tcp';
  let table: string;
  try {
    table = readFileSync(`/proc/self/net/${family}`, 'latin1');
  } catch {
    return undefined;
  }
  const local = `:${hexPort(localPort)} `;
  const remote = `:${hexPort(remotePort)} `;
  for (const line of table.split('\n')) {
    // "  sl  local_address rem_address   st tx_queue:rx_queue ..."
    const f = line.trim().split(/\s+/);
    if (f.length < 5 || !`${f[1]} `.endsWith(local) || !`${f[2]} `.endsWith(remote)) continue;
    const tx = f[4]!.split(':')[0]!;
    const n = Number.parseInt(tx, 16);
    return Number.isFinite(n) ? n : undefined;
  }
  return undefined;
}

function hexPort(port: number): string {
  return port.toString(16).toUpperCase().padStart(4, '0');
}
