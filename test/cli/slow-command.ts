/**
 * `slow`: a command built like the real ones, for test/cli/run.test.ts. On
 * abort it takes --teardown-ms to clean up; SIGUSR1 (an extra signal of the
 * runner's options) and SIGUSR2 (registered from inside, as a command does
 * once it has a session to pause) print a line.
 */
import { Command } from 'commander';
import { configureQmtCommand } from '../../src/cli/program.js';
import { run } from '../../src/cli/run.js';

const program = configureQmtCommand(new Command()).name('qmt');
program
  .command('slow')
  .option('--teardown-ms <n>', 'time the teardown takes', Number, 0)
  .option('--json')
  .action(
    run(
      'slow',
      async (ctx, o: { teardownMs: number }) => {
        ctx.onSignal('SIGUSR2', () => ctx.stderr.write('usr2\n'));
        ctx.stderr.write('ready\n');
        // What a listening socket does for a real command: keep the process alive while it waits.
        const alive = setInterval(() => undefined, 1000);
        await new Promise((resolve) => ctx.signal.addEventListener('abort', resolve, { once: true }));
        clearInterval(alive);
        ctx.stderr.write('tearing down\n');
        await new Promise((r) => setTimeout(r, o.teardownMs));
        ctx.stderr.write('torn down\n');
        return { ok: false, error: ctx.signal.reason, json: { tornDown: true } };
      },
      { signals: { SIGUSR1: (ctx) => ctx.stderr.write('usr1\n') } },
    ),
  );
await program.parseAsync(process.argv);
