import { StreamDecoder, StreamEncoder, concatPieces, type StreamDecoderOptions, type StreamRecord, type RamBlockInfo } from '../../src/stream/index.js';

/** A deterministic pseudo-random generator (xorshift32), so failures reproduce. */
export function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x;
  };
}

export function randomBytes(n: number, next: () => number): Uint8Array {
  const b = new Uint8Array(n);
  for (let i = 0; i < n; i++) b[i] = next() & 0xff;
  return b;
}

/**
 * A small but complete precopy+postcopy-shaped stream exercising every record
 * kind: configuration with subsections, ADVISE, block list, PART/END sections
 * with PAGE/ZERO/XBZRLE/CONTINUE, commands, a PACKAGED blob with device state,
 * FULL sections whose payload contains footer-like bytes, EOF, VM description.
 */
export function syntheticRecords(seed = 1, opts: { postcopy?: boolean; pagesPerPass?: number } = {}): StreamRecord[] {
  const perPass = opts.pagesPerPass ?? 20;
  const next = rng(seed);
  const blocks: RamBlockInfo[] = [
    { idstr: 'pc.ram', length: 64 * 4096 },
    { idstr: '/rom@etc/acpi/tables', length: 4 * 4096 },
  ];
  const recs: StreamRecord[] = [
    { type: 'header', version: 3 },
    { type: 'configuration', machineType: 'pc-q35-10.0', capabilities: ['validate-uuid-not-really'], uuid: randomBytes(16, next) },
    { type: 'command', command: { cmd: 'open-return-path' } },
    { type: 'command', command: { cmd: 'ping', value: 1 } },
  ];
  if (opts.postcopy) recs.push({ type: 'command', command: { cmd: 'postcopy-advise', pageSizeSummary: 0x1000n, targetPageSize: 0x1000n } });
  const ram = { sectionId: 2, idstr: 'ram', instanceId: 0, versionId: 4 } as const;
  recs.push({ type: 'section', kind: 'start', ...ram });
  recs.push({ type: 'ram-blocks', total: blocks.reduce((s, b) => s + b.length, 0), blocks });
  recs.push({ type: 'ram-eos' }, { type: 'footer', sectionId: 2 });
  let last: string | undefined;
  const page = (block: string, offset: number, kind: number): StreamRecord => {
    const continued = last === block;
    last = block;
    if (kind === 0) return { type: 'ram-zero', block, offset, continued };
    if (kind === 1 && !opts.postcopy) return { type: 'ram-xbzrle', block, offset, continued, encoded: Uint8Array.of(0x05, 0x02, 0xaa, 0xbb) };
    return { type: 'ram-page', block, offset, continued, data: randomBytes(4096, next) };
  };
  for (let pass = 0; pass < 2; pass++) {
    recs.push({ type: 'section', kind: 'part', ...ram });
    for (let i = 0; i < perPass; i++) recs.push(page('pc.ram', ((next() % 64) * 4096), next() % 3));
    recs.push(page('/rom@etc/acpi/tables', 4096, 2));
    recs.push({ type: 'ram-eos' }, { type: 'footer', sectionId: 2 });
  }
  // A device payload that contains this section's own footer bytes followed by junk.
  const tricky = Uint8Array.of(1, 2, 0x7e, 0, 0, 0, 5, 0xff, 3, 0x7e, 0, 0, 0, 5, 0x09, 4);
  const device = (id: number, idstr: string, data: Uint8Array): StreamRecord[] => [
    { type: 'section', kind: 'full', sectionId: id, idstr, instanceId: 0, versionId: 1 },
    { type: 'device-state', sectionId: id, idstr, instanceId: 0, versionId: 1, kind: 'full', data },
    { type: 'footer', sectionId: id },
  ];
  if (opts.postcopy) {
    recs.push({ type: 'command', command: { cmd: 'switchover-start' } });
    recs.push({ type: 'command', command: { cmd: 'postcopy-ram-discard', block: 'pc.ram', ranges: [{ start: 0, length: 8 * 4096 }] } });
    recs.push({ type: 'command', command: { cmd: 'ping', value: 2 } });
    const pkg: StreamRecord[] = [
      { type: 'command', command: { cmd: 'postcopy-listen' } },
      ...device(5, 'timer', tricky),
      ...device(6, 'cpu', randomBytes(300, next)),
      { type: 'command', command: { cmd: 'ping', value: 3 } },
      { type: 'command', command: { cmd: 'postcopy-run' } },
    ];
    recs.push({ type: 'command', command: { cmd: 'packaged', length: encodedLength(pkg) } }, ...pkg, { type: 'package-end' });
    recs.push({ type: 'command', command: { cmd: 'ping', value: 4 } });
    last = undefined; // the encoder forgets the last block at the package, like QEMU
    recs.push({ type: 'section', kind: 'part', ...ram });
    for (let i = 0; i < 8; i++) recs.push(page('pc.ram', i * 4096, next() % 2 === 0 ? 0 : 2));
    recs.push({ type: 'ram-eos' }, { type: 'footer', sectionId: 2 });
    recs.push({ type: 'section', kind: 'end', ...ram }, { type: 'ram-eos' }, { type: 'footer', sectionId: 2 });
    recs.push({ type: 'eof' });
  } else {
    recs.push({ type: 'command', command: { cmd: 'switchover-start' } });
    recs.push({ type: 'section', kind: 'end', ...ram });
    recs.push(page('pc.ram', 0, 2));
    recs.push({ type: 'ram-eos' }, { type: 'footer', sectionId: 2 });
    recs.push(...device(5, 'timer', tricky), ...device(6, 'cpu', randomBytes(300, next)));
    recs.push({ type: 'eof' });
    const json = JSON.stringify({
      page_size: 4096,
      devices: [
        { name: 'timer', instance_id: 0, vmsd_name: 'timer', version: 1, fields: [{ name: 'data', type: 'buffer', size: tricky.length }] },
        { name: 'cpu', instance_id: 0, vmsd_name: 'cpu', version: 1, fields: [{ name: 'data', type: 'buffer', size: 300 }] },
      ],
    });
    recs.push({ type: 'vmdesc', json: new TextEncoder().encode(json) });
  }
  return recs;
}

function encodedLength(records: StreamRecord[]): number {
  const e = new StreamEncoder({ continueMode: 'as-recorded' });
  e.writeAll(records);
  return e.take().reduce((s, p) => s + p.length, 0);
}

export function encode(records: StreamRecord[], continueMode: 'auto' | 'never' | 'as-recorded' = 'as-recorded'): Buffer {
  const e = new StreamEncoder({ continueMode });
  e.writeAll(records);
  return concatPieces(e.take());
}

/** Decodes `bytes` pushed in the given pieces; returns records with views copied (comparable). */
export function decodeSplit(bytes: Uint8Array, cuts: number[] = [], opts: StreamDecoderOptions = {}): StreamRecord[] {
  const d = new StreamDecoder(opts);
  const out: StreamRecord[] = [];
  let prev = 0;
  for (const c of [...cuts, bytes.length]) {
    // Copy each piece so that views into earlier pieces cannot alias later ones.
    out.push(...d.push(bytes.slice(prev, c)));
    prev = c;
  }
  out.push(...d.end());
  return out;
}

/** Plain objects for deep equality (bytes → hex, bigint → "Nn"). */
export function normalize(value: unknown): unknown {
  if (value instanceof Uint8Array) return Buffer.from(value.buffer, value.byteOffset, value.byteLength).toString('hex');
  if (typeof value === 'bigint') return `${value}n`;
  if (Array.isArray(value)) return value.map(normalize);
  if (value && typeof value === 'object') {
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, normalize(v)]));
  }
  return value;
}
