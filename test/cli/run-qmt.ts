/**
 * Test-only entry of the CLI: a commander program with the commands under
 * test, run as `node --import tsx test/cli/run-qmt.ts receive ...` until
 * src/cli/main.ts registers them. Mirrors main.ts's re-run of `receive --tls`
 * without TLS 1.3 session tickets.
 */
import { Command } from 'commander';
import { registerReceiveCommand } from '../../src/cli/receive.js';
import { rerunWithoutTls13Tickets } from '../../src/cli/reexec.js';

if (process.argv[2] === 'receive' && process.argv.includes('--tls')) {
  const code = rerunWithoutTls13Tickets();
  if (code !== undefined) process.exit(code);
}

const program = new Command();
program.name('qmt');
registerReceiveCommand(program);
await program.parseAsync(process.argv);
