import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const CONF = join('openssl', 'no-tls13-tickets.cnf');

/**
 * The package's folder `openssl/` sits next to `dist/` (and `src/`); this module
 * is bundled at different depths (dist/index.js, dist/index.cjs, a CLI chunk,
 * src/transport when run from source), so look upwards for it.
 */
function findShipped(): string {
  const start = dirname(fileURLToPath(import.meta.url));
  for (let dir = start, i = 0; i < 4; i++) {
    const candidate = join(dir, CONF);
    if (existsSync(candidate)) return candidate;
    const up = dirname(dir);
    if (up === dir) break;
    dir = up;
  }
  // Not found (a package copied without its openssl/ folder): where it belongs next to dist/.
  return join(dirname(start), CONF);
}

/**
 * Absolute path of the OpenSSL configuration shipped with the package
 * (`openssl/no-tls13-tickets.cnf`), which turns TLS 1.3 session tickets off.
 *
 * A TLS 1.3 server sends session tickets right after the handshake; a QEMU
 * source migrating without a return path never reads its socket, so the
 * tickets stay unread and QEMU's final close becomes a reset that drops the
 * stream's tail. OpenSSL reads this setting only at process start: start
 * Node.js with `OPENSSL_CONF` set to this path (as `qmt receive --tls` and
 * `qmt tap` do), e.g.
 * `OPENSSL_CONF=$(node -p "require('qemu-migration-transport').OPENSSL_NO_TICKETS_CONF") node app.js`.
 */
export const OPENSSL_NO_TICKETS_CONF: string = findShipped();
