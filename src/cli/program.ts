/**
 * The `qmt` command line: every command on one commander program whose
 * parse errors (unknown flag, bad value, missing argument or option) are
 * thrown rather than printed, so that they reach the one error formatter
 * (src/cli/errors.ts) like every other failure.
 */
import { Command } from 'commander';
import { registerDemoCommand } from './demo.js';
import { registerInspectCommand } from './inspect.js';
import { registerPkiCommand } from './pki.js';
import { registerReceiveCommand } from './receive.js';
import { registerRecodeCommand } from './recode.js';
import { registerSendCommand } from './send.js';
import { registerTapCommand } from './tap.js';
import { registerTunnelCommand } from './tunnel.js';

export const QMT_VERSION = '0.1.0';

/**
 * Commander's settings for `qmt` and every command under it (commander
 * copies them to subcommands created afterwards): errors are thrown
 * (`exitOverride`) and not printed (`outputError`); help and `--version`
 * still go to stdout.
 */
export function configureQmtCommand(cmd: Command): Command {
  return cmd
    .exitOverride()
    .configureOutput({ outputError: () => undefined })
    .showSuggestionAfterError(true);
}

/** The whole `qmt` program. */
export function buildProgram(): Command {
  const program = configureQmtCommand(new Command());
  program.name('qmt').description('QEMU 10 live-migration streams and transport').version(QMT_VERSION);
  registerInspectCommand(program);
  registerRecodeCommand(program);
  registerPkiCommand(program);
  registerDemoCommand(program);
  registerReceiveCommand(program);
  registerSendCommand(program);
  registerTapCommand(program);
  registerTunnelCommand(program);
  return program;
}
