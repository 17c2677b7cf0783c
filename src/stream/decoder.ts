import { ConfigSubsection, FILE_MAGIC, FILE_VERSION, FILE_VERSION_COMPAT, RAM_IDSTR, RecordType } from './constants.js';
import { StreamError, type SectionContext } from './errors.js';
import { ByteQueue, decodeName } from './byte-queue.js';
import { COMMAND_HEADER_LENGTH, checkCommandHeader, decodeCommand } from './commands.js';
import { findFooter, plausibleNextRecord } from './device-boundary.js';
import { PushDecoder } from './push-decoder.js';
import { INCOMPLETE_MAGIC } from './mapped-ram.js';
import { RamRecordParser, type KnownBlock, type MappedRamSkip, type RamFormat } from './ram.js';
import type { ConfigurationRecord, PreemptRecord, PreemptRecordWithRuns, RamRunRecord, SectionKind, StreamRecord, StreamRecordWithRuns } from './records.js';
import { parseVmDescription, vmdescSectionSizes } from './vmdesc.js';

/** Exact device-section sizes (from a VM description read ahead of time), in wire order. */
export interface DeviceSectionSize {
  readonly name: string;
  readonly instanceId: number;
  readonly size: number;
}

/** Options of StreamDecoder; every limit bounds the memory one record may hold. */
export interface StreamDecoderOptions<Runs extends boolean = false> {
  /**
   * Yield PAGE and ZERO records as runs (`ram-pages`, `ram-zeros`: one record
   * for consecutive pages of a block that lie whole in one input chunk)
   * instead of one record per page: the destination's hot path. Default
   * false (tap, inspect and re-encoding keep per-page records).
   */
  readonly pageRuns?: Runs;
  /**
   * 'main' (default): a stream from its header. 'resume': the new main channel
   * of a postcopy recovery, which has no header (pass `resumeFrom`).
   */
  readonly channel?: 'main' | 'resume';
  /**
   * The decoder of the failed channel, whose sections and RAM blocks a
   * 'resume' channel continues — or its `resumeState()` (a decoder that ran in
   * another thread).
   */
  readonly resumeFrom?: StreamDecoder<boolean> | DecoderResumeState;
  /**
   * Accept QEMU's mapped-ram format (a file: see mapped-ram.ts). The block
   * list's entries then carry their mapped-ram headers (`RamBlockInfo.mappedRam`)
   * and the bitmap and pages after each are passed over (`skipping`; a reader
   * with positioned I/O jumps instead: `jump()`). Default false: such a
   * stream is refused as 'unsupported' (a socket never carries one).
   */
  readonly mappedRam?: boolean;
  /** Largest device section payload accepted (default 16 MiB). */
  readonly maxDeviceSectionBytes?: number;
  /** Largest VM description accepted (default 16 MiB). */
  readonly maxVmdescBytes?: number;
  /** Largest PACKAGED blob accepted (default 256 MiB). */
  readonly maxPackageBytes?: number;
  /** Exact device sizes; sections found here are delimited by size instead of the footer rule. */
  readonly deviceSizes?: readonly DeviceSectionSize[];
  /**
   * Check every footer-delimited device size against the VM description when
   * it arrives (default true); a mismatch is a 'device-size-mismatch' error.
   */
  readonly verifyWithVmdesc?: boolean;
}

/** The records a StreamDecoder yields: per page, or with `pageRuns: true` in runs. */
export type DecodedRecord<Runs extends boolean> = Runs extends true ? StreamRecordWithRuns : StreamRecord;
/** The records a PreemptDecoder yields. */
export type DecodedPreemptRecord<Runs extends boolean> = Runs extends true ? PreemptRecordWithRuns : PreemptRecord;

/** Options of PreemptDecoder. */
export interface PreemptDecoderOptions<Runs extends boolean = false> {
  /** As StreamDecoderOptions.pageRuns. */
  readonly pageRuns?: Runs;
}

/**
 * What a 'resume' channel continues of a failed one, as plain data (it can
 * cross threads): the sections and RAM blocks announced, the RAM format.
 */
export interface DecoderResumeState {
  readonly sections: readonly { readonly sectionId: number; readonly idstr: string; readonly instanceId: number; readonly versionId: number }[];
  readonly startedIds: readonly number[];
  readonly ramBlocks: readonly KnownBlock[];
  readonly ramFormat: RamFormat;
  readonly postcopy: boolean;
}

type State = 'header' | 'configuration' | 'config-subsections' | 'record' | 'ram' | 'device' | 'footer' | 'after-eof' | 'done';

interface Section {
  readonly sectionId: number;
  readonly idstr: string;
  readonly instanceId: number;
  readonly versionId: number;
}

interface EmittedDevice {
  readonly idstr: string;
  readonly instanceId: number;
  readonly size: number;
  readonly offset: number;
}

/**
 * Push parser of the main channel (source → destination).
 *
 * `push(chunk)` returns every record the bytes so far complete and keeps the
 * rest; the records are the same for any chunking. Page payloads are views into
 * the pushed chunk (copied only when a page spans chunks), valid as long as the
 * caller does not reuse that chunk's memory. On malformed input it fails with
 * one StreamError (code, byte offset, section) and stays failed; records parsed
 * before the error are still returned (see PushDecoder).
 */
export class StreamDecoder<Runs extends boolean = false> extends PushDecoder<StreamRecord | RamRunRecord> {
  private q = new ByteQueue();
  private state: State;
  private sections = new Map<number, Section>();
  private startedIds = new Set<number>();
  private current: (Section & { kind: SectionKind }) | undefined;
  private currentContext: { of: Section; context: SectionContext } | undefined;
  /** RAM blocks announced by the block list; shared with the preempt channel's parser. */
  ramBlocks: Map<string, KnownBlock>;
  ramFormat: RamFormat;
  private ram: RamRecordParser;
  private packageEnd: number | undefined;
  private ended = false;
  private configuration: ConfigurationRecord | undefined;
  private configPartial: { machineType: string; targetPageBits?: number; capabilities?: string[]; uuid?: Uint8Array } | undefined;
  // device-section scanning
  private dev: Uint8Array = new Uint8Array(0);
  private devLen = 0;
  private devScan = 0;
  /** The input chunks copied into `dev`, in order: what follows the footer is given back as views of them, not of the copy. */
  private devChunks: Uint8Array[] = [];
  private devStart = 0;
  private exactSizes: DeviceSectionSize[];
  private emittedDevices: EmittedDevice[] = [];
  private readonly maxDevice: number;
  private readonly maxVmdesc: number;
  private readonly maxPackage: number;
  private readonly verify: boolean;
  private readonly acceptMappedRam: boolean;

  constructor(opts: StreamDecoderOptions<Runs> = {}) {
    super();
    this.maxDevice = opts.maxDeviceSectionBytes ?? 16 * 1024 * 1024;
    this.maxVmdesc = opts.maxVmdescBytes ?? 16 * 1024 * 1024;
    this.maxPackage = opts.maxPackageBytes ?? 256 * 1024 * 1024;
    this.verify = opts.verifyWithVmdesc ?? true;
    this.acceptMappedRam = opts.mappedRam === true;
    this.exactSizes = [...(opts.deviceSizes ?? [])];
    const given = opts.resumeFrom;
    const from = given instanceof StreamDecoder ? given : undefined;
    const state = given && !(given instanceof StreamDecoder) ? given : undefined;
    this.ramBlocks = from ? from.ramBlocks : new Map(state?.ramBlocks.map((b) => [b.idstr, b]));
    this.ramFormat = from ? from.ramFormat : state ? { ...state.ramFormat } : { ignoreShared: false, postcopyAdvised: false };
    this.ram = new RamRecordParser(this.ramBlocks, this.ramFormat);
    this.ram.pageRuns = opts.pageRuns === true;
    if (opts.channel === 'resume') {
      if (!from && !state) throw new TypeError("a 'resume' channel needs resumeFrom");
      for (const s of from ? from.sections.values() : state!.sections) this.sections.set(s.sectionId, s);
      for (const id of from ? from.startedIds : state!.startedIds) this.startedIds.add(id);
      this.ram.postcopy = from ? from.ram.postcopy : state!.postcopy;
      this.state = 'record';
    } else {
      this.state = 'header';
    }
  }

  /** Absolute offset of the next byte to be parsed. */
  get offset(): number {
    return this.q.offset;
  }

  /**
   * mapped-ram: the block whose bitmap and pages the decoder is passing over
   * (every byte pushed up to `to` is dropped), or undefined.
   */
  get skipping(): MappedRamSkip | undefined {
    return this.state === 'ram' ? this.ram.skipping : undefined;
  }

  /**
   * mapped-ram, for a reader with positioned I/O: when the decoder is passing
   * over a block's bitmap and pages and holds no byte, moves its offset to
   * where the stream goes on and returns that file position (read on from
   * there); otherwise returns undefined (push on as before).
   */
  jump(): number | undefined {
    const skip = this.skipping;
    if (!skip || this.q.available > 0) return undefined;
    this.q.jumpTo(skip.to);
    return skip.to;
  }

  /** True once EOF was read (and the VM description, if any). */
  get complete(): boolean {
    return this.state === 'after-eof' || this.state === 'done';
  }

  /** The configuration record, once read. */
  get config(): ConfigurationRecord | undefined {
    return this.configuration;
  }

  /** True after POSTCOPY_LISTEN: RAM records follow QEMU's postcopy rules. */
  get postcopy(): boolean {
    return this.ram.postcopy;
  }

  /** What a 'resume' channel continues (see DecoderResumeState), as plain data. */
  resumeState(): DecoderResumeState {
    return {
      sections: [...this.sections.values()],
      startedIds: [...this.startedIds],
      ramBlocks: [...this.ramBlocks.values()],
      ramFormat: { ...this.ramFormat },
      postcopy: this.ram.postcopy,
    };
  }

  /**
   * An independent decoder in exactly this decoder's state (pushed bytes are
   * shared, not copied). Lets a caller ask "what if the input ended here?"
   * without disturbing the live decoder; the tests use it to end a stream at
   * every prefix in linear time.
   */
  fork(): StreamDecoder<Runs> {
    const f = Object.create(StreamDecoder.prototype) as StreamDecoder<Runs>;
    Object.assign(f, this);
    f.q = this.q.clone();
    f.sections = new Map(this.sections);
    f.startedIds = new Set(this.startedIds);
    f.ramBlocks = new Map(this.ramBlocks);
    f.ramFormat = { ...this.ramFormat };
    f.ram = this.ram.clone(f.ramBlocks, f.ramFormat);
    f.configPartial = this.configPartial && { ...this.configPartial };
    f.dev = this.dev.slice(0, this.devLen);
    f.devChunks = [...this.devChunks];
    f.exactSizes = [...this.exactSizes];
    f.emittedDevices = [...this.emittedDevices];
    return f;
  }

  push(chunk: Uint8Array): DecodedRecord<Runs>[] {
    this.throwIfFailed();
    if (this.ended) throw new TypeError('push() after end()');
    this.q.push(chunk);
    return this.parseAvailable() as DecodedRecord<Runs>[];
  }

  /**
   * Declares the end of input. Returns the records that only the end could
   * complete; throws 'truncated' unless the stream is complete (EOF read).
   */
  end(): DecodedRecord<Runs>[] {
    this.throwIfFailed();
    this.ended = true;
    const out = this.parseAvailable() as DecodedRecord<Runs>[];
    // Records completed before an error: returned now, the error is thrown next time.
    if (this.failed) return out;
    const skip = this.skipping;
    if (skip) {
      this.fail(new StreamError('truncated', skip.headerOffset, `input ended at 0x${this.q.offset.toString(16)}, inside the mapped-ram bitmap and pages of RAM block "${skip.idstr}" (the stream goes on at 0x${skip.to.toString(16)})`, this.sectionContext()));
    }
    if (this.state !== 'after-eof' && this.state !== 'done') {
      const at = this.state === 'device' ? this.devStart : this.q.offset;
      this.fail(new StreamError('truncated', at, `input ended ${this.describeState()}`, this.sectionContext()));
    }
    if (this.q.available > 0 || this.devLen > 0) {
      this.fail(new StreamError('truncated', this.q.offset, `input ended inside a record (${this.q.available} bytes left)`, this.sectionContext()));
    }
    return out;
  }

  /** Made once per section, not per record: the RAM parser takes it for every record it parses. */
  private sectionContext(): SectionContext | undefined {
    const c = this.current;
    if (!c) return undefined;
    if (this.currentContext?.of !== c) this.currentContext = { of: c, context: { sectionId: c.sectionId, idstr: c.idstr, instanceId: c.instanceId } };
    return this.currentContext.context;
  }

  private describeState(): string {
    switch (this.state) {
      case 'header':
        return 'before the file header was complete';
      case 'configuration':
      case 'config-subsections':
        return 'inside the configuration record';
      case 'ram':
        return 'inside a RAM section';
      case 'device':
        return 'inside a device section';
      case 'footer':
        return 'before a section footer';
      default:
        return this.packageEnd === undefined ? 'before EOF' : 'inside a PACKAGED blob';
    }
  }

  protected step(out: (StreamRecord | RamRunRecord)[]): boolean {
    const q = this.q;
    switch (this.state) {
      case 'header': {
        if (!q.ensure(8)) return false;
        const magic = q.be32(0);
        const version = q.be32(4);
        if (magic === INCOMPLETE_MAGIC && this.acceptMappedRam) {
          throw new StreamError('incomplete', q.offset, 'an unfinished mapped-ram file: qmt receive stopped before the end (the migration failed or was interrupted), and QEMU refuses it');
        }
        if (magic !== FILE_MAGIC) throw new StreamError('bad-magic', q.offset, `bad magic 0x${magic.toString(16).padStart(8, '0')} (expected "QEVM")`);
        if (version !== FILE_VERSION) {
          const why = version === FILE_VERSION_COMPAT ? 'the obsolete SaveVM v2 format' : `unknown stream version ${version}`;
          throw new StreamError('unsupported-version', q.offset + 4, why);
        }
        q.advance(8);
        out.push({ type: 'header', version });
        this.state = 'configuration';
        return true;
      }
      case 'configuration': {
        if (!q.ensure(1)) return false;
        if (q.u8(0) !== RecordType.CONFIGURATION) {
          // Only Xen machines omit it; carry on with the records.
          this.state = 'record';
          return true;
        }
        if (!q.ensure(5)) return false;
        const len = q.be32(1);
        if (len === 0 || len > 255) throw new StreamError('bad-configuration', q.offset, `machine type name of ${len} bytes`);
        if (!q.ensure(5 + len)) return false;
        this.configPartial = { machineType: decodeName(q.bytes(5, len)) };
        q.advance(5 + len);
        this.state = 'config-subsections';
        return true;
      }
      case 'config-subsections':
        return this.stepConfigSubsection(out);
      case 'record':
        return this.stepRecord(out);
      case 'ram': {
        const rec = this.ram.next(q, this.sectionContext(), this.packageEnd);
        if (!rec) return false;
        this.checkPackageBound(q.offset);
        out.push(rec);
        if (rec.type === 'ram-eos') this.state = 'footer';
        return true;
      }
      case 'device':
        return this.stepDevice(out);
      case 'footer': {
        if (!q.ensure(5)) return false;
        const cur = this.current!;
        if (q.u8(0) !== RecordType.SECTION_FOOTER) {
          throw new StreamError('bad-footer', q.offset, `missing section footer (found byte 0x${q.u8(0).toString(16)})`, this.sectionContext());
        }
        const id = q.be32(1);
        if (id !== cur.sectionId) throw new StreamError('bad-footer', q.offset, `footer names section ${id}`, this.sectionContext());
        q.advance(5);
        this.checkPackageBound(q.offset);
        out.push({ type: 'footer', sectionId: id });
        this.current = undefined;
        this.state = 'record';
        return true;
      }
      case 'after-eof': {
        if (!q.ensure(1)) return false;
        const at = q.offset;
        if (q.u8(0) !== RecordType.VMDESCRIPTION) {
          throw new StreamError('trailing-data', at, `byte 0x${q.u8(0).toString(16)} after EOF (expected a VM description or the end)`);
        }
        if (!q.ensure(5)) return false;
        const n = q.be32(1);
        if (n > this.maxVmdesc) throw new StreamError('length-too-large', at, `VM description of ${n} bytes exceeds the limit of ${this.maxVmdesc}`);
        if (!q.ensure(5 + n)) return false;
        const json = q.bytes(5, n);
        if (this.verify && this.emittedDevices.length > 0) this.verifyDeviceSizes(json, at + 5);
        q.advance(5 + n);
        out.push({ type: 'vmdesc', json });
        this.state = 'done';
        return true;
      }
      case 'done':
        if (q.available === 0) return false;
        throw new StreamError('trailing-data', q.offset, `${q.available} bytes after the VM description`);
    }
  }

  private stepConfigSubsection(out: (StreamRecord | RamRunRecord)[]): boolean {
    const q = this.q;
    const cfg = this.configPartial!;
    if (!q.ensure(1)) return false;
    if (q.u8(0) !== RecordType.SUBSECTION) {
      const rec: ConfigurationRecord = { type: 'configuration', ...cfg };
      this.configuration = rec;
      this.configPartial = undefined;
      out.push(rec);
      this.state = 'record';
      return true;
    }
    const at = q.offset;
    if (!q.ensure(2)) return false;
    const n = q.u8(1);
    if (!q.ensure(2 + n + 4)) return false;
    const name = decodeName(q.bytes(2, n));
    const version = q.be32(2 + n);
    const head = 2 + n + 4;
    if (version !== 1) throw new StreamError('bad-configuration', at, `configuration subsection "${name}" version ${version}`);
    switch (name) {
      case ConfigSubsection.TARGET_PAGE_BITS:
        if (!q.ensure(head + 4)) return false;
        cfg.targetPageBits = q.be32(head);
        q.advance(head + 4);
        return true;
      case ConfigSubsection.UUID:
        if (!q.ensure(head + 16)) return false;
        cfg.uuid = q.bytes(head, 16).slice();
        q.advance(head + 16);
        return true;
      case ConfigSubsection.CAPABILITIES: {
        if (!q.ensure(head + 4)) return false;
        const count = q.be32(head);
        if (count > 64) throw new StreamError('bad-configuration', at, `${count} capabilities`);
        let p = head + 4;
        const caps: string[] = [];
        for (let i = 0; i < count; i++) {
          if (!q.ensure(p + 1)) return false;
          const len = q.u8(p);
          if (!q.ensure(p + 1 + len)) return false;
          caps.push(decodeName(q.bytes(p + 1, len)));
          p += 1 + len;
        }
        if (caps.includes('mapped-ram')) {
          if (!this.acceptMappedRam) throw new StreamError('unsupported', at, 'a mapped-ram stream (QEMU\'s saved-VM file format), which is not accepted here: its pages lie outside the stream');
          this.ramFormat.mappedRam = true;
        }
        this.ramFormat.ignoreShared = caps.includes('x-ignore-shared');
        cfg.capabilities = caps;
        q.advance(p);
        return true;
      }
      default:
        throw new StreamError('unknown-subsection', at, `unknown configuration subsection "${name}"`);
    }
  }

  private checkPackageBound(offset: number): void {
    if (this.packageEnd !== undefined && offset > this.packageEnd) {
      throw new StreamError('package-overrun', this.packageEnd, `a record runs ${offset - this.packageEnd} bytes past the end of the PACKAGED blob`, this.sectionContext());
    }
  }

  private stepRecord(out: (StreamRecord | RamRunRecord)[]): boolean {
    const q = this.q;
    if (this.packageEnd !== undefined && q.offset === this.packageEnd) {
      throw new StreamError('package-without-run', q.offset, 'PACKAGED blob ended without POSTCOPY_RUN');
    }
    if (!q.ensure(1)) return false;
    const at = q.offset;
    const type = q.u8(0);
    switch (type) {
      case RecordType.SECTION_START:
      case RecordType.SECTION_FULL: {
        if (!q.ensure(6)) return false;
        const n = q.u8(5);
        if (!q.ensure(6 + n + 8)) return false;
        const sectionId = q.be32(1);
        const idstr = decodeName(q.bytes(6, n));
        const instanceId = q.be32(6 + n);
        const versionId = q.be32(10 + n);
        if (n === 0) throw new StreamError('unexpected-record', at, 'section with an empty idstr');
        q.advance(6 + n + 8);
        this.checkPackageBound(q.offset);
        const kind: SectionKind = type === RecordType.SECTION_START ? 'start' : 'full';
        const s: Section = { sectionId, idstr, instanceId, versionId };
        this.sections.set(sectionId, s);
        if (kind === 'start') this.startedIds.add(sectionId);
        this.enterSection({ ...s, kind }, out);
        return true;
      }
      case RecordType.SECTION_PART:
      case RecordType.SECTION_END: {
        if (!q.ensure(5)) return false;
        const sectionId = q.be32(1);
        const s = this.sections.get(sectionId);
        if (!s) throw new StreamError('unknown-section', at, `section ${sectionId} was never started`);
        q.advance(5);
        this.checkPackageBound(q.offset);
        this.enterSection({ ...s, kind: type === RecordType.SECTION_PART ? 'part' : 'end' }, out);
        return true;
      }
      case RecordType.COMMAND: {
        if (!q.ensure(COMMAND_HEADER_LENGTH)) return false;
        const cmd = q.be16(1);
        const len = q.be16(3);
        checkCommandHeader(cmd, len, at);
        if (!q.ensure(COMMAND_HEADER_LENGTH + len)) return false;
        const command = decodeCommand(cmd, q.bytes(COMMAND_HEADER_LENGTH, len), at);
        if (command.cmd === 'packaged') {
          if (this.packageEnd !== undefined) throw new StreamError('unexpected-record', at, 'PACKAGED inside a PACKAGED blob');
          if (command.length > this.maxPackage) {
            throw new StreamError('length-too-large', at, `PACKAGED blob of ${command.length} bytes exceeds the limit of ${this.maxPackage}`);
          }
        }
        q.advance(COMMAND_HEADER_LENGTH + len);
        this.checkPackageBound(q.offset);
        out.push({ type: 'command', command });
        switch (command.cmd) {
          case 'packaged':
            this.packageEnd = q.offset + command.length;
            break;
          case 'postcopy-advise':
            this.ramFormat.postcopyAdvised = true;
            break;
          case 'postcopy-listen':
            this.ram.postcopy = true;
            break;
          case 'postcopy-run':
            if (this.packageEnd !== undefined) {
              if (q.offset !== this.packageEnd) {
                throw new StreamError('trailing-data', q.offset, `${this.packageEnd - q.offset} bytes after POSTCOPY_RUN in the PACKAGED blob`);
              }
              this.packageEnd = undefined;
              out.push({ type: 'package-end' });
            }
            break;
          default:
            break;
        }
        return true;
      }
      case RecordType.EOF:
        if (this.packageEnd !== undefined) throw new StreamError('unexpected-record', at, 'EOF inside a PACKAGED blob');
        q.advance(1);
        out.push({ type: 'eof' });
        this.state = 'after-eof';
        return true;
      case RecordType.CONFIGURATION:
      case RecordType.VMDESCRIPTION:
      case RecordType.SUBSECTION:
      case RecordType.SECTION_FOOTER:
        throw new StreamError('unexpected-record', at, `record type 0x${type.toString(16).padStart(2, '0')} out of place`);
      default:
        throw new StreamError('unknown-record-type', at, `unknown record type 0x${type.toString(16).padStart(2, '0')}`);
    }
  }

  private enterSection(s: Section & { kind: SectionKind }, out: (StreamRecord | RamRunRecord)[]): void {
    this.current = s;
    out.push({ type: 'section', kind: s.kind, sectionId: s.sectionId, idstr: s.idstr, instanceId: s.instanceId, versionId: s.versionId });
    if (s.idstr === RAM_IDSTR && s.instanceId === 0) {
      this.state = 'ram';
    } else {
      this.state = 'device';
      this.devStart = this.q.offset;
      this.devLen = 0;
      this.devScan = 0;
      this.devChunks = [];
    }
  }

  private stepDevice(out: (StreamRecord | RamRunRecord)[]): boolean {
    const q = this.q;
    const cur = this.current!;
    // 1. Exact size known from a VM description read ahead.
    if (cur.kind === 'full') {
      const idx = this.exactSizes.findIndex((d) => d.name === cur.idstr && d.instanceId === cur.instanceId);
      if (idx >= 0) {
        const size = this.exactSizes[idx]!.size;
        if (size > this.maxDevice) throw new StreamError('length-too-large', q.offset, `device section of ${size} bytes`, this.sectionContext());
        // Start and length are known: an overrun is an error now, whatever has arrived.
        this.checkPackageBound(q.offset + size);
        if (!q.ensure(size)) return false;
        this.exactSizes.splice(idx, 1);
        const data = q.bytes(0, size);
        q.advance(size);
        this.emitDevice(cur, data, out);
        return true;
      }
    }
    // 2. The footer rule, over the bytes gathered so far.
    for (const chunk of q.drain()) {
      this.appendDev(chunk);
      this.devChunks.push(chunk);
    }
    const pkgEnd = this.packageEnd;
    // Largest payload whose footer still fits: the limit, and inside a package its end.
    const inPackage = pkgEnd === undefined ? Infinity : pkgEnd - this.devStart - 5;
    const bound = Math.min(this.maxDevice, inPackage);
    const view = this.dev.subarray(0, this.devLen);
    // Candidates are judged in order and each verdict is final once its bytes are here,
    // so where the scan stops (and why) depends on the bytes, never on the chunking.
    // `devScan`: every position before it is a refused candidate.
    for (;;) {
      const i = findFooter(view, this.devScan, cur.sectionId);
      if (i < 0) {
        this.devScan = this.devLen; // not even a 0x7E from devScan on
        break;
      }
      if (i > bound) {
        this.devScan = i;
        break;
      }
      if (i + 5 > this.devLen) {
        this.devScan = i; // a footer may start here: wait for its bytes
        break;
      }
      const verdict = plausibleNextRecord(view, i + 5, {
        startedSections: this.startedIds,
        ended: this.ended,
        ...(pkgEnd === undefined ? {} : { packageRemaining: pkgEnd - (this.devStart + i + 5) }),
      });
      if (verdict === 'need-more') {
        this.devScan = i;
        break;
      }
      if (verdict === 'no') {
        this.devScan = i + 1;
        continue;
      }
      // Found: the payload is dev[0, i); give the footer and what follows back to the
      // queue as views of the chunks they came in, so that pages after it stay views
      // into the input (not into this copy).
      const data = this.dev.subarray(0, i);
      const rest = tailOf(this.devChunks, i);
      this.dev = new Uint8Array(0);
      this.devLen = 0;
      this.devScan = 0;
      this.devChunks = [];
      for (let k = rest.length - 1; k >= 0; k--) q.unshift(rest[k]!);
      this.emitDevice(cur, data, out);
      return true;
    }
    if (this.devScan > bound) {
      // No footer at any allowed place, and the bytes go past the last one.
      if (bound === inPackage) {
        throw new StreamError('package-overrun', this.devStart, 'device section has no footer inside the PACKAGED blob', this.sectionContext());
      }
      throw new StreamError('device-boundary-not-found', this.devStart, `no footer within ${this.maxDevice} bytes of device state`, this.sectionContext());
    }
    if (this.ended) throw new StreamError('truncated', this.devStart, 'input ended inside a device section', this.sectionContext());
    return false;
  }

  private appendDev(chunk: Uint8Array): void {
    if (this.devLen + chunk.length > this.dev.length) {
      const grown = new Uint8Array(Math.max(this.devLen + chunk.length, this.dev.length * 2, 4096));
      grown.set(this.dev.subarray(0, this.devLen));
      this.dev = grown;
    }
    this.dev.set(chunk, this.devLen);
    this.devLen += chunk.length;
  }

  private emitDevice(cur: Section & { kind: SectionKind }, data: Uint8Array, out: (StreamRecord | RamRunRecord)[]): void {
    out.push({ type: 'device-state', sectionId: cur.sectionId, idstr: cur.idstr, instanceId: cur.instanceId, versionId: cur.versionId, kind: cur.kind, data });
    if (cur.kind === 'full') this.emittedDevices.push({ idstr: cur.idstr, instanceId: cur.instanceId, size: data.length, offset: this.devStart });
    this.state = 'footer';
  }

  /** Rule 3: the footer-delimited sizes must be the sizes the VM description gives. */
  private verifyDeviceSizes(json: Uint8Array, jsonOffset: number): void {
    const sizes = vmdescSectionSizes(parseVmDescription(json, jsonOffset));
    const pool = [...sizes];
    for (const d of this.emittedDevices) {
      const idx = pool.findIndex((s) => s.name === d.idstr && s.instanceId === d.instanceId);
      if (idx < 0) continue; // not described (e.g. sections without a VMState description)
      const want = pool[idx]!.size;
      pool.splice(idx, 1);
      if (want !== d.size) {
        throw new StreamError('device-size-mismatch', d.offset, `device section "${d.idstr}" instance ${d.instanceId} was delimited at ${d.size} bytes but the VM description gives ${want}`);
      }
    }
  }
}

/** The bytes of `chunks` (concatenated) from `from` on, as views of the chunks. */
function tailOf(chunks: readonly Uint8Array[], from: number): Uint8Array[] {
  const out: Uint8Array[] = [];
  let skip = from;
  for (const c of chunks) {
    if (skip >= c.length) {
      skip -= c.length;
      continue;
    }
    out.push(skip === 0 ? c : c.subarray(skip));
    skip = 0;
  }
  return out;
}

/**
 * Push parser of the preempt channel: bare RAM page records with their own
 * CONTINUE memory. `blocks` is the main channel's block map (the preempt
 * channel opens only after the block list was sent). Same error contract as
 * StreamDecoder (PushDecoder).
 */
export class PreemptDecoder<Runs extends boolean = false> extends PushDecoder<PreemptRecord | RamRunRecord> {
  private readonly q = new ByteQueue();
  private readonly ram: RamRecordParser;
  private finished = false;

  constructor(blocks: Map<string, KnownBlock>, opts: PreemptDecoderOptions<Runs> = {}) {
    super();
    this.ram = new RamRecordParser(blocks, { ignoreShared: false, postcopyAdvised: true });
    this.ram.postcopy = true;
    this.ram.pageRuns = opts.pageRuns === true;
  }

  get offset(): number {
    return this.q.offset;
  }

  push(chunk: Uint8Array): DecodedPreemptRecord<Runs>[] {
    this.throwIfFailed();
    this.q.push(chunk);
    return this.parseAvailable() as DecodedPreemptRecord<Runs>[];
  }

  protected step(out: (PreemptRecord | RamRunRecord)[]): boolean {
    if (this.finished) {
      if (this.q.available > 0) throw new StreamError('trailing-data', this.q.offset, 'bytes after EOS on the preempt channel');
      return false;
    }
    const at = this.q.offset;
    const r = this.ram.next(this.q);
    if (!r) return false;
    if (r.type !== 'ram-page' && r.type !== 'ram-zero' && r.type !== 'ram-pages' && r.type !== 'ram-zeros' && r.type !== 'ram-eos') {
      throw new StreamError('bad-ram-flags', at, `${r.type} record on the preempt channel`);
    }
    if (r.type === 'ram-eos') this.finished = true;
    out.push(r);
    return true;
  }

  /** The preempt channel ends by being closed (≥ 8.0 machine types): only a partial record is an error. */
  end(): void {
    this.throwIfFailed();
    if (this.q.available > 0) {
      this.fail(new StreamError('truncated', this.q.offset, `preempt channel ended inside a page record (${this.q.available} bytes left)`));
    }
  }

  /** Forget the last block (after a recovery the first page names its block). */
  resetContinue(): void {
    this.ram.lastBlock = undefined;
  }
}
