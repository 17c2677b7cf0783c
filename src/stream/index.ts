export * from './constants.js';
export * from './errors.js';
export type * from './records.js';
export { StreamDecoder, PreemptDecoder, type StreamDecoderOptions, type PreemptDecoderOptions, type DecodedRecord, type DecodedPreemptRecord, type DeviceSectionSize } from './decoder.js';
export { StreamEncoder, PreemptEncoder, type StreamEncoderOptions, type WritePagesResult } from './encoder.js';
export { PageBitmap } from './bitmap.js';
export { ReturnPathDecoder, encodeReturnPathMessage, writeReturnPathMessage, ReceivedBitmap, type ReturnPathDecoderOptions } from './return-path.js';
export { applyXbzrle, encodeXbzrle } from './xbzrle.js';
export { ByteWriter, concatPieces } from './byte-writer.js';
export { commandName } from './commands.js';
export { isZeroPage, type KnownBlock, type RamFormat } from './ram.js';
export * from './vmdesc.js';
export { StreamSummary, type StreamSummaryReport, type PassCounts, type DeviceSummary } from './summary.js';
export {
  MULTIFD_MAGIC,
  MULTIFD_VERSION,
  MULTIFD_INIT_BYTES,
  MULTIFD_PACKET_FIXED_BYTES,
  MULTIFD_PACKET_PAGES,
  MULTIFD_BLOCK_NAME_BYTES,
  MultifdFlag,
  MultifdCompression,
  MultifdDecoder,
  encodeMultifdInit,
  encodeMultifdPacketHeader,
  multifdPacketHeaderLength,
  forEachOffsetRun,
  type MultifdDecoderOptions,
  type MultifdInitRecord,
  type MultifdPacketRecord,
  type MultifdPacketHeaderFields,
  type MultifdRecord,
} from './multifd.js';
export {
  MAPPED_RAM_VERSION,
  MAPPED_RAM_HEADER_BYTES,
  MAPPED_RAM_ALIGNMENT,
  decodeMappedRamHeader,
  writeMappedRamHeader,
  mappedRamHeaderLength,
  mappedRamBitmapBytes,
  mappedRamPagePosition,
  mappedRamBlockEnd,
  layoutMappedRamBlock,
  checkMappedRamRegions,
  type MappedRamHeader,
  type MappedRamBlockLayout,
} from './mapped-ram.js';
export type { MappedRamSkip } from './ram.js';
