import { BlockTime } from '../blocktime.js';
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
  checkMultifd(o.multifd);
  checkSignal(o.signal);
  checkNumber(o.idleTimeoutMs, 'idleTimeoutMs');
  checkNumber(o.acceptTimeoutMs, 'acceptTimeoutMs', { min: 1 });
  if (o.vcpus !== undefined) new BlockTime(o.vcpus); // throws its typed refusal
  if (o.recovery) {
    if (o.recovery.listen !== undefined) checkEndpoint(o.recovery.listen, 'recovery.listen');
    checkNumber(o.recovery.timeoutMs, 'recovery.timeoutMs', { min: 1 });
  }
}

/** `multifd`: 1–255 channels (QEMU's multifd-channels), a 16-byte UUID. */
function checkMultifd(m: DestinationOptions['multifd']): void {
  if (m === undefined) return;
  if (typeof m !== 'object' || m === null) throw usageError('type', 'bad-option', 'multifd', 'multifd must be an object { channels, uuid? }');
  if (typeof m.channels !== 'number') throw usageError('type', 'bad-option', 'multifd.channels', `multifd.channels must be a number, got ${typeof m.channels}`);
  if (!Number.isInteger(m.channels) || m.channels < 1 || m.channels > 255) throw usageError('range', 'bad-option', 'multifd.channels', `multifd.channels must be an integer from 1 to 255, got ${m.channels}`);
  if (m.uuid !== undefined && !(m.uuid instanceof Uint8Array && m.uuid.length === 16)) throw usageError('type', 'bad-option', 'multifd.uuid', 'multifd.uuid must be a Uint8Array of 16 bytes');
}
