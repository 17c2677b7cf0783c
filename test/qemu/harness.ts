/**
 * Test harness that starts and drives real QEMU processes (TCG) for
 * migration interop tests.
 *
 * Every QEMU started here is tracked and killed by PID: explicitly with
 * `stop()` / `stopAll()`, on normal process exit, on SIGINT/SIGTERM/SIGHUP,
 * and (through `setpriv --pdeathsig KILL`) by the kernel when the Node.js
 * process dies without running its handlers.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { closeSync, existsSync, mkdtempSync, openSync, readFileSync, readSync, rmSync, statSync } from 'node:fs';
import { open, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import {
  buildGuest,
  GUEST_PASS_CHAR,
  resolveGuestOptions,
  type GuestDirection,
  type GuestOptions,
  type SeedGuestOptions,
  type ResolvedGuestOptions,
} from '../guest/build.js';
import { QmpClient, type Json, type QmpEvent } from './qmp.js';

export { QmpClient, QmpError, type QmpEvent, type Json, type JsonObject } from './qmp.js';

/** The QEMU binary (override with env QEMU_BINARY). */
export const QEMU_BINARY = process.env.QEMU_BINARY ?? 'qemu-system-x86_64';

const MiB = 1024 * 1024;
const PAGE = 4096;

/**
 * 8 KiB in MiB: add it to the size of NUMA nodes after the first so their RAM
 * block length is not a multiple of 256 KiB, which avoids QEMU 10.0.2's TCG
 * dirty-tracking bug for non-first RAM blocks (see `QemuOptions.numaNodesMiB`).
 */
export const TCG_DIRTY_SAFE_PAD_MIB = 8 / 1024;

// ---------------------------------------------------------------------------
// Options and types
// ---------------------------------------------------------------------------

export interface MemoryBackendOptions {
  /** Backend object id; it becomes the name of the main RAM block (default 'm0'). */
  id?: string;
  /** 'ram' (default) → memory-backend-ram; 'file' → memory-backend-file (needs memPath). */
  type?: 'ram' | 'file';
  /** File backing the RAM (type 'file'). */
  memPath?: string;
  /** share=on|off (file backend; default off = private mapping). */
  share?: boolean;
}

export interface QemuOptions {
  /** Label used in the temp dir name and error messages. */
  name?: string;
  /** Machine type (default 'q35'); anything `-machine` accepts, e.g. 'pc-q35-9.2'. */
  machine?: 'q35' | 'pc' | (string & {});
  /** Guest RAM in MiB (default 128). With `numaNodesMiB` it must equal their sum (default: the sum). */
  memoryMiB?: number;
  /** Raw disk image to boot (`-drive file=...,format=raw,if=ide`). */
  image?: string;
  /** Build (cached) and boot the test guest with these options; ignored when `image` is set. */
  guest?: SeedGuestOptions;
  /** Start with `-incoming defer` (destination). */
  incoming?: boolean;
  /** Start with `-S` (CPUs stopped). */
  paused?: boolean;
  /** Main RAM from a memory backend: `-object memory-backend-*,id=ID -machine ...,memory-backend=ID`. */
  memoryBackend?: MemoryBackendOptions;
  /**
   * Split RAM over NUMA nodes, one `memory-backend-ram` per node (ids
   * `ram-node0`, `ram-node1`, ...), each a separate migratable RAM block.
   * Node i is mapped at guest-physical address sum(sizes[0..i-1]) MiB (below
   * the PCI hole). Sizes may be fractional but must be multiples of 8 KiB.
   * Cannot be combined with `memoryBackend`.
   *
   * TCG pitfall (QEMU 10.0.2): guest writes to a RAM block other than the one
   * at ram_addr 0 are lost by precopy dirty tracking after the first bitmap
   * sync when that block's length is a multiple of 256 KiB (the "fast path" of
   * cpu_physical_memory_sync_dirty_bitmap re-arms the TLB dirty trap at the
   * block-relative instead of the absolute ram_addr). Give every node after
   * the first a size that is not a multiple of 256 KiB, e.g.
   * `16 + TCG_DIRTY_SAFE_PAD_MIB`, when the guest writes there during a migration.
   */
  numaNodesMiB?: number[];
  /** Extra command-line arguments appended last. */
  extraArgs?: string[];
  /** How long to wait for QMP to come up (default 15 s). */
  startTimeoutMs?: number;
}

export interface RamBlockInfo {
  name: string;
  /** Page size in bytes. */
  pageSize: number;
  /** Offset in QEMU's ram_addr_t space (not a guest-physical address). */
  offset: number;
  usedLength: number;
  maxLength: number;
  readonly: boolean;
  /** Host virtual address of the block in the QEMU process. */
  hva: number;
}

export interface MigrationRamStats {
  transferred: number;
  remaining: number;
  total: number;
  duplicate: number;
  normal: number;
  'normal-bytes': number;
  'dirty-pages-rate': number;
  mbps: number;
  'dirty-sync-count': number;
  'postcopy-requests': number;
  'page-size': number;
  'multifd-bytes': number;
  'pages-per-second': number;
  'precopy-bytes': number;
  'downtime-bytes': number;
  'postcopy-bytes': number;
  'dirty-sync-missed-zero-copy': number;
  [key: string]: Json;
}

export interface MigrationInfo {
  status?: string;
  ram?: MigrationRamStats;
  'xbzrle-cache'?: {
    'cache-size': number;
    bytes: number;
    pages: number;
    'cache-miss': number;
    'cache-miss-rate': number;
    'encoding-rate': number;
    overflow: number;
  };
  'total-time'?: number;
  downtime?: number;
  'expected-downtime'?: number;
  'setup-time'?: number;
  'error-desc'?: string;
  [key: string]: Json | undefined;
}

export const MIGRATION_END_STATES: ReadonlySet<string> = new Set(['completed', 'failed', 'cancelled']);

// ---------------------------------------------------------------------------
// Process tracking and cleanup
// ---------------------------------------------------------------------------

const live = new Set<QemuProcess>();
let cleanupInstalled = false;

function killAllSync(): void {
  for (const q of live) {
    try {
      process.kill(q.pid, 'SIGKILL');
    } catch {
      /* already gone */
    }
    if (!process.env.QMT_KEEP_QEMU_DIRS) {
      try {
        rmSync(q.dir, { recursive: true, force: true });
      } catch {
        /* ignore */
      }
    }
  }
  live.clear();
}

function installCleanup(): void {
  if (cleanupInstalled) return;
  cleanupInstalled = true;
  process.on('exit', killAllSync);
  for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
    const handler = (): void => {
      killAllSync();
      // Re-raise with the default disposition once our handler is gone, unless someone else handles it.
      if (process.listenerCount(sig) <= 1) {
        process.off(sig, handler);
        process.kill(process.pid, sig);
      }
    };
    process.on(sig, handler);
  }
}

let setprivChecked: boolean | undefined;
function haveSetpriv(): boolean {
  if (setprivChecked === undefined) {
    const r = spawnSync('setpriv', ['--pdeathsig', 'KILL', '--', 'true'], { stdio: 'ignore' });
    setprivChecked = r.status === 0;
  }
  return setprivChecked;
}

/** Stops (kills) every QEMU started by this process. Safe to call any time. */
export async function stopAll(): Promise<void> {
  await Promise.all([...live].map((q) => q.stop()));
}

/** QEMU processes currently alive (started by this process and not stopped). */
export function liveQemus(): QemuProcess[] {
  return [...live];
}

// ---------------------------------------------------------------------------
// QemuProcess
// ---------------------------------------------------------------------------

export class QemuProcess {
  readonly name: string;
  readonly pid: number;
  /** Per-process temp dir: qmp.sock, serial.log, stderr.log, scratch files. */
  readonly dir: string;
  readonly qmpPath: string;
  readonly serialPath: string;
  readonly stderrPath: string;
  readonly args: readonly string[];
  readonly machine: string;
  readonly memoryMiB: number;
  readonly image: string | undefined;
  /** Guest options when started with `guest` (for invariant checks). */
  readonly guest: ResolvedGuestOptions | undefined;
  /** Name of the main RAM block ('pc.ram' or the memory backend id); undefined with NUMA nodes. */
  readonly mainRamBlock: string | undefined;
  /** Guest-physical start (bytes) of each NUMA node's RAM block, by block name. */
  readonly numaBlocks: ReadonlyArray<{ name: string; gpa: number; size: number }>;
  /** Resolves with the exit code/signal when the process has exited. */
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;

  private readonly child: ChildProcess;
  private qmpClient: QmpClient | undefined;
  private hasExited = false;
  private stopping: Promise<void> | undefined;
  private serialOffset = 0;
  private serialCount = 0;

  /** @internal use {@link startQemu} */
  constructor(init: {
    name: string;
    child: ChildProcess;
    dir: string;
    args: string[];
    machine: string;
    memoryMiB: number;
    image: string | undefined;
    guest: ResolvedGuestOptions | undefined;
    numaBlocks: Array<{ name: string; gpa: number; size: number }>;
    mainRamBlock: string | undefined;
  }) {
    this.name = init.name;
    this.child = init.child;
    if (init.child.pid === undefined) throw new Error('QEMU did not start');
    this.pid = init.child.pid;
    this.dir = init.dir;
    this.qmpPath = join(init.dir, 'qmp.sock');
    this.serialPath = join(init.dir, 'serial.log');
    this.stderrPath = join(init.dir, 'stderr.log');
    this.args = init.args;
    this.machine = init.machine;
    this.memoryMiB = init.memoryMiB;
    this.image = init.image;
    this.guest = init.guest;
    this.numaBlocks = init.numaBlocks;
    this.mainRamBlock = init.mainRamBlock;
    this.exited = new Promise((resolve) => {
      init.child.once('exit', (code, signal) => {
        this.hasExited = true;
        resolve({ code, signal });
      });
    });
  }

  /** The QMP client (throws if not connected). */
  get qmp(): QmpClient {
    if (!this.qmpClient) throw new Error(`${this.name}: QMP not connected`);
    return this.qmpClient;
  }

  /** @internal */
  async connectQmp(timeoutMs: number): Promise<void> {
    const died = this.exited.then(({ code, signal }) => {
      throw new Error(`${this.name}: QEMU exited during startup (code ${code}, signal ${signal}): ${this.stderrTail()}`);
    });
    this.qmpClient = await Promise.race([QmpClient.connect(this.qmpPath, { timeoutMs }), died]);
  }

  get isRunning(): boolean {
    return !this.hasExited;
  }

  /** Last `max` characters of QEMU's stderr. */
  stderrTail(max = 2000): string {
    try {
      const s = readFileSync(this.stderrPath, 'utf8');
      return s.length > max ? s.slice(-max) : s;
    } catch {
      return '';
    }
  }

  execute<T = Json>(command: string, args?: Record<string, unknown>, timeoutMs?: number): Promise<T> {
    return this.qmp.execute<T>(command, args, timeoutMs);
  }

  hmp(commandLine: string, timeoutMs?: number): Promise<string> {
    return this.qmp.hmp(commandLine, timeoutMs);
  }

  waitEvent(name: string, predicate?: (ev: QmpEvent) => boolean, timeoutMs?: number, since?: number): Promise<QmpEvent> {
    return this.qmp.waitEvent(name, predicate, timeoutMs, since);
  }

  /** `query-status` → e.g. { running: true, status: 'running' }. */
  queryStatus(): Promise<{ running: boolean; status: string }> {
    return this.execute('query-status');
  }

  /** Pauses the vCPUs (QMP `stop`; not to be confused with {@link stop}). */
  async pauseVm(): Promise<void> {
    await this.execute('stop');
  }

  /** Resumes the vCPUs (QMP `cont`). */
  async resumeVm(): Promise<void> {
    await this.execute('cont');
  }

  queryMigrate(): Promise<MigrationInfo> {
    return this.execute<MigrationInfo>('query-migrate');
  }

  /** `migrate-set-capabilities` from a name → on/off record. */
  async setCapabilities(caps: Record<string, boolean>): Promise<void> {
    const capabilities = Object.entries(caps).map(([capability, state]) => ({ capability, state }));
    if (capabilities.length) await this.execute('migrate-set-capabilities', { capabilities });
  }

  /** `migrate-set-parameters` with the given record (e.g. { 'max-bandwidth': 1048576 }). */
  async setParameters(params: Record<string, unknown>): Promise<void> {
    if (Object.keys(params).length) await this.execute('migrate-set-parameters', params);
  }

  /** `query-migrate-parameters`. */
  queryParameters(): Promise<Record<string, Json>> {
    return this.execute('query-migrate-parameters');
  }

  /** `query-migrate-capabilities` as a record. */
  async queryCapabilities(): Promise<Record<string, boolean>> {
    const list = await this.execute<Array<{ capability: string; state: boolean }>>('query-migrate-capabilities');
    return Object.fromEntries(list.map((c) => [c.capability, c.state]));
  }

  /** Starts an outgoing migration (`migrate uri=...`). */
  async migrate(uri: string, extra: Record<string, unknown> = {}): Promise<void> {
    await this.execute('migrate', { uri, ...extra });
  }

  /**
   * Starts listening for an incoming migration (needs `incoming: true`). Pass
   * `{ 'exit-on-error': false }` to keep QEMU alive (status `failed`) when the
   * incoming migration fails; by default QEMU exits.
   */
  async migrateIncoming(uri: string, extra: Record<string, unknown> = {}): Promise<void> {
    await this.execute('migrate-incoming', { uri, ...extra });
  }

  /** `migrate-start-postcopy`. */
  async startPostcopy(): Promise<void> {
    await this.execute('migrate-start-postcopy');
  }

  /**
   * Polls `query-migrate` until the status is in `statuses`. Rejects on
   * `failed`/`cancelled` (unless listed), on timeout, or if QEMU exits.
   */
  async waitMigration(
    statuses: string | Iterable<string> = ['completed'],
    timeoutMs = 60_000,
    pollMs = 20,
  ): Promise<MigrationInfo> {
    const want = new Set(typeof statuses === 'string' ? [statuses] : statuses);
    const deadline = Date.now() + timeoutMs;
    let last: MigrationInfo | undefined;
    for (;;) {
      if (this.hasExited) throw new Error(`${this.name}: QEMU exited while waiting for migration: ${this.stderrTail()}`);
      last = await this.queryMigrate();
      const st = last.status ?? 'none';
      if (want.has(st)) return last;
      if (st === 'failed' || st === 'cancelled') {
        throw new Error(
          `${this.name}: migration ${st}: ${last['error-desc'] ?? '(no error-desc)'}; stderr: ${this.stderrTail(800)}`,
        );
      }
      if (Date.now() > deadline) {
        throw new Error(
          `${this.name}: migration status '${st}' not in [${[...want].join(', ')}] after ${timeoutMs} ms: ${JSON.stringify(last.ram ?? {})}`,
        );
      }
      await sleep(pollMs);
    }
  }

  /** Dumps guest-physical memory [addr, addr+size) to `path` (HMP/QMP pmemsave). */
  async pmemsave(addr: number, size: number, path: string): Promise<void> {
    await this.execute('pmemsave', { val: addr, size, filename: path }, 300_000);
  }

  /** Parses `info ramblock`. */
  async ramBlocks(): Promise<RamBlockInfo[]> {
    return parseRamBlocks(await this.hmp('info ramblock'));
  }

  /** Everything the guest wrote to the serial port so far. */
  serialLog(): string {
    try {
      return readFileSync(this.serialPath, 'latin1');
    } catch {
      return '';
    }
  }

  /** Number of complete guest passes reported on the serial port (pass characters in the log). */
  serialPasses(): number {
    let fd: number;
    try {
      fd = openSync(this.serialPath, 'r');
    } catch {
      return this.serialCount;
    }
    try {
      const size = statSync(this.serialPath).size;
      if (size < this.serialOffset) {
        this.serialOffset = 0;
        this.serialCount = 0;
      }
      const buf = Buffer.alloc(64 * 1024);
      const pass = GUEST_PASS_CHAR.charCodeAt(0);
      while (this.serialOffset < size) {
        const n = readSync(fd, buf, 0, Math.min(buf.length, size - this.serialOffset), this.serialOffset);
        if (n <= 0) break;
        for (let i = 0; i < n; i++) if (buf[i] === pass) this.serialCount++;
        this.serialOffset += n;
      }
    } finally {
      closeSync(fd);
    }
    return this.serialCount;
  }

  /** Waits until {@link serialPasses} reaches `n` (an absolute count); returns the count. */
  async waitSerialPasses(n: number, timeoutMs = 30_000): Promise<number> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const c = this.serialPasses();
      if (c >= n) return c;
      if (this.hasExited) throw new Error(`${this.name}: QEMU exited while waiting for ${n} serial passes (have ${c})`);
      if (Date.now() > deadline) {
        throw new Error(`${this.name}: only ${c} of ${n} serial passes after ${timeoutMs} ms`);
      }
      await sleep(20);
    }
  }

  /** Kills QEMU by PID (SIGKILL), waits for it to exit and removes its temp dir. Idempotent. */
  stop(): Promise<void> {
    if (!this.stopping) {
      this.stopping = (async () => {
        this.qmpClient?.close();
        if (!this.hasExited) {
          try {
            process.kill(this.pid, 'SIGKILL');
          } catch {
            /* already gone */
          }
          await this.exited;
        }
        live.delete(this);
        if (!process.env.QMT_KEEP_QEMU_DIRS) await rm(this.dir, { recursive: true, force: true });
      })();
    }
    return this.stopping;
  }
}

/** Parses the text of HMP `info ramblock`. */
/** The port QEMU bound for `migrate-incoming tcp:HOST:0`. */
export async function incomingPort(q: QemuProcess): Promise<number> {
  const info = await q.queryMigrate();
  const addrs = info['socket-address'] as Array<{ port?: string }> | undefined;
  const port = Number(addrs?.[0]?.port);
  if (!Number.isInteger(port) || port <= 0) throw new Error(`${q.name}: no incoming port in ${JSON.stringify(info)}`);
  return port;
}

export function parseRamBlocks(text: string): RamBlockInfo[] {
  const units: Record<string, number> = { B: 1, KiB: 1024, MiB: MiB, GiB: 1024 * MiB };
  const out: RamBlockInfo[] = [];
  for (const raw of text.split(/\r?\n/)) {
    const line = raw.trim();
    if (!line || line.startsWith('Block Name')) continue;
    const t = line.split(/\s+/);
    if (t.length < 8) continue;
    const ro = t[t.length - 1];
    const hva = t[t.length - 2];
    const total = t[t.length - 3];
    const used = t[t.length - 4];
    const offset = t[t.length - 5];
    const unit = t[t.length - 6];
    const psize = t[t.length - 7];
    const name = t.slice(0, t.length - 7).join(' ');
    if (!ro || !hva || !total || !used || !offset || !unit || !psize || !name) continue;
    const mult = units[unit];
    if (mult === undefined || !/^0x/.test(offset)) continue;
    out.push({
      name,
      pageSize: Number(psize) * mult,
      offset: Number(BigInt(offset)),
      usedLength: Number(BigInt(used)),
      maxLength: Number(BigInt(total)),
      readonly: ro === 'ro',
      hva: /^0x/.test(hva) ? Number(BigInt(hva)) : 0,
    });
  }
  return out;
}

/** Starts a QEMU (TCG, -nodefaults, no display) and connects QMP. */
export async function startQemu(opts: QemuOptions = {}): Promise<QemuProcess> {
  installCleanup();
  const machine = opts.machine ?? 'q35';
  const label = (opts.name ?? 'qemu').replace(/[^A-Za-z0-9_-]/g, '_');
  let image = opts.image;
  let guest: ResolvedGuestOptions | undefined;
  if (opts.guest) guest = resolveGuestOptions(opts.guest);
  if (!image && opts.guest) image = await buildGuest(opts.guest);

  const numa = opts.numaNodesMiB;
  if (numa && opts.memoryBackend) throw new Error('startQemu: numaNodesMiB and memoryBackend are exclusive');
  const memoryMiB = opts.memoryMiB ?? (numa ? numa.reduce((a, b) => a + b, 0) : 128);
  if (numa && Math.round(numa.reduce((a, b) => a + b, 0) * 1024) !== Math.round(memoryMiB * 1024)) {
    throw new Error('startQemu: memoryMiB must equal the sum of numaNodesMiB');
  }

  const dir = mkdtempSync(join(tmpdir(), `qmt-${label}-`));
  const args: string[] = [];
  let machineArg = machine;
  const numaBlocks: Array<{ name: string; gpa: number; size: number }> = [];
  if (opts.memoryBackend) {
    const mb = opts.memoryBackend;
    const id = mb.id ?? 'm0';
    if ((mb.type ?? 'ram') === 'file') {
      if (!mb.memPath) throw new Error('startQemu: memoryBackend type file needs memPath');
      args.push(
        '-object',
        `memory-backend-file,id=${id},size=${memoryMiB}M,mem-path=${mb.memPath},share=${mb.share ? 'on' : 'off'}`,
      );
    } else {
      args.push('-object', `memory-backend-ram,id=${id},size=${memoryMiB}M${mb.share ? ',share=on' : ''}`);
    }
    machineArg += `,memory-backend=${id}`;
  }
  if (numa) {
    let gpa = 0;
    numa.forEach((size, i) => {
      const id = `ram-node${i}`;
      args.push('-object', `memory-backend-ram,id=${id},size=${Math.round(size * 1024)}K`, '-numa', `node,nodeid=${i},memdev=${id}`);
      numaBlocks.push({ name: id, gpa, size: Math.round(size * MiB) });
      gpa += Math.round(size * MiB);
    });
  }
  args.unshift(
    '-name',
    `qmt-${label},debug-threads=on`,
    '-machine',
    machineArg,
    '-accel',
    'tcg',
    '-m',
    Number.isInteger(memoryMiB) ? String(memoryMiB) : `${Math.round(memoryMiB * 1024)}K`,
    '-nodefaults',
    '-no-user-config',
    '-display',
    'none',
    '-qmp',
    `unix:${join(dir, 'qmp.sock')},server=on,wait=off`,
    '-serial',
    `file:${join(dir, 'serial.log')}`,
  );
  if (image) args.push('-drive', `file=${image},format=raw,if=ide,file.locking=off`);
  if (opts.incoming) args.push('-incoming', 'defer');
  if (opts.paused) args.push('-S');
  if (opts.extraArgs) args.push(...opts.extraArgs);

  const errFd = openSync(join(dir, 'stderr.log'), 'a');
  const [cmd, cmdArgs] = haveSetpriv()
    ? ['setpriv', ['--pdeathsig', 'KILL', '--', QEMU_BINARY, ...args]]
    : [QEMU_BINARY, args];
  let child: ChildProcess;
  try {
    child = spawn(cmd, cmdArgs, { stdio: ['ignore', errFd, errFd] });
  } finally {
    closeSync(errFd);
  }
  if (child.pid === undefined) {
    const err = await new Promise<Error>((resolve) => child.once('error', resolve));
    rmSync(dir, { recursive: true, force: true });
    throw new Error(`cannot start ${QEMU_BINARY}: ${err.message}`);
  }
  child.on('error', () => {
    /* reported through exit */
  });
  const mainRamBlock = numa ? undefined : (opts.memoryBackend ? (opts.memoryBackend.id ?? 'm0') : 'pc.ram');
  const q = new QemuProcess({ name: label, child, dir, args, machine, memoryMiB, image, guest, numaBlocks, mainRamBlock });
  live.add(q);
  try {
    await q.connectQmp(opts.startTimeoutMs ?? 15_000);
  } catch (err) {
    await q.stop();
    throw err;
  }
  return q;
}

// ---------------------------------------------------------------------------
// Migration between two QEMUs
// ---------------------------------------------------------------------------

export interface MigrateBetweenOptions {
  /** URI the destination listens on (default `unix:<dst.dir>/migrate.sock`). */
  uri?: string;
  /** URI the source connects to (default: `uri`); e.g. a relay in between. */
  connectUri?: string;
  /** Capabilities set on both sides. */
  capabilities?: Record<string, boolean>;
  sourceCapabilities?: Record<string, boolean>;
  destinationCapabilities?: Record<string, boolean>;
  /** Parameters set on both sides. */
  parameters?: Record<string, unknown>;
  sourceParameters?: Record<string, unknown>;
  destinationParameters?: Record<string, unknown>;
  /** Start postcopy once source `ram.dirty-sync-count` >= this (e.g. 2 = after the first full pass). */
  postcopyAfterPasses?: number;
  /**
   * Let a precopy that cannot converge (e.g. `downtime-limit: 1`) converge once
   * source `ram.dirty-sync-count` >= this, by setting `convergeParameters` on
   * the source. Use it to force several passes over a running guest.
   */
  convergeAfterPasses?: number;
  /** Source parameters set at `convergeAfterPasses` (default `{ 'downtime-limit': 10000 }`). */
  convergeParameters?: Record<string, unknown>;
  /** Called after the destination listens and before the source starts (e.g. to start a relay). */
  beforeMigrate?: () => Promise<void> | void;
  /** Called once postcopy was requested. */
  onPostcopyStarted?: () => Promise<void> | void;
  /** Timeout for the whole migration (default 120 s). */
  timeoutMs?: number;
  /** Also wait for the destination to report `completed` (default true). */
  waitDestination?: boolean;
}

export interface MigrateBetweenResult {
  /** Source `query-migrate` at completion. */
  source: MigrationInfo;
  /** Destination `query-migrate` at completion (undefined if not waited for). */
  destination: MigrationInfo | undefined;
  /** Whether `migrate-start-postcopy` was issued and accepted. */
  postcopyStarted: boolean;
  /** Wall time from `migrate` to source completion. */
  durationMs: number;
}

/**
 * Migrates `src` to `dst` (which must have been started with `incoming: true`)
 * and waits for completion. On failure the error carries both sides' state.
 */
export async function migrateBetween(
  src: QemuProcess,
  dst: QemuProcess,
  opts: MigrateBetweenOptions = {},
): Promise<MigrateBetweenResult> {
  const uri = opts.uri ?? `unix:${join(dst.dir, 'migrate.sock')}`;
  const connectUri = opts.connectUri ?? uri;
  const timeoutMs = opts.timeoutMs ?? 120_000;
  const deadline = Date.now() + timeoutMs;
  await dst.setCapabilities({ ...opts.capabilities, ...opts.destinationCapabilities });
  await dst.setParameters({ ...opts.parameters, ...opts.destinationParameters });
  await src.setCapabilities({ ...opts.capabilities, ...opts.sourceCapabilities });
  await src.setParameters({ ...opts.parameters, ...opts.sourceParameters });
  await dst.migrateIncoming(uri);
  if (uri.startsWith('unix:')) await waitForPath(uri.slice(5), 5_000);
  await opts.beforeMigrate?.();
  const t0 = Date.now();
  let postcopyStarted = false;
  try {
    await src.migrate(connectUri);
    if (opts.convergeAfterPasses !== undefined && opts.postcopyAfterPasses === undefined) {
      for (;;) {
        const info = await src.queryMigrate();
        const st = info.status ?? 'none';
        if (MIGRATION_END_STATES.has(st)) break;
        if ((info.ram?.['dirty-sync-count'] ?? 0) >= opts.convergeAfterPasses) {
          await src.setParameters(opts.convergeParameters ?? { 'downtime-limit': 10_000 });
          break;
        }
        if (Date.now() > deadline) throw new Error('timed out waiting for dirty-sync-count before converging');
        await sleep(10);
      }
    }
    if (opts.postcopyAfterPasses !== undefined) {
      for (;;) {
        const info = await src.queryMigrate();
        const st = info.status ?? 'none';
        if (MIGRATION_END_STATES.has(st)) break;
        if (st === 'active' && (info.ram?.['dirty-sync-count'] ?? 0) >= opts.postcopyAfterPasses) {
          try {
            await src.startPostcopy();
            postcopyStarted = true;
            await opts.onPostcopyStarted?.();
          } catch (err) {
            // The migration may have completed in precopy just before the command.
            const again = await src.queryMigrate();
            if (!MIGRATION_END_STATES.has(again.status ?? '')) throw err;
          }
          break;
        }
        if (Date.now() > deadline) throw new Error('timed out waiting for dirty-sync-count before postcopy');
        await sleep(10);
      }
    }
    const source = await src.waitMigration(['completed'], Math.max(1, deadline - Date.now()));
    const durationMs = Date.now() - t0;
    const destination =
      opts.waitDestination === false ? undefined : await dst.waitMigration(['completed'], Math.max(1, deadline - Date.now()));
    return { source, destination, postcopyStarted, durationMs };
  } catch (err) {
    const s = await src.queryMigrate().catch(() => undefined);
    const d = await dst.queryMigrate().catch(() => undefined);
    throw new Error(
      `migrateBetween ${src.name} → ${dst.name} failed: ${(err as Error).message}\n` +
        `  source: ${s?.status} ${s?.['error-desc'] ?? ''}\n  destination: ${d?.status} ${d?.['error-desc'] ?? ''}\n` +
        `  source stderr: ${src.stderrTail(500)}\n  destination stderr: ${dst.stderrTail(500)}`,
      { cause: err },
    );
  }
}

async function waitForPath(path: string, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!existsSync(path)) {
    if (Date.now() > deadline) throw new Error(`${path} did not appear within ${timeoutMs} ms`);
    await sleep(5);
  }
}

// ---------------------------------------------------------------------------
// Guest memory helpers
// ---------------------------------------------------------------------------

export type GuestRamReadMethod = 'auto' | 'pmemsave' | 'procmem';

/** Guest-physical segments of RAM below the PCI hole, with their host addresses in the QEMU process. */
export async function guestRamSegments(q: QemuProcess): Promise<Array<{ gpa: number; size: number; hva: number; block: string }>> {
  const m = q.machine;
  // RAM-block offset == guest-physical address below this limit (the low-memory split).
  const limit = /^(q35|pc-q35)/.test(m) ? 0x8000_0000 : /^(pc|pc-i440fx)(-|$)/.test(m) ? 0xc000_0000 : 0;
  if (!limit) return [];
  const blocks = await q.ramBlocks();
  const byName = new Map(blocks.map((b) => [b.name, b]));
  const wanted = q.numaBlocks.length
    ? q.numaBlocks
    : q.mainRamBlock
      ? [{ name: q.mainRamBlock, gpa: 0, size: byName.get(q.mainRamBlock)?.usedLength ?? 0 }]
      : [];
  const out: Array<{ gpa: number; size: number; hva: number; block: string }> = [];
  for (const w of wanted) {
    const b = byName.get(w.name);
    if (!b || !b.hva || w.gpa >= limit) break;
    out.push({ gpa: w.gpa, size: Math.min(w.size, limit - w.gpa), hva: b.hva, block: w.name });
  }
  return out;
}

async function readViaProcMem(q: QemuProcess, size: number, addr: number): Promise<Buffer | undefined> {
  const segs = await guestRamSegments(q);
  const buf = Buffer.allocUnsafe(size);
  const fh = await open(`/proc/${q.pid}/mem`, 'r').catch(() => undefined);
  if (!fh) return undefined;
  try {
    let done = 0;
    while (done < size) {
      const gpa = addr + done;
      const seg = segs.find((s) => gpa >= s.gpa && gpa < s.gpa + s.size);
      if (!seg) return undefined;
      const n = Math.min(size - done, seg.gpa + seg.size - gpa, 64 * MiB);
      const { bytesRead } = await fh.read(buf, done, n, seg.hva + (gpa - seg.gpa));
      if (bytesRead <= 0) return undefined;
      done += bytesRead;
    }
    return buf;
  } catch {
    return undefined;
  } finally {
    await fh.close();
  }
}

/**
 * Reads guest memory [addr, addr+size) into a Buffer.
 *
 * 'procmem' reads the RAM blocks straight from /proc/PID/mem at the host
 * addresses `info ramblock` reports (fast: ~1 GiB/s; needs root or ptrace
 * rights; q35/pc RAM below the PCI hole, including NUMA node blocks). It
 * returns RAM-block contents, so 0xA0000-0xFFFFF shows the RAM underneath the
 * VGA/ROM window (what migration transfers) rather than what the guest sees.
 * 'pmemsave' goes through QEMU's pmemsave into a temp file (slow: ~6 s per
 * GiB; guest-physical view). 'auto' (default) tries procmem, then pmemsave.
 * Pause the VM first for a consistent snapshot; do not read a postcopy
 * destination before it completed (missing pages would block).
 */
export async function readGuestRam(
  q: QemuProcess,
  size: number,
  addr = 0,
  method: GuestRamReadMethod = 'auto',
): Promise<Buffer> {
  if (method !== 'pmemsave') {
    const buf = await readViaProcMem(q, size, addr);
    if (buf) return buf;
    if (method === 'procmem') throw new Error(`${q.name}: cannot read [${addr}, +${size}) through /proc/${q.pid}/mem`);
  }
  const path = join(q.dir, `pmem-${Date.now()}-${Math.random().toString(16).slice(2)}.bin`);
  try {
    await q.pmemsave(addr, size, path);
    return await readFile(path);
  } finally {
    await rm(path, { force: true });
  }
}

/** Guest-physical ranges that are not RAM on PC machines (VGA window, option ROMs, BIOS shadow). */
export const NON_RAM_RANGES: ReadonlyArray<readonly [number, number]> = [[0xa0000, 0x100000]];

export interface RamDiff {
  equal: boolean;
  /** Addresses of the first differing pages (up to `limit`). */
  pages: number[];
  /** Total number of differing pages. */
  count: number;
}

/**
 * Compares two guest memory dumps page by page, skipping 0xA0000–0xFFFFF (and
 * any extra `skip` ranges). A length difference counts as differing pages.
 */
export function compareGuestRam(
  a: Buffer,
  b: Buffer,
  opts: { limit?: number; skip?: ReadonlyArray<readonly [number, number]> } = {},
): RamDiff {
  const limit = opts.limit ?? 16;
  const skip = [...NON_RAM_RANGES, ...(opts.skip ?? [])];
  const len = Math.max(a.length, b.length);
  const pages: number[] = [];
  let count = 0;
  for (let off = 0; off < len; off += PAGE) {
    const end = Math.min(off + PAGE, len);
    if (skip.some(([s, e]) => off < e && end > s)) {
      // Compare only the parts of the page outside skipped ranges (ranges are page aligned in practice).
      continue;
    }
    let differs = end > a.length || end > b.length;
    if (!differs) differs = a.compare(b, off, end, off, end) !== 0;
    if (differs) {
      count++;
      if (pages.length < limit) pages.push(off);
    }
  }
  return { equal: count === 0, pages, count };
}

export interface InvariantRange {
  startMiB: number;
  endMiB: number;
  direction?: GuestDirection;
}

export interface InvariantResult {
  ok: boolean;
  /** Counter value at the beginning of the scan order. */
  n: number;
  /** Guest-physical address of the first page holding N−1 in scan order, or null if all pages hold N. */
  stepAt: number | null;
  detail: string;
}

/**
 * Checks the test guest's memory invariant on a dump that starts at
 * guest-physical address 0: walking the pages of the range in the guest's scan
 * order, the first byte of every page is N or N−1 (mod 256), all N first, then
 * (after at most one step down) all N−1. Holds for any consistent snapshot
 * (paused VM, or memory after a correct migration).
 */
export function checkGuestInvariant(mem: Buffer, range: InvariantRange): InvariantResult {
  const start = Math.round(range.startMiB * MiB);
  const end = Math.round(range.endMiB * MiB);
  const down = range.direction === 'down';
  if (mem.length < end) {
    return { ok: false, n: -1, stepAt: null, detail: `dump is ${mem.length} bytes, range ends at ${end}` };
  }
  const pages = (end - start) / PAGE;
  const at = (i: number): number => (down ? end - PAGE - i * PAGE : start + i * PAGE);
  const n = mem[at(0)] ?? 0;
  const nMinus1 = (n + 255) & 0xff;
  let stepAt: number | null = null;
  for (let i = 0; i < pages; i++) {
    const addr = at(i);
    const v = mem[addr] ?? 0;
    if (stepAt === null) {
      if (v === n) continue;
      if (v === nMinus1) {
        stepAt = addr;
        continue;
      }
      return {
        ok: false,
        n,
        stepAt,
        detail: `page 0x${addr.toString(16)} (#${i} in scan order) holds ${v}, expected ${n} or ${nMinus1}`,
      };
    }
    if (v !== nMinus1) {
      return {
        ok: false,
        n,
        stepAt,
        detail: `page 0x${addr.toString(16)} (#${i} in scan order) holds ${v} after the step down at 0x${stepAt.toString(16)}, expected ${nMinus1}`,
      };
    }
  }
  return {
    ok: true,
    n,
    stepAt,
    detail:
      stepAt === null
        ? `all ${pages} pages hold ${n}`
        : `pages hold ${n} up to 0x${stepAt.toString(16)} (exclusive), then ${nMinus1}`,
  };
}

/**
 * The seed guest's read region (guest.S RDEND): every page's first dword
 * holds the page's address, as the guest wrote it once at start. A page that
 * does not was lost, or came from somewhere else.
 */
export function checkReadRegion(mem: Buffer, start: number, end: number): { ok: boolean; pages: number; detail: string } {
  if (mem.length < end) return { ok: false, pages: 0, detail: `dump is ${mem.length} bytes, the read region ends at ${end}` };
  for (let a = start; a < end; a += PAGE) {
    const v = mem.readUInt32LE(a);
    if (v !== a) return { ok: false, pages: (a - start) / PAGE, detail: `read page 0x${a.toString(16)} holds 0x${v.toString(16)}` };
  }
  return { ok: true, pages: (end - start) / PAGE, detail: `all ${(end - start) / PAGE} read pages hold their address` };
}

/** Convenience: the invariant range of a QEMU started with `guest`. */
export function guestRangeOf(q: QemuProcess): InvariantRange {
  if (!q.guest) throw new Error(`${q.name}: not started with the test guest`);
  return { startMiB: q.guest.startMiB, endMiB: q.guest.endMiB, direction: q.guest.direction };
}

/** Bytes to dump from guest-physical 0 to cover all RAM below 2 GiB and the guest's range. */
export function dumpSizeFor(q: QemuProcess): number {
  const end = q.guest ? q.guest.end : 0;
  return Math.max(end, Math.min(Math.round(q.memoryMiB * MiB), 0x8000_0000));
}

/** Re-export for tests that want the raw guest option resolution. */
export { buildGuest, resolveGuestOptions, type GuestOptions, type ResolvedGuestOptions, type GuestDirection };
