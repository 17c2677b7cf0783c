/**
 * The `--json` output of every `qmt` command: one object on stdout when the
 * command ends, success or failure, with the same envelope
 * (`version`, `command`, `ok`, `durationMs`, `error`) and the command's own
 * fields after it. Quantities carry their unit in the key (`…Bytes`, `…Ms`,
 * `…Us`, `…MiB`, `…BytesPerSecond`); counts (pages, requests) have none.
 * 64-bit values are decimal strings, byte strings hex. README "JSON output"
 * documents the schema; bump JSON_SCHEMA_VERSION on any incompatible change.
 */
import type { LatencySummary } from '../protocol/latency.js';
import type { DestinationStats } from '../protocol/destination.js';
import type { SourceStats } from '../protocol/source.js';
import type { ChannelStats } from '../transport/channel.js';
import type { DescribedError } from './errors.js';

export const JSON_SCHEMA_VERSION = 1;

/** The fields every command's `--json` object starts with. */
export interface JsonEnvelope {
  /** Schema version of this output (JSON_SCHEMA_VERSION). */
  version: number;
  /** 'demo', 'inspect', 'recode', 'pki init', 'receive', 'send', 'tap'; null when the command line did not parse. */
  command: string | null;
  /** The command did what it was asked (exit code 0). */
  ok: boolean;
  /** Wall time of the command. */
  durationMs: number;
  /** Why it failed (absent when ok). */
  error?: DescribedError;
}

/** Latency percentiles, µs. */
export interface LatencyJson {
  count: number;
  p50Us: number;
  p90Us: number;
  p99Us: number;
  p999Us: number;
  maxUs: number;
  meanUs: number;
}

export function latencyJson(l: LatencySummary): LatencyJson {
  return { count: l.count, p50Us: l.p50, p90Us: l.p90, p99Us: l.p99, p999Us: l.p999, maxUs: l.max, meanUs: l.mean };
}

/** One channel's counters, its socket options as read back (getsockopt). */
export interface ChannelJson {
  role: ChannelStats['role'];
  bytesSent: number;
  bytesReceived: number;
  queuedBytes: number;
  peakQueuedBytes: number;
  maxQueuedBytes: number;
  /** The pull-based bulk window (main). */
  bulkWindowBytes: number;
  /** Times the bulk producer waited for room below the window. */
  bulkWaits: number;
  /** Times a send had to wait for room. */
  writeWaits: number;
  /** Times reading paused for a busy consumer. */
  readPauses: number;
  tuning: {
    sndbufBytes: number | null;
    rcvbufBytes: number | null;
    noDelay: boolean | null;
    cork: boolean;
    notSentLowatBytes: number | null;
    /** SO_PRIORITY (0..6). */
    priority: number | null;
    /** IP_TOS / IPV6_TCLASS byte. */
    tos: number | null;
    warnings: string[];
  };
  tls: ChannelStats['tls'] | null;
}

export function channelJson(c: ChannelStats): ChannelJson {
  const t = c.tuning;
  return {
    role: c.role,
    bytesSent: c.bytesSent,
    bytesReceived: c.bytesReceived,
    queuedBytes: c.queuedBytes,
    peakQueuedBytes: c.peakQueuedBytes,
    maxQueuedBytes: c.maxQueuedBytes,
    bulkWindowBytes: c.bulkWindowBytes,
    bulkWaits: c.bulkWaits,
    writeWaits: c.writeWaits,
    readPauses: c.readPauses,
    tuning: {
      sndbufBytes: t.sndbuf ?? null,
      rcvbufBytes: t.rcvbuf ?? null,
      noDelay: t.noDelay ?? null,
      cork: t.cork,
      notSentLowatBytes: t.notSentLowat ?? null,
      priority: t.priority ?? null,
      tos: t.tos ?? null,
      warnings: t.warnings,
    },
    tls: c.tls ?? null,
  };
}

/** The channels of a session: main, preempt, and the multifd channels by id (their `id` in each). */
export interface ChannelsJson {
  main?: ChannelJson;
  preempt?: ChannelJson;
  multifd?: (ChannelJson & { id: number })[];
}

function channelsJson(c: { main?: ChannelStats; preempt?: ChannelStats; multifd?: ChannelStats[] }): ChannelsJson {
  return {
    ...(c.main ? { main: channelJson(c.main) } : {}),
    ...(c.preempt ? { preempt: channelJson(c.preempt) } : {}),
    ...(c.multifd?.length ? { multifd: c.multifd.map((m) => ({ id: m.id ?? 0, ...channelJson(m) })) } : {}),
  };
}

/** Page records by kind: PAGE (QEMU's `normal`), ZERO (`duplicate`), XBZRLE. */
export interface PagesJson {
  normal: number;
  zero: number;
  xbzrle: number;
}

/** `qmt receive`'s counters, from DestinationStats. */
export interface DestinationStatsJson {
  status: DestinationStats['status'];
  totalTimeMs: number;
  transferredBytes: number;
  pages: PagesJson;
  preemptPages: number;
  precopyIterations: number;
  postcopyRequests: number;
  /** Request sent → page arrived. */
  postcopyLatency: LatencyJson;
  /** QEMU's postcopy-blocktime (ms): every faulting context waited on a missing page at once. */
  postcopyBlocktimeMs: number;
  /** postcopy-vcpu-blocktime (ms), per vCPU id (`qmt receive --fault`'s generator is vCPU 0). */
  postcopyVcpuBlocktimeMs: number[];
  recoveries: number;
  /** 0 in a correct migration. */
  placedTwice: number;
  /** Runs of consecutive pages landed as one (the pages in them are `pages`): pages per run is the page path's batch. */
  runs: { count: number };
  /** Times reading waited for the sink (its disk slower than the network). */
  sink: { pauses: number };
  channels: { main?: ChannelJson; preempt?: ChannelJson };
  /** With multifd: channels, MULTIFD_FLUSH barriers passed, packets, and per channel (by id) its bytes and pages. */
  multifd?: { channels: number; syncs: number; packets: number; flushWaits: number; perChannel: { id: number; bytes: number; packets: number; pages: PagesJson }[] };
  /** Whether the channels ran in worker threads, why, and each channel's thread (id) and CPU time. */
  threads: ThreadsJson;
}

/** stats.threads in JSON: per channel its thread id and CPU time in ms. */
export interface ThreadsJson<Extra = object> {
  used: boolean;
  why: string;
  channels: ({ role: string; id: number; cpuMs: number } & Extra)[];
}

/** Numbers renamed with their unit (id, cpuMs); a channel's other fields kept as they are. */
export function threadsJson<C extends { role: string; threadId: number; cpuSeconds: number }>(t: { used: boolean; why: string; channels: readonly C[] }): ThreadsJson<Omit<C, 'role' | 'threadId' | 'cpuSeconds'>> {
  return {
    used: t.used,
    why: t.why,
    channels: t.channels.map(({ role, threadId, cpuSeconds, ...rest }) => ({ ...rest, role, id: threadId, cpuMs: Math.round(cpuSeconds * 1000) })),
  };
}

export function destinationStatsJson(s: DestinationStats): DestinationStatsJson {
  return {
    status: s.status,
    totalTimeMs: s['total-time'],
    transferredBytes: s.transferred,
    pages: { normal: s.normal, zero: s.duplicate, xbzrle: s.xbzrle },
    preemptPages: s['preempt-pages'],
    precopyIterations: s['precopy-iterations'],
    postcopyRequests: s['postcopy-requests'],
    postcopyLatency: latencyJson(s['postcopy-latency']),
    postcopyBlocktimeMs: s['postcopy-blocktime'],
    postcopyVcpuBlocktimeMs: s['postcopy-vcpu-blocktime'],
    recoveries: s.recoveries,
    placedTwice: s['placed-twice'],
    runs: { count: s.runs.count },
    sink: { pauses: s['sink-waits'] },
    channels: channelsJson(s.channels),
    threads: threadsJson(s.threads),
    ...(s.multifd
      ? {
          multifd: {
            channels: s.multifd.channels,
            syncs: s.multifd.syncs,
            packets: s.multifd.packets,
            flushWaits: s.multifd['flush-waits'],
            perChannel: s.multifd.perChannel.map((c, id) => ({ id, bytes: c.bytes, packets: c.packets, pages: { normal: c.normal, zero: c.zero, xbzrle: 0 } })),
          },
        }
      : {}),
  };
}

/** `qmt send`'s and `qmt demo`'s source counters, from SourceStats. */
export interface SourceStatsJson {
  status: SourceStats['status'];
  totalTimeMs: number;
  setupTimeMs: number;
  /** Source stop → destination running; null when the migration did not get there. */
  downtimeMs: number | null;
  transferredBytes: number;
  remainingBytes: number;
  pages: PagesJson;
  pagesPerSecond: number;
  passes: number;
  dirtySyncCount: number;
  postcopyRequests: number;
  /** Requested pages by the channel that answered and why (SourceStats['requests-answered']). */
  requestsAnswered: { preempt: number; mainInFlight: number; mainNoPreempt: number };
  /** Request arrival → last byte of the page handed to the kernel. */
  postcopyLatency: LatencyJson;
  recoveries: number;
  /** Whether the channels ran in worker threads, why, and each thread's CPU time (SourceStats.threads). */
  threads: ThreadsJson<Omit<NonNullable<SourceStats['threads']>['channels'][number], 'role' | 'threadId' | 'cpuSeconds'>> | null;
  channels: ChannelsJson;
}

export function sourceStatsJson(s: SourceStats): SourceStatsJson {
  return {
    status: s.status,
    totalTimeMs: s['total-time'],
    setupTimeMs: s['setup-time'],
    downtimeMs: s.downtime ?? null,
    transferredBytes: s.transferred,
    remainingBytes: s.remaining,
    pages: { normal: s.normal, zero: s.duplicate, xbzrle: s.xbzrle },
    pagesPerSecond: s['pages-per-second'],
    passes: s.passes,
    dirtySyncCount: s['dirty-sync-count'],
    postcopyRequests: s['postcopy-requests'],
    requestsAnswered: { preempt: s['requests-answered'].preempt, mainInFlight: s['requests-answered']['main-in-flight'], mainNoPreempt: s['requests-answered']['main-no-preempt'] },
    postcopyLatency: latencyJson(s['postcopy-latency']),
    recoveries: s.recoveries,
    threads: s.threads ? threadsJson(s.threads) : null,
    channels: channelsJson(s.channels),
  };
}

/** JSON.stringify that writes bigints as decimal strings and bytes as hex. */
export function stringifyJson(v: unknown): string {
  return JSON.stringify(v, (_k, x: unknown) => (typeof x === 'bigint' ? x.toString() : x instanceof Uint8Array ? Buffer.from(x).toString('hex') : x), 2);
}
