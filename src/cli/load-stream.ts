import { open } from 'node:fs/promises';
import { decodePositioned, fileReader } from '../protocol/mapped-ram-file.js';
import { StreamDecoder, type DeviceSectionSize } from '../stream/decoder.js';
import type { StreamRecord } from '../stream/records.js';
import { findTrailingVmDescription, parseVmDescription, vmdescSectionSizes, type VmDescription } from '../stream/vmdesc.js';
import { readChunks, readTail } from './read-file.js';

/** QEMU's analyze-migration.py looks at the last 10 MiB; our limit for a description is 16 MiB. */
const TAIL_BYTES = 16 * 1024 * 1024;

/**
 * A file stream's trailing VM description, read before the stream itself so
 * that device sections can be delimited exactly by size. Undefined when the
 * file has none (postcopy captures) or it does not parse: the decoder then
 * falls back to the footer rule and checks the description when it meets it.
 */
export async function readAheadVmDescription(path: string): Promise<{ desc: VmDescription; sizes: DeviceSectionSize[] } | undefined> {
  const { bytes, offset } = await readTail(path, TAIL_BYTES);
  const found = findTrailingVmDescription(bytes);
  if (!found) return undefined;
  try {
    const desc = parseVmDescription(found.json, offset + found.offset);
    return { desc, sizes: vmdescSectionSizes(desc) };
  } catch {
    return undefined;
  }
}

export interface DecodeFileOptions {
  /** false: do not read the trailing VM description first (default true). */
  exact?: boolean;
  /** Called after each chunk with the bytes read so far (a progress display). */
  onProgress?: (bytesRead: number) => void;
  /** Checked between chunks: aborting stops the decode with the signal's reason. */
  signal?: AbortSignal;
  /**
   * Accept QEMU's mapped-ram files too (StreamDecoderOptions.mappedRam): the
   * file is read with positioned reads that jump over each block's bitmap
   * and pages.
   */
  mappedRam?: boolean;
}

/** Decodes a whole file, handing each batch of records to `onRecords` (views stay valid). */
export async function decodeFile(
  path: string,
  onRecords: (records: StreamRecord[], offset: number) => void | Promise<void>,
  opts: DecodeFileOptions = {},
): Promise<{ decoder: StreamDecoder; desc: VmDescription | undefined }> {
  const ahead = opts.exact === false ? undefined : await readAheadVmDescription(path);
  const decoder = new StreamDecoder({ ...(ahead ? { deviceSizes: ahead.sizes } : {}), ...(opts.mappedRam ? { mappedRam: true } : {}) });
  if (opts.mappedRam) {
    const fh = await open(path, 'r');
    try {
      await decodePositioned(await fileReader(fh), decoder, onRecords, { ...(opts.onProgress ? { onProgress: opts.onProgress } : {}), ...(opts.signal ? { signal: opts.signal } : {}) });
    } finally {
      await fh.close();
    }
    return { decoder, desc: ahead?.desc };
  }
  let read = 0;
  for await (const chunk of readChunks(path)) {
    opts.signal?.throwIfAborted();
    const records = decoder.push(chunk);
    if (records.length > 0) await onRecords(records, decoder.offset);
    read += chunk.length;
    opts.onProgress?.(read);
  }
  const last = decoder.end();
  if (last.length > 0) await onRecords(last, decoder.offset);
  return { decoder, desc: ahead?.desc };
}
