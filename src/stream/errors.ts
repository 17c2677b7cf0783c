/**
 * Stable codes of every way a stream can be refused. They are part of the API:
 * callers switch on them, the CLI prints them.
 */
export type StreamErrorCode =
  | 'truncated' // input ended inside a record or before the stream was complete
  | 'bad-magic'
  | 'unsupported-version'
  | 'unknown-record-type'
  | 'unexpected-record' // a known record in a place it may not be
  | 'bad-configuration'
  | 'unknown-subsection'
  | 'unknown-section' // PART/END/footer naming a section id never started
  | 'bad-footer'
  | 'unknown-command'
  | 'bad-command-length'
  | 'bad-command'
  | 'bad-ram-flags'
  | 'bad-block-list'
  | 'unknown-ram-block'
  | 'continue-without-block'
  | 'page-out-of-range'
  | 'bad-zero-fill'
  | 'bad-xbzrle'
  | 'length-too-large' // a length field beyond the configured limit
  | 'device-boundary-not-found'
  | 'device-size-mismatch'
  | 'package-overrun'
  | 'package-without-run'
  | 'bad-vmdesc'
  | 'trailing-data'
  | 'bad-return-path-message'
  | 'bad-bitmap'
  | 'bad-multifd-init' // a multifd init message with a wrong UUID or channel id
  | 'bad-multifd-packet' // a multifd packet field that is inconsistent (next_packet_size, flags, block name)
  | 'unaligned-page' // a page offset that is not a multiple of the page size
  | 'bad-mapped-ram-header' // a mapped-ram block header with a wrong page size, misaligned or overlapping regions
  | 'incomplete' // a mapped-ram file qmt receive did not finish (the migration failed or was interrupted)
  | 'unsupported'; // valid QEMU, outside what this library implements (RDMA; mapped-ram where it was not asked for)

import { QmtError } from '../errors.js';

/** Names the section a failing record belonged to, when it is known. */
export interface SectionContext {
  readonly sectionId: number;
  readonly idstr?: string;
  readonly instanceId?: number;
}

/**
 * The one error the stream codec throws for bad input. `offset` is the byte
 * offset (from the start of the channel's byte stream) of the first byte of the
 * record or field that is wrong.
 */
export class StreamError extends QmtError {
  static readonly family = 'stream';
  override readonly name = 'StreamError';
  readonly family = 'stream';
  readonly code: StreamErrorCode;
  declare readonly offset: number;
  readonly section: SectionContext | undefined;

  constructor(code: StreamErrorCode, offset: number, message: string, section?: SectionContext) {
    const where = section ? ` (in section ${section.sectionId}${section.idstr === undefined ? '' : ` "${section.idstr}"`})` : '';
    super(`${message}${where}`, { offset });
    this.code = code;
    this.section = section;
  }

  /** The one-line form the CLI prints: `<code> at offset <n>: <what>`. */
  override describe(): string {
    return `${this.code} at offset ${this.offset}: ${this.message}`;
  }
}
