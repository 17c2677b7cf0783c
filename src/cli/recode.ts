import { open } from 'node:fs/promises';
import { StreamEncoder } from '../stream/encoder.js';
import { decodeFile } from './load-stream.js';

export interface RecodeOptions {
  /** Never set RAM_SAVE_FLAG_CONTINUE: every page names its block. */
  noContinue?: boolean;
}

/** Decodes IN with our decoder and writes it again with our encoder. Returns bytes written. */
export async function recodeFile(input: string, output: string, opts: RecodeOptions = {}): Promise<number> {
  const enc = new StreamEncoder({ continueMode: opts.noContinue ? 'never' : 'auto' });
  const out = await open(output, 'w');
  let written = 0;
  try {
    await decodeFile(input, async (records) => {
      enc.writeAll(records);
      const pieces = enc.take();
      // Views into the input chunk are still valid here: write before the next chunk is read.
      for (let i = 0; i < pieces.length; i += 1024) {
        const { bytesWritten } = await out.writev(pieces.slice(i, i + 1024) as Buffer[]);
        written += bytesWritten;
      }
    });
    const rest = enc.take();
    if (rest.length > 0) written += (await out.writev(rest as Buffer[])).bytesWritten;
  } finally {
    await out.close();
  }
  return written;
}
