/**
 * What the tap learns from one multifd channel (QEMU's `multifd` capability):
 * its init message (the channel id), then packets of normal and zero pages
 * and the SYNC packets that close every pass. The bytes are decoded by the
 * codec's MultifdDecoder after they were forwarded; a StreamError ends the
 * parsing of this channel only (the relay goes on).
 *
 * Shared by the tap (live, chunk by chunk) and `qmt inspect` (a captured
 * channel file): one way to count a channel.
 */
import { MultifdDecoder, type MultifdRecord } from '../../stream/multifd.js';
import { StreamError } from '../../stream/errors.js';
import type { KnownBlock } from '../../stream/ram.js';

/** Counts of one multifd channel. */
export interface MultifdChannelCounts {
  /** The channel id from its init message (null before the 64 bytes are in). */
  id: number | null;
  /** Packets, SYNC packets included. */
  packets: number;
  /** SYNC packets (QEMU sends one per channel at setup and after every pass). */
  syncs: number;
  /** Pages by kind: normal pages carry 4 KiB each, zero pages only their offset. */
  pages: { normal: number; zero: number };
  /** Bytes parsed: the init message and the packets (headers and page data), as QEMU counts `ram.multifd-bytes`. */
  multifdBytes: number;
  /** Pages by RAM block name. */
  blocks: Record<string, { normal: number; zero: number }>;
}

/** Sum over channels. */
export interface MultifdTotals {
  channels: number;
  packets: number;
  syncs: number;
  pages: { normal: number; zero: number };
  multifdBytes: number;
}

/** Folds the records of one multifd channel into counts; see the file comment. */
export class MultifdChannelCounter {
  private readonly decoder: MultifdDecoder;
  private readonly c: MultifdChannelCounts = { id: null, packets: 0, syncs: 0, pages: { normal: 0, zero: 0 }, multifdBytes: 0, blocks: {} };
  private failure: StreamError | undefined;

  constructor(opts: { blocks?: readonly KnownBlock[] } = {}) {
    // In pieces: a packet's pages as they lie in the pushed chunks, never copied to make a 512 KiB packet whole.
    this.decoder = new MultifdDecoder({ splitPackets: true, ...(opts.blocks ? { blocks: opts.blocks } : {}) });
  }

  /** The error that ended the parsing, if any. */
  get error(): StreamError | undefined {
    return this.failure;
  }

  /** The channel id from its init message (null before it). */
  get id(): number | null {
    return this.c.id;
  }

  /** Bytes parsed so far (the offset of the next record). */
  get offset(): number {
    return this.decoder.offset;
  }

  /** Names and bounds the packets' pages by the main channel's block list (it may arrive after the channel connected). */
  setBlocks(blocks: readonly KnownBlock[]): void {
    this.decoder.setBlocks(blocks);
  }

  /** Feeds bytes; returns the error that ended the parsing now or earlier (never throws a StreamError). */
  push(chunk: Uint8Array): StreamError | undefined {
    if (this.failure) return this.failure;
    let records: MultifdRecord[] = [];
    try {
      records = this.decoder.push(chunk);
    } catch (e) {
      if (!(e instanceof StreamError)) throw e;
      this.failure = e;
      return e;
    }
    for (const r of records) this.count(r);
    // The decoder hands back the records before an error and keeps the error.
    this.failure = this.decoder.error;
    return this.failure;
  }

  /** The channel ended: a channel cut inside a packet (or before its init) is 'truncated'. */
  end(): StreamError | undefined {
    if (this.failure) return this.failure;
    try {
      this.decoder.end();
    } catch (e) {
      if (!(e instanceof StreamError)) throw e;
      this.failure = e;
    }
    return this.failure;
  }

  counts(): MultifdChannelCounts {
    const blocks: MultifdChannelCounts['blocks'] = {};
    for (const [k, v] of Object.entries(this.c.blocks)) blocks[k] = { ...v };
    // QEMU adds the init message and every packet (header and page data) to multifd-bytes.
    return { ...this.c, pages: { ...this.c.pages }, blocks, multifdBytes: this.c.id === null ? 0 : this.decoder.offset };
  }

  private count(r: MultifdRecord): void {
    const c = this.c;
    if (r.type === 'multifd-init') {
      c.id = r.id;
      return;
    }
    // A packet may come in pieces: the zero list with the first, SYNC and the count with the last.
    if (r.last) c.packets++;
    if (r.sync) c.syncs++;
    const n = r.normal.length;
    const z = r.zero.length;
    c.pages.normal += n;
    c.pages.zero += z;
    if (n + z > 0) {
      const b = (c.blocks[r.block] ??= { normal: 0, zero: 0 });
      b.normal += n;
      b.zero += z;
    }
  }
}

/** Adds up channel counts. */
export function multifdTotals(channels: readonly MultifdChannelCounts[]): MultifdTotals {
  const t: MultifdTotals = { channels: channels.length, packets: 0, syncs: 0, pages: { normal: 0, zero: 0 }, multifdBytes: 0 };
  for (const c of channels) {
    t.packets += c.packets;
    t.syncs += c.syncs;
    t.pages.normal += c.pages.normal;
    t.pages.zero += c.pages.zero;
    t.multifdBytes += c.multifdBytes;
  }
  return t;
}
