import { CommanderError } from 'commander';
import { buildProgram } from './program.js';
import { rerunWithoutTls13Tickets } from './reexec.js';
import { describeError, exitCodeOf, formatErrorLine } from './errors.js';
import { writeJson } from './run.js';

// A TLS destination must not send TLS 1.3 session tickets to a QEMU source
// that never reads them (openssl/no-tls13-tickets.cnf says why).
if (process.argv[2] === 'receive' && process.argv.includes('--tls')) {
  const code = rerunWithoutTls13Tickets();
  if (code !== undefined) process.exit(code);
}

const program = buildProgram();
try {
  await program.parseAsync(process.argv);
} catch (e) {
  // Commands report their own failures (src/cli/run.ts): what arrives here
  // is the command line itself — a bad flag or value, or help and --version.
  if (e instanceof CommanderError && e.exitCode === 0) {
    process.exitCode = 0;
  } else if (e instanceof CommanderError && e.code === 'commander.help') {
    // `qmt` or `qmt pki` without a command: the help (on stderr) is the message.
    process.exitCode = 2;
  } else {
    const d = describeError(e);
    if (process.argv.includes('--json')) {
      const name = program.commands.find((c) => c.name() === process.argv[2])?.name() ?? null;
      writeJson(process.stdout, name === 'pki' ? 'pki init' : name, 0, false, d);
    }
    process.stderr.write(formatErrorLine(d));
    process.exitCode = exitCodeOf(e);
  }
}
