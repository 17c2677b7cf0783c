/**
 * Synthetic guests for the library → library benchmarks: guest RAM in an
 * InMemorySource, what the "guest" does to it while it migrates, and what the
 * same guest does at the destination once it runs there (postcopy).
 */
import { createHash, randomFillSync } from 'node:crypto';
import { performance } from 'node:perf_hooks';
import { InMemorySource, type DestinationSession, type DeviceStateSection } from '../../src/protocol/index.js';
import { TARGET_PAGE_SIZE } from '../../src/stream/constants.js';

const MiB = 1024 * 1024;
const PAGE = TARGET_PAGE_SIZE;
export const RAM_BLOCK = 'pc.ram';
export const MACHINE_TYPE = 'pc-q35-10.0';

/** What a benchmark source migrates. */
export type GuestSpec =
  /** Every page non-zero (a counter in its first byte), nothing dirtied: the QEMU test guest after one pass, paused. */
  | { kind: 'pattern'; bytes: number; shared?: boolean }
  /** qmt demo's video-streaming guest (see {@link VideoGuest}). */
  | { kind: 'video'; bytes: number }
  /** Zero RAM but for `rangeBytes` from 1 MiB, whose first bytes all go up by one every `intervalMs` (the test guest's loop, small). */
  | { kind: 'range'; bytes: number; rangeBytes: number; intervalMs: number };

/** Device sections of every synthetic guest: small opaque blobs, as QEMU's timer and CPU. */
export function syntheticDevices(extra: readonly DeviceStateSection[] = []): DeviceStateSection[] {
  return [
    { idstr: 'timer', instanceId: 0, versionId: 2, data: randomFillSync(Buffer.alloc(24)) },
    { idstr: 'cpu', instanceId: 0, versionId: 12, data: randomFillSync(Buffer.alloc(1851)) },
    ...extra,
  ];
}

/** SHA-1 over the blocks in name order: "the same RAM at both ends", cheaply. */
export function hashBlocks(blocks: ReadonlyMap<string, Buffer>): string {
  const h = createHash('sha1');
  for (const name of [...blocks.keys()].sort()) {
    h.update(name);
    const b = blocks.get(name)!;
    // One update takes at most 2³¹−1 bytes.
    for (let off = 0; off < b.length; off += 1 << 30) h.update(b.subarray(off, Math.min(b.length, off + (1 << 30))));
  }
  return h.digest('hex');
}

/** A running guest at the source: memory, a workload, and its state as a device section. */
export interface BenchGuest {
  readonly source: InMemorySource;
  start(): void;
  /** Stops the workload (SourceSession's stopVm). */
  stop(): void;
  /** Extra device sections describing the workload's state at the stop. */
  devices(): DeviceStateSection[];
}

/** An InMemorySource over SharedArrayBuffer-backed blocks, shared (memory and dirty bitmaps) with the source's channel threads. */
export function sharedSource(blocks: ReadonlyMap<string, Buffer>): InMemorySource {
  return new InMemorySource(blocks, { shared: true });
}

export function createGuest(spec: GuestSpec): BenchGuest {
  switch (spec.kind) {
    case 'pattern':
      return new PatternGuest(spec.bytes, spec.shared === true);
    case 'video':
      return new VideoGuest(spec.bytes);
    case 'range':
      return new RangeGuest(spec.bytes, spec.rangeBytes, spec.intervalMs);
  }
}

class PatternGuest implements BenchGuest {
  readonly source: InMemorySource;
  constructor(bytes: number, shared: boolean) {
    const ram = shared ? Buffer.from(new SharedArrayBuffer(bytes)) : Buffer.alloc(bytes);
    for (let off = 0, i = 1; off < bytes; off += PAGE, i++) ram[off] = (i & 0xff) || 1;
    this.source = shared ? sharedSource(new Map([[RAM_BLOCK, ram]])) : new InMemorySource(new Map([[RAM_BLOCK, ram]]));
  }
  start(): void {}
  stop(): void {}
  devices(): DeviceStateSection[] {
    return [];
  }
}

class RangeGuest implements BenchGuest {
  readonly source: InMemorySource;
  private timer: NodeJS.Timeout | undefined;
  private readonly one = Buffer.alloc(1);
  constructor(
    bytes: number,
    private readonly rangeBytes: number,
    private readonly intervalMs: number,
  ) {
    this.source = new InMemorySource([{ idstr: RAM_BLOCK, length: bytes }]);
    this.step();
  }
  private step(): void {
    const mem = this.source.memory.get(RAM_BLOCK)!;
    for (let off = MiB; off < MiB + this.rangeBytes; off += PAGE) {
      this.one[0] = ((mem[off] ?? 0) + 1) & 0xff;
      this.source.write(RAM_BLOCK, off, this.one);
    }
  }
  start(): void {
    this.timer = setInterval(() => this.step(), this.intervalMs);
  }
  stop(): void {
    clearInterval(this.timer);
  }
  devices(): DeviceStateSection[] {
    return [];
  }
}

/** Where the video workload writes, for a guest of `bytes` (qmt demo's layout). */
export function videoLayout(bytes: number): { hot: { start: number; length: number }; stream: { start: number; length: number }; streamBytesPerSec: number; hotWritesPerSec: number } {
  const stream = { start: Math.floor(bytes / 2), length: Math.max(16 * MiB, Math.floor(bytes / 8)) };
  return {
    hot: { start: Math.floor(bytes / 8), length: Math.max(4 * MiB, Math.floor(bytes / 64)) },
    stream,
    // The streaming buffer wraps every 2 s; 256 scattered 64-byte writes in the hot set every 5 ms.
    streamBytesPerSec: stream.length / 2,
    hotWritesPerSec: 256 * 200,
  };
}

const VIDEO_STATE = 'bench-video';

/**
 * The seed's video-streaming VM, as `qmt demo` models it: an OS image (a
 * third of the pages hold data, the rest are zero), a hot working set
 * rewritten all the time (scattered 64-byte writes), and a streaming buffer
 * written front to back at a steady rate, wrapping around. The writer's
 * position migrates as a device section, as a vCPU's registers would.
 */
export class VideoGuest implements BenchGuest {
  readonly source: InMemorySource;
  readonly layout: ReturnType<typeof videoLayout>;
  private timer: NodeJS.Timeout | undefined;
  private streamPos = 0;
  private last = 0;
  private carry = 0;
  private readonly hotNoise = Buffer.alloc(64);
  private streamNoise = Buffer.alloc(0);
  private tick = 0;

  constructor(readonly bytes: number) {
    this.source = new InMemorySource([{ idstr: RAM_BLOCK, length: bytes }]);
    const ram = this.source.memory.get(RAM_BLOCK)!;
    for (let p = 0; p < bytes; p += 3 * PAGE) randomFillSync(ram, p, PAGE);
    this.layout = videoLayout(bytes);
  }

  start(): void {
    this.last = performance.now();
    this.timer = setInterval(() => this.step(), 5);
  }

  /** Writes what the elapsed time asks for: the rate stays steady when a tick comes late. */
  private step(): void {
    const now = performance.now();
    const dt = (now - this.last) / 1000;
    this.last = now;
    const { hot, stream, streamBytesPerSec, hotWritesPerSec } = this.layout;
    this.tick = (this.tick + 1) & 0xff;
    // Cheap bytes (a tick counter): the workload must not eat the CPU the migration needs.
    this.hotNoise.fill(this.tick || 1);
    const hotWrites = Math.round(hotWritesPerSec * dt);
    for (let i = 0; i < hotWrites; i++) {
      const off = hot.start + Math.floor(Math.random() * (hot.length / 64)) * 64;
      this.source.write(RAM_BLOCK, off, this.hotNoise);
    }
    let todo = streamBytesPerSec * dt + this.carry;
    const whole = Math.floor(todo / 256) * 256;
    this.carry = todo - whole;
    todo = whole;
    while (todo > 0) {
      const n = Math.min(todo, stream.length - this.streamPos);
      if (this.streamNoise.length < n) this.streamNoise = Buffer.alloc(n);
      this.streamNoise.fill(this.tick || 1, 0, n);
      this.source.write(RAM_BLOCK, stream.start + this.streamPos, this.streamNoise.subarray(0, n));
      this.streamPos = (this.streamPos + n) % stream.length;
      todo -= n;
    }
  }

  stop(): void {
    clearInterval(this.timer);
  }

  devices(): DeviceStateSection[] {
    const state = Buffer.alloc(8);
    state.writeUInt32LE(this.streamPos, 0);
    state.writeUInt32LE(this.bytes / MiB, 4);
    return [{ idstr: VIDEO_STATE, instanceId: 0, versionId: 1, data: state }];
  }
}

/** What the destination's guest did while it ran in postcopy. */
export interface DestinationWorkloadReport {
  /** Pages touched that were not there yet (each a demand request, unless the stream brought it meanwhile). */
  faults: number;
  /** Stream bytes written at the destination against what the steady rate asks for over the same time. */
  streamProgress: number;
  runMs: number;
}

/**
 * The video guest running on at the destination once POSTCOPY_RUN arrived:
 * four vCPUs, one continuing the streaming buffer from where the source
 * stopped, three writing the hot set at random, each at the source's rate and
 * each blocked while its page is missing (a demand request). Reads only, so
 * that the RAM can still be compared with the source's. Stops when the
 * migration ends.
 */
/** The video guest's vCPUs at the destination (DestinationOptions.vcpus for postcopy-blocktime). */
export const VIDEO_VCPUS = 4;

export function runVideoAtDestination(dst: DestinationSession): Promise<DestinationWorkloadReport> {
  const dev = dst.snapshot().devices.find((d) => d.idstr === VIDEO_STATE);
  if (!dev) return Promise.reject(new Error(`no ${VIDEO_STATE} device section before POSTCOPY_RUN`));
  const startPos = dev.data.readUInt32LE(0);
  const layout = videoLayout(dev.data.readUInt32LE(4) * MiB);
  let over = false;
  const ended = dst.done.then(
    () => undefined,
    () => undefined,
  );
  void ended.then(() => (over = true));
  const t0 = performance.now();
  let faults = 0;
  let streamDone = 0;

  // vCPU 0 streams, vCPUs 1–3 write the hot set (VIDEO_VCPUS): each waits on its own faults.
  const touch = async (offset: number, vcpu: number): Promise<void> => {
    const page = offset - (offset % PAGE);
    if (dst.hasPage(RAM_BLOCK, page)) return;
    faults++;
    await dst.requestPage(RAM_BLOCK, page, { vcpu }).catch(() => undefined);
  };
  const pace = async (done: number, perSec: number): Promise<void> => {
    const due = t0 + (done / perSec) * 1000;
    const wait = due - performance.now();
    await new Promise<void>((r) => (wait > 1 ? setTimeout(r, wait) : setImmediate(r)));
  };
  const streamer = async (): Promise<void> => {
    const { stream, streamBytesPerSec } = layout;
    let pos = startPos - (startPos % PAGE);
    while (!over) {
      await touch(stream.start + pos, 0);
      pos = (pos + PAGE) % stream.length;
      streamDone += PAGE;
      await pace(streamDone, streamBytesPerSec);
    }
  };
  const hotWriter = async (vcpu: number): Promise<void> => {
    const { hot, hotWritesPerSec } = layout;
    const perVcpu = hotWritesPerSec / 3;
    let done = 0;
    while (!over) {
      // A batch of writes per wake-up, as many as 1 ms of the rate asks for.
      for (let i = 0; i < Math.max(1, perVcpu / 1000) && !over; i++, done++) await touch(hot.start + Math.floor(Math.random() * hot.length), vcpu);
      await pace(done, perVcpu);
    }
  };
  return Promise.all([streamer(), hotWriter(1), hotWriter(2), hotWriter(3)]).then(() => {
    const runMs = performance.now() - t0;
    return { faults, streamProgress: streamDone / ((layout.streamBytesPerSec * runMs) / 1000), runMs };
  });
}
