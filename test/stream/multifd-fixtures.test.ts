import { describe, expect, it } from 'vitest';
import {
  MULTIFD_PACKET_PAGES,
  MultifdDecoder,
  StreamDecoder,
  StreamEncoder,
  concatPieces,
  encodeMultifdInit,
  encodeMultifdPacketHeader,
  forEachOffsetRun,
  type MultifdRecord,
} from '../../src/stream/index.js';
import { checkGuestInvariant } from '../qemu/harness.js';
import {
  HEADER,
  MULTIFD_SCENARIOS,
  channelSample,
  checkChannelPieces,
  checkChannelPrefixes,
  checkChannelSplits,
  loadCapture,
  samePacket,
  sha256,
} from './multifd-capture.js';
import { checkPrefixes, decodeWhole, prefixSample } from './prefixes.js';

/**
 * Multifd captures from QEMU 10.0.2 → QEMU 10.0.2 (2 and 4 channels plain,
 * 2 over TLS recorded as plaintext; test/fixtures/README.md): the main channel
 * with the StreamDecoder, every channel with the MultifdDecoder, against
 * QEMU's own counters, re-encoded, split and ended everywhere it matters.
 */

const PAGE = 4096;
/** Seed of the sampled prefixes and splits; MULTIFD_SEED=N draws another sample (all: npm run fuzz:prefixes). */
const SEED = Number(process.env.MULTIFD_SEED ?? 1);

describe.each(MULTIFD_SCENARIOS)('multifd capture %s', (name) => {
  const c = loadCapture(name);
  const sc = c.sidecar;
  const ram = sc.source.queryMigrate.ram;
  const flushes = c.mainRecords.filter((r) => r.type === 'ram-multifd-flush').length;
  /** zero-page-detection=legacy: zero pages go on main as ZERO records, not in the packets' zero lists. */
  const legacyZero = sc.parameters.sourceMultifd['zero-page-detection'] === 'legacy';
  const mainZeros = c.mainRecords.filter((r) => r.type === 'ram-zero').length;

  it('has the files its sidecar describes, one per channel, in connect order', () => {
    expect(sha256(c.main)).toBe(sc.files.main.sha256);
    expect(c.channels.length).toBe(sc.multifd.channels);
    c.channels.forEach((ch, k) => {
      const f = sc.files.multifd[k]!;
      expect([ch.file, ch.bytes.length, sha256(ch.bytes), f.connectOrder]).toEqual([f.name, f.bytes, f.sha256, k]);
    });
    if (name === 'multifd-tls') expect(sc.relay.connections.every((x) => x.tlsIn === 'TLSv1.3' && x.tlsOut === 'TLSv1.3')).toBe(true);
  });

  it(`main channel: the StreamDecoder reads the block list, MULTIFD_FLUSH records and no page${legacyZero ? ' but ZERO records' : ''}`, () => {
    const types = new Set(c.mainRecords.map((r) => r.type));
    expect(types.has('ram-blocks')).toBe(true);
    for (const t of ['ram-page', 'ram-xbzrle']) expect(types.has(t as never), t).toBe(false);
    expect(types.has('ram-zero')).toBe(legacyZero);
    expect(sc.parameters.sourceMultifd['multifd-compression']).toBe('none');
    expect(flushes).toBeGreaterThanOrEqual(3); // setup, every pass, completion
    expect(c.blocks.map((b) => [b.idstr, b.length])).toEqual(sc.source.ramBlocks.map((b) => [b.name, b.usedLength]));
    const enc = new StreamEncoder();
    enc.writeAll(c.mainRecords);
    expect(concatPieces(enc.take()).equals(c.main)).toBe(true);
    const { completions } = checkPrefixes(c.main, decodeWhole(c.main), prefixSample(c.mainRecords, c.main.length, 1, { ramBoundaries: 0, anywhere: 2000 }));
    expect(completions).toBe(2); // right after EOF, and the whole stream with its VM description
  });

  it('channels: init with the sidecar ids, a SYNC first, pages_alloc 128 or 0, packet numbers of one shared counter, a SYNC per MULTIFD_FLUSH', () => {
    const nums: bigint[] = [];
    c.channels.forEach((ch, k) => {
      const init = ch.spans[0]!.record;
      expect(init).toMatchObject({ type: 'multifd-init', id: sc.files.multifd[k]!.channelId, uuid: new Uint8Array(16) });
      const [first] = ch.packets;
      expect(first).toMatchObject({ sync: true, pagesAlloc: 0, block: '', nextPacketSize: 0 });
      let prev = -1n;
      let syncs = 0;
      for (const p of ch.packets) {
        const pages = p.normal.length + p.zero.length;
        // QEMU 10.0: a SYNC packet carries no pages, a page packet is never SYNC
        expect([p.sync, p.pagesAlloc, p.flags]).toEqual(pages === 0 ? [true, 0, 1] : [false, MULTIFD_PACKET_PAGES, 0]);
        if (pages > 0) expect(p.handle?.idstr).toBe(p.block);
        if (legacyZero) expect(p.zero.length).toBe(0);
        expect(p.packetNum).toBeGreaterThan(prev);
        prev = p.packetNum;
        nums.push(p.packetNum);
        if (p.sync) syncs++;
      }
      expect(syncs, `${ch.file}: SYNC packets`).toBe(flushes);
    });
    expect(new Set(c.channels.map((ch) => (ch.spans[0]!.record as { id: number }).id)).size).toBe(sc.multifd.channels);
    nums.sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
    expect(nums.every((n, i) => n === BigInt(i))).toBe(true);
  });

  it("sums to QEMU's counters: normal and zero pages, multifd-bytes", () => {
    let normal = 0;
    let zero = 0;
    for (const ch of c.channels) {
      for (const p of ch.packets) {
        normal += p.normal.length;
        zero += p.zero.length;
      }
    }
    expect(normal).toBe(ram.normal);
    expect(zero + mainZeros).toBe(ram.duplicate);
    expect(legacyZero ? zero : mainZeros).toBe(0);
    expect(c.channels.reduce((n, ch) => n + ch.bytes.length, 0)).toBe(ram['multifd-bytes']);
    expect(sc.multifd['multifd-bytes']).toBe(ram['multifd-bytes']);
  });

  it('landed round by round (SYNC to SYNC, by runs), the pages hold the guest invariant', () => {
    const pcRam = c.blocks.find((b) => b.idstr === 'pc.ram')!;
    const mem = Buffer.alloc(pcRam.length);
    const next = c.channels.map(() => 0);
    let landed = 0;
    let onMain = 0;
    /** Main's ZERO records (legacy zero-page detection) up to its next MULTIFD_FLUSH: the same round. */
    const mainRound = () => {
      for (; onMain < c.mainRecords.length; onMain++) {
        const m = c.mainRecords[onMain]!;
        if (m.type === 'ram-multifd-flush') {
          onMain++;
          return;
        }
        if (m.type === 'ram-zero' && m.block === 'pc.ram') mem.fill(0, m.offset, m.offset + PAGE);
      }
    };
    // Round r: each channel's packets up to and including its r-th SYNC (round 1 is the setup SYNC alone).
    for (let r = 1; r <= flushes + 1; r++) {
      mainRound();
      c.channels.forEach((ch, k) => {
        while (next[k]! < ch.packets.length) {
          const p = ch.packets[next[k]!++]!;
          if (p.block === 'pc.ram') {
            forEachOffsetRun(p.normal, p.normal.length, (first, offset, n) => {
              mem.set(p.data.subarray(p.start + first * PAGE, p.start + (first + n) * PAGE), offset);
              landed += n;
            });
            forEachOffsetRun(p.zero, p.zero.length, (_first, offset, n) => mem.fill(0, offset, offset + n * PAGE));
          }
          if (p.sync) break;
        }
      });
    }
    expect(next).toEqual(c.channels.map((ch) => ch.packets.length));
    expect(landed).toBeGreaterThan(64);
    const inv = checkGuestInvariant(mem, sc.guest);
    expect(inv.ok, inv.detail).toBe(true);
    // not vacuously: the range's counters are not all zero (as they would be with pages wrongly zeroed)
    const start = Math.round(sc.guest.startMiB * 1024 * 1024);
    const end = Math.round(sc.guest.endMiB * 1024 * 1024);
    let nonzero = 0;
    for (let a = start; a < end; a += PAGE) if (mem[a] !== 0) nonzero++;
    expect(nonzero).toBeGreaterThan((end - start) / PAGE / 2);
    // and a page of the range moved by one is caught
    const bad = Buffer.from(mem);
    const at = Math.round(sc.guest.startMiB * 1024 * 1024) + 7 * PAGE;
    bad[at] = (bad[at] as number) ^ 0x55;
    expect(checkGuestInvariant(bad, sc.guest).ok).toBe(false);
  });

  it('re-encodes every init message and packet header byte for byte', () => {
    for (const ch of c.channels) {
      const pieces: Uint8Array[] = [];
      for (const s of ch.spans) {
        const r = s.record;
        if (r.type === 'multifd-init') pieces.push(encodeMultifdInit(r.id, r.uuid));
        else {
          const h = encodeMultifdPacketHeader({ ...r, pagesAlloc: MULTIFD_PACKET_PAGES });
          expect(Buffer.compare(h, ch.bytes.subarray(s.start, s.headerEnd)), `${ch.file} @${s.start}`).toBe(0);
          pieces.push(h, r.data.subarray(r.start, r.start + r.normal.length * PAGE));
        }
      }
      expect(Buffer.concat(pieces).equals(ch.bytes), ch.file).toBe(true);
    }
  });

  it(`ends truncated at sampled prefixes, cleanly only after a whole record (seed ${SEED})`, () => {
    for (const ch of c.channels) {
      const { ended, clean } = checkChannelPrefixes(ch, c.blocks, channelSample(ch, SEED));
      expect(ended).toBeGreaterThan(3 * HEADER);
      expect(clean).toBeGreaterThanOrEqual(4);
    }
  });

  it(`split in two at sampled offsets: the same records (seed ${SEED})`, () => {
    // fewer random picks than for prefixes: a split inside page data copies the packet's pages
    for (const ch of c.channels) expect(checkChannelSplits(ch, c.blocks, channelSample(ch, SEED, 500))).toBeGreaterThan(3 * HEADER);
  });

  it(`splitPackets, split at sampled offsets: pieces that are views of the input and join to the packet (seed ${SEED})`, () => {
    for (const ch of c.channels) {
      const splits = checkChannelPieces(ch, c.blocks, channelSample(ch, SEED));
      if (ch.packets.some((p) => p.normal.length > 0)) expect(splits, ch.file).toBeGreaterThan(0);
    }
  });

  it('byte by byte: the same records, in both modes', () => {
    for (const ch of c.channels) {
      const d = new MultifdDecoder({ blocks: c.blocks });
      const got: MultifdRecord[] = [];
      for (let n = 0; n < ch.bytes.length; n++) got.push(...d.push(ch.bytes.subarray(n, n + 1)));
      d.end();
      expect(got.length).toBe(ch.spans.length);
      got.forEach((r, i) => expect(samePacket(r, ch.spans[i]!.record), `${ch.file} record ${i}`).toBe(true));
      const split = new MultifdDecoder({ splitPackets: true });
      let pages = 0;
      for (let n = 0; n < ch.bytes.length; n += 1000) for (const r of split.push(ch.bytes.slice(n, n + 1000))) if (r.type === 'multifd-packet') pages += r.normal.length;
      split.end();
      expect(pages).toBe(ch.packets.reduce((a, p) => a + p.normal.length, 0));
    }
  });
});

describe('multifd main channel', () => {
  it('is what the existing decoder reads as a multifd stream (no multifd capability marker needed)', () => {
    const c = loadCapture('multifd-2');
    const d = new StreamDecoder({ pageRuns: true });
    const recs = [...d.push(c.main), ...d.end()];
    expect(recs.some((r) => r.type === 'ram-pages' || r.type === 'ram-zeros')).toBe(false);
    expect(d.complete).toBe(true);
  });
});
