/**
 * QEMU's mapped-ram file format (capability `mapped-ram`, `migrate file:PATH`;
 * migration/ram.c of 10.0.2: mapped_ram_setup_ramblock,
 * parse_ramblock_mapped_ram, ram_save_file_bmap). The file is a migration
 * stream with holes: each entry of the RAM block list (idstr, used_length) is
 * followed by a 28-byte header, and the stream goes on at
 * `pagesOffset + length` — between the header and there lie the block's
 * bitmap of pages written and its pages, page i at `pagesOffset + i × 4096`.
 * Zero pages are not written (their bit is clear). The bitmap is written when
 * RAM completes; the device state follows RAM in the stream as usual.
 *
 * This module is the header's encoder, decoder and length, and the layout
 * arithmetic as pure functions; the stream decoder reads the headers in the
 * block list (`StreamDecoder({ mappedRam: true })`), the file reader and sink
 * of src/protocol do the positioned I/O.
 */
import { PageBitmap } from './bitmap.js';
import type { ByteWriter } from './byte-writer.js';
import { be32At } from './byte-queue.js';
import { TARGET_PAGE_SIZE } from './constants.js';
import { StreamError, type SectionContext } from './errors.js';

/** MAPPED_RAM_HDR_VERSION: 10.0 writes 1 and refuses anything above. */
export const MAPPED_RAM_VERSION = 1;
/** sizeof(MappedRamHeader), packed: be32 version, be64 page size, be64 bitmap offset, be64 pages offset. */
export const MAPPED_RAM_HEADER_BYTES = 28;
/**
 * MAPPED_RAM_FILE_OFFSET_ALIGNMENT: QEMU rounds each block's pages offset up
 * to 1 MiB (O_DIRECT); its loader only insists on page alignment.
 */
export const MAPPED_RAM_ALIGNMENT = 0x100000;

/** The per-block mapped-ram header, file offsets absolute (from the file's first byte). */
export interface MappedRamHeader {
  readonly version: number;
  /** TARGET_PAGE_SIZE of the source: the unit of the bitmap and of the pages region. */
  readonly pageSize: number;
  /** Where the block's bitmap of pages written lies ({@link mappedRamBitmapBytes} bytes). */
  readonly bitmapOffset: number;
  /** Where page 0 of the block lies; the block's pages region is `length` bytes from here. */
  readonly pagesOffset: number;
}

/** Encoded length of a header (quic-go habit: every record knows its size). */
export function mappedRamHeaderLength(): number {
  return MAPPED_RAM_HEADER_BYTES;
}

/** Writes a header (big-endian, as QEMU's cpu_to_be*). */
export function writeMappedRamHeader(w: ByteWriter, h: MappedRamHeader): void {
  w.be32(h.version).be64(h.pageSize).be64(h.bitmapOffset).be64(h.pagesOffset);
}

/** Bytes of a block's bitmap: BITS_TO_LONGS(pages) × sizeof(unsigned long), little-endian words as on x86-64. */
export function mappedRamBitmapBytes(length: number): number {
  return PageBitmap.byteSize(Math.ceil(length / TARGET_PAGE_SIZE));
}

/** File position of the page at `offset` of a block. */
export function mappedRamPagePosition(h: MappedRamHeader, offset: number): number {
  return h.pagesOffset + offset;
}

/** Where the stream goes on after a block of `length` bytes: the end of its pages region. */
export function mappedRamBlockEnd(h: MappedRamHeader, length: number): number {
  return h.pagesOffset + length;
}

/**
 * The header QEMU 10.0 writes for a block of `length` bytes whose header
 * starts at file position `headerOffset`: the bitmap right after the header,
 * the pages at the next 1 MiB boundary after the bitmap.
 */
export function layoutMappedRamBlock(headerOffset: number, length: number, alignment = MAPPED_RAM_ALIGNMENT): MappedRamHeader {
  const bitmapOffset = headerOffset + MAPPED_RAM_HEADER_BYTES;
  return { version: MAPPED_RAM_VERSION, pageSize: TARGET_PAGE_SIZE, bitmapOffset, pagesOffset: roundUp(bitmapOffset + mappedRamBitmapBytes(length), alignment) };
}

export function roundUp(n: number, to: number): number {
  return Math.ceil(n / to) * to;
}

/** A be64 field as a number, or 'length-too-large' naming it (no file offset of ours reaches 2^53). */
function be64Field(b: Uint8Array, p: number, at: number, what: string, section: SectionContext | undefined): number {
  const hi = be32At(b, p);
  const v = hi * 0x1_0000_0000 + be32At(b, p + 4);
  if (hi >= 0x20_0000) throw new StreamError('length-too-large', at, `mapped-ram ${what} 0x${hi.toString(16)}${be32At(b, p + 4).toString(16).padStart(8, '0')} is beyond any file`, section);
  return v;
}

/**
 * Decodes the header of `block` (`length` bytes) from `bytes` (at least 28),
 * which start at file position `at`, and checks it the way the file must be
 * for QEMU 10.0's loader to make sense of it: version 1 (QEMU refuses above
 * 1), the x86 page size, pages page-aligned (QEMU's "region has bad
 * alignment"), and the regions in order — header, bitmap, pages — so that
 * the stream never goes back over itself (QEMU does not check this; a file it
 * writes always has it). Each error names the field's offset.
 */
export function decodeMappedRamHeader(bytes: Uint8Array, at: number, block: string, length: number, section?: SectionContext): MappedRamHeader {
  const version = be32At(bytes, 0);
  if (version !== MAPPED_RAM_VERSION) {
    throw new StreamError('unsupported-version', at, `mapped-ram header version ${version} of RAM block "${block}" (QEMU 10.0 writes ${MAPPED_RAM_VERSION} and refuses above it)`, section);
  }
  const pageSize = be64Field(bytes, 4, at + 4, `page size of RAM block "${block}"`, section);
  if (pageSize !== TARGET_PAGE_SIZE) {
    throw new StreamError('bad-mapped-ram-header', at + 4, `mapped-ram page size ${pageSize} of RAM block "${block}" (expected ${TARGET_PAGE_SIZE})`, section);
  }
  const bitmapOffset = be64Field(bytes, 12, at + 12, `bitmap offset of RAM block "${block}"`, section);
  const pagesOffset = be64Field(bytes, 20, at + 20, `pages offset of RAM block "${block}"`, section);
  if (pagesOffset % TARGET_PAGE_SIZE !== 0) {
    throw new StreamError('bad-mapped-ram-header', at + 20, `mapped-ram pages offset 0x${pagesOffset.toString(16)} of RAM block "${block}" is not page aligned`, section);
  }
  const headerEnd = at + MAPPED_RAM_HEADER_BYTES;
  if (bitmapOffset < headerEnd || bitmapOffset + mappedRamBitmapBytes(length) > pagesOffset) {
    throw new StreamError(
      'bad-mapped-ram-header',
      at + 12,
      `mapped-ram bitmap of RAM block "${block}" at 0x${bitmapOffset.toString(16)} (+0x${mappedRamBitmapBytes(length).toString(16)}) does not lie between its header's end 0x${headerEnd.toString(16)} and its pages at 0x${pagesOffset.toString(16)}`,
      section,
    );
  }
  if (!Number.isSafeInteger(pagesOffset + length)) throw new StreamError('length-too-large', at + 20, `mapped-ram pages of RAM block "${block}" end beyond any file`, section);
  return { version, pageSize, bitmapOffset, pagesOffset };
}

/** A RAM block of a mapped-ram file: its list entry with its header and where the header was. */
export interface MappedRamBlockLayout {
  readonly idstr: string;
  readonly length: number;
  readonly header: MappedRamHeader;
  /** File position of the header's first byte (for errors). */
  readonly headerOffset: number;
}

/**
 * Checks that a block's bitmap and pages lie inside a file of `fileSize`
 * bytes: 'truncated' (at the header) naming the region that runs past the
 * end, e.g. a file cut by a failed copy.
 */
export function checkMappedRamRegions(b: MappedRamBlockLayout, fileSize: number): void {
  const bitmapEnd = b.header.bitmapOffset + mappedRamBitmapBytes(b.length);
  if (bitmapEnd > fileSize) {
    throw new StreamError('truncated', b.headerOffset, `the bitmap of RAM block "${b.idstr}" [0x${b.header.bitmapOffset.toString(16)}, 0x${bitmapEnd.toString(16)}) runs past the file's end 0x${fileSize.toString(16)}`);
  }
  const pagesEnd = mappedRamBlockEnd(b.header, b.length);
  if (pagesEnd > fileSize) {
    throw new StreamError('truncated', b.headerOffset, `the pages of RAM block "${b.idstr}" [0x${b.header.pagesOffset.toString(16)}, 0x${pagesEnd.toString(16)}) run past the file's end 0x${fileSize.toString(16)}`);
  }
}

/** A block's bitmap from its bytes as in the file ({@link mappedRamBitmapBytes} of them): bit i set = page i is in the file. */
export function mappedRamBitmap(length: number, bytes: Uint8Array): PageBitmap {
  return new PageBitmap(Math.ceil(length / TARGET_PAGE_SIZE), { bytes });
}

/**
 * The first 8 bytes of a mapped-ram file that `qmt receive` has not finished
 * (it writes QEMU's "QEVM" header last, once everything else is durable):
 * "QMTP" and the stream version. QEMU refuses such a file ("Not a migration
 * stream"); our decoder says 'incomplete'.
 */
export const INCOMPLETE_MAGIC = 0x514d5450;
