/**
 * A destination's RAM written straight into a QEMU mapped-ram file
 * (src/stream/mapped-ram.ts): what `qmt receive --format mapped-ram` writes
 * and a plain QEMU 10 loads with `migrate-incoming file:PATH` (capability
 * mapped-ram on).
 *
 * The layout is fixed when the block list arrives, before any page: each
 * block's pages at a 1 MiB-aligned offset, the stream's own bytes (header,
 * configuration, block list, device state) in the gaps, written by
 * `finish()` once the migration is over. The pages go through a
 * PageFileWriter (every block a BlockFile of this one file, based at its
 * pages offset): the same batched, bounded, asynchronous positioned writes
 * as a saved-VM directory's, durable on flush.
 *
 * A file that is not finished says so: its first 8 bytes are "QMTP" and the
 * stream version until `finish()` of a complete migration has made
 * everything else durable and writes QEMU's "QEVM" there (and fsyncs again).
 * QEMU refuses such a file (not a migration stream); our decoder reports it as
 * 'incomplete'. An interrupted receive, a failed one, a crash: all leave it.
 */
import * as nodeFs from 'node:fs';
import { PageBitmap } from '../stream/bitmap.js';
import { ByteWriter, concatPieces } from '../stream/byte-writer.js';
import { FILE_MAGIC, FILE_VERSION, RAM_IDSTR, RAM_VERSION, RamFlag, TARGET_PAGE_SIZE } from '../stream/constants.js';
import { StreamEncoder } from '../stream/encoder.js';
import { INCOMPLETE_MAGIC, MAPPED_RAM_ALIGNMENT, MAPPED_RAM_HEADER_BYTES, MAPPED_RAM_VERSION, layoutMappedRamBlock, mappedRamBitmapBytes, roundUp, writeMappedRamHeader, type MappedRamHeader } from '../stream/mapped-ram.js';
import type { ConfigurationRecord, RamBlockInfo } from '../stream/records.js';
import type { ReceivedDeviceSection } from './destination/types.js';
import { MigrationError, StorageError } from './errors.js';
import { asBuffer, checkPageRun, checkPageViews, type GuestMemorySink } from './memory.js';
import { PageFileWriter, type PageFileWriterOptions, type PageFileWriterStats, type WriterBlock } from './page-file-writer.js';

const PAGE = TARGET_PAGE_SIZE;
/**
 * Room kept at the start of the file for the stream's first bytes (header,
 * configuration, RAM section header, block list size, the first entry):
 * their length is known only once the configuration is, after the layout is
 * fixed. QEMU reads each bitmap at its header's offset, so the first block's
 * bitmap simply starts after this room.
 */
const PREFIX_ROOM = 64 * 1024;

/** What a migration left for the file's stream parts (a DestinationResult has it all). */
export interface MappedRamContents {
  complete: boolean;
  configuration: ConfigurationRecord | undefined;
  machineType: string | undefined;
  devices: readonly ReceivedDeviceSection[];
  vmdesc: Uint8Array | undefined;
}

/** What `finish()` wrote. */
export interface MappedRamSaveSummary {
  /** The file holds QEMU's header: a complete save QEMU loads. */
  complete: boolean;
  bytes: number;
  blocks: { idstr: string; length: number; pagesOffset: number; present: number }[];
  devices: { count: number; bytes: number };
}

interface Block {
  readonly info: RamBlockInfo;
  /** File position of its entry (idstr, length) in the block list; the first one's is the prefix's length, known at finish. */
  readonly entryAt: number;
  readonly header: MappedRamHeader;
  /** Pages whose bytes are in the file: set by writes, cleared by ZERO records (QEMU's file_bmap). */
  readonly present: PageBitmap;
  /** The block in the writer: page at `offset` goes to `header.pagesOffset + offset` of the file. */
  readonly pages: WriterBlock;
}

/** The first 8 bytes of a file not finished ({@link INCOMPLETE_MAGIC}), and of a finished one. */
function fileHeader(magic: number): Buffer {
  const b = Buffer.alloc(8);
  b.writeUInt32BE(magic, 0);
  b.writeUInt32BE(FILE_VERSION, 4);
  return b;
}

/** Options of MappedRamSink: the write pipeline's (PageFileWriterOptions: maxInFlightBytes 16 MiB, writeBytes 1 MiB, writesPerFile 4). */
export type MappedRamSinkOptions = PageFileWriterOptions;

/** What a MappedRamSink has done and holds (numbers only): its writer's figures and its fsyncs. */
export interface MappedRamSinkStats extends PageFileWriterStats {
  fsyncs: number;
}

/**
 * GuestMemorySink into one mapped-ram file at `path` (created or replaced).
 * Call `finish(result)` after the migration (complete or not), then `close()`.
 */
export class MappedRamSink implements GuestMemorySink {
  private readonly fd: number;
  private readonly writer: PageFileWriter;
  private blocks: Block[] = [];
  private byName = new Map<string, Block>();
  /** The last block looked up: a destination writes runs of one block after another. */
  private last: Block | undefined;
  private fsyncs = 0;
  /** File position where the stream goes on after the last block's pages. */
  private tailAt = 0;
  private closed = false;

  constructor(
    readonly path: string,
    opts: MappedRamSinkOptions = {},
  ) {
    try {
      this.writer = new PageFileWriter((fd, b, o, l, p, cb) => nodeFs.write(fd, b, o, l, p, cb), opts);
    } catch (e) {
      throw new RangeError(`MappedRamSink: ${(e as Error).message}`);
    }
    try {
      this.fd = nodeFs.openSync(path, 'w+');
      // Unfinished from the first byte on: a receive that dies before finish() leaves a file QEMU refuses.
      nodeFs.writeSync(this.fd, fileHeader(INCOMPLETE_MAGIC), 0, 8, 0);
    } catch (e) {
      throw new StorageError('open', path, 0, e);
    }
  }

  /**
   * Fixes the layout: the first block's bitmap after {@link PREFIX_ROOM},
   * each block's pages at the next 1 MiB boundary after its bitmap, the next
   * block's entry right after the pages (as QEMU lays it out). The file is
   * sized to the end of the last block's pages (holes). x-ignore-shared
   * blocks are refused: QEMU 10.0 writes their address before the mapped-ram
   * header and its loader does not read it, so no such file loads.
   */
  setBlocks(list: readonly RamBlockInfo[]): void {
    if (this.blocks.length > 0) {
      const same = list.length === this.blocks.length && list.every((b, i) => b.idstr === this.blocks[i]!.info.idstr && b.length === this.blocks[i]!.info.length);
      if (same) return;
      throw new MigrationError('protocol', 'setup', `${this.path}: a second RAM block list, other than the first (a mapped-ram file's layout is fixed by the first)`);
    }
    if (list.some((b) => b.gpa !== undefined)) {
      throw new MigrationError('unsupported', 'setup', `${this.path}: a source with x-ignore-shared cannot be saved as mapped-ram (QEMU 10.0 cannot load such a file)`);
    }
    let at = 0;
    const blocks: Block[] = list.map((info, i) => {
      const entry = 1 + Buffer.byteLength(info.idstr, 'latin1') + 8;
      let header: MappedRamHeader;
      let entryAt: number;
      if (i === 0) {
        entryAt = -1;
        const bitmapOffset = PREFIX_ROOM + entry + MAPPED_RAM_HEADER_BYTES;
        header = { version: MAPPED_RAM_VERSION, pageSize: PAGE, bitmapOffset, pagesOffset: roundUp(bitmapOffset + mappedRamBitmapBytes(info.length), MAPPED_RAM_ALIGNMENT) };
      } else {
        entryAt = at;
        header = layoutMappedRamBlock(at + entry, info.length);
      }
      at = header.pagesOffset + info.length;
      const pages = this.writer.addBlock({ idstr: info.idstr, length: info.length, path: this.path, fd: this.fd, base: header.pagesOffset }, PageBitmap.forBlockLength(info.length));
      return { info, entryAt, header, present: PageBitmap.forBlockLength(info.length), pages };
    });
    this.blocks = blocks;
    this.tailAt = at;
    this.byName = new Map(blocks.map((b) => [b.info.idstr, b]));
    try {
      nodeFs.ftruncateSync(this.fd, this.tailAt);
    } catch (e) {
      throw new StorageError('truncate', this.path, this.tailAt, e);
    }
  }

  private block(name: string): Block {
    const l = this.last;
    if (l !== undefined && l.info.idstr === name && !this.writer.failed) return l;
    this.check();
    const b = this.byName.get(name);
    if (!b) throw new Error(`unknown RAM block "${name}"`);
    this.last = b;
    return b;
  }

  private check(): void {
    this.writer.check();
    if (this.closed) throw new Error('MappedRamSink: used after close()');
  }

  writePage(block: string, offset: number, data: Uint8Array): void {
    this.writePages(block, offset, 1, data, 0, PAGE);
  }

  zeroPage(block: string, offset: number): void {
    this.zeroPages(block, offset, 1);
  }

  writePages(block: string, offset: number, count: number, data: Uint8Array, start: number, stride: number): void {
    const b = this.block(block);
    checkPageRun(block, b.info.length, offset, count);
    checkPageViews(block, data, start, count, stride);
    this.writer.writePages(b.pages, offset, count, asBuffer(data), start, stride);
    b.present.setRange(offset / PAGE, count);
  }

  zeroPages(block: string, offset: number, count: number): void {
    const b = this.block(block);
    checkPageRun(block, b.info.length, offset, count);
    // A page written in an earlier pass gets zeros written over it (the writer's rule) and its bit cleared, as QEMU's.
    this.writer.zeroPages(b.pages, offset, count);
    b.present.clearRange(offset / PAGE, count);
  }

  backpressure(): Promise<void> | undefined {
    return this.writer.backpressure();
  }

  /**
   * The page as the file will hold it once every pending write is done (for
   * XBZRLE), copied: from the newest pending write of it, else read from the
   * file (synchronous, XBZRLE only), zeros for a page never written.
   */
  readPage(block: string, offset: number): Uint8Array {
    const b = this.block(block);
    checkPageRun(block, b.info.length, offset, 1);
    const out = Buffer.alloc(PAGE);
    if (!b.pages.written.has(offset / PAGE)) return out;
    if (this.writer.copyPending(b.pages, offset, out)) return out;
    const at = b.header.pagesOffset + offset;
    let got = 0;
    try {
      while (got < PAGE) {
        const n = nodeFs.readSync(this.fd, out, got, PAGE - got, at + got);
        if (n === 0) break;
        got += n;
      }
    } catch (e) {
      throw this.writer.fail(new StorageError('read', this.path, at + got, e));
    }
    return out;
  }

  /** Every page write done, then the file fsync'ed (also after a failed write: what arrived is durable). Rejects with the failure. */
  async flush(): Promise<void> {
    if (this.closed) throw new Error('MappedRamSink: used after close()');
    await this.writer.drained();
    await this.fsync().catch((e: unknown) => this.writer.fail(e as StorageError));
    this.writer.check();
  }

  stats(): MappedRamSinkStats {
    return { ...this.writer.stats(), fsyncs: this.fsyncs };
  }

  /**
   * Writes the stream around the pages — header, configuration (capability
   * mapped-ram), the RAM section with every block's entry, header and bitmap,
   * the device sections, EOF, the VM description — makes it durable, and, if
   * `r.complete`, then writes QEMU's header over the "unfinished" one. A
   * migration that failed before its block list leaves just the unfinished
   * header. Rejects with the StorageError of a failed page write (after
   * writing what it can: the file stays unfinished).
   */
  async finish(r: MappedRamContents): Promise<MappedRamSaveSummary> {
    if (this.closed) throw new Error('MappedRamSink: finish() after close()');
    let failure: unknown;
    await this.flush().catch((e: unknown) => (failure = e));
    const complete = r.complete && failure === undefined && this.blocks.length > 0;
    // Without a block list (or, failed, without a configuration) there is no stream to write: the file stays unfinished.
    const writable = this.blocks.length > 0 && (complete || (r.configuration?.machineType ?? r.machineType) !== undefined);
    const pieces = writable ? this.streamParts(r) : [];
    for (const p of pieces) await this.writeAt(p.bytes, p.at);
    await this.fsync();
    if (complete) {
      await this.writeAt(fileHeader(FILE_MAGIC), 0);
      await this.fsync();
    }
    if (failure !== undefined) throw failure;
    const end = pieces.reduce((n, p) => Math.max(n, p.at + p.bytes.length), 8);
    return {
      complete,
      bytes: end,
      blocks: this.blocks.map((b) => ({ idstr: b.info.idstr, length: b.info.length, pagesOffset: b.header.pagesOffset, present: b.present.count() })),
      devices: { count: r.devices.length, bytes: r.devices.reduce((n, d) => n + d.data.length, 0) },
    };
  }

  /** The stream's bytes and where each piece goes. */
  private streamParts(r: MappedRamContents): { at: number; bytes: Uint8Array }[] {
    const used = new Set(r.devices.map((d) => d.sectionId));
    let ramId = 0;
    while (used.has(ramId)) ramId++;
    const total = this.blocks.reduce((n, b) => n + b.info.length, 0);
    const entry = (w: ByteWriter, b: Block): void => {
      w.str8(b.info.idstr).be64(b.info.length);
      writeMappedRamHeader(w, b.header);
    };
    // The prefix ends with the first block's entry and header, which must stay before its bitmap.
    const enc = new StreamEncoder();
    // Unfinished until the very end: the header is written again, whole, by finish().
    enc.write({ type: 'header', version: FILE_VERSION });
    const c = r.configuration;
    const machineType = c?.machineType ?? r.machineType;
    if (machineType === undefined) throw new MigrationError('protocol', 'completion', `${this.path}: no configuration record arrived (no machine type to write)`);
    enc.write({
      type: 'configuration',
      machineType,
      capabilities: ['mapped-ram'],
      ...(c?.targetPageBits !== undefined ? { targetPageBits: c.targetPageBits } : {}),
      ...(c?.uuid ? { uuid: c.uuid } : {}),
    });
    enc.write({ type: 'section', kind: 'start', sectionId: ramId, idstr: RAM_IDSTR, instanceId: 0, versionId: RAM_VERSION });
    const head = new ByteWriter();
    head.be64(total + RamFlag.MEM_SIZE);
    entry(head, this.blocks[0]!);
    const prefix = concatPieces([...enc.take(), ...head.take()]);
    prefix.set(fileHeader(INCOMPLETE_MAGIC), 0);
    if (prefix.length > this.blocks[0]!.header.bitmapOffset) {
      throw new MigrationError('protocol', 'completion', `${this.path}: the stream's first ${prefix.length} bytes do not fit before the first bitmap at ${this.blocks[0]!.header.bitmapOffset}`);
    }
    const out: { at: number; bytes: Uint8Array }[] = [{ at: 0, bytes: prefix }];
    for (const [i, b] of this.blocks.entries()) {
      if (i > 0) {
        const w = new ByteWriter();
        entry(w, b);
        out.push({ at: b.entryAt, bytes: concatPieces(w.take()) });
      }
      out.push({ at: b.header.bitmapOffset, bytes: b.present.bytes });
    }
    // After the last block: the START section's end, an END section (as QEMU's), the devices, EOF.
    const tail = new StreamEncoder();
    tail.write({ type: 'ram-eos' });
    tail.write({ type: 'footer', sectionId: ramId });
    tail.write({ type: 'section', kind: 'end', sectionId: ramId, idstr: RAM_IDSTR, instanceId: 0, versionId: RAM_VERSION });
    tail.write({ type: 'ram-eos' });
    tail.write({ type: 'footer', sectionId: ramId });
    for (const d of r.devices) {
      tail.write({ type: 'section', kind: d.kind, sectionId: d.sectionId, idstr: d.idstr, instanceId: d.instanceId, versionId: d.versionId });
      tail.write({ type: 'device-state', kind: d.kind, sectionId: d.sectionId, idstr: d.idstr, instanceId: d.instanceId, versionId: d.versionId, data: d.data });
      tail.write({ type: 'footer', sectionId: d.sectionId });
    }
    tail.write({ type: 'eof' });
    if (r.vmdesc) tail.write({ type: 'vmdesc', json: r.vmdesc });
    out.push({ at: this.tailAt, bytes: concatPieces(tail.take()) });
    return out;
  }

  private writeAt(bytes: Uint8Array, at: number): Promise<void> {
    return new Promise((resolve, reject) => {
      const go = (done: number): void => {
        nodeFs.write(this.fd, bytes, done, bytes.length - done, at + done, (err, n) => {
          if (err) reject(new StorageError('write', this.path, at + done, err));
          else if (done + n < bytes.length) go(done + n);
          else resolve();
        });
      };
      go(0);
    });
  }

  private fsync(): Promise<void> {
    return new Promise((resolve, reject) =>
      nodeFs.fsync(this.fd, (err) => {
        this.fsyncs++;
        if (err) reject(new StorageError('fsync', this.path, 0, err));
        else resolve();
      }),
    );
  }

  /** Lets pending writes finish and closes the file (finish() first to make it a save). */
  async close(): Promise<void> {
    if (this.closed) return;
    await this.writer.drained();
    this.closed = true;
    this.last = undefined;
    this.writer.dispose();
    await new Promise<void>((resolve) => nodeFs.close(this.fd, () => resolve()));
  }
}
