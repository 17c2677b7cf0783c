import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

/** The shipped OpenSSL configuration that turns TLS 1.3 session tickets off (see the file for why). */
export function noTicketsConfigPath(): string {
  return fileURLToPath(new URL('../../openssl/no-tls13-tickets.cnf', import.meta.url));
}

/**
 * Re-runs this command with OPENSSL_CONF pointing at the no-tickets
 * configuration, unless OPENSSL_CONF is already set (the user's choice wins).
 * Returns the child's exit code, or undefined when no re-run was needed.
 */
export function rerunWithoutTls13Tickets(): number | undefined {
  if (process.env.OPENSSL_CONF !== undefined) return undefined;
  const conf = noTicketsConfigPath();
  if (!existsSync(conf)) return undefined;
  // The child shares our terminal: let it handle ^C and report; we only wait.
  const ignore = () => undefined;
  process.on('SIGINT', ignore);
  process.on('SIGTERM', ignore);
  const r = spawnSync(process.execPath, [...process.execArgv, ...process.argv.slice(1)], {
    stdio: 'inherit',
    env: { ...process.env, OPENSSL_CONF: conf },
  });
  return r.status ?? 1;
}
