/**
 * Reading a mapped-ram file (QEMU's saved-VM file, src/stream/mapped-ram.ts)
 * with positioned reads: the stream parts are decoded in order, the bitmap
 * and pages of every block are jumped over (a 64 MiB guest's file is read in
 * a few hundred KiB), each block's bitmap is read at its offset, and pages are
 * read later by (block, offset) in runs.
 */
import { open, type FileHandle } from 'node:fs/promises';
import type { PageBitmap } from '../stream/bitmap.js';
import { zeroAbsentPages } from './block-files.js';
import { TARGET_PAGE_SIZE } from '../stream/constants.js';
import { StreamDecoder, type DeviceSectionSize } from '../stream/decoder.js';
import { StreamError } from '../stream/errors.js';
import { checkMappedRamRegions, mappedRamBitmap, mappedRamBitmapBytes, mappedRamPagePosition, type MappedRamHeader } from '../stream/mapped-ram.js';
import type { ConfigurationRecord, DeviceStateRecord, RamBlockInfo, StreamRecord } from '../stream/records.js';

const PAGE = TARGET_PAGE_SIZE;

/** Random access to a file's bytes (a FileHandle, or memory in tests). */
export interface PositionedReader {
  /** Bytes in the file. */
  readonly size: number;
  /** Reads into `into` from file position `position`; resolves with the bytes read (fewer only at the end). */
  read(into: Uint8Array, position: number): Promise<number>;
}

/** A PositionedReader over bytes in memory. */
export function bufferReader(bytes: Uint8Array): PositionedReader {
  return {
    size: bytes.length,
    read: (into, position) => {
      const n = Math.max(0, Math.min(into.length, bytes.length - position));
      into.set(bytes.subarray(position, position + n));
      return Promise.resolve(n);
    },
  };
}

/** A PositionedReader over an open file (its size as of opening). */
export async function fileReader(fh: FileHandle): Promise<PositionedReader> {
  const { size } = await fh.stat();
  return {
    size,
    read: async (into, position) => {
      let got = 0;
      while (got < into.length) {
        const { bytesRead } = await fh.read(into, got, into.length - got, position + got);
        if (bytesRead === 0) break;
        got += bytesRead;
      }
      return got;
    },
  };
}

export interface DecodePositionedOptions {
  /** Bytes per read of stream parts (default 1 MiB). */
  chunkBytes?: number;
  /** Called with the file position reached after each read (progress). */
  onProgress?: (position: number) => void;
  /** Checked between reads: aborting stops the decode with the signal's reason. */
  signal?: AbortSignal;
}

/**
 * Decodes the stream of `reader` with `decoder`, jumping over what a
 * mapped-ram decoder passes over (a plain stream is read front to back), and
 * hands every batch of records to `onRecords` (the views stay valid: every
 * read is a fresh buffer). A block whose bitmap or pages run past the file's
 * end fails at once ('truncated', at its header), before anything is read
 * from there. Ends the decoder (so a stream without EOF is 'truncated').
 */
export async function decodePositioned(
  reader: PositionedReader,
  decoder: StreamDecoder,
  onRecords: (records: StreamRecord[], offset: number) => void | Promise<void>,
  opts: DecodePositionedOptions = {},
): Promise<void> {
  const chunk = opts.chunkBytes ?? 1 << 20;
  let pos = 0;
  let checked: unknown;
  while (pos < reader.size) {
    opts.signal?.throwIfAborted();
    const buf = Buffer.allocUnsafe(Math.min(chunk, reader.size - pos));
    const n = await reader.read(buf, pos);
    if (n === 0) break;
    pos += n;
    const records = decoder.push(buf.subarray(0, n));
    if (records.length > 0) await onRecords(records, decoder.offset);
    const skip = decoder.skipping;
    if (skip && skip !== checked) {
      checked = skip;
      checkMappedRamRegions(skip, reader.size);
    }
    pos = decoder.jump() ?? pos;
    opts.onProgress?.(pos);
  }
  const last = decoder.end();
  if (last.length > 0) await onRecords(last, decoder.offset);
}

/**
 * The blocks of a decoded mapped-ram block list with their bitmaps, read at
 * their offsets (the decoder checked every region against the file's size
 * while it passed over it). A bitmap above `maxBitmapBytes` (default 64 MiB:
 * a 2 TiB block) is 'length-too-large', before anything is allocated.
 */
export async function readMappedRamBlocks(reader: PositionedReader, list: readonly RamBlockInfo[], maxBitmapBytes = 64 << 20): Promise<MappedRamBlock[]> {
  const blocks: MappedRamBlock[] = [];
  for (const [index, b] of list.entries()) {
    const header = b.mappedRam;
    if (!header) throw new StreamError('bad-block-list', 0, `RAM block "${b.idstr}" has no mapped-ram header`);
    const bytes = mappedRamBitmapBytes(b.length);
    if (bytes > maxBitmapBytes) throw new StreamError('length-too-large', header.bitmapOffset, `the bitmap of RAM block "${b.idstr}" is ${bytes} bytes, above the limit of ${maxBitmapBytes}`);
    const buf = new Uint8Array(bytes);
    const n = await reader.read(buf, header.bitmapOffset);
    if (n !== bytes) throw new StreamError('truncated', header.bitmapOffset + n, `the bitmap of RAM block "${b.idstr}" ended after ${n} of ${bytes} bytes`);
    blocks.push({ idstr: b.idstr, length: b.length, header, index, present: mappedRamBitmap(b.length, buf) });
  }
  return blocks;
}

/** A RAM block of a mapped-ram file with the pages it holds. */
export interface MappedRamBlock {
  readonly idstr: string;
  readonly length: number;
  readonly header: MappedRamHeader;
  /** Position in the block list. */
  readonly index: number;
  /** Bit i set: page i is in the file (at `header.pagesOffset + i × 4096`); clear: the page is zero. */
  readonly present: PageBitmap;
}

export interface MappedRamFileOptions extends DecodePositionedOptions {
  /** Every batch of decoded records (inspect folds them into its summary). */
  onRecords?: (records: StreamRecord[], offset: number) => void | Promise<void>;
  /** Exact device-section sizes from a VM description read ahead (StreamDecoderOptions.deviceSizes). */
  deviceSizes?: readonly DeviceSectionSize[];
  /** Largest bitmap of one block accepted (default 64 MiB: a 2 TiB block); above, 'length-too-large'. */
  maxBitmapBytes?: number;
}

/**
 * A mapped-ram file, decoded and checked: its configuration, RAM blocks with
 * their headers and bitmaps, device sections and VM description. Its pages
 * are read on demand with {@link readPages}. A file that is not a complete,
 * well-formed mapped-ram stream fails `read`/`open` with a StreamError (code,
 * file offset).
 */
export class MappedRamFile {
  private constructor(
    private readonly reader: PositionedReader,
    private readonly fh: FileHandle | undefined,
    readonly configuration: ConfigurationRecord | undefined,
    readonly blocks: readonly MappedRamBlock[],
    /** Device sections in stream order (payloads are views into the reads). */
    readonly devices: readonly DeviceStateRecord[],
    readonly vmdesc: Uint8Array | undefined,
  ) {}

  /** Bytes in the file. */
  get size(): number {
    return this.reader.size;
  }

  /** Opens and reads `path` (close() it afterwards). */
  static async open(path: string, opts: MappedRamFileOptions = {}): Promise<MappedRamFile> {
    const fh = await open(path, 'r');
    try {
      return await MappedRamFile.read(await fileReader(fh), opts, fh);
    } catch (e) {
      await fh.close();
      throw e;
    }
  }

  /** Reads a mapped-ram file through `reader`. */
  static async read(reader: PositionedReader, opts: MappedRamFileOptions = {}, fh?: FileHandle): Promise<MappedRamFile> {
    const decoder = new StreamDecoder({ mappedRam: true, ...(opts.deviceSizes ? { deviceSizes: opts.deviceSizes } : {}) });
    let configuration: ConfigurationRecord | undefined;
    let list: readonly RamBlockInfo[] | undefined;
    const devices: DeviceStateRecord[] = [];
    let vmdesc: Uint8Array | undefined;
    await decodePositioned(
      reader,
      decoder,
      async (records, offset) => {
        for (const r of records) {
          if (r.type === 'configuration') configuration = r;
          else if (r.type === 'device-state') devices.push(r);
          else if (r.type === 'vmdesc') vmdesc = r.json;
          else if (r.type === 'ram-blocks') list ??= r.blocks;
        }
        await opts.onRecords?.(records, offset);
      },
      opts,
    );
    if (!decoder.ramFormat.mappedRam) throw new StreamError('unsupported', 0, 'not a mapped-ram file (its configuration does not list the mapped-ram capability)');
    if (!list) throw new StreamError('truncated', decoder.offset, 'a mapped-ram file without a RAM block list');
    const blocks = await readMappedRamBlocks(reader, list, opts.maxBitmapBytes);
    return new MappedRamFile(reader, fh, configuration, blocks, devices, vmdesc);
  }

  /** The block named `idstr`. */
  block(idstr: string): MappedRamBlock | undefined {
    return this.blocks.find((b) => b.idstr === idstr);
  }

  /** Pages in the file (QEMU's `normal` of a one-pass save) and pages not (zero: `duplicate`). */
  pageCounts(): { normal: number; zero: number } {
    let normal = 0;
    let all = 0;
    for (const b of this.blocks) {
      normal += b.present.count();
      all += b.present.pages;
    }
    return { normal, zero: all - normal };
  }

  /**
   * Reads `count` pages of `block` from `offset` into `into` at `at`: one
   * positioned read for the run, then pages whose bit is clear are zeroed (a
   * page QEMU wrote in one pass and found zero in a later one keeps its old
   * bytes in the file, its bit cleared).
   */
  async readPages(block: MappedRamBlock, offset: number, count: number, into: Uint8Array, at = 0): Promise<void> {
    if (offset % PAGE !== 0 || offset < 0 || count < 0 || offset + count * PAGE > block.length || at + count * PAGE > into.length) {
      throw new RangeError(`readPages: ${count} pages at 0x${offset.toString(16)} of RAM block "${block.idstr}" (0x${block.length.toString(16)} bytes) into ${into.length - at} bytes`);
    }
    const len = count * PAGE;
    const view = into.subarray(at, at + len);
    const n = await this.reader.read(view, mappedRamPagePosition(block.header, offset));
    if (n !== len) throw new StreamError('truncated', mappedRamPagePosition(block.header, offset) + n, `pages of RAM block "${block.idstr}" end early`);
    zeroAbsentPages(block.present, offset / PAGE, count, view, 0);
  }

  async close(): Promise<void> {
    await this.fh?.close();
  }
}
