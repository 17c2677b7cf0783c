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
  private readonly migrations: MigrationAnalysis[] = [];

  /** The feed of a connection whose role its first bytes told; undefined for one that cannot be parsed. */
  feed(role: TunnelRole): ChannelFeed | undefined {
    if (role === 'main') return this.pair(this.startMigration(), 'main', 'return-path');
    const current = this.migrations[this.migrations.length - 1];
    if (!current) return undefined;
    if (role === 'preempt') {
      current.preemptConnected();
      return this.pair(current, 'preempt', 'preempt-reverse');
    }
    if (role === 'multifd') {
      const ch = current.multifdConnected();
      return this.pair(current, 'multifd', 'multifd-reverse', ch);
    }
    return undefined;
  }

  reports(): AnalysisReport[] {
    return this.migrations.map((m) => m.report());
  }

  private startMigration(): MigrationAnalysis {
    const previous = this.migrations[this.migrations.length - 1];
    const m = new MigrationAnalysis({ t0: performance.now(), ...(previous?.resumable ? { previous } : {}) });
    // The one before the previous is over (no recovery continues it): its per-page state goes.
    if (this.migrations.length >= 2) this.migrations[this.migrations.length - 2]!.release();
    if (previous && !previous.resumable) previous.release();
    this.migrations.push(m);
    if (this.migrations.length > KEEP) this.migrations.shift()!.release();
    return m;
  }

  private pair(m: MigrationAnalysis, toward: TapDirection, back: TapDirection, channel = 0): ChannelFeed {
    return {
      toward: (c) => m.push(toward, c, performance.now(), channel),
      back: (c) => m.push(back, c, performance.now(), channel),
    };
  }
}
