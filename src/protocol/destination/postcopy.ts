import { TARGET_PAGE_SIZE } from '../../stream/constants.js';
import type { StreamRecordWithRuns as StreamRecord } from '../../stream/records.js';
import { usageError } from '../../errors.js';
import { MigrationError, type MigrationPhase } from '../errors.js';
import type { PageTracker } from '../page-tracker.js';

/**
 * Postcopy on the destination: the ADVISE, DISCARD and LISTEN commands
 * (whether the decoder saw ADVISE and LISTEN is the decoder's own state:
 * `ramFormat.postcopyAdvised`, `postcopy`), and demand requests.
 */

type Command = Extract<StreamRecord, { type: 'command' }>['command'];

/** POSTCOPY_ADVISE: refused unless postcopy is enabled here and the page sizes are ours. */
export function checkAdvise(c: Extract<Command, { cmd: 'postcopy-advise' }>, enabled: boolean, phase: MigrationPhase): void {
  if (!enabled) throw new MigrationError('protocol', phase, 'the source advises postcopy, but postcopy is not enabled on this destination');
  if (c.targetPageSize !== BigInt(TARGET_PAGE_SIZE) || c.pageSizeSummary !== BigInt(TARGET_PAGE_SIZE)) {
    throw new MigrationError('protocol', phase, `postcopy page sizes 0x${c.pageSizeSummary.toString(16)}/0x${c.targetPageSize.toString(16)} differ from ours (0x1000)`);
  }
}

/** A command that needs POSTCOPY_ADVISE first. */
export function requireAdvised(advised: boolean, what: string, phase: MigrationPhase): void {
  if (!advised) throw new MigrationError('protocol', phase, `${what} without POSTCOPY_ADVISE`);
}

/** POSTCOPY_RAM_DISCARD: the pages will come again. */
export function discard(c: Extract<Command, { cmd: 'postcopy-ram-discard' }>, pages: PageTracker): void {
  for (const range of c.ranges) pages.discard(c.block, range.start, range.length);
}

/**
 * The arguments of requestPage, checked before anything is sent: a request
 * the source would refuse ends the migration there.
 */
export function checkPageRequest(block: unknown, offset: unknown, pages: PageTracker, over: MigrationError | undefined): asserts block is string {
  if (typeof block !== 'string') throw usageError('type', 'unknown-ram-block', 'block', `block must be a RAM block name, got ${typeof block}`);
  if (typeof offset !== 'number' || !Number.isSafeInteger(offset)) throw usageError('type', 'page-out-of-range', 'offset', `offset must be an integer, got ${String(offset)}`);
  if (over) throw over;
  const info = pages.block(block);
  if (!info) {
    const blocks = pages.blocks;
    const known = blocks.length === 0 ? 'the RAM block list has not arrived yet' : `known: ${blocks.map((b) => `"${b.idstr}"`).join(', ')}`;
    throw usageError('range', 'unknown-ram-block', 'block', `no RAM block "${block}" in this migration (${known})`);
  }
  if (offset < 0 || offset >= info.length) throw usageError('range', 'page-out-of-range', 'offset', `offset 0x${offset.toString(16)} is outside RAM block "${block}" (0x${info.length.toString(16)} bytes)`);
  if (offset % TARGET_PAGE_SIZE !== 0) throw usageError('range', 'unaligned-offset', 'offset', `offset 0x${offset.toString(16)} is not a multiple of the page size (0x${TARGET_PAGE_SIZE.toString(16)})`);
}
