import { StreamError } from './errors.js';

/**
 * XBZRLE as QEMU encodes it (migration/xbzrle.c): a sequence of
 * (ULEB128 unchanged-run length, ULEB128 changed-run length, changed bytes).
 * A trailing unchanged run is never written.
 */

/** QEMU's "small" ULEB128: at most two bytes (values below 2^14). */
function readUleb(data: Uint8Array, p: number): [value: number, next: number] | undefined {
  const b0 = data[p];
  if (b0 === undefined) return undefined;
  if ((b0 & 0x80) === 0) return [b0, p + 1];
  const b1 = data[p + 1];
  if (b1 === undefined || (b1 & 0x80) !== 0) return undefined;
  return [(b0 & 0x7f) | (b1 << 7), p + 2];
}

/**
 * Applies an encoded delta to `page` in place, with the acceptance rules of
 * QEMU's decoder (every unchanged run is followed by a non-empty changed run;
 * only the first unchanged run may be empty). Throws StreamError 'bad-xbzrle'
 * (at `offset`) otherwise.
 */
export function applyXbzrle(page: Uint8Array, encoded: Uint8Array, offset = 0): void {
  const bad = (why: string): never => {
    throw new StreamError('bad-xbzrle', offset, `XBZRLE delta ${why}`);
  };
  let p = 0;
  let d = 0;
  while (p < encoded.length) {
    if (encoded.length - p < 2) bad('ends inside a run header');
    const zrun = readUleb(encoded, p) ?? bad('has a bad unchanged-run length');
    if (p !== 0 && zrun[0] === 0) bad('has an empty unchanged run');
    p = zrun[1];
    d += zrun[0];
    if (d > page.length) bad('runs past the end of the page');
    if (encoded.length - p < 2) bad('ends inside a run header');
    const nzrun = readUleb(encoded, p) ?? bad('has a bad changed-run length');
    if (nzrun[0] === 0) bad('has an empty changed run');
    p = nzrun[1];
    const n = nzrun[0];
    if (d + n > page.length || p + n > encoded.length) bad('runs past the end of the page or of the delta');
    page.set(encoded.subarray(p, p + n), d);
    p += n;
    d += n;
  }
}

function pushUleb(out: number[], v: number): void {
  do {
    let b = v & 0x7f;
    v = Math.floor(v / 128);
    if (v > 0) b |= 0x80;
    out.push(b);
  } while (v > 0);
}

/**
 * Encodes `next` as a delta over `prev` (same length). Returns undefined when
 * the delta would not be shorter than `limit` bytes (QEMU then sends the page whole).
 */
export function encodeXbzrle(prev: Uint8Array, next: Uint8Array, limit = next.length): Uint8Array | undefined {
  const out: number[] = [];
  let i = 0;
  const n = next.length;
  while (i < n) {
    let z = i;
    while (z < n && prev[z] === next[z]) z++;
    if (z === n) break; // trailing unchanged run is implied
    let c = z;
    while (c < n && prev[c] !== next[c]) c++;
    pushUleb(out, z - i);
    pushUleb(out, c - z);
    for (let k = z; k < c; k++) out.push(next[k] as number);
    if (out.length >= limit) return undefined;
    i = c;
  }
  return Uint8Array.from(out);
}
