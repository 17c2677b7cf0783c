/**
 * Wire records as discriminated unions on `type`. The decoder yields them, the
 * encoder takes them; decode(encode(x)) = x for every record here.
 */
import type { MappedRamHeader } from './mapped-ram.js';
import type { KnownBlock } from './ram.js';

// ---- main channel: framing ---------------------------------------------------

export interface HeaderRecord {
  readonly type: 'header';
  /** Always FILE_VERSION (3): anything else is refused while decoding. */
  readonly version: number;
}

export interface ConfigurationRecord {
  readonly type: 'configuration';
  /** e.g. "pc-q35-10.0". */
  readonly machineType: string;
  /** Present only when the source sent the target-page-bits subsection. */
  readonly targetPageBits?: number;
  /** Validated capabilities announced by the source (x-ignore-shared, mapped-ram). */
  readonly capabilities?: readonly string[];
  /** 16 raw bytes, present only with validate-uuid. */
  readonly uuid?: Uint8Array;
}

export type SectionKind = 'start' | 'part' | 'end' | 'full';

/**
 * The header of a START/PART/END/FULL section. PART and END carry only the id
 * on the wire; the decoder fills idstr/instance/version from the START it
 * remembers, the encoder writes them only for START/FULL.
 */
export interface SectionHeaderRecord {
  readonly type: 'section';
  readonly kind: SectionKind;
  readonly sectionId: number;
  readonly idstr: string;
  readonly instanceId: number;
  readonly versionId: number;
}

/** `7E be32 id`, after every section payload when footers are on. */
export interface SectionFooterRecord {
  readonly type: 'footer';
  readonly sectionId: number;
}

/** The payload of a non-RAM section (device state), delimited as documented in device-boundary.ts. */
export interface DeviceStateRecord {
  readonly type: 'device-state';
  readonly sectionId: number;
  readonly idstr: string;
  readonly instanceId: number;
  readonly versionId: number;
  readonly kind: SectionKind;
  readonly data: Uint8Array;
}

export interface EofRecord {
  readonly type: 'eof';
}

export interface VmDescriptionRecord {
  readonly type: 'vmdesc';
  /** The JSON text exactly as sent (UTF-8). */
  readonly json: Uint8Array;
}

export interface CommandRecord {
  readonly type: 'command';
  readonly command: MigrationCommand;
}

/** Emitted when the decoder reaches the end of a PACKAGED blob (after its POSTCOPY_RUN). */
export interface PackageEndRecord {
  readonly type: 'package-end';
}

// ---- commands ----------------------------------------------------------------

export interface DiscardRange {
  /** Byte offset inside the RAM block. */
  readonly start: number;
  /** Bytes. */
  readonly length: number;
}

export type MigrationCommand =
  | { readonly cmd: 'open-return-path' }
  | { readonly cmd: 'ping'; readonly value: number }
  /** 16-byte form; `pageSizeSummary` ORs the page sizes of all blocks, `targetPageSize` is 4096 on x86. */
  | { readonly cmd: 'postcopy-advise'; readonly pageSizeSummary: bigint; readonly targetPageSize: bigint }
  /** 0-byte form: only dirty-bitmap postcopy. */
  | { readonly cmd: 'postcopy-advise-bitmap-only' }
  | { readonly cmd: 'postcopy-listen' }
  | { readonly cmd: 'postcopy-run' }
  | { readonly cmd: 'postcopy-ram-discard'; readonly block: string; readonly ranges: readonly DiscardRange[] }
  /** The package's `length` bytes follow the command; the decoder then yields its records and a `package-end`. */
  | { readonly cmd: 'packaged'; readonly length: number }
  | { readonly cmd: 'enable-colo' }
  | { readonly cmd: 'postcopy-resume' }
  | { readonly cmd: 'recv-bitmap'; readonly block: string }
  | { readonly cmd: 'switchover-start' };

export type CommandName = MigrationCommand['cmd'];

// ---- RAM ---------------------------------------------------------------------

export interface RamBlockInfo {
  readonly idstr: string;
  /** used_length in bytes. */
  readonly length: number;
  /** Present only for blocks whose page size differs from the host's (postcopy on). */
  readonly pageSize?: number;
  /** Guest physical address, present (for every block) only with x-ignore-shared. */
  readonly gpa?: bigint;
  /** The block's header in a mapped-ram file (where its bitmap and pages lie). */
  readonly mappedRam?: MappedRamHeader;
}

export interface RamBlockListRecord {
  readonly type: 'ram-blocks';
  /** Sum of every block's length, as sent (the "offset" of the MEM_SIZE record). */
  readonly total: number;
  readonly blocks: readonly RamBlockInfo[];
}

/**
 * `continued` says whether the record was sent with RAM_SAVE_FLAG_CONTINUE
 * (the idstr omitted). The decoder always fills `block` from the per-channel
 * last block; the encoder decides CONTINUE by its own rule unless told to keep it.
 */
export interface RamPageRecord {
  readonly type: 'ram-page';
  readonly block: string;
  readonly offset: number;
  readonly continued: boolean;
  /** TARGET_PAGE_SIZE bytes: a view into the input chunk unless the page spanned chunks. */
  readonly data: Uint8Array;
}

export interface RamZeroRecord {
  readonly type: 'ram-zero';
  readonly block: string;
  readonly offset: number;
  readonly continued: boolean;
}

export interface RamXbzrleRecord {
  readonly type: 'ram-xbzrle';
  readonly block: string;
  readonly offset: number;
  readonly continued: boolean;
  /** The encoded delta (ULEB128 run pairs), to be applied to the page the receiver holds. */
  readonly encoded: Uint8Array;
}

export interface RamEosRecord {
  readonly type: 'ram-eos';
}

export interface RamMultifdFlushRecord {
  readonly type: 'ram-multifd-flush';
}

export type RamRecord =
  | RamBlockListRecord
  | RamPageRecord
  | RamZeroRecord
  | RamXbzrleRecord
  | RamEosRecord
  | RamMultifdFlushRecord;

/**
 * Consecutive PAGE records of one block at consecutive offsets, whole in one
 * input chunk, as the decoders yield them with `pageRuns`: the first page as
 * sent (CONTINUE or not), every later one sent with CONTINUE. Expanded, page
 * i is the `ram-page` record { block, offset: offset + i*4096, continued:
 * i === 0 ? continued : true, data: data[start + i*stride, +4096) }.
 */
export interface RamPageRunRecord {
  readonly type: 'ram-pages';
  readonly block: string;
  /** The block as the parser found it (its `index` is the block's position in the block list). */
  readonly handle: KnownBlock;
  /** Offset of the first page in the block. */
  readonly offset: number;
  /** Pages in the run, ≥ 1. */
  readonly count: number;
  /**
   * Page i is data[start + i*stride, start + i*stride + 4096): views into the
   * input chunk (often the whole chunk), no copy; valid as long as the caller
   * does not reuse that chunk's memory. A page that spanned chunks (copied) is
   * a run of 1 with stride 4096.
   */
  readonly data: Uint8Array;
  readonly start: number;
  readonly stride: number;
  /** Whether the first page was sent with CONTINUE. */
  readonly continued: boolean;
}

/** Consecutive ZERO records of one block at consecutive offsets, whole in one input chunk (see RamPageRunRecord). */
export interface RamZeroRunRecord {
  readonly type: 'ram-zeros';
  readonly block: string;
  readonly handle: KnownBlock;
  readonly offset: number;
  readonly count: number;
  readonly continued: boolean;
}

export type RamRunRecord = RamPageRunRecord | RamZeroRunRecord;

/** Records the main-channel decoder yields. */
export type StreamRecord =
  | HeaderRecord
  | ConfigurationRecord
  | SectionHeaderRecord
  | SectionFooterRecord
  | DeviceStateRecord
  | EofRecord
  | VmDescriptionRecord
  | CommandRecord
  | PackageEndRecord
  | RamRecord;

/** Records of the preempt channel: bare page records (EOS only in the ≤ 7.2 compat mode). */
export type PreemptRecord = RamPageRecord | RamZeroRecord | RamEosRecord;

/** What StreamDecoder yields with `pageRuns: true`: every PAGE and ZERO record is in a run. */
export type StreamRecordWithRuns = Exclude<StreamRecord, RamPageRecord | RamZeroRecord> | RamRunRecord;

/** What PreemptDecoder yields with `pageRuns: true`. */
export type PreemptRecordWithRuns = RamRunRecord | RamEosRecord;

// ---- return path -----------------------------------------------------------

export type ReturnPathMessage =
  | { readonly type: 'shut'; readonly value: number }
  | { readonly type: 'pong'; readonly value: number }
  | { readonly type: 'req-pages-id'; readonly block: string; readonly offset: number; readonly length: number }
  | { readonly type: 'req-pages'; readonly offset: number; readonly length: number }
  /** `bitmap` is the little-endian received-bitmap, its length a multiple of 8. */
  | { readonly type: 'recv-bitmap'; readonly block: string; readonly bitmap: Uint8Array }
  | { readonly type: 'resume-ack'; readonly value: number }
  | { readonly type: 'switchover-ack' };
