import type { StreamRecordWithRuns as StreamRecord } from '../../stream/records.js';
import type { MigrationPhase } from '../errors.js';
import type { DestinationCounters } from './stats.js';
import type { ReceivedDeviceSection } from './types.js';

type SectionRecord = Extract<StreamRecord, { type: 'section' }>;
type DeviceRecord = Extract<StreamRecord, { type: 'device-state' }>;

/**
 * The main stream's sections, as precopy sees them: RAM PART sections are
 * QEMU's iterations ('pass' events), FULL sections are device state, and
 * after POSTCOPY_LISTEN the RAM END section says the source finished RAM.
 */
export class SectionWatch {
  private section: { idstr: string; kind: string } | undefined;
  /** After LISTEN, RAM's END section came: the source finished sending RAM (a refusing source never sends it). */
  ramEnded = false;
  readonly devices: ReceivedDeviceSection[] = [];

  /** A section header; returns the phase it starts, if any. */
  opened(r: SectionRecord, listening: boolean): MigrationPhase | undefined {
    this.section = { idstr: r.idstr, kind: r.kind };
    if (r.idstr === 'ram' && r.kind === 'end' && listening) this.ramEnded = true;
    if (listening) return undefined;
    if (r.idstr === 'ram' && r.kind === 'part') return 'precopy';
    if (r.kind === 'full') return 'device-state';
    return undefined;
  }

  /** A section footer; returns the pass it completed (a RAM PART section before LISTEN), if any. */
  closed(listening: boolean, counts: DestinationCounters): { iteration: number; pages: number; transferred: number } | undefined {
    const s = this.section;
    this.section = undefined;
    let pass: { iteration: number; pages: number; transferred: number } | undefined;
    if (s?.idstr === 'ram' && s.kind === 'part' && !listening) {
      counts.iterations++;
      pass = { iteration: counts.iterations, pages: counts.iterationPages, transferred: counts.transferred };
    }
    if (s?.idstr === 'ram') counts.iterationPages = 0;
    return pass;
  }

  /** Device state, kept whole (copied: the record views the received chunk). */
  device(r: DeviceRecord, packaged: boolean): void {
    this.devices.push({ sectionId: r.sectionId, idstr: r.idstr, instanceId: r.instanceId, versionId: r.versionId, kind: r.kind, packaged, data: Buffer.from(r.data) });
  }
}
