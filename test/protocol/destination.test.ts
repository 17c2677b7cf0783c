import net from 'node:net';
import { describe, expect, it } from 'vitest';
import {
  DestinationSession,
  InMemorySink,
  MigrationError,
  PreemptEncoder,
  StreamEncoder,
  concatPieces,
  type StreamRecord,
} from '../../src/index.js';
import { syntheticRecords } from '../stream/synthetic.js';
import { scriptedSource } from '../support/scripted-source.js';


function expectedRam(records: StreamRecord[]): Map<string, Buffer> {
  const mem = new Map<string, Buffer>();
  for (const r of records) {
    if (r.type === 'ram-blocks') for (const b of r.blocks) mem.set(b.idstr, Buffer.alloc(b.length));
    if (r.type === 'ram-page') mem.get(r.block)!.set(r.data, r.offset);
    if (r.type === 'ram-zero') mem.get(r.block)!.fill(0, r.offset, r.offset + 4096);
    if (r.type === 'ram-xbzrle') {
      // synthetic XBZRLE: skip 5 bytes, write 2 (0xaa 0xbb)
      mem.get(r.block)!.set([0xaa, 0xbb], r.offset + 5);
    }
  }
  return mem;
}

describe('DestinationSession with a scripted source', () => {
  it('precopy: PONG, SHUT 0 and the RAM and devices received', async () => {
    const sink = new InMemorySink();
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink });
    const passes: number[] = [];
    dst.on('pass', (p) => passes.push(p.iteration));
    const src = await scriptedSource(dst.uri);
    const records = syntheticRecords(3);
    src.write(records);
    const result = await dst.done;
    await src.waitFor((m) => m.some((x) => x.type === 'shut'));
    expect(src.messages).toEqual([
      { type: 'pong', value: 1 },
      { type: 'shut', value: 0 },
    ]);
    expect(result.complete).toBe(true);
    expect(result.machineType).toBe('pc-q35-10.0');
    expect(result.devices.map((d) => d.idstr)).toEqual(['timer', 'cpu']);
    expect(passes).toEqual([1, 2]);
    for (const [name, buf] of expectedRam(records)) expect(sink.blocks.get(name)!.equals(buf), name).toBe(true);
    expect(result.stats.status).toBe('completed');
    src.sock.destroy();
  });

  it('a corrupt record ends the session with a typed error, SHUT 1, and no hang', async () => {
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink: new InMemorySink() });
    const src = await scriptedSource(dst.uri);
    const records = syntheticRecords(4);
    const enc = new StreamEncoder({ continueMode: 'as-recorded' });
    enc.writeAll(records);
    const bytes = concatPieces(enc.take());
    const at = bytes.indexOf(Buffer.from([0x02, 0, 0, 0, 2])); // first RAM PART
    bytes[at + 1] = 0x55; // unknown section id
    src.sock.write(bytes);
    const err = await dst.done.then(
      () => undefined,
      (e: unknown) => e as MigrationError,
    );
    expect(err).toBeInstanceOf(MigrationError);
    expect(err?.code).toBe('unknown-section');
    expect(err?.kind).toBe('stream');
    expect(err?.offset).toBe(at);
    expect(err?.phase).toBe('setup');
    expect(err?.message).toMatch(new RegExp(`at offset ${at}`));
    await src.waitFor((m) => m.some((x) => x.type === 'shut'));
    expect(src.messages.at(-1)).toEqual({ type: 'shut', value: 1 });
    expect(dst.snapshot().complete).toBe(false);
    src.sock.destroy();
  });

  it('a source that disconnects mid-stream, and one that goes silent', async () => {
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink: new InMemorySink() });
    const src = await scriptedSource(dst.uri);
    const records = syntheticRecords(5);
    src.write(records.slice(0, 20));
    // Read the PONG first: a socket closed with unread data sends a reset, not a FIN.
    await src.waitFor((m) => m.some((x) => x.type === 'pong'));
    await new Promise((r) => setTimeout(r, 50));
    src.sock.destroy();
    await expect(dst.done).rejects.toMatchObject({ code: 'peer-disconnected', phase: 'precopy' });

    const quiet = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink: new InMemorySink(), idleTimeoutMs: 200 });
    const q = await scriptedSource(quiet.uri);
    q.write(records.slice(0, 2));
    const t0 = Date.now();
    await expect(quiet.done).rejects.toMatchObject({ code: 'idle-timeout', phase: 'setup' });
    expect(Date.now() - t0).toBeLessThan(2000);
    q.sock.destroy();
  });

  it('refuses postcopy unless enabled, as QEMU does', async () => {
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink: new InMemorySink() });
    const src = await scriptedSource(dst.uri);
    src.write(syntheticRecords(6, { postcopy: true }));
    await expect(dst.done).rejects.toMatchObject({ code: 'protocol', message: expect.stringMatching(/postcopy is not enabled/) });
    src.sock.destroy();
  });

  it('postcopy: demand requests go out once per page and are answered on the preempt channel', async () => {
    const sink = new InMemorySink();
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, postcopy: true });
    const src = await scriptedSource(dst.uri);
    const all = syntheticRecords(8, { postcopy: true, pagesPerPass: 2 });
    // Everything up to and including the package; hold back the postcopy pages.
    const pkgEnd = all.findIndex((r) => r.type === 'package-end');
    const ping4 = pkgEnd + 1;
    src.write(all.slice(0, ping4 + 1));
    await new Promise<void>((r) => dst.once('postcopy-run', () => r()));
    // Page 60 of pc.ram was discarded or never sent: ask twice, concurrently.
    const offset = 60 * 4096;
    expect(dst.hasPage('pc.ram', offset)).toBe(false);
    const a = dst.requestPage('pc.ram', offset);
    const b = dst.requestPage('pc.ram', offset);
    await src.waitFor((m) => m.some((x) => x.type === 'req-pages-id'));
    const reqs = src.messages.filter((m) => m.type === 'req-pages-id' || m.type === 'req-pages');
    expect(reqs).toEqual([{ type: 'req-pages-id', block: 'pc.ram', offset, length: 4096 }]);
    // Answer on a preempt channel.
    const pre = net.connect(Number(dst.uri.split(':').pop()), '127.0.0.1');
    await new Promise((r) => pre.once('connect', r));
    const penc = new PreemptEncoder();
    const page = Buffer.alloc(4096, 0x5a);
    penc.write({ type: 'ram-page', block: 'pc.ram', offset, continued: false, data: page });
    pre.write(concatPieces(penc.take()));
    const [ra, rb] = await Promise.all([a, b]);
    expect(ra).toMatchObject({ requested: true, channel: 'preempt', offset });
    expect(rb).toEqual(ra);
    expect(sink.blocks.get('pc.ram')!.subarray(offset, offset + 4096).equals(page)).toBe(true);
    // A page already there resolves at once, without a request.
    await expect(dst.requestPage('pc.ram', offset)).resolves.toMatchObject({ requested: false, channel: 'none' });
    // A pending request is resolved by the bulk stream too.
    const bulkOffset = all.slice(ping4 + 1).find((r) => r.type === 'ram-page' || r.type === 'ram-zero') as { offset: number } | undefined;
    expect(bulkOffset).toBeDefined();
    const c = dst.hasPage('pc.ram', bulkOffset!.offset) ? undefined : dst.requestPage('pc.ram', bulkOffset!.offset);
    // The rest of RAM, as a source sends it after LISTEN: every page not yet there, once.
    const tail = all.slice(ping4 + 1);
    const endAt = tail.findIndex((r) => r.type === 'section' && r.kind === 'end');
    const sentLater = new Set(tail.filter((r) => r.type === 'ram-page' || r.type === 'ram-zero').map((r) => `${(r as { block: string }).block}:${(r as { offset: number }).offset}`));
    const rest: StreamRecord[] = [];
    for (const [block, size] of [['pc.ram', 64], ['/rom@etc/acpi/tables', 4]] as const) {
      for (let p = 0; p < size; p++) {
        if (!dst.hasPage(block, p * 4096) && !sentLater.has(`${block}:${p * 4096}`)) rest.push({ type: 'ram-zero', block, offset: p * 4096, continued: false });
      }
    }
    src.write([...tail.slice(0, endAt), { type: 'section', kind: 'part', sectionId: 2, idstr: 'ram', instanceId: 0, versionId: 4 }, ...rest, { type: 'ram-eos' }, { type: 'footer', sectionId: 2 }, ...tail.slice(endAt)]);
    if (c) await expect(c).resolves.toMatchObject({ channel: 'main' });
    const result = await dst.done;
    expect(result.postcopy).toBe(true);
    expect(result.devices.every((d) => d.packaged)).toBe(true);
    expect(result.stats['postcopy-requests']).toBeGreaterThanOrEqual(1);
    expect(result.stats['postcopy-latency'].count).toBeGreaterThanOrEqual(1);
    expect(result.stats['preempt-pages']).toBe(1);
    await src.waitFor((m) => m.some((x) => x.type === 'shut'));
    expect(src.messages.filter((m) => m.type === 'pong').map((m) => (m as { value: number }).value)).toEqual([1, 2, 3, 4]);
    src.sock.destroy();
    pre.destroy();
  });

  it('postcopy: a page that arrives on the preempt channel after EOF still lands; a page that never comes fails', async () => {
    for (const deliver of [true, false]) {
      const sink = new InMemorySink();
      const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, postcopy: true });
      const src = await scriptedSource(dst.uri);
      const all = syntheticRecords(9, { postcopy: true, pagesPerPass: 2 });
      const ping4 = all.findIndex((r) => r.type === 'package-end') + 1;
      src.write(all.slice(0, ping4 + 1));
      await new Promise<void>((r) => dst.once('postcopy-run', () => r()));
      const pre = net.connect(Number(dst.uri.split(':').pop()), '127.0.0.1');
      await new Promise((r) => pre.once('connect', r));
      // Send every page but one on main, then END and EOF; the last one comes late on preempt.
      const late = { block: 'pc.ram', offset: 63 * 4096 };
      const rest: StreamRecord[] = [];
      for (const [block, size] of [['pc.ram', 64], ['/rom@etc/acpi/tables', 4]] as const) {
        for (let p = 0; p < size; p++) {
          if (block === late.block && p * 4096 === late.offset) continue;
          if (!dst.hasPage(block, p * 4096)) rest.push({ type: 'ram-zero', block, offset: p * 4096, continued: false });
        }
      }
      const request = dst.requestPage(late.block, late.offset).catch((e: unknown) => e);
      src.write([
        { type: 'section', kind: 'part', sectionId: 2, idstr: 'ram', instanceId: 0, versionId: 4 },
        ...rest,
        { type: 'ram-eos' },
        { type: 'footer', sectionId: 2 },
        { type: 'section', kind: 'end', sectionId: 2, idstr: 'ram', instanceId: 0, versionId: 4 },
        { type: 'ram-eos' },
        { type: 'footer', sectionId: 2 },
        { type: 'eof' },
      ]);
      if (deliver) {
        await new Promise((r) => setTimeout(r, 150));
        const penc = new PreemptEncoder();
        penc.write({ type: 'ram-page', block: late.block, offset: late.offset, continued: false, data: Buffer.alloc(4096, 7) });
        pre.write(concatPieces(penc.take()));
        const result = await dst.done;
        expect(result.complete).toBe(true);
        expect(await request).toMatchObject({ channel: 'preempt', requested: true });
        expect(sink.blocks.get('pc.ram')![late.offset]).toBe(7);
      } else {
        await expect(dst.done).rejects.toMatchObject({ code: 'protocol', phase: 'completion', message: expect.stringMatching(/1 pages never received/) });
        expect(await request).toBeInstanceOf(MigrationError);
      }
      src.sock.destroy();
      pre.destroy();
    }
  }, 20_000);
});
