/**
 * Builds the test guest (test/guest/guest.S) into a raw, bootable disk image.
 *
 * The image is cached in test/guest/build/ under a name derived from a hash of
 * the assembly source and the build options. Concurrent builders (several
 * vitest workers) are safe: each one assembles in its own temporary directory
 * and publishes the image with an atomic rename.
 */
import { execFile } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

const execFileAsync = promisify(execFile);

const HERE = dirname(fileURLToPath(import.meta.url));
export const GUEST_SOURCE = join(HERE, 'guest.S');
export const GUEST_BUILD_DIR = join(HERE, 'build');

const MiB = 1024 * 1024;
const PAGE = 4096;

/** Character the guest writes to the serial port after every complete pass. */
export const GUEST_PASS_CHAR = '*';
/** Line the guest writes to the serial port once, when it starts. */
export const GUEST_BANNER = 'QMT-GUEST';

export type GuestDirection = 'up' | 'down';

export interface GuestOptions {
  /** First MiB of the range the guest walks (default 1). Fractions allowed if page aligned; must be >= 1. */
  startMiB?: number;
  /** End of the range, exclusive, in MiB (default 100). Fractions allowed if page aligned. */
  endMiB?: number;
  /** 'up' (default): lowest page first; 'down': highest page first. */
  direction?: GuestDirection;
}

/** GuestOptions and the seed guest's read region. */
export interface SeedGuestOptions extends GuestOptions {
  /**
   * End (exclusive, MiB) of a read region from `endMiB` on, read every pass
   * and never written after its first fill (guest.S RDEND). Default: none.
   */
  readEndMiB?: number;
}

export interface ResolvedGuestOptions {
  startMiB: number;
  endMiB: number;
  direction: GuestDirection;
  /** Byte address of the first page of the range. */
  start: number;
  /** Byte address just past the last page of the range. */
  end: number;
  /** End of the read region (bytes, exclusive), 0 without one. */
  readEnd: number;
}

/** Applies defaults and validates guest options (throws on invalid ranges). */
export function resolveGuestOptions(opts: SeedGuestOptions = {}): ResolvedGuestOptions {
  const startMiB = opts.startMiB ?? 1;
  const endMiB = opts.endMiB ?? 100;
  const direction = opts.direction ?? 'up';
  const start = Math.round(startMiB * MiB);
  const end = Math.round(endMiB * MiB);
  if (direction !== 'up' && direction !== 'down') throw new Error(`guest: bad direction ${String(direction)}`);
  if (start % PAGE !== 0 || end % PAGE !== 0) throw new Error('guest: range must be 4 KiB aligned');
  if (start < MiB) throw new Error('guest: range must start at or above 1 MiB (code and BIOS live below)');
  if (end <= start) throw new Error('guest: empty range');
  if (end > 0xc000_0000) throw new Error('guest: range must end below 3 GiB (32-bit flat mode, below the PCI hole)');
  const readEnd = opts.readEndMiB === undefined ? 0 : Math.round(opts.readEndMiB * MiB);
  if (readEnd !== 0) {
    if (readEnd % PAGE !== 0 || readEnd <= end) throw new Error('guest: the read region must end page aligned, past the range');
    if (readEnd > 0xc000_0000) throw new Error('guest: the read region must end below 3 GiB');
  }
  return { startMiB, endMiB, direction, start, end, readEnd };
}

async function run(cmd: string, args: string[]): Promise<void> {
  try {
    await execFileAsync(cmd, args, { maxBuffer: 1024 * 1024 });
  } catch (err) {
    const e = err as { stderr?: string; message: string };
    throw new Error(`guest build: ${cmd} ${args.join(' ')} failed: ${e.stderr ?? e.message}`);
  }
}

/**
 * Builds (or reuses) the guest image and returns its absolute path. The image
 * is a raw disk of 1 MiB whose first sector is the boot sector; boot it with
 * `-drive file=PATH,format=raw,if=ide`.
 */
export async function buildGuest(opts: SeedGuestOptions = {}): Promise<string> {
  const o = resolveGuestOptions(opts);
  const source = await readFile(GUEST_SOURCE);
  const defs: Record<string, string> = {
    START: `0x${o.start.toString(16)}`,
    END: `0x${o.end.toString(16)}`,
    DOWN: o.direction === 'down' ? '1' : '0',
    ...(o.readEnd ? { RDEND: `0x${o.readEnd.toString(16)}` } : {}),
  };
  const hash = createHash('sha256')
    .update(source)
    .update('\0')
    .update(JSON.stringify(defs))
    .update('\0v1')
    .digest('hex')
    .slice(0, 16);
  const name = `guest-${o.direction}-${o.start.toString(16)}-${o.end.toString(16)}${o.readEnd ? `-r${o.readEnd.toString(16)}` : ''}-${hash}.img`;
  const image = join(GUEST_BUILD_DIR, name);
  if (existsSync(image)) return image;

  await mkdir(GUEST_BUILD_DIR, { recursive: true });
  const work = await mkdtemp(join(GUEST_BUILD_DIR, '.work-'));
  try {
    const obj = join(work, 'guest.o');
    const elf = join(work, 'guest.elf');
    const bin = join(work, 'guest.bin');
    const defsym = Object.entries(defs).flatMap(([k, v]) => ['--defsym', `${k}=${v}`]);
    await run('as', ['--32', ...defsym, '-o', obj, GUEST_SOURCE]);
    await run('ld', ['-m', 'elf_i386', '-Ttext=0x7c00', '-e', '_start', '-o', elf, obj]);
    await run('objcopy', ['-O', 'binary', '-j', '.text', elf, bin]);
    const sector = await readFile(bin);
    if (sector.length !== 512 || sector[510] !== 0x55 || sector[511] !== 0xaa) {
      throw new Error(`guest build: boot sector is ${sector.length} bytes or lacks the 55 AA signature`);
    }
    // A 1 MiB disk: SeaBIOS computes a CHS geometry of 16 heads x 63 sectors and
    // refuses to boot a disk smaller than one cylinder (504 KiB): "could not read the boot disk".
    const disk = Buffer.alloc(1024 * 1024);
    sector.copy(disk, 0);
    const tmp = `${image}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`;
    await writeFile(tmp, disk);
    await rename(tmp, image);
    return image;
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}

// `node --import tsx test/guest/build.ts [startMiB endMiB [up|down]]` prints the image path.
if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  const [s, e, d] = process.argv.slice(2);
  buildGuest({
    ...(s !== undefined ? { startMiB: Number(s) } : {}),
    ...(e !== undefined ? { endMiB: Number(e) } : {}),
    ...(d !== undefined ? { direction: d as GuestDirection } : {}),
  }).then(
    (p) => console.log(p),
    (err: unknown) => {
      console.error(err);
      process.exitCode = 1;
    },
  );
}
