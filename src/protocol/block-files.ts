/**
 * Where a RAM block's pages live in a file, as every thread of a session can
 * use it: page at byte `offset` of the block is at byte `base + offset` of
 * the file. One description for the files a saved VM keeps (one file per
 * block, base 0) and for a mapped-ram file (every block in one file, each at
 * its own base), so that a worker thread reads or writes a channel's pages
 * at their fixed positions itself.
 */
export interface BlockFile {
  readonly idstr: string;
  /** The block's bytes (a multiple of the page size). */
  readonly length: number;
  /** For errors: the file's path. */
  readonly path: string;
  /**
   * The open file's descriptor, valid in every thread of the process until
   * the session that uses it has ended (its owner closes it after that).
   */
  readonly fd: number;
  /** Byte of the file where the block's page 0 is. */
  readonly base: number;
}

/** The file position of byte `offset` of `block`. */
export function filePosition(block: BlockFile, offset: number): number {
  return block.base + offset;
}
