/**
 * Test-only entry of the CLI: a commander program with the commands under
 * test, run as `node --import tsx test/cli/run-qmt.ts receive ...` until
 * src/cli/main.ts registers them.
 */
import { Command } from 'commander';
import { registerReceiveCommand } from '../../src/cli/receive.js';

const program = new Command();
program.name('qmt');
registerReceiveCommand(program);
await program.parseAsync(process.argv);
