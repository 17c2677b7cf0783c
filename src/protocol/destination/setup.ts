import { TARGET_PAGE_SIZE } from '../../stream/constants.js';
import type { RamBlockInfo } from '../../stream/records.js';
import { usageError } from '../../errors.js';
import { MigrationError, type MigrationPhase } from '../errors.js';
import type { GuestMemorySink } from '../memory.js';
import { checkEndpoint, checkNumber, checkSignal, checkTransport } from '../options.js';
import type { PageTracker } from '../page-tracker.js';
import type { DestinationOptions } from './types.js';

/**
 * Setup: the options checked before anything listens, and the block list
 * (RAM START section) that sizes the sink and the page tracker.
 */

/** The block list arrived: every block must use our page size; the sink and the tracker are sized. */
export function acceptBlockList(blocks: readonly RamBlockInfo[], sink: GuestMemorySink, pages: PageTracker, phase: MigrationPhase): void {
  for (const b of blocks) {
    if (b.pageSize !== undefined && b.pageSize !== TARGET_PAGE_SIZE) {
      throw new MigrationError('protocol', phase, `RAM block "${b.idstr}" uses ${b.pageSize}-byte pages; only ${TARGET_PAGE_SIZE} is supported`);
    }
  }
  sink.setBlocks(blocks);
  pages.setBlocks(blocks);
}

export function validateDestinationOptions(o: DestinationOptions): void {
  if (typeof o !== 'object' || o === null) throw usageError('type', 'bad-option', 'options', 'DestinationSession.listen needs an options object');
  checkEndpoint(o.listen, 'listen');
  const sink = o.sink as Partial<GuestMemorySink> | undefined;
  if (typeof sink !== 'object' || sink === null || typeof sink.setBlocks !== 'function' || typeof sink.writePage !== 'function' || typeof sink.zeroPage !== 'function' || typeof sink.readPage !== 'function') {
    throw usageError('type', 'bad-option', 'sink', 'sink must be a GuestMemorySink (setBlocks, writePage, zeroPage, readPage, flush, close)');
  }
  if (o.postcopy !== undefined && typeof o.postcopy !== 'boolean') throw usageError('type', 'bad-option', 'postcopy', `postcopy must be a boolean, got ${typeof o.postcopy}`);
  checkTransport(o.transport);
  checkSignal(o.signal);
  checkNumber(o.idleTimeoutMs, 'idleTimeoutMs');
  checkNumber(o.acceptTimeoutMs, 'acceptTimeoutMs', { min: 1 });
  if (o.recovery) {
    if (o.recovery.listen !== undefined) checkEndpoint(o.recovery.listen, 'recovery.listen');
    checkNumber(o.recovery.timeoutMs, 'recovery.timeoutMs', { min: 1 });
  }
}
