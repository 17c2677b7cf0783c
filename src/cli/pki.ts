import { X509Certificate } from 'node:crypto';
import { InvalidArgumentError, Option, type Command } from 'commander';
import { DEFAULT_PKI_HOSTNAMES, initPkiDir } from '../transport/pki.js';
import { checkOutputDirectory } from './args.js';
import { describeError, formatErrorLine } from './errors.js';
import { run } from './run.js';

/** Where the command writes; tests replace it (then the command reports in place of the runner). */
export interface PkiCommandIo {
  out(text: string): void;
  err(text: string): void;
}

async function initCommand(dir: string, opts: { hostname: string[]; days: number; force?: boolean }, io: PkiCommandIo, json: boolean): Promise<{ ok: true; json: object }> {
  await checkOutputDirectory(dir, 'DIR, the credentials directory');
  const hostnames = opts.hostname.length > 0 ? opts.hostname : [...DEFAULT_PKI_HOSTNAMES];
  const { pki: made, files } = await initPkiDir(dir, { hostnames, days: opts.days, force: opts.force === true });
  const until = new X509Certificate(made.serverCert).validTo;
  if (!json) {
    io.out(`${files.join('\n')}\n`);
    io.err(`qmt: certificates for ${hostnames.join(', ')}, valid until ${until}\n`);
  }
  return { ok: true, json: { dir, files, hostnames, validDays: opts.days, validUntil: new Date(until).toISOString() } };
}

const defaultIo: PkiCommandIo = {
  out: (t) => process.stdout.write(t),
  err: (t) => process.stderr.write(t),
};

function collect(value: string, previous: string[]): string[] {
  return [...previous, value];
}

function parseDays(value: string): number {
  const n = Number(value);
  if (!/^\d+$/.test(value) || !Number.isSafeInteger(n) || n < 1 || n > 36_500) {
    throw new InvalidArgumentError('expected a whole number of days, 1 … 36500');
  }
  return n;
}

/**
 * Adds `qmt pki init DIR [--hostname NAME]... [--days N] [--force]`: writes a
 * new CA and server and client certificates in QEMU's tls-creds-x509 layout
 * (ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem,
 * client-key.pem; keys mode 0600) and prints the files written.
 */
export function registerPkiCommand(program: Command, io: PkiCommandIo = defaultIo): Command {
  const pki = program.command('pki').description('X.509 credentials for migration over TLS');
  pki
    .command('init')
    .description(
      "create a CA with a server and a client certificate in QEMU's tls-creds-x509 layout " +
        '(use the same directory on both hosts: endpoint=server on the destination, endpoint=client on the source)',
    )
    .argument('<dir>', 'directory to write (created if missing)')
    .addOption(
      new Option('--hostname <name>', "DNS name or IP address for the certificates' subjectAltName; repeatable")
        .argParser(collect)
        .default([] as string[], DEFAULT_PKI_HOSTNAMES.join(', ')),
    )
    .option('--days <n>', 'validity in days', parseDays, 365)
    .option('--force', 'replace existing files')
    .option('--json', 'print a machine-readable report (the files written) instead of the list')
    .action(
      io === defaultIo
        ? run('pki init', (ctx, dir: string, opts: { hostname: string[]; days: number; force?: boolean }) => initCommand(dir, opts, io, ctx.json))
        : async (dir: string, opts: { hostname: string[]; days: number; force?: boolean }) => {
            try {
              await initCommand(dir, opts, io, false);
            } catch (e) {
              io.err(formatErrorLine(describeError(e)));
              process.exitCode = 1;
            }
          },
    );
  return pki;
}
