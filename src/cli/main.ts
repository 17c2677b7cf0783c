import { Command } from 'commander';
import { StreamError } from '../stream/errors.js';
import { formatInspectReport, inspectFile, toJson } from './inspect.js';
import { recodeFile } from './recode.js';
import { registerPkiCommand } from './pki.js';
import { registerDemoCommand } from './demo.js';
import { registerReceiveCommand } from './receive.js';
import { registerSendCommand } from './send.js';
import { registerTapCommand } from './tap.js';
import { rerunWithoutTls13Tickets } from './reexec.js';

/** Prints one line for a failure and sets the exit code; never a stack trace for bad input. */
function report(e: unknown): void {
  if (e instanceof StreamError) {
    process.stderr.write(`qmt: ${e.describe()}\n`);
  } else {
    process.stderr.write(`qmt: ${e instanceof Error ? e.message : String(e)}\n`);
  }
  process.exitCode = 1;
}

// A TLS destination must not send TLS 1.3 session tickets to a QEMU source
// that never reads them (openssl/no-tls13-tickets.cnf says why).
if (process.argv[2] === 'receive' && process.argv.includes('--tls')) {
  const code = rerunWithoutTls13Tickets();
  if (code !== undefined) process.exit(code);
}

const program = new Command();
program.name('qmt').description('QEMU 10 live-migration streams and transport').version('0.1.0');

program
  .command('inspect')
  .description('decode a captured migration stream and summarise it')
  .argument('<file>', 'a stream written by QEMU (migrate "file:...") or by qmt')
  .option('--json', 'print a machine-readable report')
  .option('--devices', 'decode device state into named fields (needs the VM description)')
  .action(async (file: string, opts: { json?: boolean; devices?: boolean }) => {
    try {
      const r = await inspectFile(file, opts);
      process.stdout.write(`${opts.json ? toJson(r) : formatInspectReport(r)}\n`);
    } catch (e) {
      report(e);
    }
  });

program
  .command('recode')
  .description('decode a stream and encode it again with our encoder')
  .argument('<in>')
  .argument('<out>')
  .option('--no-continue', 'name the RAM block in every page record (no RAM_SAVE_FLAG_CONTINUE)')
  .action(async (input: string, output: string, opts: { continue: boolean }) => {
    try {
      const n = await recodeFile(input, output, { noContinue: !opts.continue });
      process.stderr.write(`qmt: wrote ${n} bytes to ${output}\n`);
    } catch (e) {
      report(e);
    }
  });

registerPkiCommand(program);
registerDemoCommand(program);
registerReceiveCommand(program);
registerSendCommand(program);
registerTapCommand(program);

program.parseAsync(process.argv).catch(report);
