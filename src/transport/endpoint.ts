import { TransportError } from './errors.js';

/** Where a migration listens or connects, in QEMU's URI syntax. */
export type Endpoint = { readonly kind: 'tcp'; readonly host: string; readonly port: number } | { readonly kind: 'unix'; readonly path: string };

/**
 * Parses `tcp:HOST:PORT` (IPv6 literals in brackets: `tcp:[::1]:4444`) and
 * `unix:PATH`, as QEMU's migrate/migrate-incoming accept them.
 */
export function parseEndpoint(uri: string): Endpoint {
  if (uri.startsWith('unix:')) {
    const path = uri.slice(5);
    if (path.length === 0) throw new TransportError('bad-endpoint', `no path in "${uri}"`);
    return { kind: 'unix', path };
  }
  if (uri.startsWith('tcp:')) {
    const rest = uri.slice(4);
    const m = /^\[([^\]]+)\]:(\d+)$/.exec(rest) ?? /^([^:]*):(\d+)$/.exec(rest);
    if (!m) throw new TransportError('bad-endpoint', `expected tcp:HOST:PORT, got "${uri}"`);
    const port = Number(m[2]);
    if (!Number.isInteger(port) || port < 0 || port > 65535) throw new TransportError('bad-endpoint', `bad port in "${uri}"`);
    return { kind: 'tcp', host: m[1] === '' ? '0.0.0.0' : (m[1] as string), port };
  }
  throw new TransportError('bad-endpoint', `unsupported endpoint "${uri}" (use tcp:HOST:PORT or unix:PATH)`);
}

export function formatEndpoint(ep: Endpoint): string {
  if (ep.kind === 'unix') return `unix:${ep.path}`;
  return ep.host.includes(':') ? `tcp:[${ep.host}]:${ep.port}` : `tcp:${ep.host}:${ep.port}`;
}
