import { open } from 'node:fs/promises';
import { Option, type Command } from 'commander';
import { MultifdChannelCounter, multifdTotals, type MultifdChannelCounts, type MultifdTotals } from '../protocol/tap/multifd.js';
import { fileReader, readMappedRamBlocks } from '../protocol/mapped-ram-file.js';
import { MULTIFD_MAGIC } from '../stream/multifd.js';
import type { KnownBlock } from '../stream/ram.js';
import { StreamSummary, type StreamSummaryReport } from '../stream/summary.js';
import type { StreamRecord } from '../stream/records.js';
import { decodeDeviceState, deviceStateToJson, parseVmDescription, type VmDescription } from '../stream/vmdesc.js';
import { checkInputFile } from './args.js';
import { CliError } from './errors.js';
import { fileProgress, PROGRESS_MODES, type ProgressMode } from './file-progress.js';
import { decodeFile } from './load-stream.js';
import { readChunks } from './read-file.js';
import { run } from './run.js';

export interface InspectOptions {
  devices?: boolean;
  /** Called after each chunk read (a progress display). */
  onProgress?: (bytesRead: number) => void;
  /** Aborting stops the decode. */
  signal?: AbortSignal;
}

/** What a mapped-ram file holds per RAM block (from its header and bitmap). */
export interface MappedRamBlockReport {
  idstr: string;
  length: number;
  bitmapOffset: number;
  pagesOffset: number;
  /** Pages in the file (bit set); the others are zero. */
  present: number;
  pages: number;
}

export interface InspectReport extends StreamSummaryReport {
  file: string;
  /**
   * A mapped-ram file (QEMU's saved-VM format): its blocks' layout and pages.
   * `pages` then counts the pages in the file (normal) and those not (zero):
   * QEMU's `ram.normal`/`ram.duplicate` of a save in one pass (a stopped
   * guest); a running guest's save rewrites pages in place and QEMU counts
   * every write. Passes leave no trace in such a file (`passes` is empty).
   */
  mappedRam?: MappedRamBlockReport[];
  /** Decoded device fields, by "idstr/instance", with --devices. */
  deviceFields?: Record<string, unknown>;
}

/** What `qmt inspect` reports for a captured multifd channel (one connection's bytes, source → destination). */
export interface MultifdInspectReport extends MultifdChannelCounts {
  kind: 'multifd-channel';
  file: string;
  /** Bytes decoded: the whole file (a file that ends inside a packet is an error). */
  bytes: number;
}

/** Does the file begin with the multifd magic 0x11223344 (a multifd channel rather than a main stream)? */
export async function isMultifdFile(path: string): Promise<boolean> {
  const fh = await open(path, 'r');
  try {
    const b = Buffer.alloc(4);
    const { bytesRead } = await fh.read(b, 0, 4, 0);
    return bytesRead === 4 && b.readUInt32BE(0) === MULTIFD_MAGIC;
  } finally {
    await fh.close();
  }
}

/**
 * Decodes a captured multifd channel (init message, then packets) and counts
 * it. `blocks` (the main stream's block list) bound the pages' offsets. A bad
 * or truncated channel throws the codec's StreamError (code and offset).
 */
export async function inspectMultifdFile(path: string, opts: { blocks?: readonly KnownBlock[]; onProgress?: (bytesRead: number) => void; signal?: AbortSignal } = {}): Promise<MultifdInspectReport> {
  const counter = new MultifdChannelCounter(opts.blocks ? { blocks: opts.blocks } : {});
  let read = 0;
  for await (const chunk of readChunks(path)) {
    opts.signal?.throwIfAborted();
    const e = counter.push(chunk);
    if (e) throw e;
    read += chunk.length;
    opts.onProgress?.(read);
  }
  const e = counter.end();
  if (e) throw e;
  return { kind: 'multifd-channel', file: path, bytes: read, ...counter.counts() };
}

/** Decodes a captured stream and summarises it (what `qmt inspect` prints). */
export async function inspectFile(path: string, opts: InspectOptions = {}): Promise<InspectReport> {
  const summary = new StreamSummary();
  const payloads: { idstr: string; instanceId: number; data: Uint8Array }[] = [];
  let vmdescJson: Uint8Array | undefined;
  const { decoder, desc: ahead } = await decodeFile(path, (records: StreamRecord[], offset: number) => {
    summary.add(records, offset);
    if (!opts.devices) return;
    for (const r of records) {
      if (r.type === 'device-state' && r.kind === 'full') payloads.push({ idstr: r.idstr, instanceId: r.instanceId, data: r.data });
      if (r.type === 'vmdesc') vmdescJson = r.json;
    }
  }, { mappedRam: true, ...(opts.onProgress ? { onProgress: opts.onProgress } : {}), ...(opts.signal ? { signal: opts.signal } : {}) });
  const report: InspectReport = { file: path, ...summary.report };
  if (decoder.ramFormat.mappedRam) await addMappedRamPages(path, report);
  if (opts.devices) {
    const desc: VmDescription | undefined = ahead ?? (vmdescJson ? parseVmDescription(vmdescJson) : undefined);
    report.deviceFields = {};
    for (const p of payloads) {
      const d = desc?.devices.find((x) => x.name === p.idstr && x.instanceId === p.instanceId);
      report.deviceFields[`${p.idstr}/${p.instanceId}`] = d ? deviceStateToJson(decodeDeviceState(d, p.data)) : { raw: Buffer.from(p.data).toString('hex') };
    }
  }
  return report;
}

/** A mapped-ram file's pages are not records: they are counted from each block's bitmap. */
async function addMappedRamPages(path: string, report: InspectReport): Promise<void> {
  const fh = await open(path, 'r');
  try {
    const blocks = await readMappedRamBlocks(await fileReader(fh), report.ramBlocks);
    report.mappedRam = blocks.map((b) => ({ idstr: b.idstr, length: b.length, bitmapOffset: b.header.bitmapOffset, pagesOffset: b.header.pagesOffset, present: b.present.count(), pages: b.present.pages }));
    const normal = report.mappedRam.reduce((n, b) => n + b.present, 0);
    report.pages = { normal, zero: report.mappedRam.reduce((n, b) => n + b.pages, 0) - normal, xbzrle: 0 };
  } finally {
    await fh.close();
  }
}

const MiB = 1024 * 1024;
function size(n: number): string {
  return n >= MiB ? `${(n / MiB).toFixed(n % MiB === 0 ? 0 : 2)} MiB` : n >= 1024 ? `${(n / 1024).toFixed(n % 1024 === 0 ? 0 : 1)} KiB` : `${n} B`;
}

/** The human-readable form of a multifd channel's report. */
export function formatMultifdInspectReport(r: MultifdInspectReport): string {
  const lines = [`${r.file}: multifd channel ${r.id ?? '?'}, ${r.bytes} bytes, ${r.packets} packets (${r.syncs} SYNC)`];
  lines.push(`pages: ${r.pages.normal} normal, ${r.pages.zero} zero`);
  for (const [block, p] of Object.entries(r.blocks)) lines.push(`  ${block.padEnd(24)} ${p.normal} normal, ${p.zero} zero`);
  return lines.join('\n');
}

/** The sum over the multifd channels of an inspect run, as text. */
export function formatMultifdTotals(t: MultifdTotals): string {
  return `multifd total: ${t.channels} channels, ${t.packets} packets (${t.syncs} SYNC), pages ${t.pages.normal} normal, ${t.pages.zero} zero, ${t.multifdBytes} bytes`;
}

/** The human-readable form of a report. */
export function formatInspectReport(r: InspectReport): string {
  const lines: string[] = [];
  lines.push(`${r.file}: ${r.bytes} bytes, stream version ${r.version ?? '?'}, machine ${r.machineType ?? '(no configuration)'}`);
  if (r.capabilities?.length) lines.push(`capabilities: ${r.capabilities.join(', ')}`);
  lines.push(`sections: ${r.sections.start} START, ${r.sections.part} PART, ${r.sections.end} END, ${r.sections.full} FULL`);
  lines.push('RAM blocks:');
  for (const b of r.ramBlocks) {
    lines.push(`  ${b.idstr.padEnd(24)} ${size(b.length).padStart(10)}${b.pageSize ? `  page size ${size(b.pageSize)}` : ''}${b.gpa !== undefined ? `  gpa 0x${b.gpa.toString(16)}` : ''}`);
  }
  if (r.mappedRam) {
    lines.push(`mapped-ram: pages at fixed offsets, ${r.pages.normal} in the file, ${r.pages.zero} zero (not written)`);
    for (const b of r.mappedRam) lines.push(`  ${b.idstr.padEnd(24)} ${String(b.present).padStart(7)} of ${String(b.pages).padEnd(7)} pages at 0x${b.pagesOffset.toString(16)}, bitmap at 0x${b.bitmapOffset.toString(16)}`);
  } else lines.push(`pages: ${r.pages.normal} PAGE, ${r.pages.zero} ZERO, ${r.pages.xbzrle} XBZRLE`);
  for (const p of r.passes) lines.push(`  pass ${p.pass}: ${p.normal} PAGE, ${p.zero} ZERO, ${p.xbzrle} XBZRLE`);
  if (r.commands.length > 0) {
    lines.push('commands:');
    for (const c of r.commands) lines.push(`  ${formatCommand(c)}`);
  }
  lines.push(`devices (${r.devices.length}):`);
  for (const d of r.devices) {
    lines.push(`  ${String(d.sectionId).padStart(3)} ${`${d.idstr}`.padEnd(28)} inst ${d.instanceId} v${d.versionId} ${d.kind.toUpperCase().padEnd(5)} ${String(d.size).padStart(7)} bytes${d.packaged ? ' (packaged)' : ''}`);
  }
  lines.push(`end: ${r.eof ? 'EOF' : 'no EOF'}${r.vmdescBytes !== undefined ? `, VM description ${r.vmdescBytes} bytes` : ', no VM description'}`);
  if (r.deviceFields) {
    lines.push('device fields:');
    lines.push(JSON.stringify(r.deviceFields, null, 2));
  }
  return lines.join('\n');
}

function formatCommand(c: InspectReport['commands'][number]): string {
  switch (c.cmd) {
    case 'ping':
      return `PING ${c.value}`;
    case 'postcopy-advise':
      return `POSTCOPY_ADVISE page sizes 0x${c.pageSizeSummary.toString(16)}, target page 0x${c.targetPageSize.toString(16)}`;
    case 'postcopy-ram-discard':
      return `POSTCOPY_RAM_DISCARD "${c.block}" ${c.ranges.map((x) => `[0x${x.start.toString(16)}, +0x${x.length.toString(16)})`).join(' ')}`;
    case 'packaged':
      return `PACKAGED ${c.length} bytes`;
    case 'recv-bitmap':
      return `RECV_BITMAP "${c.block}"`;
    default:
      return c.cmd.toUpperCase().replace(/-/g, '_');
  }
}

/** The fields of `qmt inspect --json` after the envelope (README "JSON output"), for a main stream. */
export interface InspectJson {
  kind: 'stream';
  file: string;
  /** Bytes decoded (the whole file when it ends with EOF). */
  bytes: number;
  /** The stream's own version (QEMU_VM_FILE_VERSION, 3). */
  streamVersion: number | null;
  machineType: string | null;
  capabilities: readonly string[];
  ramBlocks: { idstr: string; lengthBytes: number; pageSizeBytes: number | null; gpa: string | null }[];
  sections: StreamSummaryReport['sections'];
  pages: StreamSummaryReport['pages'];
  passes: StreamSummaryReport['passes'];
  /** The commands in order; `packaged` carries `lengthBytes`, a discard its ranges as `startBytes`/`lengthBytes`. */
  commands: Record<string, unknown>[];
  devices: { sectionId: number; idstr: string; instanceId: number; versionId: number; kind: string; sizeBytes: number; packaged: boolean }[];
  eof: boolean;
  vmdescBytes: number | null;
  /** A mapped-ram file: per block its bitmap and pages offsets and the pages present (`pages` counts them); null for a stream. */
  mappedRam: { idstr: string; lengthBytes: number; bitmapOffset: number; pagesOffset: number; present: number; pages: number }[] | null;
  deviceFields?: Record<string, unknown>;
}

function commandJson(c: InspectReport['commands'][number]): Record<string, unknown> {
  switch (c.cmd) {
    case 'packaged':
      return { cmd: c.cmd, lengthBytes: c.length };
    case 'postcopy-advise':
      return { cmd: c.cmd, pageSizeSummary: c.pageSizeSummary.toString(), targetPageSizeBytes: Number(c.targetPageSize) };
    case 'postcopy-ram-discard':
      return { cmd: c.cmd, block: c.block, ranges: c.ranges.map((r) => ({ startBytes: r.start, lengthBytes: r.length })) };
    default:
      return { ...c };
  }
}

export function inspectJson(r: InspectReport): InspectJson {
  return {
    kind: 'stream',
    file: r.file,
    bytes: r.bytes,
    streamVersion: r.version ?? null,
    machineType: r.machineType ?? null,
    capabilities: r.capabilities ?? [],
    ramBlocks: r.ramBlocks.map((b) => ({ idstr: b.idstr, lengthBytes: b.length, pageSizeBytes: b.pageSize ?? null, gpa: b.gpa === undefined ? null : b.gpa.toString() })),
    sections: r.sections,
    pages: r.pages,
    passes: r.passes,
    commands: r.commands.map(commandJson),
    devices: r.devices.map((d) => ({ sectionId: d.sectionId, idstr: d.idstr, instanceId: d.instanceId, versionId: d.versionId, kind: d.kind, sizeBytes: d.size, packaged: d.packaged })),
    eof: r.eof,
    vmdescBytes: r.vmdescBytes ?? null,
    mappedRam: r.mappedRam ? r.mappedRam.map((b) => ({ idstr: b.idstr, lengthBytes: b.length, bitmapOffset: b.bitmapOffset, pagesOffset: b.pagesOffset, present: b.present, pages: b.pages })) : null,
    ...(r.deviceFields ? { deviceFields: r.deviceFields } : {}),
  };
}

/** A decode error of FILE as the CLI prints it: the code, and the file and offset in the message. */
export function inFile(file: string, e: unknown): unknown {
  const x = e as { code?: unknown; offset?: unknown; message?: unknown } | null;
  if (typeof x?.code !== 'string' || typeof x.offset !== 'number' || typeof x.message !== 'string') return e;
  return new CliError(x.code, `${file} at offset ${x.offset}: ${x.message}`, { cause: e });
}

/** `qmt inspect --json` of a multifd channel file. */
export type MultifdInspectJson = MultifdInspectReport;

/** `qmt inspect --json` with several files: each file's report, and the sum over the multifd channels among them. */
export interface InspectManyJson {
  files: (InspectJson | MultifdInspectJson)[];
  multifd: MultifdTotals | null;
}

/**
 * Inspects several captured files (a session's main channel and its multifd
 * channels, say): main streams first, so that their block list bounds the
 * channels' pages; the reports in the order given. `multifd`: every file is a
 * multifd channel (else each is recognised by its first 4 bytes).
 */
export async function inspectFiles(
  files: readonly string[],
  opts: InspectOptions & { multifd?: boolean } = {},
): Promise<{ reports: (InspectReport | MultifdInspectReport)[]; multifd: MultifdTotals | null }> {
  const kinds = await Promise.all(files.map(async (f) => (opts.multifd || (await isMultifdFile(f)) ? 'multifd' : 'stream')));
  const reports: (InspectReport | MultifdInspectReport | undefined)[] = new Array(files.length);
  let done = 0;
  const progress = opts.onProgress ? (n: number) => opts.onProgress!(done + n) : undefined;
  let blocks: KnownBlock[] | undefined;
  const withFile = async <T extends { bytes: number }>(file: string, f: () => Promise<T>): Promise<T> => {
    try {
      const r = await f();
      done += r.bytes;
      return r;
    } catch (e) {
      throw inFile(file, e);
    }
  };
  for (const [i, file] of files.entries()) {
    if (kinds[i] !== 'stream') continue;
    const r = await withFile(file, () => inspectFile(file, { ...opts, ...(progress ? { onProgress: progress } : {}) }));
    if (r.ramBlocks.length > 0) blocks = r.ramBlocks.map((b, index) => ({ idstr: b.idstr, length: b.length, index }));
    reports[i] = r;
  }
  for (const [i, file] of files.entries()) {
    if (kinds[i] !== 'multifd') continue;
    reports[i] = await withFile(file, () =>
      inspectMultifdFile(file, { ...(blocks ? { blocks } : {}), ...(progress ? { onProgress: progress } : {}), ...(opts.signal ? { signal: opts.signal } : {}) }),
    );
  }
  const all = reports as (InspectReport | MultifdInspectReport)[];
  const channels = all.filter((r): r is MultifdInspectReport => 'kind' in r && r.kind === 'multifd-channel');
  return { reports: all, multifd: channels.length > 0 ? multifdTotals(channels) : null };
}

function isMultifdReport(r: InspectReport | MultifdInspectReport): r is MultifdInspectReport {
  return 'kind' in r && r.kind === 'multifd-channel';
}

/** Adds `qmt inspect FILE... [--json] [--devices] [--multifd] [--progress MODE]`. */
export function registerInspectCommand(program: Command): Command {
  return program
    .command('inspect')
    .description('decode captured migration streams (a main channel, multifd channels) and summarise them')
    .argument('<file...>', 'a stream written by QEMU (migrate "file:...") or by qmt, or captured channels (qmt tap --capture)')
    .option('--json', 'print a machine-readable report')
    .option('--devices', 'decode device state into named fields (needs the VM description)')
    .option('--multifd', 'decode every file as a multifd channel (default: a file starting with 11 22 33 44 is one)')
    .addOption(new Option('--progress <mode>', 'progress on stderr (auto: a bar on a TTY for files of 64 MiB or more)').choices([...PROGRESS_MODES]).default('auto'))
    .action(
      run('inspect', async (ctx, files: string[], opts: { json?: boolean; devices?: boolean; multifd?: boolean; progress: ProgressMode }) => {
        let size = 0;
        for (const file of files) size += await checkInputFile(file, files.length > 1 ? 'a stream to inspect' : 'the stream to inspect');
        const bar = fileProgress(opts.progress, size, 'inspect');
        let out: Awaited<ReturnType<typeof inspectFiles>>;
        try {
          out = await inspectFiles(files, { ...(opts.devices ? { devices: true } : {}), ...(opts.multifd ? { multifd: true } : {}), onProgress: (n) => bar.update(n), signal: ctx.signal });
        } catch (e) {
          return { ok: false, error: e };
        } finally {
          bar.stop();
        }
        const text = (r: InspectReport | MultifdInspectReport): string => (isMultifdReport(r) ? formatMultifdInspectReport(r) : formatInspectReport(r));
        const json = (r: InspectReport | MultifdInspectReport): InspectJson | MultifdInspectJson => (isMultifdReport(r) ? r : inspectJson(r));
        if (!ctx.json) {
          const parts = out.reports.map(text);
          if (files.length > 1 && out.multifd) parts.push(formatMultifdTotals(out.multifd));
          ctx.stdout.write(`${parts.join('\n\n')}\n`);
        }
        // One file: its report as the JSON body (as before multifd); several: a list and the multifd sum.
        if (files.length === 1) return { ok: true, json: json(out.reports[0]!) };
        const many: InspectManyJson = { files: out.reports.map(json), multifd: out.multifd };
        return { ok: true, json: many };
      }),
    );
}
