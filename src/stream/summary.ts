import type { MigrationCommand, RamBlockInfo, StreamRecord } from './records.js';

/** Page counts of one pass over RAM. */
export interface PassCounts {
  pass: number;
  /** PAGE records (QEMU's `ram.normal`). */
  normal: number;
  /** ZERO records (QEMU's `ram.duplicate`). */
  zero: number;
  /** XBZRLE records (QEMU's `xbzrle-cache.pages`). */
  xbzrle: number;
}

export interface DeviceSummary {
  sectionId: number;
  idstr: string;
  instanceId: number;
  versionId: number;
  kind: string;
  size: number;
  /** Whether it travelled inside the postcopy package. */
  packaged: boolean;
}

export type CommandSummary = MigrationCommand;

export interface StreamSummaryReport {
  bytes: number;
  version?: number;
  machineType?: string;
  capabilities?: readonly string[];
  ramBlocks: RamBlockInfo[];
  sections: { start: number; part: number; end: number; full: number };
  pages: { normal: number; zero: number; xbzrle: number };
  passes: PassCounts[];
  commands: CommandSummary[];
  devices: DeviceSummary[];
  eof: boolean;
  vmdescBytes?: number;
}

/**
 * Folds decoded records into what `qmt inspect` reports. Passes are not on
 * the wire: QEMU's scan continues where the previous PART stopped and a new
 * pass starts when it wraps around RAM, so a page at or before the previous
 * page's position (in block-list order) opens a new pass.
 */
export class StreamSummary {
  private readonly r: StreamSummaryReport = {
    bytes: 0,
    ramBlocks: [],
    sections: { start: 0, part: 0, end: 0, full: 0 },
    pages: { normal: 0, zero: 0, xbzrle: 0 },
    passes: [],
    commands: [],
    devices: [],
    eof: false,
  };
  private blockIndex = new Map<string, { index: number; base: number }>();
  private lastPos = -1;
  private inPackage = false;

  /** Adds the records decoded from the bytes up to `offset`. */
  add(records: readonly StreamRecord[], offset: number): void {
    for (const rec of records) this.addOne(rec);
    this.r.bytes = offset;
  }

  private pass(): PassCounts {
    let p = this.r.passes[this.r.passes.length - 1];
    if (!p) {
      p = { pass: 1, normal: 0, zero: 0, xbzrle: 0 };
      this.r.passes.push(p);
    }
    return p;
  }

  private page(block: string, offset: number): PassCounts {
    const b = this.blockIndex.get(block);
    const pos = b ? b.base + offset : -1;
    let p = this.pass();
    if (pos >= 0 && pos <= this.lastPos) {
      p = { pass: p.pass + 1, normal: 0, zero: 0, xbzrle: 0 };
      this.r.passes.push(p);
    }
    this.lastPos = pos;
    return p;
  }

  private addOne(rec: StreamRecord): void {
    const r = this.r;
    switch (rec.type) {
      case 'header':
        r.version = rec.version;
        return;
      case 'configuration':
        r.machineType = rec.machineType;
        if (rec.capabilities) r.capabilities = rec.capabilities;
        return;
      case 'section':
        r.sections[rec.kind]++;
        return;
      case 'ram-blocks': {
        r.ramBlocks = [...rec.blocks];
        let base = 0;
        this.blockIndex = new Map();
        rec.blocks.forEach((b, index) => {
          this.blockIndex.set(b.idstr, { index, base });
          base += b.length;
        });
        return;
      }
      case 'ram-page':
        r.pages.normal++;
        this.page(rec.block, rec.offset).normal++;
        return;
      case 'ram-zero':
        r.pages.zero++;
        this.page(rec.block, rec.offset).zero++;
        return;
      case 'ram-xbzrle':
        r.pages.xbzrle++;
        this.page(rec.block, rec.offset).xbzrle++;
        return;
      case 'device-state':
        r.devices.push({
          sectionId: rec.sectionId,
          idstr: rec.idstr,
          instanceId: rec.instanceId,
          versionId: rec.versionId,
          kind: rec.kind,
          size: rec.data.length,
          packaged: this.inPackage,
        });
        return;
      case 'command':
        r.commands.push(rec.command);
        if (rec.command.cmd === 'packaged') this.inPackage = true;
        return;
      case 'package-end':
        this.inPackage = false;
        return;
      case 'eof':
        r.eof = true;
        return;
      case 'vmdesc':
        r.vmdescBytes = rec.json.length;
        return;
      default:
        return;
    }
  }

  get report(): StreamSummaryReport {
    return this.r;
  }
}
