/**
 * Every bad invocation of every `qmt` command, as a user types it: exactly one
 * stderr line `qmt: <code>: <what>` naming the argument, option or path,
 * nothing on stdout, no stack trace, exit 2 for usage and 1 for failures.
 * Plus the formatter on its own (any object with a string `code`). Each
 * case is a tsx start-up (seconds on a busy machine): one per kind of mistake.
 */
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CommanderError } from 'commander';
import { afterAll, describe, expect, it } from 'vitest';
import { CliError, describeError, exitCodeOf } from '../../src/cli/errors.js';
import { StreamError } from '../../src/stream/errors.js';
import { TransportError } from '../../src/transport/errors.js';
import { MigrationError } from '../../src/protocol/errors.js';
import { mapLimit, qmt, ROOT } from './qmt.js';

const work = mkdtempSync(join(tmpdir(), 'qmt-errors-'));
afterAll(() => rmSync(work, { recursive: true, force: true }));
const FILE = join(work, 'a-file');
writeFileSync(FILE, 'not a stream');
const DIR = join(work, 'a-dir');
mkdirSync(DIR);
const MISSING = join(work, 'missing.bin');
const STREAM = join(ROOT, 'test', 'fixtures', 'xbzrle.bin');

/** args, exit code, the one stderr line. */
type Case = [args: string[], exit: 1 | 2, line: RegExp];

const esc = (s: string): string => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');

async function check(cases: Case[]): Promise<void> {
  const results = await mapLimit(cases, 4, ([args]) => qmt(args, { cwd: work }));
  results.forEach((r, i) => {
    const [args, exit, line] = cases[i]!;
    const what = `qmt ${args.join(' ')}\n${r.stderr}`;
    expect(r.stderr, what).not.toMatch(/^\s+at /m);
    expect(r.stderr.split('\n'), `${what}: one line`).toHaveLength(2); // the line and the final ''
    expect(r.stderr.trimEnd(), what).toMatch(line);
    expect(r.stdout, what).toBe('');
    expect(r.code, what).toBe(exit);
  });
}

describe('qmt: bad invocations, one line each', () => {
  it('qmt itself', async () => {
    await check([
      [['frob'], 2, /^qmt: usage: unknown command 'frob'$/],
      [['--frob'], 2, /^qmt: usage: unknown option '--frob'$/],
    ]);
  }, 60_000);

  it('qmt demo', async () => {
    await check([
      [['demo', '--size', '0'], 2, /^qmt: usage: option '--size <MiB>' argument '0' is invalid\. --size must be an integer in 1\.\.1048576$/],
      [['demo', '--size', 'abc'], 2, /^qmt: usage: option '--size <MiB>' argument 'abc' is invalid/],
      [['demo', '--size', '1000000'], 2, /^qmt: usage: --size 1000000: the demo holds the guest twice \(2000000 MiB\), more than this machine's \d+ MiB of RAM$/],
      [['demo', '--workload', 'foo'], 2, /^qmt: usage: option '--workload <kind>' argument 'foo' is invalid\. Allowed choices are video, idle\.$/],
      [['demo', '--postcopy', 'sometimes'], 2, /^qmt: usage: option '--postcopy <policy>' argument 'sometimes' is invalid\. postcopy policy must be/],
      [['demo', '--siz', '3'], 2, /^qmt: usage: unknown option '--siz' \(Did you mean --size\?\)$/],
      [['demo', 'extra'], 2, /^qmt: usage: too many arguments for 'demo'/],
    ]);
  }, 60_000);

  it('qmt inspect', async () => {
    await check([
      [['inspect'], 2, /^qmt: usage: missing required argument 'file'$/],
      [['inspect', MISSING], 1, new RegExp(`^qmt: not-found: ${esc(MISSING)}: no such file`)],
      [['inspect', DIR], 1, new RegExp(`^qmt: is-a-directory: ${esc(DIR)}: is a directory, expected a file`)],
      [['inspect', FILE], 1, new RegExp(`^qmt: bad-magic: ${esc(FILE)} at offset 0: bad magic`)],
      [['inspect', STREAM, '--progress', 'loud'], 2, /^qmt: usage: option '--progress <mode>' argument 'loud' is invalid/],
    ]);
  }, 60_000);

  it('qmt recode', async () => {
    await check([
      [['recode', STREAM], 2, /^qmt: usage: missing required argument 'out'$/],
      [['recode', MISSING, join(work, 'out.bin')], 1, new RegExp(`^qmt: not-found: ${esc(MISSING)}: no such file \\(IN\\)$`)],
      [['recode', DIR, join(work, 'out.bin')], 1, new RegExp(`^qmt: is-a-directory: ${esc(DIR)}`)],
      [['recode', STREAM, DIR], 1, new RegExp(`^qmt: is-a-directory: ${esc(DIR)}: is a directory, expected a file \\(OUT\\)$`)],
      [['recode', STREAM, FILE], 1, new RegExp(`^qmt: exists: ${esc(FILE)}: already exists \\(use --force to replace it\\)$`)],
      [['recode', STREAM, join(work, 'no', 'such', 'dir.bin')], 1, /^qmt: not-found: .*no\/such: no such directory/],
    ]);
  }, 60_000);

  it('qmt pki init', async () => {
    await check([
      [['pki', 'init'], 2, /^qmt: usage: missing required argument 'dir'$/],
      [['pki', 'init', join(work, 'pki'), '--days', '0'], 2, /^qmt: usage: option '--days <n>' argument '0' is invalid/],
      [['pki', 'init', FILE], 1, new RegExp(`^qmt: not-a-directory: ${esc(FILE)}: is a file, expected a directory`)],
    ]);
  }, 60_000);

  it('qmt receive', async () => {
    await check([
      [['receive', '--listen', 'tcp:127.0.0.1:0'], 2, /^qmt: usage: required option '--out <path>' not specified$/],
      [['receive', '--listen', 'tcp:127.0.0.1:0', '--out', DIR, '--format', 'mapped-ram'], 1, new RegExp(`^qmt: is-a-directory: ${esc(DIR)}: is a directory, expected a file \\(--out`)],
      [['receive', '--listen', 'tcp:127.0.0.1', '--out', DIR], 2, /^qmt: usage: option '--listen <uri>' argument 'tcp:127\.0\.0\.1' is invalid\. expected tcp:HOST:PORT/],
      [['receive', '--listen', 'tcp:127.0.0.1:99999', '--out', DIR], 2, /^qmt: usage: option '--listen <uri>' argument 'tcp:127\.0\.0\.1:99999' is invalid\. bad port/],
      [['receive', '--listen', 'tcp:127.0.0.1:0', '--out', DIR, '--idle-timeout', '-5'], 2, /^qmt: usage: option '--idle-timeout <ms>' argument '-5' is invalid/],
      [['receive', '--listen', 'tcp:127.0.0.1:0', '--out', DIR, '--postcopy', '--fault', 'bogus'], 2, /^qmt: usage: option '--fault <pattern>' argument 'bogus' is invalid/],
      [['receive', '--listen', 'tcp:127.0.0.1:0', '--out', DIR, '--fault-rate', '10'], 2, /^qmt: usage: --fault-rate needs --fault$/],
      [['receive', '--listen', 'tcp:127.0.0.1:0', '--out', FILE], 1, new RegExp(`^qmt: not-a-directory: ${esc(FILE)}: is a file, expected a directory \\(--out`)],
    ]);
  }, 60_000);

  it('qmt send', async () => {
    await check([
      [['send', '--from', DIR], 2, /^qmt: usage: required option '--to <uri>' not specified$/],
      [['send', '--from', DIR, '--to', 'tcp:127.0.0.1:99999'], 2, /^qmt: usage: option '--to <uri>' argument 'tcp:127\.0\.0\.1:99999' is invalid\. bad port/],
      [['send', '--from', MISSING, '--to', 'tcp:127.0.0.1:1'], 1, new RegExp(`^qmt: not-found: ${esc(MISSING)}: no such file or directory \\(--from, the saved VM\\)$`)],
      // A file is read as a mapped-ram file.
      [['send', '--from', FILE, '--to', 'tcp:127.0.0.1:1'], 1, new RegExp(`^qmt: saved-vm: ${esc(FILE)}: not a saved VM \\(a directory from qmt receive, or a complete mapped-ram file\\): bad-magic at offset 0: `)],
      [['send', '--from', DIR, '--to', 'tcp:127.0.0.1:1'], 1, new RegExp(`^qmt: saved-vm: .*a-dir: not a saved VM \\(no manifest\\.json`)],
      [['send', '--from', DIR, '--to', 'tcp:127.0.0.1:1', '--bandwidth', '1'], 2, /^qmt: usage: option '--bandwidth <bytes\/s>' argument '1' is invalid/],
      [['send', '--from', DIR, '--to', 'tcp:127.0.0.1:1', '--postcopy', 'later'], 2, /^qmt: usage: option '--postcopy <policy>' argument 'later' is invalid/],
      [['send', '--from', DIR, '--to', 'tcp:127.0.0.1:1', '--preempt'], 2, /^qmt: usage: --preempt needs --postcopy/],
      [['send', '--from', DIR, '--to', 'tcp:127.0.0.1:1', '--tls-allow', 'x'], 2, /^qmt: usage: --tls-allow needs --tls$/],
    ]);
  }, 60_000);

  it('qmt tap', async () => {
    await check([
      [['tap', '--to', 'tcp:127.0.0.1:1'], 2, /^qmt: usage: required option '--listen <uri>' not specified$/],
      [['tap', '--listen', 'tcp:127.0.0.1:0', '--to', 'unix:'], 2, /^qmt: usage: option '--to <uri>' argument 'unix:' is invalid\. no path/],
      [['tap', '--listen', 'tcp:127.0.0.1:0', '--to', 'tcp:127.0.0.1:1', '--keep-listning'], 2, /^qmt: usage: unknown option '--keep-listning' \(Did you mean --keep-listening\?\)$/],
    ]);
  }, 60_000);

  it('--json: a bad invocation is also one JSON object on stdout', async () => {
    const r = await qmt(['demo', '--size', 'abc', '--json']);
    expect(r.code).toBe(2);
    expect(JSON.parse(r.stdout)).toEqual({
      version: 1,
      command: 'demo',
      ok: false,
      durationMs: 0,
      error: { code: 'usage', message: "option '--size <MiB>' argument 'abc' is invalid. --size must be an integer in 1..1048576" },
    });
    expect(r.stderr).toBe("qmt: usage: option '--size <MiB>' argument 'abc' is invalid. --size must be an integer in 1..1048576\n");
  }, 60_000);
});

describe('describeError: any object with a string code', () => {
  it('keeps the code of our errors, and where they happened', () => {
    expect(describeError(new StreamError('bad-magic', 0, 'bad magic 0x00000000 (expected "QEVM")'))).toEqual({ code: 'bad-magic', message: 'at offset 0: bad magic 0x00000000 (expected "QEVM")' });
    expect(describeError(new TransportError('connect-failed', 'connect ECONNREFUSED 127.0.0.1:1', { channel: 'main' }))).toEqual({
      code: 'connect-failed',
      message: '(main channel) connect ECONNREFUSED 127.0.0.1:1',
    });
    expect(describeError(new MigrationError('idle-timeout', 'precopy', 'no data for 300 ms'))).toEqual({ code: 'idle-timeout', phase: 'precopy', message: 'no data for 300 ms (phase: precopy)' });
    // A class this module never heard of (another error base, another build of the package).
    class Other extends Error {
      readonly code = 'tls-unknown-ca';
    }
    expect(describeError(new Other('the peer\ncertificate is from another CA'))).toEqual({ code: 'tls-unknown-ca', message: 'the peer certificate is from another CA' });
    expect(describeError({ code: 'x', message: 'plain object' })).toEqual({ code: 'x', message: 'plain object' });
  });

  it("puts Node's system errors in words, naming the path", () => {
    const enoent = Object.assign(new Error("ENOENT: no such file or directory, open 'vm.bin'"), { code: 'ENOENT', errno: -2, syscall: 'open', path: 'vm.bin' });
    expect(describeError(enoent)).toEqual({ code: 'not-found', message: 'vm.bin: no such file or directory' });
    const eacces = Object.assign(new Error("EACCES: permission denied, open '/root/x'"), { code: 'EACCES', path: '/root/x' });
    expect(describeError(eacces)).toEqual({ code: 'permission-denied', message: '/root/x: permission denied' });
    expect(describeError(Object.assign(new Error('odd'), { code: 'EWEIRD' }))).toEqual({ code: 'eweird', message: 'odd' });
  });

  it('usage (exit 2) versus failure (exit 1)', () => {
    expect(exitCodeOf(new CommanderError(1, 'commander.unknownOption', "error: unknown option '--x'"))).toBe(2);
    expect(describeError(new CommanderError(1, 'commander.unknownOption', "error: unknown option '--x'"))).toEqual({ code: 'usage', message: "unknown option '--x'" });
    expect(exitCodeOf(new CliError('usage', 'IN and OUT are the same file'))).toBe(2);
    expect(exitCodeOf(new CliError('not-found', 'x: no such file'))).toBe(1);
    expect(exitCodeOf('a string')).toBe(1);
    expect(describeError(undefined)).toEqual({ code: 'error', message: 'undefined' });
  });
});
