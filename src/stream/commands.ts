import { Command, COMMAND_MAX, DISCARD_VERSION } from './constants.js';
import { StreamError } from './errors.js';
import type { ByteWriter } from './byte-writer.js';
import type { DiscardRange, MigrationCommand } from './records.js';
import { decodeName } from './byte-queue.js';

/** Payload lengths a 10.0 destination enforces ("received with bad length"); -1 = variable. */
const FIXED_LENGTH: Record<number, number> = {
  [Command.OPEN_RETURN_PATH]: 0,
  [Command.PING]: 4,
  [Command.POSTCOPY_ADVISE]: -1, // 0 or 16
  [Command.POSTCOPY_LISTEN]: 0,
  [Command.POSTCOPY_RUN]: 0,
  [Command.POSTCOPY_RAM_DISCARD]: -1,
  [Command.PACKAGED]: 4,
  [Command.ENABLE_COLO]: 0,
  [Command.POSTCOPY_RESUME]: 0,
  [Command.RECV_BITMAP]: -1,
  [Command.SWITCHOVER_START]: 0,
};

/** COMMAND record header: type byte, be16 cmd, be16 len. */
export const COMMAND_HEADER_LENGTH = 5;

/**
 * Checks a command header before its payload is buffered, so that a bad
 * length is refused without waiting for (or allocating) its bytes.
 */
export function checkCommandHeader(cmd: number, len: number, offset: number): void {
  if (cmd === Command.INVALID || cmd >= COMMAND_MAX) {
    throw new StreamError('unknown-command', offset, `unknown command ${cmd}`);
  }
  const fixed = FIXED_LENGTH[cmd] as number;
  const ok =
    fixed >= 0
      ? len === fixed
      : cmd === Command.POSTCOPY_ADVISE
        ? len === 0 || len === 16
        : cmd === Command.RECV_BITMAP
          ? len >= 2
          : len >= 3; // discard: version, str8 name (≥1 byte), version
  if (!ok) throw new StreamError('bad-command-length', offset, `command ${commandName(cmd)} with bad length ${len}`);
}

/** Decodes a command payload (already length-checked). `offset` is the record's first byte. */
export function decodeCommand(cmd: number, payload: Uint8Array, offset: number): MigrationCommand {
  const view = new DataView(payload.buffer, payload.byteOffset, payload.byteLength);
  switch (cmd) {
    case Command.OPEN_RETURN_PATH:
      return { cmd: 'open-return-path' };
    case Command.PING:
      return { cmd: 'ping', value: view.getUint32(0) };
    case Command.POSTCOPY_ADVISE:
      if (payload.length === 0) return { cmd: 'postcopy-advise-bitmap-only' };
      return { cmd: 'postcopy-advise', pageSizeSummary: view.getBigUint64(0), targetPageSize: view.getBigUint64(8) };
    case Command.POSTCOPY_LISTEN:
      return { cmd: 'postcopy-listen' };
    case Command.POSTCOPY_RUN:
      return { cmd: 'postcopy-run' };
    case Command.POSTCOPY_RAM_DISCARD:
      return decodeDiscard(payload, view, offset);
    case Command.PACKAGED:
      return { cmd: 'packaged', length: view.getUint32(0) };
    case Command.ENABLE_COLO:
      return { cmd: 'enable-colo' };
    case Command.POSTCOPY_RESUME:
      return { cmd: 'postcopy-resume' };
    case Command.RECV_BITMAP: {
      const n = payload[0] as number;
      if (n === 0 || n + 1 !== payload.length) {
        throw new StreamError('bad-command', offset, `RECV_BITMAP name length ${n} does not match command length ${payload.length}`);
      }
      return { cmd: 'recv-bitmap', block: decodeName(payload.subarray(1)) };
    }
    case Command.SWITCHOVER_START:
      return { cmd: 'switchover-start' };
    default:
      throw new StreamError('unknown-command', offset, `unknown command ${cmd}`);
  }
}

function decodeDiscard(payload: Uint8Array, view: DataView, offset: number): MigrationCommand {
  // u8 version, str8 idstr, u8 0, then (be64 start, be64 length)*
  if (payload[0] !== DISCARD_VERSION) {
    throw new StreamError('bad-command', offset, `POSTCOPY_RAM_DISCARD version ${payload[0]} (expected ${DISCARD_VERSION})`);
  }
  const n = payload[1] as number;
  const rangesAt = 2 + n + 1;
  if (n === 0 || payload.length < rangesAt || (payload.length - rangesAt) % 16 !== 0 || payload.length === rangesAt) {
    throw new StreamError('bad-command', offset, `POSTCOPY_RAM_DISCARD with malformed ranges (length ${payload.length})`);
  }
  if (payload[2 + n] !== 0) throw new StreamError('bad-command', offset, 'POSTCOPY_RAM_DISCARD missing the zero byte after the block name');
  const ranges: DiscardRange[] = [];
  for (let p = rangesAt; p < payload.length; p += 16) {
    ranges.push({ start: readBe64Number(view, p), length: readBe64Number(view, p + 8) });
  }
  return { cmd: 'postcopy-ram-discard', block: decodeName(payload.subarray(2, 2 + n)), ranges };
}

function readBe64Number(view: DataView, p: number): number {
  return view.getUint32(p) * 0x1_0000_0000 + view.getUint32(p + 4);
}

/** The MIG_CMD_* number of a command. */
export function commandNumber(c: MigrationCommand): number {
  switch (c.cmd) {
    case 'open-return-path':
      return Command.OPEN_RETURN_PATH;
    case 'ping':
      return Command.PING;
    case 'postcopy-advise':
    case 'postcopy-advise-bitmap-only':
      return Command.POSTCOPY_ADVISE;
    case 'postcopy-listen':
      return Command.POSTCOPY_LISTEN;
    case 'postcopy-run':
      return Command.POSTCOPY_RUN;
    case 'postcopy-ram-discard':
      return Command.POSTCOPY_RAM_DISCARD;
    case 'packaged':
      return Command.PACKAGED;
    case 'enable-colo':
      return Command.ENABLE_COLO;
    case 'postcopy-resume':
      return Command.POSTCOPY_RESUME;
    case 'recv-bitmap':
      return Command.RECV_BITMAP;
    case 'switchover-start':
      return Command.SWITCHOVER_START;
  }
}

/** Payload length of a command on the wire (PACKAGED's package bytes are not counted, as in QEMU). */
export function commandPayloadLength(c: MigrationCommand): number {
  switch (c.cmd) {
    case 'ping':
    case 'packaged':
      return 4;
    case 'postcopy-advise':
      return 16;
    case 'postcopy-ram-discard':
      return 3 + Buffer.byteLength(c.block, 'latin1') + 16 * c.ranges.length;
    case 'recv-bitmap':
      return 1 + Buffer.byteLength(c.block, 'latin1');
    default:
      return 0;
  }
}

/** Writes a whole COMMAND record (type byte, header, payload). */
export function writeCommand(w: ByteWriter, c: MigrationCommand): void {
  w.u8(0x08).be16(commandNumber(c)).be16(commandPayloadLength(c));
  switch (c.cmd) {
    case 'ping':
      w.be32(c.value);
      break;
    case 'postcopy-advise':
      w.be64(c.pageSizeSummary).be64(c.targetPageSize);
      break;
    case 'postcopy-ram-discard':
      if (c.ranges.length === 0) throw new RangeError('a discard command needs at least one range');
      w.u8(DISCARD_VERSION).str8(c.block).u8(0);
      for (const r of c.ranges) w.be64(r.start).be64(r.length);
      break;
    case 'packaged':
      w.be32(c.length);
      break;
    case 'recv-bitmap':
      w.str8(c.block);
      break;
    default:
      break;
  }
}

const NAMES: Record<number, string> = Object.fromEntries(Object.entries(Command).map(([k, v]) => [v, k]));
/** QEMU's name of a command number, for messages. */
export function commandName(cmd: number): string {
  return NAMES[cmd] ?? `#${cmd}`;
}
