/**
 * Numbers of QEMU 10.0's migration wire format. Names in comments are QEMU's
 * (migration/savevm.h, migration/ram.h, migration/migration.c).
 * `as const` objects rather than `const enum`: isolated transpilers (tsup/esbuild)
 * cannot inline const enums across files.
 */

/** QEMU_VM_FILE_MAGIC, "QEVM". */
export const FILE_MAGIC = 0x5145564d;
/** QEMU_VM_FILE_VERSION. */
export const FILE_VERSION = 3;
/** QEMU_VM_FILE_VERSION_COMPAT: recognised only to be refused. */
export const FILE_VERSION_COMPAT = 2;

/** Top-level record type bytes of the main channel. */
export const RecordType = {
  EOF: 0x00, // QEMU_VM_EOF
  SECTION_START: 0x01, // QEMU_VM_SECTION_START
  SECTION_PART: 0x02, // QEMU_VM_SECTION_PART
  SECTION_END: 0x03, // QEMU_VM_SECTION_END
  SECTION_FULL: 0x04, // QEMU_VM_SECTION_FULL
  SUBSECTION: 0x05, // QEMU_VM_SUBSECTION (inside device payloads only)
  VMDESCRIPTION: 0x06, // QEMU_VM_VMDESCRIPTION
  CONFIGURATION: 0x07, // QEMU_VM_CONFIGURATION
  COMMAND: 0x08, // QEMU_VM_COMMAND
  SECTION_FOOTER: 0x7e, // QEMU_VM_SECTION_FOOTER
} as const;

/** Flags in the low 12 bits of a RAM record's be64 (RAM_SAVE_FLAG_*). */
export const RamFlag = {
  FULL: 0x001, // RAM_SAVE_FLAG_FULL, obsolete, never sent
  ZERO: 0x002, // RAM_SAVE_FLAG_ZERO
  MEM_SIZE: 0x004, // RAM_SAVE_FLAG_MEM_SIZE
  PAGE: 0x008, // RAM_SAVE_FLAG_PAGE
  EOS: 0x010, // RAM_SAVE_FLAG_EOS
  CONTINUE: 0x020, // RAM_SAVE_FLAG_CONTINUE
  XBZRLE: 0x040, // RAM_SAVE_FLAG_XBZRLE
  HOOK: 0x080, // RAM_SAVE_FLAG_HOOK (RDMA)
  COMPRESS_PAGE: 0x100, // RAM_SAVE_FLAG_COMPRESS_PAGE, removed in 9.1
  MULTIFD_FLUSH: 0x200, // RAM_SAVE_FLAG_MULTIFD_FLUSH
} as const;

/** The RAM handler's idstr and the only version a 10.0 destination accepts. */
export const RAM_IDSTR = 'ram';
export const RAM_VERSION = 4;
/** Target page size of x86 (TARGET_PAGE_SIZE); flags live below it. */
export const TARGET_PAGE_SIZE = 4096;
export const TARGET_PAGE_BITS = 12;
export const TARGET_PAGE_MASK = TARGET_PAGE_SIZE - 1;
/** ENCODING_FLAG_XBZRLE: the byte after an XBZRLE record's header. */
export const XBZRLE_ENCODING = 0x01;

/** MIG_CMD_* numbers of COMMAND records. */
export const Command = {
  INVALID: 0, // MIG_CMD_INVALID
  OPEN_RETURN_PATH: 1, // MIG_CMD_OPEN_RETURN_PATH
  PING: 2, // MIG_CMD_PING
  POSTCOPY_ADVISE: 3, // MIG_CMD_POSTCOPY_ADVISE
  POSTCOPY_LISTEN: 4, // MIG_CMD_POSTCOPY_LISTEN
  POSTCOPY_RUN: 5, // MIG_CMD_POSTCOPY_RUN
  POSTCOPY_RAM_DISCARD: 6, // MIG_CMD_POSTCOPY_RAM_DISCARD
  PACKAGED: 7, // MIG_CMD_PACKAGED
  ENABLE_COLO: 8, // MIG_CMD_ENABLE_COLO
  POSTCOPY_RESUME: 9, // MIG_CMD_POSTCOPY_RESUME
  RECV_BITMAP: 10, // MIG_CMD_RECV_BITMAP
  SWITCHOVER_START: 11, // MIG_CMD_SWITCHOVER_START
} as const;
/** First command number a 10.0 destination rejects (MIG_CMD_MAX). */
export const COMMAND_MAX = 12;
/** Version byte at the start of a POSTCOPY_RAM_DISCARD payload (postcopy_ram_discard_version). */
export const DISCARD_VERSION = 0;
/** QEMU puts at most this many ranges into one discard command (MAX_DISCARDS_PER_COMMAND). */
export const MAX_DISCARDS_PER_COMMAND = 12;

/** Return-path message types (MIG_RP_MSG_*). */
export const RpMessage = {
  INVALID: 0, // MIG_RP_MSG_INVALID
  SHUT: 1, // MIG_RP_MSG_SHUT
  PONG: 2, // MIG_RP_MSG_PONG
  REQ_PAGES_ID: 3, // MIG_RP_MSG_REQ_PAGES_ID
  REQ_PAGES: 4, // MIG_RP_MSG_REQ_PAGES
  RECV_BITMAP: 5, // MIG_RP_MSG_RECV_BITMAP
  RESUME_ACK: 6, // MIG_RP_MSG_RESUME_ACK
  SWITCHOVER_ACK: 7, // MIG_RP_MSG_SWITCHOVER_ACK
} as const;
export const RP_MESSAGE_MAX = 8;
/** The source refuses return-path messages longer than this (max_len in source_return_path_thread). */
export const RP_MAX_LENGTH = 512;
/** End mark after a received-bitmap (RAMBLOCK_RECV_BITMAP_ENDING). */
export const RECV_BITMAP_ENDING = 0x0123456789abcdefn;
/** RESUME_ACK's value (MIGRATION_RESUME_ACK_VALUE). */
export const RESUME_ACK_VALUE = 1;

/** Names of the configuration record's subsections. */
export const ConfigSubsection = {
  TARGET_PAGE_BITS: 'configuration/target-page-bits',
  CAPABILITIES: 'configuration/capabilities',
  UUID: 'configuration/uuid',
} as const;
