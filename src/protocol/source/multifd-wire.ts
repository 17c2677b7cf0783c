/**
 * TEMPORARY: the multifd encoders of contract A until src/stream/multifd.ts
 * (mfd-codec) lands; replaced by it at the merge.
 */
export const MULTIFD_MAGIC = 0x11223344;
export const MULTIFD_VERSION = 1;
export const MULTIFD_INIT_BYTES = 64;
export const MultifdFlag = { SYNC: 0x1, COMPRESSION_MASK: 0x3e, DEVICE_STATE: 0x40 } as const;

export function encodeMultifdInit(id: number, uuid?: Uint8Array): Uint8Array {
  const b = Buffer.alloc(MULTIFD_INIT_BYTES);
  b.writeUInt32BE(MULTIFD_MAGIC, 0);
  b.writeUInt32BE(MULTIFD_VERSION, 4);
  if (uuid) b.set(uuid.subarray(0, 16), 8);
  b[24] = id;
  return b;
}

export function multifdPacketHeaderLength(pagesAlloc: number): number {
  return 320 + 8 * pagesAlloc;
}

export function encodeMultifdPacketHeader(p: {
  flags: number;
  pagesAlloc: number;
  packetNum: bigint;
  nextPacketSize?: number;
  block: string;
  normal: ArrayLike<number>;
  normalCount?: number;
  zero: ArrayLike<number>;
  zeroCount?: number;
}): Uint8Array {
  const b = Buffer.alloc(multifdPacketHeaderLength(p.pagesAlloc));
  const normal = p.normalCount ?? p.normal.length;
  const zero = p.zeroCount ?? p.zero.length;
  const sync = (p.flags & MultifdFlag.SYNC) !== 0;
  b.writeUInt32BE(MULTIFD_MAGIC, 0);
  b.writeUInt32BE(MULTIFD_VERSION, 4);
  b.writeUInt32BE(p.flags, 8);
  b.writeUInt32BE(sync ? 0 : p.pagesAlloc, 12);
  b.writeUInt32BE(normal, 16);
  b.writeUInt32BE(p.nextPacketSize ?? normal * 4096, 20);
  b.writeBigUInt64BE(p.packetNum, 24);
  b.writeUInt32BE(zero, 32);
  b.write(p.block, 64, 255, 'latin1');
  let o = 320;
  for (let i = 0; i < normal; i++, o += 8) b.writeBigUInt64BE(BigInt(p.normal[i]!), o);
  for (let i = 0; i < zero; i++, o += 8) b.writeBigUInt64BE(BigInt(p.zero[i]!), o);
  return b;
}
