/**
 * Test-only entry of `qmt send`: a commander program with the send command,
 * run as `node --import tsx test/cli/run-send.ts send ...` until
 * src/cli/main.ts registers it.
 */
import { Command } from 'commander';
import { registerSendCommand } from '../../src/cli/send.js';

const program = new Command();
program.name('qmt');
registerSendCommand(program);
await program.parseAsync(process.argv);
