import { open } from 'node:fs/promises';

/** Reads a file front to back in fresh chunks (decoded records may keep views into them). */
export async function* readChunks(path: string, chunkSize = 1 << 20): AsyncGenerator<Buffer> {
  const fh = await open(path, 'r');
  try {
    for (;;) {
      const buf = Buffer.allocUnsafe(chunkSize);
      const { bytesRead } = await fh.read(buf, 0, chunkSize, null);
      if (bytesRead === 0) return;
      yield buf.subarray(0, bytesRead);
    }
  } finally {
    await fh.close();
  }
}

/** The last `n` bytes of a file (where a trailing VM description lives). */
export async function readTail(path: string, n: number): Promise<{ bytes: Buffer; offset: number }> {
  const fh = await open(path, 'r');
  try {
    const { size } = await fh.stat();
    const len = Math.min(n, size);
    const bytes = Buffer.alloc(len);
    await fh.read(bytes, 0, len, size - len);
    return { bytes, offset: size - len };
  } finally {
    await fh.close();
  }
}
