import { randomBytes } from 'node:crypto';
import { link, open, rename, stat, unlink } from 'node:fs/promises';
import { basename, dirname, join, resolve } from 'node:path';
import { Option, type Command } from 'commander';
import { StreamEncoder } from '../stream/encoder.js';
import { checkInputFile } from './args.js';
import { CliError, usageError } from './errors.js';
import { fileProgress, PROGRESS_MODES, type ProgressMode } from './file-progress.js';
import { inFile } from './inspect.js';
import { decodeFile } from './load-stream.js';
import { run } from './run.js';

export interface RecodeOptions {
  /** Never set RAM_SAVE_FLAG_CONTINUE: every page names its block. */
  noContinue?: boolean;
  /** Replace an existing OUT (default: refuse with 'exists'). */
  force?: boolean;
  /** Called after each chunk of IN read (a progress display). */
  onProgress?: (bytesRead: number) => void;
  /** Aborting stops the recode; nothing is left behind. */
  signal?: AbortSignal;
}

async function sameFile(a: string, b: string): Promise<boolean> {
  if (resolve(a) === resolve(b)) return true;
  const [sa, sb] = await Promise.all([stat(a), stat(b).catch(() => undefined)]);
  return sb !== undefined && sa.dev === sb.dev && sa.ino === sb.ino;
}

async function exists(path: string): Promise<boolean> {
  return stat(path).then(
    () => true,
    () => false,
  );
}

/**
 * Moves the finished temporary file to `output`. Without `force` through a
 * hard link, which fails if `output` appeared meanwhile (no silent clobber of
 * a file created while we worked); where links are not supported, a check and
 * a rename.
 */
async function publish(tmp: string, output: string, force: boolean): Promise<void> {
  if (force) return rename(tmp, output);
  try {
    await link(tmp, output);
  } catch (e) {
    const errno = (e as NodeJS.ErrnoException).code;
    if (errno === 'EEXIST') throw new CliError('exists', `${output}: already exists (use --force to replace it)`, { cause: e });
    if (errno !== 'EPERM' && errno !== 'ENOTSUP' && errno !== 'EXDEV') throw e;
    if (await exists(output)) throw new CliError('exists', `${output}: already exists (use --force to replace it)`);
    return rename(tmp, output);
  }
  await unlink(tmp);
}

/**
 * Decodes IN with our decoder and writes it again with our encoder. OUT is
 * written to a temporary file next to it and renamed when complete: a failed
 * or interrupted recode leaves OUT as it was and no temporary file. Refuses
 * IN = OUT ('usage') and an existing OUT without `force` ('exists').
 * Returns bytes written.
 */
export async function recodeFile(input: string, output: string, opts: RecodeOptions = {}): Promise<number> {
  await checkInputFile(input, 'IN');
  if (await sameFile(input, output)) throw usageError(`IN and OUT are the same file (${output}): write to another file, then rename`);
  const outStat = await stat(output).catch((e: NodeJS.ErrnoException) => (e.code === 'ENOENT' ? undefined : Promise.reject(e)));
  if (outStat?.isDirectory()) throw new CliError('is-a-directory', `${output}: is a directory, expected a file (OUT)`);
  if (outStat && !opts.force) throw new CliError('exists', `${output}: already exists (use --force to replace it)`);
  const dir = dirname(resolve(output));
  const dirStat = await stat(dir).catch(() => undefined);
  if (!dirStat?.isDirectory()) throw new CliError('not-found', `${dir}: no such directory (OUT's directory)`);

  const tmp = join(dir, `.${basename(output)}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`);
  const enc = new StreamEncoder({ continueMode: opts.noContinue ? 'never' : 'auto' });
  const out = await open(tmp, 'wx');
  let written = 0;
  let closed = false;
  try {
    try {
      await decodeFile(
        input,
        async (records) => {
          enc.writeAll(records);
          const pieces = enc.take();
          // Views into the input chunk are still valid here: write before the next chunk is read.
          for (let i = 0; i < pieces.length; i += 1024) {
            const { bytesWritten } = await out.writev(pieces.slice(i, i + 1024) as Buffer[]);
            written += bytesWritten;
          }
        },
        { ...(opts.onProgress ? { onProgress: opts.onProgress } : {}), ...(opts.signal ? { signal: opts.signal } : {}) },
      );
    } catch (e) {
      throw inFile(input, e);
    }
    const rest = enc.take();
    if (rest.length > 0) written += (await out.writev(rest as Buffer[])).bytesWritten;
    await out.sync();
    await out.close();
    closed = true;
    opts.signal?.throwIfAborted();
    await publish(tmp, output, opts.force === true);
  } catch (e) {
    if (!closed) await out.close().catch(() => undefined);
    await unlink(tmp).catch(() => undefined);
    throw e;
  }
  return written;
}

/** Adds `qmt recode IN OUT [--no-continue] [--force] [--progress MODE]`. */
export function registerRecodeCommand(program: Command): Command {
  return program
    .command('recode')
    .description('decode a stream and encode it again with our encoder')
    .argument('<in>', 'a stream written by QEMU or by qmt')
    .argument('<out>', 'the file to write (not IN; written to a temporary file next to it, then renamed)')
    .option('--no-continue', 'name the RAM block in every page record (no RAM_SAVE_FLAG_CONTINUE)')
    .option('--force', 'replace OUT if it exists')
    .option('--json', 'print a machine-readable report')
    .addOption(new Option('--progress <mode>', 'progress on stderr (auto: a bar on a TTY for files of 64 MiB or more)').choices([...PROGRESS_MODES]).default('auto'))
    .action(
      run('recode', async (ctx, input: string, output: string, opts: { continue: boolean; force?: boolean; progress: ProgressMode }) => {
        const size = await checkInputFile(input, 'IN');
        const bar = fileProgress(opts.progress, size, 'recode');
        let bytes: number;
        try {
          bytes = await recodeFile(input, output, { noContinue: !opts.continue, force: opts.force === true, onProgress: (n) => bar.update(n), signal: ctx.signal });
        } finally {
          bar.stop();
        }
        if (!ctx.json) ctx.stderr.write(`qmt: wrote ${bytes} bytes to ${output}\n`);
        return { ok: true, json: { in: input, out: output, bytesRead: size, bytesWritten: bytes, continue: opts.continue } };
      }),
    );
}
