import { FILE_MAGIC, RecordType, ConfigSubsection } from './constants.js';
import { ByteWriter } from './byte-writer.js';
import { writeCommand } from './commands.js';
import { RamRecordWriter, type KnownBlock, type RamFormat } from './ram.js';
import type { ConfigurationRecord, PreemptRecord, RamBlockInfo, SectionHeaderRecord, StreamRecord } from './records.js';

export interface StreamEncoderOptions {
  /**
   * When to set RAM_SAVE_FLAG_CONTINUE: 'auto' (default, as QEMU: same block as
   * the previous page on this channel), 'never' (always name the block), or
   * 'as-recorded' (follow each record's `continued`, for byte-exact re-encoding).
   */
  readonly continueMode?: 'auto' | 'never' | 'as-recorded';
  /** Size of the slab that holds small fields (default 64 KiB). */
  readonly slabSize?: number;
  /**
   * The channel's RAM blocks, against which writePages checks its arguments,
   * for a channel that does not write the block list itself: the preempt
   * channel (pass the main encoder's `blocks`, a live view) or the main
   * channel of a postcopy recovery. A block list written later replaces it.
   */
  readonly blocks?: ReadonlyMap<string, KnownBlock> | readonly Pick<RamBlockInfo, 'idstr' | 'length'>[];
}

/** The block map of `opts.blocks`: a map is shared as it is (it may still be filled), a list indexed. */
function blocksOf(opts: StreamEncoderOptions): ReadonlyMap<string, KnownBlock> {
  const b = opts.blocks;
  if (b === undefined) return new Map();
  if (b instanceof Map) return b as ReadonlyMap<string, KnownBlock>;
  return indexBlocks(b as readonly Pick<RamBlockInfo, 'idstr' | 'length'>[]);
}

function indexBlocks(list: readonly Pick<RamBlockInfo, 'idstr' | 'length'>[]): Map<string, KnownBlock> {
  const m = new Map<string, KnownBlock>();
  list.forEach((b, index) => m.set(b.idstr, { idstr: b.idstr, length: b.length, index }));
  return m;
}

/** The result of writePages: how many pages went as PAGE (`normal`) and as ZERO. */
export interface WritePagesResult {
  readonly normal: number;
  readonly zero: number;
}

/**
 * Writes main-channel records. Small fields go into a slab, page payloads and
 * device state are appended by reference: `take()` returns the pieces for one
 * corked write (or writev), and no page is ever copied into a header buffer.
 *
 * A PACKAGED command's length is computed here: records written after a
 * `packaged` command are collected until `package-end` and sent behind the
 * command with their real length (the record's own `length` is ignored).
 */
export class StreamEncoder {
  private w: ByteWriter;
  private readonly ram: RamRecordWriter;
  /** RAM format in force (what the block list carries), learned from the records written. */
  readonly format: RamFormat = { ignoreShared: false, postcopyAdvised: false };
  private outer: ByteWriter | undefined;
  private readonly slabSize: number;
  private known: Map<string, KnownBlock>;

  constructor(opts: StreamEncoderOptions = {}) {
    this.slabSize = opts.slabSize ?? 64 * 1024;
    this.w = new ByteWriter(this.slabSize);
    this.ram = new RamRecordWriter(opts.continueMode ?? 'auto');
    // Our own map (filled in place when the block list is written), so that a
    // PreemptEncoder given `blocks` sees the list written later.
    this.known = new Map(blocksOf(opts));
  }

  /** The RAM blocks of the block list written on this channel (or given as `blocks`): a live view. */
  get blocks(): ReadonlyMap<string, KnownBlock> {
    return this.known;
  }

  /**
   * Writes `count` consecutive pages of `block` read from `data` at `start`
   * (page i at `start + i*4096`): each as PAGE or, when all zero (checked in
   * place), ZERO, CONTINUE as QEMU. Headers go into the slab, payloads by
   * reference (`data` must stay unchanged until the pieces are written). The
   * block and bounds are checked once per call against the block list this
   * encoder wrote (or `blocks`); misuse throws a RangeError with a `code`
   * (unknown-ram-block, page-out-of-range, unaligned-offset, bad-option)
   * before anything is written. Same bytes as write() of the per-page records.
   */
  writePages(block: string, offset: number, count: number, data: Uint8Array, start = 0): WritePagesResult {
    return this.ram.writePages(this.w, this.known, block, offset, count, data, start);
  }

  /** Bytes written and not yet taken. */
  get pendingBytes(): number {
    return this.w.length;
  }

  /** Forget the channel's last block (QEMU does so before the postcopy discards and on recovery). */
  resetContinue(): void {
    this.ram.resetContinue();
  }

  write(r: StreamRecord): void {
    const w = this.w;
    switch (r.type) {
      case 'header':
        w.be32(FILE_MAGIC).be32(r.version);
        return;
      case 'configuration':
        writeConfiguration(w, r);
        if (r.capabilities?.includes('x-ignore-shared')) this.format.ignoreShared = true;
        return;
      case 'section':
        writeSectionHeader(w, r);
        return;
      case 'footer':
        w.u8(RecordType.SECTION_FOOTER).be32(r.sectionId);
        return;
      case 'device-state':
        w.view(r.data);
        return;
      case 'eof':
        w.u8(RecordType.EOF);
        return;
      case 'vmdesc':
        w.u8(RecordType.VMDESCRIPTION).be32(r.json.length).view(r.json);
        return;
      case 'command':
        if (r.command.cmd === 'packaged') {
          if (this.outer) throw new Error('PACKAGED inside a PACKAGED blob');
          // QEMU forgets the last block at the postcopy switch (ram_postcopy_send_discard_bitmap);
          // the package comes right after that point and no page lies in between.
          this.ram.resetContinue();
          this.outer = w;
          this.w = new ByteWriter(this.slabSize);
          return;
        }
        if (r.command.cmd === 'postcopy-advise') this.format.postcopyAdvised = true;
        writeCommand(w, r.command);
        return;
      case 'package-end': {
        const outer = this.outer;
        if (!outer) throw new Error('package-end without PACKAGED');
        const pieces = this.w.take();
        let length = 0;
        for (const p of pieces) length += p.length;
        writeCommand(outer, { cmd: 'packaged', length });
        for (const p of pieces) outer.view(p);
        this.w = outer;
        this.outer = undefined;
        return;
      }
      case 'ram-blocks':
        this.ram.write(w, r, this.format);
        this.known.clear();
        r.blocks.forEach((b, index) => this.known.set(b.idstr, { idstr: b.idstr, length: b.length, index }));
        return;
      default:
        this.ram.write(w, r, this.format);
        return;
    }
  }

  /** Writes several records. */
  writeAll(records: Iterable<StreamRecord>): void {
    for (const r of records) this.write(r);
  }

  /** The pieces written since the last call (nothing of an unfinished package). */
  take(): Uint8Array[] {
    return this.w === this.outer ? [] : this.outer ? this.outer.take() : this.w.take();
  }
}

/** Writes preempt-channel records: bare pages with the channel's own CONTINUE memory. */
export class PreemptEncoder {
  private readonly w: ByteWriter;
  private readonly ram: RamRecordWriter;
  private known: ReadonlyMap<string, KnownBlock>;
  constructor(opts: StreamEncoderOptions = {}) {
    this.w = new ByteWriter(opts.slabSize ?? 16 * 1024);
    this.ram = new RamRecordWriter(opts.continueMode ?? 'auto');
    this.known = blocksOf(opts);
  }
  /** The blocks writePages checks against (`blocks` of the options, or setBlocks). */
  get blocks(): ReadonlyMap<string, KnownBlock> {
    return this.known;
  }
  /** Sets the block list writePages checks against (the one the main channel sent). */
  setBlocks(blocks: ReadonlyMap<string, KnownBlock> | readonly Pick<RamBlockInfo, 'idstr' | 'length'>[]): void {
    this.known = blocksOf({ blocks });
  }
  write(r: PreemptRecord): void {
    this.ram.write(this.w, r);
  }
  /** As StreamEncoder.writePages, with this channel's own CONTINUE memory. */
  writePages(block: string, offset: number, count: number, data: Uint8Array, start = 0): WritePagesResult {
    return this.ram.writePages(this.w, this.known, block, offset, count, data, start);
  }
  resetContinue(): void {
    this.ram.resetContinue();
  }
  take(): Uint8Array[] {
    return this.w.take();
  }
}

function writeSectionHeader(w: ByteWriter, r: SectionHeaderRecord): void {
  switch (r.kind) {
    case 'start':
    case 'full':
      w.u8(r.kind === 'start' ? RecordType.SECTION_START : RecordType.SECTION_FULL)
        .be32(r.sectionId)
        .str8(r.idstr)
        .be32(r.instanceId)
        .be32(r.versionId);
      return;
    case 'part':
    case 'end':
      w.u8(r.kind === 'part' ? RecordType.SECTION_PART : RecordType.SECTION_END).be32(r.sectionId);
      return;
  }
}

function writeConfiguration(w: ByteWriter, r: ConfigurationRecord): void {
  const name = Buffer.from(r.machineType, 'latin1');
  w.u8(RecordType.CONFIGURATION).be32(name.length).raw(name);
  // Subsections in QEMU's order (vmstate_configuration's subsection list).
  if (r.targetPageBits !== undefined) {
    w.u8(RecordType.SUBSECTION).str8(ConfigSubsection.TARGET_PAGE_BITS).be32(1).be32(r.targetPageBits);
  }
  if (r.capabilities !== undefined) {
    w.u8(RecordType.SUBSECTION).str8(ConfigSubsection.CAPABILITIES).be32(1).be32(r.capabilities.length);
    for (const c of r.capabilities) w.str8(c);
  }
  if (r.uuid !== undefined) {
    if (r.uuid.length !== 16) throw new RangeError('uuid must be 16 bytes');
    w.u8(RecordType.SUBSECTION).str8(ConfigSubsection.UUID).be32(1).raw(r.uuid);
  }
}
