import { Command, COMMAND_MAX, RecordType } from './constants.js';

/**
 * Where does a device section end? Device payloads carry no length (QEMU's
 * loader finds the end by running the device's own load code). We delimit them
 * in three ways, from exact to heuristic:
 *
 * 1. By size from the VM description, when it is known up front (a file whose
 *    trailing VMDESCRIPTION was read first): exact.
 * 2. By the footer rule: the payload ends at the first `7E <be32 this id>`
 *    that is followed by a plausible next record — a full, valid record header
 *    (a START/FULL with a printable idstr and small instance/version, a
 *    PART/END of a section already started, a COMMAND with a known number and
 *    its fixed length, or EOF followed by VMDESCRIPTION or the end of input).
 *    Inside a PACKAGED blob the footer and the next record's header must lie
 *    within the package. The payload may not exceed maxDeviceSectionBytes: once
 *    no candidate within that (or the package) is left, the section is refused.
 * 3. Confirmed afterwards: when the VM description arrives after EOF, every
 *    size found by rule 2 is checked against it.
 */

export type BoundaryVerdict = 'yes' | 'no' | 'need-more';

export interface BoundaryContext {
  /** Section ids started so far (PART/END may only name these). */
  readonly startedSections: ReadonlySet<number>;
  /** True when no more input will come. */
  readonly ended: boolean;
  /** Bytes left in the enclosing package after position `p`, if inside one. */
  readonly packageRemaining?: number;
}

const FIXED_CMD_LEN: Record<number, number> = {
  [Command.OPEN_RETURN_PATH]: 0,
  [Command.PING]: 4,
  [Command.POSTCOPY_LISTEN]: 0,
  [Command.POSTCOPY_RUN]: 0,
  [Command.PACKAGED]: 4,
  [Command.ENABLE_COLO]: 0,
  [Command.POSTCOPY_RESUME]: 0,
  [Command.SWITCHOVER_START]: 0,
};

function be32(b: Uint8Array, p: number): number {
  return ((b[p] as number) * 0x1000000 + (((b[p + 1] as number) << 16) | ((b[p + 2] as number) << 8) | (b[p + 3] as number))) >>> 0;
}

/**
 * Judges whether a record plausibly starts at `b[p]` (`b` holds bytes up to
 * `b.length`; more may come unless `ctx.ended`).
 */
export function plausibleNextRecord(b: Uint8Array, p: number, ctx: BoundaryContext): BoundaryVerdict {
  const have = b.length - p;
  const need = (n: number): BoundaryVerdict | undefined => {
    // A header that would cross the package end is no record of this package; known without its bytes.
    if (ctx.packageRemaining !== undefined && n > ctx.packageRemaining) return 'no';
    return have >= n ? undefined : ctx.ended ? 'no' : 'need-more';
  };
  if (ctx.packageRemaining !== undefined) {
    // A package never ends after a device section: POSTCOPY_RUN comes last.
    if (ctx.packageRemaining <= 0) return 'no';
    if (b[p] === RecordType.EOF) return 'no';
  }
  if (have === 0) return ctx.ended ? 'no' : 'need-more';
  switch (b[p]) {
    case RecordType.EOF: {
      if (have === 1) return ctx.ended ? 'yes' : 'need-more';
      if (b[p + 1] !== RecordType.VMDESCRIPTION) return 'no';
      const m = need(7);
      if (m) return m;
      return b[p + 6] === 0x7b /* '{' */ ? 'yes' : 'no';
    }
    case RecordType.SECTION_PART:
    case RecordType.SECTION_END: {
      const m = need(5);
      if (m) return m;
      return ctx.startedSections.has(be32(b, p + 1)) ? 'yes' : 'no';
    }
    case RecordType.SECTION_START:
    case RecordType.SECTION_FULL: {
      const m = need(6);
      if (m) return m;
      if (be32(b, p + 1) > 0xffff) return 'no';
      const n = b[p + 5] as number;
      if (n === 0) return 'no';
      const m2 = need(6 + n + 8);
      if (m2) return m2;
      for (let i = 0; i < n; i++) {
        const c = b[p + 6 + i] as number;
        if (c < 0x20 || c > 0x7e) return 'no';
      }
      const instance = be32(b, p + 6 + n);
      const version = be32(b, p + 10 + n);
      return instance <= 0xffff && version <= 0xffff ? 'yes' : 'no';
    }
    case RecordType.COMMAND: {
      const m = need(5);
      if (m) return m;
      const cmd = ((b[p + 1] as number) << 8) | (b[p + 2] as number);
      const len = ((b[p + 3] as number) << 8) | (b[p + 4] as number);
      if (cmd === 0 || cmd >= COMMAND_MAX) return 'no';
      const fixed = FIXED_CMD_LEN[cmd];
      if (fixed !== undefined) return len === fixed ? 'yes' : 'no';
      if (cmd === Command.POSTCOPY_ADVISE) return len === 0 || len === 16 ? 'yes' : 'no';
      return len >= 2 ? 'yes' : 'no';
    }
    default:
      return 'no';
  }
}

/** Finds `7E <be32 id>` in `b` from `from` on; returns the index of the 0x7E or -1. */
export function findFooter(b: Uint8Array, from: number, sectionId: number): number {
  const i0 = (sectionId >>> 24) & 0xff;
  const i1 = (sectionId >>> 16) & 0xff;
  const i2 = (sectionId >>> 8) & 0xff;
  const i3 = sectionId & 0xff;
  let i = from;
  for (;;) {
    i = b.indexOf(RecordType.SECTION_FOOTER, i);
    if (i < 0 || i + 5 > b.length) return i < 0 ? -1 : i;
    if (b[i + 1] === i0 && b[i + 2] === i1 && b[i + 3] === i2 && b[i + 4] === i3) return i;
    i++;
  }
}
