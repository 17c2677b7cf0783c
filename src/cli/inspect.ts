import { Option, type Command } from 'commander';
import { StreamSummary, type StreamSummaryReport } from '../stream/summary.js';
import type { StreamRecord } from '../stream/records.js';
import { decodeDeviceState, deviceStateToJson, parseVmDescription, type VmDescription } from '../stream/vmdesc.js';
import { checkInputFile } from './args.js';
import { CliError } from './errors.js';
import { fileProgress, PROGRESS_MODES, type ProgressMode } from './file-progress.js';
import { decodeFile } from './load-stream.js';
import { run } from './run.js';

export interface InspectOptions {
  devices?: boolean;
  /** Called after each chunk read (a progress display). */
  onProgress?: (bytesRead: number) => void;
  /** Aborting stops the decode. */
  signal?: AbortSignal;
}

export interface InspectReport extends StreamSummaryReport {
  file: string;
  /** Decoded device fields, by "idstr/instance", with --devices. */
  deviceFields?: Record<string, unknown>;
}

/** Decodes a captured stream and summarises it (what `qmt inspect` prints). */
export async function inspectFile(path: string, opts: InspectOptions = {}): Promise<InspectReport> {
  const summary = new StreamSummary();
  const payloads: { idstr: string; instanceId: number; data: Uint8Array }[] = [];
  let vmdescJson: Uint8Array | undefined;
  const { desc: ahead } = await decodeFile(path, (records: StreamRecord[], offset: number) => {
    summary.add(records, offset);
    if (!opts.devices) return;
    for (const r of records) {
      if (r.type === 'device-state' && r.kind === 'full') payloads.push({ idstr: r.idstr, instanceId: r.instanceId, data: r.data });
      if (r.type === 'vmdesc') vmdescJson = r.json;
    }
  }, { ...(opts.onProgress ? { onProgress: opts.onProgress } : {}), ...(opts.signal ? { signal: opts.signal } : {}) });
  const report: InspectReport = { file: path, ...summary.report };
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

const MiB = 1024 * 1024;
function size(n: number): string {
  return n >= MiB ? `${(n / MiB).toFixed(n % MiB === 0 ? 0 : 2)} MiB` : n >= 1024 ? `${(n / 1024).toFixed(n % 1024 === 0 ? 0 : 1)} KiB` : `${n} B`;
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
  lines.push(`pages: ${r.pages.normal} PAGE, ${r.pages.zero} ZERO, ${r.pages.xbzrle} XBZRLE`);
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

/** The fields of `qmt inspect --json` after the envelope (README "JSON output"). */
export interface InspectJson {
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
    ...(r.deviceFields ? { deviceFields: r.deviceFields } : {}),
  };
}

/** A decode error of FILE as the CLI prints it: the code, and the file and offset in the message. */
export function inFile(file: string, e: unknown): unknown {
  const x = e as { code?: unknown; offset?: unknown; message?: unknown } | null;
  if (typeof x?.code !== 'string' || typeof x.offset !== 'number' || typeof x.message !== 'string') return e;
  return new CliError(x.code, `${file} at offset ${x.offset}: ${x.message}`, { cause: e });
}

/** Adds `qmt inspect FILE [--json] [--devices] [--progress MODE]`. */
export function registerInspectCommand(program: Command): Command {
  return program
    .command('inspect')
    .description('decode a captured migration stream and summarise it')
    .argument('<file>', 'a stream written by QEMU (migrate "file:...") or by qmt')
    .option('--json', 'print a machine-readable report')
    .option('--devices', 'decode device state into named fields (needs the VM description)')
    .addOption(new Option('--progress <mode>', 'progress on stderr (auto: a bar on a TTY for files of 64 MiB or more)').choices([...PROGRESS_MODES]).default('auto'))
    .action(
      run('inspect', async (ctx, file: string, opts: { json?: boolean; devices?: boolean; progress: ProgressMode }) => {
        const size = await checkInputFile(file, 'the stream to inspect');
        const bar = fileProgress(opts.progress, size, 'inspect');
        let r: InspectReport;
        try {
          r = await inspectFile(file, { ...(opts.devices ? { devices: true } : {}), onProgress: (n) => bar.update(n), signal: ctx.signal });
        } catch (e) {
          return { ok: false, error: inFile(file, e) };
        } finally {
          bar.stop();
        }
        if (!ctx.json) ctx.stdout.write(`${formatInspectReport(r)}\n`);
        return { ok: true, json: inspectJson(r) };
      }),
    );
}
