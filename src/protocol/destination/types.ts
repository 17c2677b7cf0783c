import type { ConfigurationRecord, RamBlockInfo } from '../../stream/records.js';
import type { ChannelStats } from '../../transport/channel.js';
import type { TransportOptions } from '../../transport/connection.js';
import type { ThreadMode } from '../../transport/worker/support.js';
import type { StrangerEvent } from '../../transport/qualify.js';
import type { MigrationError } from '../errors.js';
import type { LatencySummary } from '../latency.js';
import type { GuestMemorySink } from '../memory.js';
import type { PageRequestResult } from '../page-tracker.js';
import type { DestinationRecoveryOptions, PausedEvent, ResumedEvent } from '../recovery.js';
import type { MultifdStats } from './multifd.js';

/** The public shapes of a DestinationSession: options, events, stats and result. */

/** One device (non-RAM) section as received, delimited exactly. */
export interface ReceivedDeviceSection {
  sectionId: number;
  idstr: string;
  instanceId: number;
  versionId: number;
  kind: 'start' | 'part' | 'end' | 'full';
  /** Whether it came inside the postcopy package. */
  packaged: boolean;
  data: Buffer;
}

/** Counters named as QEMU's `query-migrate` names them where one exists. */
export interface DestinationStats {
  status: 'setup' | 'active' | 'postcopy-active' | 'postcopy-paused' | 'postcopy-recover' | 'completed' | 'failed';
  /** Postcopy recoveries completed. */
  recoveries: number;
  /** Pages that arrived after POSTCOPY_LISTEN although already here (QEMU would refuse to place them twice); 0 in a correct migration. */
  'placed-twice': number;
  /** Bytes received on every channel. */
  transferred: number;
  /** PAGE records (QEMU's `normal`). */
  normal: number;
  /** ZERO records (QEMU's `duplicate`). */
  duplicate: number;
  xbzrle: number;
  /** Pages that came on the preempt channel. */
  'preempt-pages': number;
  /** Demand requests sent (QEMU's source counts them as `postcopy-requests`). */
  'postcopy-requests': number;
  /** RAM PART sections seen (QEMU's iterations). */
  'precopy-iterations': number;
  'total-time': number;
  /** Latency of demand requests (request sent → page arrived), µs. */
  'postcopy-latency': LatencySummary;
  /**
   * QEMU's `postcopy-blocktime`, in ms (to the µs): how long every faulting
   * context (`requestPage`'s `vcpu`, up to the `vcpus` option) waited on a
   * missing page at the same time, the VM making no progress. The VM's stall
   * is the downtime plus this.
   */
  'postcopy-blocktime': number;
  /** QEMU's `postcopy-vcpu-blocktime`: per vCPU id, ms it waited on missing pages. */
  'postcopy-vcpu-blocktime': number[];
  /**
   * Runs of consecutive pages landed as one (one writePages / zeroPages call
   * each; a sink without them gets a call per page) and the pages in them:
   * pages / count is the batch the page path works in. XBZRLE pages are runs
   * of one.
   */
  runs: { count: number; pages: number };
  /** Times reading paused for the sink's backpressure (its disk slower than the network). */
  'sink-waits': number;
  channels: { main?: ChannelStats; preempt?: ChannelStats; multifd?: ChannelStats[] };
  /**
   * With `multifd`: barriers passed, packets, pages (also counted in
   * normal, duplicate and runs above) per channel; `flush-waits`: MULTIFD_FLUSH
   * records at which the main stream waited for a channel's SYNC.
   */
  multifd?: MultifdStats & { 'flush-waits': number };
  /** Whether the channels ran in worker threads (`threads` option), why, and each channel's thread. */
  threads: ThreadStats;
}

/** stats.threads: which path was used and why; per channel thread, its CPU time so far. */
export interface ThreadStats {
  used: boolean;
  why: string;
  channels: { role: 'main' | 'preempt' | `multifd-${number}`; threadId: number; cpuSeconds: number }[];
}

/** What a completed (or, on failure, partial) migration left behind. */
export interface DestinationResult {
  complete: boolean;
  machineType: string | undefined;
  configuration: ConfigurationRecord | undefined;
  blocks: RamBlockInfo[];
  devices: ReceivedDeviceSection[];
  /** The VM description JSON (precopy only). */
  vmdesc: Buffer | undefined;
  postcopy: boolean;
  stats: DestinationStats;
  error?: MigrationError;
}

export interface DestinationOptions {
  /** `tcp:HOST:PORT` or `unix:PATH`. */
  listen: string;
  /** Where RAM goes. */
  sink: GuestMemorySink;
  /** TLS, tuning and buffering of the two channels. */
  transport?: TransportOptions;
  /**
   * Accept postcopy (a 16-byte POSTCOPY_ADVISE), as QEMU's `postcopy-ram`
   * capability on a destination. Default false: such a stream is refused.
   */
  postcopy?: boolean;
  /**
   * Fail when no byte arrives for this long once connected (default 60 s;
   * 0 = never). Once the VM runs here (the postcopy package is in) such
   * silence is a network failure instead — a pulled cable or a frozen
   * middlebox sends no FIN and no RST — and pauses the migration like a reset
   * (see `recovery`); with `recovery: false` it fails.
   */
  idleTimeoutMs?: number;
  /**
   * Postcopy recovery: once the VM runs here (the postcopy package is in), a
   * network failure pauses the migration ('paused'), keeps every page and
   * request, and listens for the source's new connection ('resumed' after
   * POSTCOPY_RESUME). Default: on when `postcopy` is; `false` makes such a
   * failure final.
   */
  recovery?: DestinationRecoveryOptions | false;
  /**
   * QEMU's multifd (capability `multifd`, parameter `multifd-channels`): the
   * source opens `channels` more connections (1–255) that carry the pages in
   * packets; the main channel carries only the block list, MULTIFD_FLUSH
   * barriers and device state. Processing starts once main and every channel
   * are in (as QEMU). `uuid`: the 16 bytes the channels' init messages must
   * carry (QEMU's `-uuid` of the source; default zeros). Precopy only on a
   * QEMU 10.0 peer; with our SourceSession also postcopy after a multifd
   * precopy (QEMU 10.1's order: the preempt channel after every multifd
   * channel, which are idle in postcopy). Refused at the call otherwise.
   */
  multifd?: { channels: number; uuid?: Uint8Array };
  /**
   * Fail with 'accept-timeout' when no source has connected (no main
   * channel) this long after listening (default: wait forever, as QEMU's
   * `migrate-incoming`).
   */
  acceptTimeoutMs?: number;
  /**
   * Run each channel (its socket, TLS, decoding and page copies) in a worker
   * thread of its own: 'on', 'off', or 'auto' (default: threads when this
   * Node can pass sockets to workers — 26.6 and later —, the sink is
   * `InMemorySink({ shared: true })` and the machine has at least
   * AUTO_THREADS_MIN_CORES (4) cores; otherwise the single-thread path).
   * 'on' where impossible throws at the call (`threads-unavailable`, saying
   * why); `stats().threads` says which path ran and why.
   */
  threads?: ThreadMode;
  /**
   * The guest's vCPUs: the faulting contexts that make "all" for
   * `postcopy-blocktime` (QEMU's smp cpus), 1–4096; `requestPage`'s `vcpu`
   * must then be below it. Default: every vCPU id requests have named so far.
   */
  vcpus?: number;
  /**
   * Aborting it closes the destination, as `close()`: while `listen()` runs it
   * rejects, afterwards `done` rejects with 'cancelled' (`cause`: the
   * signal's reason).
   */
  signal?: AbortSignal;
}

export interface DestinationEvents {
  /**
   * A connection qualified as a channel (after its TLS handshake; see
   * MigrationListener): the main channel when its first bytes came, a
   * plain-TCP preempt channel only with its first page.
   */
  channel: [{ role: 'main' | 'preempt' | 'multifd'; stats: ChannelStats }];
  /**
   * A connection was dropped before it became a channel (it closed, sent
   * something else than a migration stream, failed TLS, was too slow or one
   * too many): the migration is unaffected and the listener keeps waiting.
   */
  stranger: [StrangerEvent];
  configuration: [ConfigurationRecord];
  'ram-blocks': [RamBlockInfo[]];
  /** A RAM PART section ended: one precopy iteration. */
  pass: [{ iteration: number; pages: number; transferred: number }];
  'postcopy-advise': [];
  'postcopy-listen': [];
  /** POSTCOPY_RUN: the source VM is stopped and the destination may run. `at` is performance.now(). */
  'postcopy-run': [{ at: number }];
  /** A demand request was answered. */
  'page-request': [PageRequestResult];
  /** Postcopy: a channel failed; requests wait, the source's new connection is awaited at `uri`. */
  paused: [PausedEvent & { uri: string }];
  /** POSTCOPY_RESUME on a new connection: postcopy goes on, waiting requests were sent again. */
  resumed: [ResumedEvent];
  completed: [DestinationResult];
  failed: [MigrationError];
}

