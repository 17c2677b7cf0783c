/** A large, valid migration stream on disk (one RAM block, every page once), written in slices. */
import { open } from 'node:fs/promises';
import type { StreamRecord } from '../../src/stream/records.js';
import { StreamEncoder } from '../../src/stream/encoder.js';

const PAGE = 4096;

export async function writeBigStream(path: string, sizeMiB: number): Promise<void> {
  const length = sizeMiB * 1024 * 1024;
  const ram = { sectionId: 2, idstr: 'ram', instanceId: 0, versionId: 4 } as const;
  const enc = new StreamEncoder({ continueMode: 'auto' });
  const fh = await open(path, 'w');
  const flush = async (): Promise<void> => {
    const pieces = enc.take();
    for (let i = 0; i < pieces.length; i += 1024) await fh.writev(pieces.slice(i, i + 1024) as Buffer[]);
  };
  try {
    enc.writeAll([
      { type: 'header', version: 3 },
      { type: 'configuration', machineType: 'pc-q35-10.0' },
      { type: 'section', kind: 'start', ...ram },
      { type: 'ram-blocks', total: length, blocks: [{ idstr: 'pc.ram', length }] },
      { type: 'ram-eos' },
      { type: 'footer', sectionId: 2 },
    ]);
    const data = Buffer.alloc(PAGE);
    const slice = 4 * 1024 * 1024;
    for (let start = 0; start < length; start += slice) {
      const recs: StreamRecord[] = [{ type: 'section', kind: 'part', ...ram }];
      for (let offset = start; offset < Math.min(length, start + slice); offset += PAGE) {
        data.writeUInt32BE(offset / PAGE + 1, 0); // never a zero page
        recs.push({ type: 'ram-page', block: 'pc.ram', offset, continued: offset !== 0, data: Buffer.from(data) });
      }
      recs.push({ type: 'ram-eos' }, { type: 'footer', sectionId: 2 });
      enc.writeAll(recs);
      await flush();
    }
    enc.writeAll([{ type: 'section', kind: 'end', ...ram }, { type: 'ram-eos' }, { type: 'footer', sectionId: 2 }, { type: 'eof' }]);
    await flush();
  } finally {
    await fh.close();
  }
}
