import { RamFlag, TARGET_PAGE_MASK, TARGET_PAGE_SIZE, XBZRLE_ENCODING } from './constants.js';
import { StreamError, type SectionContext } from './errors.js';
import { be32At, decodeName, type ByteQueue } from './byte-queue.js';
import type { ByteWriter } from './byte-writer.js';
import { usageError } from '../errors.js';
import { MAPPED_RAM_HEADER_BYTES, decodeMappedRamHeader, mappedRamBlockEnd, writeMappedRamHeader, type MappedRamBlockLayout, type MappedRamHeader } from './mapped-ram.js';
import type { RamBlockInfo, RamPageRunRecord, RamRecord, RamRunRecord, RamZeroRunRecord } from './records.js';

/** The flags that name a record's kind; CONTINUE is a modifier on top of one of them. */
const KIND_MASK = TARGET_PAGE_MASK & ~RamFlag.CONTINUE;

/** Options that change which optional block-list fields are on the wire. */
export interface RamFormat {
  /** x-ignore-shared: every block-list entry carries its guest physical address. */
  ignoreShared: boolean;
  /**
   * POSTCOPY_ADVISE was received: a block-list entry may carry its page size
   * (only blocks whose page size is not the host's, i.e. hugepages).
   */
  postcopyAdvised: boolean;
  /**
   * mapped-ram (a file, see mapped-ram.ts): every block-list entry carries a
   * mapped-ram header and the stream skips the block's bitmap and pages; no
   * page record may appear.
   */
  mappedRam?: boolean;
}

/** mapped-ram: the part of the file after a block's header that is not stream bytes. */
export interface MappedRamSkip extends MappedRamBlockLayout {
  /** File position where the stream goes on (the end of the block's pages). */
  readonly to: number;
}

/** A RAM block as the parser tracks it: its length bounds page offsets. */
export interface KnownBlock {
  readonly idstr: string;
  readonly length: number;
  /**
   * Its position in the block list (0-based), so that a consumer keeps its
   * per-block state in arrays indexed by it instead of Maps keyed by name.
   */
  readonly index: number;
}

/**
 * Module-local copies of the constants the per-page loops use: an imported
 * binding can compile to a getter call per access (CommonJS interop, as tsx
 * runs the tests and benchmarks on Node 20), a local const never does.
 */
const PAGE = TARGET_PAGE_SIZE;
const PAGE_MASK = TARGET_PAGE_MASK;
const F_ZERO = RamFlag.ZERO;
const F_PAGE = RamFlag.PAGE;
const F_CONTINUE = RamFlag.CONTINUE;

/** Header bytes of a page record sent with CONTINUE (the be64 alone). */
const CONTINUED_HEAD = 8;
/** Stride of the payloads of consecutive CONTINUE PAGE records in one chunk. */
const PAGE_RECORD_STRIDE = CONTINUED_HEAD + TARGET_PAGE_SIZE;

/**
 * Parses RAM records (RAM section payloads and the preempt channel) one
 * whole record at a time. Keeps the channel's CONTINUE memory ("last block"),
 * which survives section boundaries, as QEMU's does.
 */
export class RamRecordParser {
  /** Last block named by a record with an idstr on this channel. */
  lastBlock: string | undefined;
  /** After POSTCOPY_LISTEN only ZERO/PAGE/EOS may appear (QEMU's postcopy loader). */
  postcopy = false;
  /**
   * Yield PAGE and ZERO records as runs (`ram-pages`/`ram-zeros`): a record
   * per run of consecutive CONTINUE records in the head chunk, not per page.
   */
  pageRuns = false;
  private pendingList: { total: number; sum: number; blocks: RamBlockInfo[]; start: number; skip?: MappedRamSkip } | undefined;

  constructor(
    /** Shared with the channel that carries the block list. */
    readonly blocks: Map<string, KnownBlock>,
    readonly format: RamFormat,
    private readonly maxXbzrle = TARGET_PAGE_SIZE,
  ) {}

  /**
   * Returns the next record, or undefined when more bytes are needed (nothing
   * consumed in that case, except completed block-list entries). With
   * `pageRuns`, PAGE and ZERO records come as runs, none of which extends past
   * the absolute stream offset `limit` (the end of a PACKAGED blob).
   */
  next(q: ByteQueue, section?: SectionContext, limit = Infinity): RamRecord | RamRunRecord | undefined {
    if (this.pendingList) return this.continueBlockList(q, section);
    if (!q.ensure(8)) return undefined;
    const start = q.offset;
    const hi = q.be32(0);
    const lo = q.be32(4);
    const flags = lo & TARGET_PAGE_MASK;
    const offset = hi * 0x1_0000_0000 + (lo - flags);
    const kind = flags & KIND_MASK;
    const continued = (flags & RamFlag.CONTINUE) !== 0;
    if (this.format.mappedRam && (kind === RamFlag.PAGE || kind === RamFlag.ZERO || kind === RamFlag.XBZRLE || kind === RamFlag.MULTIFD_FLUSH)) {
      // QEMU's loader: "Unexpected RAM flags" (pages live at their offsets in the file, not in the stream).
      throw new StreamError('bad-ram-flags', start, `RAM flags 0x${flags.toString(16)} in a mapped-ram stream (its pages are not records)`, section);
    }
    switch (kind) {
      case RamFlag.PAGE:
      case RamFlag.ZERO:
      case RamFlag.XBZRLE: {
        if (this.postcopy && kind === RamFlag.XBZRLE) {
          throw new StreamError('bad-ram-flags', start, `XBZRLE page in postcopy (flags 0x${flags.toString(16)})`, section);
        }
        let nameLen = 0;
        if (!continued) {
          if (!q.ensure(9)) return undefined;
          nameLen = q.u8(8);
          if (nameLen === 0) throw new StreamError('unknown-ram-block', start, 'page record with an empty block name', section);
        }
        const head = continued ? 8 : 9 + nameLen;
        let total: number;
        if (kind === RamFlag.PAGE) total = head + TARGET_PAGE_SIZE;
        else if (kind === RamFlag.ZERO) total = head + 1;
        else {
          if (!q.ensure(head + 3)) return undefined;
          if (q.u8(head) !== XBZRLE_ENCODING) {
            throw new StreamError('bad-xbzrle', start, `XBZRLE encoding byte ${q.u8(head)} (expected 1)`, section);
          }
          const len = q.be16(head + 1);
          if (len > this.maxXbzrle) throw new StreamError('bad-xbzrle', start, `XBZRLE length ${len} exceeds the page size`, section);
          total = head + 3 + len;
        }
        if (!q.ensure(total)) return undefined;
        let block: string;
        if (continued) {
          if (this.lastBlock === undefined) {
            throw new StreamError('continue-without-block', start, 'CONTINUE flag on the first page record of the channel', section);
          }
          block = this.lastBlock;
        } else {
          block = decodeName(q.bytes(9, nameLen));
        }
        const known = this.blocks.get(block);
        if (!known) throw new StreamError('unknown-ram-block', start, `page for unknown RAM block "${block}"`, section);
        if (offset + TARGET_PAGE_SIZE > known.length) {
          throw new StreamError('page-out-of-range', start, `page at 0x${offset.toString(16)} beyond block "${block}" of 0x${known.length.toString(16)} bytes`, section);
        }
        this.lastBlock = block;
        if (this.pageRuns && kind !== RamFlag.XBZRLE) {
          if (kind === RamFlag.ZERO && q.u8(head) !== 0) {
            throw new StreamError('bad-zero-fill', start, `zero page with fill byte 0x${q.u8(head).toString(16)}`, section);
          }
          return this.run(q, kind, known, offset, continued, head, total, limit);
        }
        let rec: RamRecord;
        if (kind === RamFlag.PAGE) {
          rec = { type: 'ram-page', block, offset, continued, data: q.bytes(head, TARGET_PAGE_SIZE) };
        } else if (kind === RamFlag.ZERO) {
          const fill = q.u8(head);
          if (fill !== 0) throw new StreamError('bad-zero-fill', start, `zero page with fill byte 0x${fill.toString(16)}`, section);
          rec = { type: 'ram-zero', block, offset, continued };
        } else {
          rec = { type: 'ram-xbzrle', block, offset, continued, encoded: q.bytes(head + 3, total - head - 3) };
        }
        q.advance(total);
        return rec;
      }
      case RamFlag.EOS:
      case RamFlag.MULTIFD_FLUSH:
        if (continued || offset !== 0 || (this.postcopy && kind === RamFlag.MULTIFD_FLUSH)) {
          throw new StreamError('bad-ram-flags', start, `unexpected RAM flags 0x${flags.toString(16)} with address 0x${offset.toString(16)}`, section);
        }
        q.advance(8);
        return kind === RamFlag.EOS ? { type: 'ram-eos' } : { type: 'ram-multifd-flush' };
      case RamFlag.MEM_SIZE:
        if (continued || this.postcopy) {
          throw new StreamError('bad-ram-flags', start, `unexpected RAM flags 0x${flags.toString(16)}`, section);
        }
        q.advance(8);
        this.pendingList = { total: offset, sum: 0, blocks: [], start };
        return this.continueBlockList(q, section);
      case RamFlag.HOOK:
        throw new StreamError('unsupported', start, 'RAM_SAVE_FLAG_HOOK (RDMA) is not supported', section);
      default:
        throw new StreamError('bad-ram-flags', start, `unknown combination of RAM flags 0x${flags.toString(16)}`, section);
    }
  }

  /**
   * The run that starts with the (validated, not yet consumed) record at the
   * head of `q`: it takes every following record that is whole in the head
   * chunk, of the same kind, with CONTINUE, at the next offset, inside the
   * block and before `limit`. A record that fails any of these ends the run
   * and is parsed on its own by the next call, so errors (code, offset) are
   * exactly those of the per-page mode. Per page: two be32 reads and
   * compares, no allocation, no Map lookup.
   */
  private run(q: ByteQueue, kind: number, known: KnownBlock, offset: number, continued: boolean, head: number, total: number, limit: number): RamRunRecord {
    const buf = q.buf;
    const base = q.pos;
    const isPage = kind === F_PAGE;
    const recLen = isPage ? PAGE_RECORD_STRIDE : CONTINUED_HEAD + 1;
    const want = kind | F_CONTINUE;
    // The head chunk's end, or the limit if it comes first (both relative to buf).
    const stop = Math.min(buf.length, limit - q.offset + base);
    const maxCount = (known.length - offset) / PAGE;
    let p = base + total;
    let count = 1;
    let next = offset + PAGE;
    while (count < maxCount && p + recLen <= stop) {
      const lo = be32At(buf, p + 4);
      if ((lo & PAGE_MASK) !== want) break;
      if (be32At(buf, p) * 0x1_0000_0000 + (lo - want) !== next) break;
      if (!isPage && buf[p + CONTINUED_HEAD] !== 0) break;
      p += recLen;
      next += PAGE;
      count++;
    }
    q.advance(p - base);
    if (isPage) {
      const rec: RamPageRunRecord = {
        type: 'ram-pages',
        block: known.idstr,
        handle: known,
        offset,
        count,
        data: buf,
        start: base + head,
        stride: count === 1 ? PAGE : PAGE_RECORD_STRIDE,
        continued,
      };
      return rec;
    }
    const rec: RamZeroRunRecord = { type: 'ram-zeros', block: known.idstr, handle: known, offset, count, continued };
    return rec;
  }

  private continueBlockList(q: ByteQueue, section: SectionContext | undefined): RamRecord | undefined {
    const list = this.pendingList!;
    for (;;) {
      if (list.skip) {
        // mapped-ram: the bitmap and pages of the block just read are not stream bytes.
        const n = Math.min(q.available, list.skip.to - q.offset);
        q.skip(n);
        if (q.offset < list.skip.to) return undefined;
        list.skip = undefined;
      }
      if (list.sum >= list.total) break;
      const at = q.offset;
      if (!q.ensure(1)) return undefined;
      const n = q.u8(0);
      if (n === 0) throw new StreamError('bad-block-list', at, 'RAM block with an empty name', section);
      // name, used_length, then up to two optional be64s: peek far enough to decide.
      let need = 1 + n + 8;
      if (!q.ensure(need)) return undefined;
      const idstr = decodeName(q.bytes(1, n));
      const length = q.be64(1 + n);
      if (length % TARGET_PAGE_SIZE !== 0 || length === 0 || list.sum + length > list.total) {
        throw new StreamError('bad-block-list', at, `RAM block "${idstr}" length 0x${length.toString(16)} does not fit the total 0x${list.total.toString(16)}`, section);
      }
      const isLast = list.sum + length === list.total;
      let pageSize: number | undefined;
      if (this.format.postcopyAdvised) {
        // The page-size field is present only for non-host-page-size blocks. The
        // next thing is otherwise a str8 (first byte ≥ 1) or, after the last block,
        // a be64 EOS/MULTIFD_FLUSH: a be64 page size (first byte 0, value a power of
        // two above 4 KiB) is told apart from both.
        if (!q.ensure(need + 8)) return undefined;
        const candidate = q.be64(need);
        const firstByte = q.u8(need);
        const looksLikePageSize = firstByte === 0 && candidate > TARGET_PAGE_SIZE && Number.isInteger(Math.log2(candidate));
        if (looksLikePageSize && (!isLast || (candidate !== RamFlag.EOS && candidate !== RamFlag.MULTIFD_FLUSH))) {
          pageSize = candidate;
          need += 8;
        }
      }
      let gpa: bigint | undefined;
      if (this.format.ignoreShared) {
        if (!q.ensure(need + 8)) return undefined;
        gpa = q.be64big(need);
        need += 8;
      }
      let mappedRam: MappedRamHeader | undefined;
      if (this.format.mappedRam) {
        if (!q.ensure(need + MAPPED_RAM_HEADER_BYTES)) return undefined;
        mappedRam = decodeMappedRamHeader(q.bytes(need, MAPPED_RAM_HEADER_BYTES), at + need, idstr, length, section);
        list.skip = { idstr, length, header: mappedRam, headerOffset: at + need, to: mappedRamBlockEnd(mappedRam, length) };
        need += MAPPED_RAM_HEADER_BYTES;
      }
      q.advance(need);
      const info: RamBlockInfo = { idstr, length, ...(pageSize === undefined ? {} : { pageSize }), ...(gpa === undefined ? {} : { gpa }), ...(mappedRam ? { mappedRam } : {}) };
      this.blocks.set(idstr, { idstr, length, index: list.blocks.length });
      list.blocks.push(info);
      list.sum += length;
    }
    this.pendingList = undefined;
    // QEMU forgets the last block when the block list is (re)sent.
    this.lastBlock = undefined;
    return { type: 'ram-blocks', total: list.total, blocks: list.blocks };
  }

  /** A copy with the same channel state, over `blocks` (for StreamDecoder.fork). */
  clone(blocks: Map<string, KnownBlock>, format: RamFormat): RamRecordParser {
    const c = new RamRecordParser(blocks, format, this.maxXbzrle);
    c.lastBlock = this.lastBlock;
    c.postcopy = this.postcopy;
    c.pageRuns = this.pageRuns;
    if (this.pendingList) c.pendingList = { ...this.pendingList, blocks: [...this.pendingList.blocks], ...(this.pendingList.skip ? { skip: { ...this.pendingList.skip } } : {}) };
    return c;
  }

  /**
   * mapped-ram: the block whose bitmap and pages the parser is passing over,
   * and the file position where the stream goes on (a reader with positioned
   * I/O jumps there instead of reading them: see StreamDecoder.jump).
   */
  get skipping(): MappedRamSkip | undefined {
    return this.pendingList?.skip;
  }

  /** True while a block list is half read (so the section cannot end here). */
  get inBlockList(): boolean {
    return this.pendingList !== undefined;
  }
}

/**
 * Writes RAM records. Keeps the channel's CONTINUE memory, like QEMU's source:
 * `continueMode` 'auto' sets CONTINUE whenever the block equals the previous
 * page's, 'never' always names the block, 'as-recorded' follows each record's
 * `continued` (for byte-exact re-encoding of a decoded stream).
 */
export class RamRecordWriter {
  lastBlock: string | undefined;
  constructor(public continueMode: 'auto' | 'never' | 'as-recorded' = 'auto') {}

  /** Forget the last block: the next page names its block (QEMU does this before discards and on recovery). */
  resetContinue(): void {
    this.lastBlock = undefined;
  }

  /**
   * Writes `count` consecutive pages of `block` from `data` (page i at
   * `start + i*4096`), each as PAGE or, when all zero, ZERO, with CONTINUE by
   * the channel's rule ('as-recorded' counts as 'auto': pages carry no flag of
   * their own). The arguments are checked once, against `blocks` (the block
   * list of the channel); per page there is a zero test in place, an 8-byte
   * header in the slab and, for PAGE, the payload appended by reference.
   */
  writePages(w: ByteWriter, blocks: ReadonlyMap<string, KnownBlock>, block: string, offset: number, count: number, data: Uint8Array, start: number): { normal: number; zero: number } {
    checkPages(blocks, block, offset, count, data, start);
    const never = this.continueMode === 'never';
    let cont = !never && this.lastBlock === block;
    let normal = 0;
    const dataEnd = start + count * PAGE;
    // Pages before `zeroEnd` are known zero (one compare over a span of them);
    // no span is tried before `noSpanEnd` (a span that failed: page by page there).
    let zeroEnd = -1;
    let noSpanEnd = -1;
    let o = offset;
    for (let p = start; p < dataEnd; p += PAGE, o += PAGE) {
      let zero: boolean;
      if (p < zeroEnd) zero = true;
      else if (data[p] !== 0 || data[p + PAGE - 1] !== 0) zero = false;
      else {
        // Zero pages come in stretches: probe the next pages' end bytes and
        // compare all that pass at once (one native call for up to 64 KiB).
        let k = 1;
        if (p >= noSpanEnd) {
          const most = Math.min(ZERO_SPAN_PAGES, (dataEnd - p) / PAGE);
          while (k < most && data[p + k * PAGE] === 0 && data[p + (k + 1) * PAGE - 1] === 0) k++;
        }
        if (k > 1 && ZERO_SPAN.compare(data, p, p + k * PAGE, 0, k * PAGE) === 0) {
          zeroEnd = p + k * PAGE;
          zero = true;
        } else {
          if (k > 1) noSpanEnd = p + k * PAGE;
          zero = ZERO_SPAN.compare(data, p, p + PAGE, 0, PAGE) === 0;
        }
      }
      if (cont) {
        w.pageHead(o + (zero ? F_ZERO | F_CONTINUE : F_PAGE | F_CONTINUE), zero);
      } else {
        w.be64(o + (zero ? F_ZERO : F_PAGE)).str8(block);
        if (zero) w.u8(0);
        cont = !never;
      }
      if (!zero) {
        w.view(data.subarray(p, p + PAGE));
        normal++;
      }
    }
    this.lastBlock = block;
    return { normal, zero: count - normal };
  }

  write(w: ByteWriter, r: RamRecord, format?: RamFormat): void {
    switch (r.type) {
      case 'ram-page':
      case 'ram-zero':
      case 'ram-xbzrle': {
        const kind = r.type === 'ram-page' ? RamFlag.PAGE : r.type === 'ram-zero' ? RamFlag.ZERO : RamFlag.XBZRLE;
        const cont =
          this.continueMode === 'never'
            ? false
            : this.continueMode === 'as-recorded'
              ? r.continued
              : this.lastBlock === r.block;
        if (cont && this.lastBlock !== r.block) {
          throw new RangeError(`CONTINUE for block "${r.block}" but the channel's last block is "${this.lastBlock ?? '(none)'}"`);
        }
        if (r.offset % TARGET_PAGE_SIZE !== 0) throw new RangeError(`page offset 0x${r.offset.toString(16)} is not page aligned`);
        w.be64(r.offset + kind + (cont ? RamFlag.CONTINUE : 0));
        if (!cont) w.str8(r.block);
        this.lastBlock = r.block;
        if (r.type === 'ram-page') {
          if (r.data.length !== TARGET_PAGE_SIZE) throw new RangeError(`page of ${r.data.length} bytes`);
          w.view(r.data);
        } else if (r.type === 'ram-zero') {
          w.u8(0);
        } else {
          w.u8(XBZRLE_ENCODING).be16(r.encoded.length).view(r.encoded);
        }
        return;
      }
      case 'ram-eos':
        w.be64(RamFlag.EOS);
        return;
      case 'ram-multifd-flush':
        w.be64(RamFlag.MULTIFD_FLUSH);
        return;
      case 'ram-blocks':
        w.be64(r.total + RamFlag.MEM_SIZE);
        for (const b of r.blocks) {
          w.str8(b.idstr).be64(b.length);
          if (b.pageSize !== undefined) {
            if (format && !format.postcopyAdvised) throw new RangeError('a block page size is only sent after POSTCOPY_ADVISE');
            w.be64(b.pageSize);
          }
          if (format?.ignoreShared) w.be64(b.gpa ?? 0n);
          if (b.mappedRam) writeMappedRamHeader(w, b.mappedRam);
        }
        this.lastBlock = undefined;
        return;
    }
  }
}

/** Encoded length of a page-like record (quic-go habit: every record knows its size). */
export function ramPageRecordLength(r: RamRecord, continued: boolean): number {
  const head = continued || !('block' in r) ? 8 : 9 + Buffer.byteLength(r.block, 'latin1');
  switch (r.type) {
    case 'ram-page':
      return head + TARGET_PAGE_SIZE;
    case 'ram-zero':
      return head + 1;
    case 'ram-xbzrle':
      return head + 3 + r.encoded.length;
    default:
      return 8;
  }
}

/**
 * The checks of a page batch, made once per call: `block` is in the channel's
 * block list, `offset` page aligned, the `count` pages inside the block and
 * inside `data` from `start`. Typed errors (UsageError: RangeError/TypeError
 * with a `code`) naming the block and offset.
 */
export function checkPages(blocks: ReadonlyMap<string, KnownBlock>, block: string, offset: number, count: number, data: Uint8Array, start: number): KnownBlock {
  const known = blocks.get(block);
  if (!known) {
    const list = blocks.size === 0 ? 'no block list was written on this channel' : `known: ${[...blocks.keys()].map((k) => `"${k}"`).join(', ')}`;
    throw usageError('range', 'unknown-ram-block', 'block', `writePages: no RAM block "${block}" (${list})`);
  }
  if (!Number.isSafeInteger(offset) || offset < 0) {
    throw usageError('range', 'page-out-of-range', 'offset', `writePages: offset ${String(offset)} of block "${block}" is not a non-negative integer`);
  }
  if (offset % TARGET_PAGE_SIZE !== 0) {
    throw usageError('range', 'unaligned-offset', 'offset', `writePages: offset 0x${offset.toString(16)} of block "${block}" is not page aligned`);
  }
  if (!Number.isSafeInteger(count) || count < 1) {
    throw usageError('range', 'bad-option', 'count', `writePages: count ${String(count)} at 0x${offset.toString(16)} of block "${block}" is not a positive integer`);
  }
  if (offset + count * TARGET_PAGE_SIZE > known.length) {
    throw usageError('range', 'page-out-of-range', 'offset', `writePages: ${count} pages at 0x${offset.toString(16)} run past block "${block}" of 0x${known.length.toString(16)} bytes`);
  }
  if (!Number.isSafeInteger(start) || start < 0 || start + count * TARGET_PAGE_SIZE > data.length) {
    throw usageError('range', 'bad-option', 'data', `writePages: ${count} pages at 0x${offset.toString(16)} of block "${block}" need ${count * TARGET_PAGE_SIZE} bytes of data from ${String(start)}, it has ${data.length}`);
  }
  return known;
}

const ZERO_PAGE = Buffer.alloc(TARGET_PAGE_SIZE);
/** Zero pages compared at once by writePages, at most. */
const ZERO_SPAN_PAGES = 16;
const ZERO_SPAN = Buffer.alloc(ZERO_SPAN_PAGES * TARGET_PAGE_SIZE);
/**
 * True when a page is all zero bytes (sent as a 9-byte ZERO record instead of
 * 4 KiB). The two byte probes reject most non-zero pages without a call; the
 * rest is one native memcmp.
 */
export function isZeroPage(page: Uint8Array): boolean {
  if (page[0] !== 0 || page[page.length - 1] !== 0) return false;
  return ZERO_PAGE.equals(page.length === TARGET_PAGE_SIZE ? page : page.subarray(0, TARGET_PAGE_SIZE));
}
