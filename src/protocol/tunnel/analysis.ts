/**
 * What an end of the tunnel sees of the migrations it carries, parsed as the
 * tap parses them (MigrationAnalysis, src/protocol/tap/analysis.ts): per
 * migration (one per main connection; a postcopy recovery's main connection
 * continues the one before), per-channel bytes and pages, passes, the
 * switchover moments and request → page latency at this end. Fed with the
 * bytes as they pass this end: toward the destination (read from QEMU at the
 * entry, written to QEMU at the exit) and back. QEMU's own TLS hides the
 * stream: such connections ('tls') are counted, not parsed.
 */
import { performance } from 'node:perf_hooks';
import { MigrationAnalysis, type AnalysisReport, type TapDirection } from '../tap/analysis.js';
import type { TunnelRole } from './common.js';

/** How many finished migrations' reports are kept (the latest). */
const KEEP = 16;

export interface ChannelFeed {
  /** Bytes toward the destination QEMU. */
  toward(chunk: Buffer): void;
  /** Bytes back toward the source QEMU. */
  back(chunk: Buffer): void;
}

export class TunnelAnalysis {
  /** The migrations shown in the reports: those whose first connection turned out to be a main channel. */
  private readonly migrations: MigrationAnalysis[] = [];
  /** The migration of the latest first connection, shown or not yet. */
  private latest: MigrationAnalysis | undefined;

  /**
   * A QEMU connection has opened, in QEMU's order; `leader`: it is the first
   * of its migration (or recovery), the others join the latest one. The
   * migration is fixed here, not when the first bytes come: a multifd
   * channel's MultiFDInit can come before the main channel's header (QEMU's
   * multifd threads send it while the migration thread still writes the
   * header into its buffer). Returns the connection's feed, to be asked once
   * its first bytes tell its role; undefined for one that cannot be parsed.
   */
  opened(leader: boolean): (role: TunnelRole) => ChannelFeed | undefined {
    const m = leader ? (this.latest = this.newMigration()) : this.latest;
    return (role) => {
      if (!m) return undefined;
      if (leader) {
        // QEMU's TLS (or bytes that are no migration): nothing of this migration is parsed.
        if (role !== 'main') return undefined;
        this.show(m);
        return this.pair(m, 'main', 'return-path');
      }
      if (role === 'preempt') {
        m.preemptConnected();
        return this.pair(m, 'preempt', 'preempt-reverse');
      }
      if (role === 'multifd') return this.pair(m, 'multifd', 'multifd-reverse', m.multifdConnected());
      return undefined;
    };
  }

  reports(): AnalysisReport[] {
    return this.migrations.map((m) => m.report());
  }

  private newMigration(): MigrationAnalysis {
    const previous = this.migrations[this.migrations.length - 1];
    return new MigrationAnalysis({ t0: performance.now(), ...(previous?.resumable ? { previous } : {}) });
  }

  private show(m: MigrationAnalysis): void {
    const previous = this.migrations[this.migrations.length - 1];
    // The one before the previous is over (no recovery continues it): its per-page state goes.
    if (this.migrations.length >= 2) this.migrations[this.migrations.length - 2]!.release();
    if (previous && !previous.resumable) previous.release();
    this.migrations.push(m);
    if (this.migrations.length > KEEP) this.migrations.shift()!.release();
  }

  private pair(m: MigrationAnalysis, toward: TapDirection, back: TapDirection, channel = 0): ChannelFeed {
    return {
      toward: (c) => m.push(toward, c, performance.now(), channel),
      back: (c) => m.push(back, c, performance.now(), channel),
    };
  }
}
