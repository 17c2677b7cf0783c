import { usageError } from '../errors.js';

/** The highest vCPU id a demand request may carry (QEMU's x86 limit is 4096 vCPUs). */
export const MAX_VCPU = 4095;

/** stats['postcopy-blocktime'] and ['postcopy-vcpu-blocktime'], in milliseconds as QEMU's query-migrate. */
export interface BlockTimeSummary {
  /** Time during which every faulting context waited on a missing page at once: the VM made no progress. */
  total: number;
  /** Per context (vCPU id = index): time it waited on missing pages. */
  perVcpu: number[];
}

/**
 * QEMU's postcopy blocktime (migration/postcopy-ram.c, mark_postcopy_blocktime_*),
 * for the faulting contexts of a destination: `begin` when a context starts
 * waiting on a missing page, `end` when that page is here. A context is
 * blocked while it waits on at least one page (a vCPU waits on one; a
 * requestPage caller may wait on several). The total grows only while all
 * `vcpus` contexts are blocked at once — a guest whose every vCPU waits makes
 * no progress, and that is the stall it feels on top of the downtime.
 *
 * Without a declared count, "all" is every context seen so far (highest id + 1),
 * so one untagged caller is one vCPU and its waits are the total.
 *
 * Arrays indexed by vCPU id: a request costs no lookup beyond two array slots.
 */
export class BlockTime {
  /** Pages each context waits on now. */
  private readonly waiting: number[] = [];
  /** When each context's current wait began (ms). */
  private readonly since: number[] = [];
  private readonly blocked: number[] = [];
  /** Contexts waiting now. */
  private down = 0;
  /** When the last context went down while the rest waited: the start of the current all-blocked stretch. */
  private allSince: number | undefined;
  private total = 0;
  private seen = 0;

  /** `vcpus`: how many contexts make "all" (QEMU's smp cpus); default: every context seen. */
  constructor(private readonly vcpus?: number) {
    if (vcpus !== undefined && (!Number.isInteger(vcpus) || vcpus < 1 || vcpus > MAX_VCPU + 1)) {
      throw usageError('range', 'bad-option', 'vcpus', `vcpus must be an integer from 1 to ${MAX_VCPU + 1}, got ${String(vcpus)}`);
    }
  }

  /** Refuses a vCPU id that is not an integer in range (at requestPage, before anything waits). */
  check(vcpu: number): void {
    const limit = this.vcpus === undefined ? MAX_VCPU : this.vcpus - 1;
    if (!Number.isInteger(vcpu) || vcpu < 0 || vcpu > limit) {
      throw usageError(Number.isInteger(vcpu) ? 'range' : 'type', 'bad-vcpu', 'vcpu', `vcpu must be an integer from 0 to ${limit}, got ${String(vcpu)}`);
    }
  }

  begin(vcpu: number, now: number): void {
    if (vcpu >= this.seen) {
      for (let i = this.seen; i <= vcpu; i++) {
        this.waiting[i] = 0;
        this.since[i] = 0;
        this.blocked[i] = 0;
      }
      this.seen = vcpu + 1;
      // A new context that is not waiting yet breaks an all-blocked stretch counted without it.
      this.closeStretch(now);
    }
    if (this.waiting[vcpu]!++ > 0) return;
    this.since[vcpu] = now;
    this.down++;
    if (this.down === this.all()) this.allSince = now;
  }

  end(vcpu: number, now: number): void {
    if (vcpu >= this.seen || this.waiting[vcpu] === 0) return;
    if (--this.waiting[vcpu]! > 0) return;
    this.blocked[vcpu]! += now - this.since[vcpu]!;
    this.closeStretch(now);
    this.down--;
  }

  private all(): number {
    return this.vcpus ?? this.seen;
  }

  private closeStretch(now: number): void {
    if (this.allSince === undefined) return;
    this.total += now - this.allSince;
    this.allSince = undefined;
  }

  /** So far; a wait still going on counts up to `now`. */
  summary(now: number): BlockTimeSummary {
    const perVcpu: number[] = [];
    const n = Math.max(this.seen, this.vcpus ?? 0);
    for (let i = 0; i < n; i++) {
      const open = i < this.seen && this.waiting[i]! > 0 ? now - this.since[i]! : 0;
      perVcpu.push(ms(i < this.seen ? this.blocked[i]! + open : 0));
    }
    return { total: ms(this.total + (this.allSince === undefined ? 0 : now - this.allSince)), perVcpu };
  }
}

/** Milliseconds to the microsecond: a demo's stall is tens of ms, QEMU's integer ms would hide it. */
function ms(x: number): number {
  return Math.round(x * 1000) / 1000;
}
