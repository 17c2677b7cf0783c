import { StreamSummary, type StreamSummaryReport } from '../stream/summary.js';
import type { StreamRecord } from '../stream/records.js';
import { decodeDeviceState, deviceStateToJson, parseVmDescription, type VmDescription } from '../stream/vmdesc.js';
import { decodeFile } from './load-stream.js';

export interface InspectOptions {
  json?: boolean;
  devices?: boolean;
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
  });
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

/** JSON.stringify that writes bigints as decimal strings. */
export function toJson(v: unknown): string {
  return JSON.stringify(v, (_k, x: unknown) => (typeof x === 'bigint' ? x.toString() : x instanceof Uint8Array ? Buffer.from(x).toString('hex') : x), 2);
}
