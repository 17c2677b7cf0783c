/**
 * The VM description (VMDESCRIPTION record, type 0x06): the JSON a QEMU 10.0
 * source writes after the final EOF of a precopy stream. It describes every
 * FULL device section of the stream, field by field, with the number of bytes
 * each field took on the wire, which makes it the one exact way to delimit and
 * decode device state in a completed capture.
 *
 * Pure: no I/O. The layout rules follow `migration/vmstate.c`
 * (`vmstate_save_state_v`, `vmsd_desc_field_start`/`_end`,
 * `vmstate_subsection_save`) and `migration/savevm.c` (`vmstate_save`,
 * `vmstate_save_old_style`) of QEMU 10.0.
 */

import { RecordType } from './constants.js';
import { StreamError, type SectionContext } from './errors.js';

// ---- the description ----------------------------------------------------------

/** One entry of a description's `fields` list. */
export interface VmsdField {
  /** QEMU's field name; made unique by QEMU with a `[n]` suffix when a name repeats (`config[0]`). */
  readonly name: string;
  /** The VMStateInfo name (`uint32`, `buffer`, `pci config`, …), or `struct` / `vstruct`. */
  readonly type: string;
  /**
   * Bytes written for ONE element, as measured by QEMU while saving. For a
   * struct this includes the struct's own subsections.
   */
  readonly size: number;
  /** Compressed array: `arrayLen` elements of `size` bytes each, described once. */
  readonly arrayLen?: number;
  /** Array described element by element: this entry is element `index`. */
  readonly index?: number;
  /** For `type: "struct"`: the nested description. */
  readonly struct?: VmsdDescription;
  /**
   * For `tmp` and `vstruct` fields QEMU writes the nested description into the
   * field object itself (no `struct` key). Kept here when present.
   */
  readonly inline?: VmsdDescription;
}

/** A VMState description as QEMU records it: the device itself, a nested struct or a subsection. */
export interface VmsdDescription {
  readonly vmsdName: string;
  readonly version: number;
  readonly fields: readonly VmsdField[];
  /** Only the subsections that were actually sent, in wire order. */
  readonly subsections: readonly VmsdDescription[];
}

/** A device saved through a VMState description (almost all of them). */
export interface VmStateDevice extends VmsdDescription {
  readonly kind: 'vmstate';
  /** idstr of the FULL section. */
  readonly name: string;
  readonly instanceId: number;
}

/**
 * A device saved by custom code (`SaveVMHandlers.save_state`, e.g. `slirp`):
 * QEMU describes it as one opaque `data` buffer and gives no vmsd name or
 * version.
 */
export interface LegacyDevice {
  readonly kind: 'legacy';
  readonly name: string;
  readonly instanceId: number;
  /** Payload length in bytes. */
  readonly size: number;
  readonly fields: readonly VmsdField[];
}

export type VmDevice = VmStateDevice | LegacyDevice;

/** The whole VMDESCRIPTION JSON. */
export interface VmDescription {
  /** How the CONFIGURATION record's payload was written (absent when the source sent no configuration). */
  readonly configuration?: VmsdDescription;
  /** Target page size (4096 on x86). */
  readonly pageSize: number;
  /** One entry per FULL section, in wire order. RAM is not listed. */
  readonly devices: readonly VmDevice[];
}

/** QEMU nests a few levels deep; anything far beyond that is not a QEMU description. */
const MAX_DEPTH = 64;
const U32_MAX = 0xffff_ffff;

/**
 * Parses the VM description JSON (the body of a VMDESCRIPTION record).
 *
 * Unknown keys are ignored. Throws `StreamError` `bad-vmdesc` at `baseOffset`
 * when the text is not UTF-8 JSON or does not have the shape QEMU writes
 * (missing/mistyped keys, negative or non-integer sizes, subsection names
 * longer than 255 bytes, nesting deeper than 64, old-style devices whose
 * fields do not add up to their `size`, a device size beyond 2^53 - 1).
 *
 * @param json the JSON text or its UTF-8 bytes.
 * @param baseOffset stream offset reported in errors (the offset of the JSON's first byte, say); default 0.
 */
export function parseVmDescription(json: Uint8Array | string, baseOffset = 0): VmDescription {
  const fail = (what: string): never => {
    throw new StreamError('bad-vmdesc', baseOffset, `VM description: ${what}`);
  };
  let text: string;
  if (typeof json === 'string') {
    text = json;
  } else {
    try {
      text = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true }).decode(json);
    } catch {
      return fail('not valid UTF-8');
    }
  }
  let root: unknown;
  try {
    root = JSON.parse(text);
  } catch (e) {
    return fail(`malformed JSON (${e instanceof Error ? e.message : String(e)})`);
  }
  return new DescriptionParser(fail).parseRoot(root);
}

type Json = Record<string, unknown>;

class DescriptionParser {
  constructor(private readonly fail: (what: string) => never) {}

  parseRoot(root: unknown): VmDescription {
    const top = this.object(root, 'top level');
    const pageSize = this.integer(top, 'page_size', 'top level', 1, Number.MAX_SAFE_INTEGER);
    const devices = this.array(top, 'devices', 'top level').map((d, i) => this.device(d, `devices[${i}]`));
    if (top.configuration === undefined) return { pageSize, devices };
    const configuration = this.description(top.configuration, 'configuration', 0);
    return { configuration, pageSize, devices };
  }

  private device(value: unknown, where: string): VmDevice {
    const o = this.object(value, where);
    const name = this.string(o, 'name', where);
    const at = `${where} "${name}"`;
    const instanceId = this.integer(o, 'instance_id', at, 0, U32_MAX);
    if (o.vmsd_name === undefined) {
      // vmstate_save_old_style(): no vmsd, a top-level size and one opaque field.
      if (o.size === undefined) return this.fail(`${at}: neither "vmsd_name" nor "size"`);
      const size = this.integer(o, 'size', at, 0, Number.MAX_SAFE_INTEGER);
      const fields = this.array(o, 'fields', at).map((f, i) => this.field(f, `${at}.fields[${i}]`, 1));
      const sum = fieldsSize(fields, this.fail, at);
      if (sum !== size) this.fail(`${at}: fields add up to ${sum} bytes, "size" says ${size}`);
      return { kind: 'legacy', name, instanceId, size, fields };
    }
    const device: VmStateDevice = { kind: 'vmstate', name, instanceId, ...this.description(o, at, 0) };
    // Checked here so that sizes of a parsed description never overflow later.
    descriptionSize(device, this.fail, at);
    return device;
  }

  private description(value: unknown, where: string, depth: number): VmsdDescription {
    if (depth > MAX_DEPTH) this.fail(`${where}: nested deeper than ${MAX_DEPTH}`);
    const o = this.object(value, where);
    const vmsdName = this.string(o, 'vmsd_name', where);
    const version = this.integer(o, 'version', where, 0, U32_MAX);
    const fields = this.array(o, 'fields', where).map((f, i) => this.field(f, `${where}.fields[${i}]`, depth + 1));
    const subsections =
      o.subsections === undefined
        ? []
        : this.array(o, 'subsections', where).map((s, i) => {
            const sub = this.description(s, `${where}.subsections[${i}]`, depth + 1);
            const len = utf8Length(sub.vmsdName);
            // The wire carries the name as a str8.
            if (len === 0 || len > 255) this.fail(`${where}.subsections[${i}]: name of ${len} bytes cannot be sent`);
            return sub;
          });
    return { vmsdName, version, fields, subsections };
  }

  private field(value: unknown, where: string, depth: number): VmsdField {
    if (depth > MAX_DEPTH) this.fail(`${where}: nested deeper than ${MAX_DEPTH}`);
    const o = this.object(value, where);
    const name = this.string(o, 'name', where);
    const at = `${where} "${name}"`;
    const type = this.string(o, 'type', at);
    const size = this.integer(o, 'size', at, 0, Number.MAX_SAFE_INTEGER);
    const field: Mutable<VmsdField> = { name, type, size };
    if (o.array_len !== undefined) field.arrayLen = this.integer(o, 'array_len', at, 1, Number.MAX_SAFE_INTEGER);
    if (o.index !== undefined) field.index = this.integer(o, 'index', at, 0, Number.MAX_SAFE_INTEGER);
    if (o.struct !== undefined) field.struct = this.description(o.struct, `${at}.struct`, depth + 1);
    if (o.fields !== undefined) field.inline = this.description(o, `${at} (inline)`, depth + 1);
    if (type === 'struct' && field.struct === undefined) this.fail(`${at}: struct without "struct" description`);
    return field;
  }

  private object(value: unknown, where: string): Json {
    if (typeof value !== 'object' || value === null || Array.isArray(value)) {
      return this.fail(`${where}: expected an object`);
    }
    return value as Json;
  }

  private array(o: Json, key: string, where: string): unknown[] {
    const v = o[key];
    if (!Array.isArray(v)) return this.fail(`${where}: "${key}" must be an array`);
    return v;
  }

  private string(o: Json, key: string, where: string): string {
    const v = o[key];
    if (typeof v !== 'string') return this.fail(`${where}: "${key}" must be a string`);
    return v;
  }

  private integer(o: Json, key: string, where: string, min: number, max: number): number {
    const v = o[key];
    if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < min || v > max) {
      return this.fail(`${where}: "${key}" must be an integer in [${min}, ${max}], got ${JSON.stringify(v)}`);
    }
    return v;
  }
}

// ---- sizes --------------------------------------------------------------------

/**
 * Exact payload length of the FULL section `device` describes: the fields
 * (`size` × `arrayLen`, where a struct's `size` already includes that struct's
 * subsections) plus, for each top-level subsection, its header (`05`, str8
 * name, be32 version) and its own length, recursively. For an old-style device,
 * its `size`.
 *
 * Never throws for a description from {@link parseVmDescription}; for one
 * built by hand, throws `bad-vmdesc` (offset 0) if the total is not a safe
 * integer.
 */
export function deviceSectionSize(device: VmDevice): number {
  const fail = (what: string): never => {
    throw new StreamError('bad-vmdesc', 0, `VM description of "${device.name}": ${what}`);
  };
  return device.kind === 'legacy' ? device.size : descriptionSize(device, fail, device.name);
}

/**
 * Payload length of any VMState description (a device, a struct element, the
 * configuration record's payload after its type byte), computed as in
 * {@link deviceSectionSize}.
 */
export function vmStateSize(desc: VmsdDescription): number {
  return descriptionSize(desc, (what) => {
    throw new StreamError('bad-vmdesc', 0, `VM description "${desc.vmsdName}": ${what}`);
  }, desc.vmsdName);
}

/** Per-device payload sizes in wire order: what a decoder needs to cut the device block into FULL sections. */
export function vmdescSectionSizes(desc: VmDescription): Array<{ name: string; instanceId: number; size: number }> {
  return desc.devices.map((d) => ({ name: d.name, instanceId: d.instanceId, size: deviceSectionSize(d) }));
}

function fieldsSize(fields: readonly VmsdField[], fail: (what: string) => never, where: string): number {
  let total = 0;
  for (const f of fields) {
    total += f.size * (f.arrayLen ?? 1);
    if (!Number.isSafeInteger(total)) fail(`${where}: size overflows at field "${f.name}"`);
  }
  return total;
}

function descriptionSize(desc: VmsdDescription, fail: (what: string) => never, where: string): number {
  let total = fieldsSize(desc.fields, fail, where);
  for (const sub of desc.subsections) {
    total += subsectionHeaderSize(sub) + descriptionSize(sub, fail, `${where}.{${sub.vmsdName}}`);
    if (!Number.isSafeInteger(total)) fail(`${where}: size overflows at subsection "${sub.vmsdName}"`);
  }
  return total;
}

/** `05`, u8 length, name, be32 version. */
function subsectionHeaderSize(sub: VmsdDescription): number {
  return 1 + 1 + utf8Length(sub.vmsdName) + 4;
}

function utf8Length(s: string): number {
  let n = 0;
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c < 0x80) n += 1;
    else if (c < 0x800) n += 2;
    else if (c >= 0xd800 && c <= 0xdbff && i + 1 < s.length && (s.charCodeAt(i + 1) & 0xfc00) === 0xdc00) {
      n += 4;
      i++;
    } else n += 3;
  }
  return n;
}

// ---- locating the record ------------------------------------------------------

/**
 * Finds the VMDESCRIPTION record at the end of a complete precopy stream
 * (`00` EOF, `06`, be32 N, N bytes of JSON, end of input).
 *
 * Stricter than analyze-migration.py's search (last NUL, first `{` after it,
 * `06` five bytes before): the JSON never contains a NUL, so the record can only
 * start within a few bytes of the last NUL; a candidate is accepted only if the
 * byte before it is the `00` EOF, N equals exactly the number of bytes left, and
 * the JSON starts with `{` and ends with `}`. Unlike the script it is not fooled
 * by a length whose bytes include `{` (0x7B). The JSON is not parsed here.
 *
 * @returns `offset` of the `06` byte and a view of the JSON bytes, or
 *   `undefined` if the stream does not end with such a record.
 */
export function findTrailingVmDescription(stream: Uint8Array): { offset: number; json: Uint8Array } | undefined {
  const len = stream.length;
  let lastNul = len - 1;
  while (lastNul >= 0 && stream[lastNul] !== 0) lastNul--;
  if (lastNul < 0) return undefined;
  const view = new DataView(stream.buffer, stream.byteOffset, stream.byteLength);
  // The EOF byte is at p - 1 <= lastNul, and the JSON (p + 5 ..) holds no NUL, so p + 5 > lastNul.
  for (let p = lastNul + 1; p >= lastNul - 4 && p >= 1; p--) {
    if (p + 5 >= len) continue;
    if (stream[p] !== RecordType.VMDESCRIPTION || stream[p - 1] !== RecordType.EOF) continue;
    if (view.getUint32(p + 1) !== len - p - 5) continue;
    if (stream[p + 5] !== 0x7b || stream[len - 1] !== 0x7d) continue;
    return { offset: p, json: stream.subarray(p + 5) };
  }
  return undefined;
}

// ---- decoding -----------------------------------------------------------------

/**
 * One decoded value.
 *
 * - `int`: 1-, 2- and 4-byte integer types, as a JS number.
 * - `int64`: 8-byte integer types, always as a `bigint` (signed or unsigned per
 *   the type), never a lossy number.
 * - `bool`: a 1-byte `bool` (any non-zero byte is true, as QEMU loads it).
 * - `bytes`: everything kept opaque: `buffer`, `unused_buffer`, `bitmap`,
 *   `timer`, `float64`, `CPU_Double_U`, `pci config`, `msix state`, `virtio`,
 *   `qtailq`, `gtree`, `qlist`, old-style `data`, any unknown type, and an
 *   integer/bool type whose size is not the type's natural size.
 * - `string`: a `capability` (str8 capability name, configuration record only).
 * - `nullptr`: the one-byte `'0'` marker QEMU writes for a NULL element of an
 *   array of pointers.
 * - `struct`: a nested struct (`struct`, and `tmp`/`vstruct` fields whose inline
 *   description accounts for all their bytes); `bytes` is the element's raw
 *   bytes.
 */
export type VmStateValue =
  | { readonly kind: 'int'; readonly size: 1 | 2 | 4; readonly signed: boolean; readonly value: number }
  | { readonly kind: 'int64'; readonly signed: boolean; readonly value: bigint }
  | { readonly kind: 'bool'; readonly value: boolean }
  | { readonly kind: 'bytes'; readonly value: Uint8Array }
  | { readonly kind: 'string'; readonly value: string }
  | { readonly kind: 'nullptr' }
  | { readonly kind: 'struct'; readonly value: DecodedVmState; readonly bytes: Uint8Array };

/** A decoded field. */
export interface DecodedField {
  readonly name: string;
  readonly type: string;
  /** Copied from the description when QEMU listed an array element by element. */
  readonly index?: number;
  /** Offset of the field's first byte in the payload given to the decoder. */
  readonly offset: number;
  /** Bytes the field took (all elements). */
  readonly length: number;
  /** The value, or one value per element when the description had `array_len`. */
  readonly value: VmStateValue | readonly VmStateValue[];
}

/** A decoded VMState payload: a device, a struct element or a subsection. */
export interface DecodedVmState {
  /** Absent for an old-style device. */
  readonly vmsdName?: string;
  readonly version?: number;
  /** Offset in the payload of the first byte: of the first field, or of the `05` for a subsection. */
  readonly offset: number;
  /** Bytes covered, including a subsection's header. */
  readonly length: number;
  readonly fields: readonly DecodedField[];
  readonly subsections: readonly DecodedVmState[];
}

/** A decoded FULL section payload. */
export interface DecodedDevice extends DecodedVmState {
  readonly name: string;
  readonly instanceId: number;
}

/** Options of the decoders. */
export interface VmStateDecodeOptions {
  /** Stream offset of the payload's first byte; error offsets are relative to it. Default 0. */
  readonly baseOffset?: number;
  /** Section the payload belongs to, attached to errors. */
  readonly section?: SectionContext;
}

/**
 * Decodes a FULL section payload field by field, as analyze-migration.py does.
 * Integers are big-endian; see {@link VmStateValue} for what is decoded and
 * what stays bytes. Subsection headers are checked (`05`, the described name,
 * the described version).
 *
 * Throws `StreamError`:
 * - `device-size-mismatch` when `payload` is longer than
 *   {@link deviceSectionSize} (offset: the first extra byte) or shorter (offset:
 *   the field or subsection header that does not fit, named in the message);
 * - `bad-vmdesc` when the bytes contradict the description (subsection header,
 *   a struct whose description does not add up to its recorded size, a
 *   `nullptr` marker that is not `'0'`), naming the field path.
 */
export function decodeDeviceState(device: VmDevice, payload: Uint8Array, options: VmStateDecodeOptions = {}): DecodedDevice {
  const desc = device.kind === 'legacy' ? { fields: device.fields, subsections: [] } : device;
  const state = decodeWith(desc, deviceSectionSize(device), payload, device.name, options);
  return { name: device.name, instanceId: device.instanceId, ...state };
}

/**
 * Decodes any VMState payload against its description, e.g. the configuration
 * record's payload (the bytes after its `07`) against `VmDescription.configuration`.
 * Errors as in {@link decodeDeviceState}.
 */
export function decodeVmState(desc: VmsdDescription, payload: Uint8Array, options: VmStateDecodeOptions = {}): DecodedVmState {
  return decodeWith(desc, vmStateSize(desc), payload, desc.vmsdName, options);
}

type Shape = Pick<VmsdDescription, 'fields' | 'subsections'> & Partial<Pick<VmsdDescription, 'vmsdName' | 'version'>>;

function decodeWith(desc: Shape, expected: number, payload: Uint8Array, root: string, options: VmStateDecodeOptions): DecodedVmState {
  const base = options.baseOffset ?? 0;
  if (payload.length > expected) {
    throw new StreamError(
      'device-size-mismatch',
      base + expected,
      `${root}: payload is ${payload.length} bytes, the VM description accounts for ${expected}`,
      options.section,
    );
  }
  const decoder = new PayloadDecoder(payload, base, options.section, expected);
  return decoder.state(desc, 0, payload.length, root, false);
}

const INT_TYPES: Readonly<Record<string, { size: 1 | 2 | 4 | 8; signed: boolean }>> = {
  int8: { size: 1, signed: true },
  int16: { size: 2, signed: true },
  int32: { size: 4, signed: true },
  'int32 equal': { size: 4, signed: true },
  // "le" is "less or equal" (a check on load), not little-endian: it is written with put_int32.
  'int32 le': { size: 4, signed: true },
  int64: { size: 8, signed: true },
  uint8: { size: 1, signed: false },
  uint16: { size: 2, signed: false },
  uint32: { size: 4, signed: false },
  'uint32 equal': { size: 4, signed: false },
  uint64: { size: 8, signed: false },
  'uint8 equal': { size: 1, signed: false },
  'uint16 equal': { size: 2, signed: false },
  // QEMU names its uint64-equal VMStateInfo "int64 equal"; there is no signed one.
  'int64 equal': { size: 8, signed: false },
};

type Mutable<T> = { -readonly [K in keyof T]: T[K] };

interface Body {
  fields: DecodedField[];
  subsections: DecodedVmState[];
  stop: number;
}

function withName(desc: Shape, state: Mutable<DecodedVmState>): DecodedVmState {
  if (desc.vmsdName !== undefined) state.vmsdName = desc.vmsdName;
  if (desc.version !== undefined) state.version = desc.version;
  return state;
}

const utf8 = new TextEncoder();

/** VMS_NULLPTR_MARKER. */
const NULLPTR_MARKER = 0x30;

class PayloadDecoder {
  private readonly view: DataView;

  constructor(
    private readonly bytes: Uint8Array,
    private readonly base: number,
    private readonly section: SectionContext | undefined,
    private readonly expected: number,
  ) {
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  }

  /**
   * Decodes `desc` from `start` and checks it ends exactly at `end`. `end` is
   * the payload's end at the top level, else the end of a struct element.
   */
  state(desc: Shape, start: number, end: number, path: string, inStruct: boolean): DecodedVmState {
    const { fields, subsections, stop } = this.body(desc, start, end, path, inStruct);
    if (stop !== end) {
      this.bad(stop, `${path}: description accounts for ${stop - start} bytes, QEMU recorded ${end - start}`);
    }
    return withName(desc, { offset: start, length: stop - start, fields, subsections });
  }

  /**
   * Decodes fields then subsections from `start`; `stop` is the offset after
   * them. Running past `end` means a short payload at the top level, but a
   * description that contradicts its recorded size inside a struct.
   */
  private body(desc: Shape, start: number, end: number, path: string, inStruct: boolean): Body {
    let pos = start;
    const fields: DecodedField[] = [];
    for (const f of desc.fields) {
      const fpath = f.index === undefined ? `${path}.${f.name}` : `${path}.${f.name}[${f.index}]`;
      const n = f.arrayLen ?? 1;
      const length = f.size * n;
      this.need(pos, length, end, fpath, inStruct);
      const values: VmStateValue[] = [];
      for (let i = 0; i < n; i++) {
        values.push(this.value(f, pos + i * f.size, f.arrayLen === undefined ? fpath : `${fpath}[${i}]`));
      }
      const first = values[0];
      const field: Mutable<DecodedField> = {
        name: f.name,
        type: f.type,
        offset: pos,
        length,
        value: f.arrayLen === undefined && first !== undefined ? first : values,
      };
      if (f.index !== undefined) field.index = f.index;
      fields.push(field);
      pos += length;
    }
    const subsections: DecodedVmState[] = [];
    for (const sub of desc.subsections) {
      const spath = `${path}.{${sub.vmsdName}}`;
      const header = this.subsectionHeader(sub, pos, end, spath, inStruct);
      const r = this.body(sub, pos + header, end, spath, inStruct);
      subsections.push(withName(sub, { offset: pos, length: r.stop - pos, fields: r.fields, subsections: r.subsections }));
      pos = r.stop;
    }
    return { fields, subsections, stop: pos };
  }

  private subsectionHeader(sub: VmsdDescription, pos: number, end: number, path: string, inStruct: boolean): number {
    const name = utf8.encode(sub.vmsdName);
    const size = 1 + 1 + name.length + 4;
    this.need(pos, size, end, `${path} (subsection header)`, inStruct);
    if (this.bytes[pos] !== RecordType.SUBSECTION) {
      this.bad(pos, `${path}: expected subsection byte 0x05, got 0x${hex2(this.bytes[pos] ?? 0)}`);
    }
    const got = this.bytes.subarray(pos + 2, pos + 2 + (this.bytes[pos + 1] ?? 0));
    if (this.bytes[pos + 1] !== name.length || !sameBytes(got, name)) {
      this.bad(pos + 1, `${path}: expected subsection "${sub.vmsdName}", got "${latin1(got)}"`);
    }
    const version = this.view.getUint32(pos + 2 + name.length);
    if (version !== sub.version) {
      this.bad(pos + 2 + name.length, `${path}: subsection version ${version}, description says ${sub.version}`);
    }
    return size;
  }

  private value(f: VmsdField, pos: number, path: string): VmStateValue {
    const size = f.size;
    const raw = this.bytes.subarray(pos, pos + size);
    const int = INT_TYPES[f.type];
    if (int !== undefined && int.size === size) return this.int(pos, int.size, int.signed);
    switch (f.type) {
      case 'bool':
        if (size === 1) return { kind: 'bool', value: raw[0] !== 0 };
        break;
      case 'nullptr':
        if (size === 1) {
          if (raw[0] !== NULLPTR_MARKER) this.bad(pos, `${path}: nullptr marker 0x${hex2(raw[0] ?? 0)}, expected 0x30`);
          return { kind: 'nullptr' };
        }
        break;
      case 'capability':
        if (size >= 1 && raw[0] === size - 1) return { kind: 'string', value: latin1(raw.subarray(1)) };
        break;
      case 'struct':
        if (f.struct !== undefined) return { kind: 'struct', value: this.state(f.struct, pos, pos + size, path, true), bytes: raw };
        break;
      default:
        // tmp/vstruct: trust the inline description only when it accounts for every byte;
        // qtailq/gtree/qlist also leave (possibly repeated) inline keys but add marker bytes.
        if (f.inline !== undefined && this.fits(f.inline, size)) {
          return { kind: 'struct', value: this.state(f.inline, pos, pos + size, path, true), bytes: raw };
        }
    }
    return { kind: 'bytes', value: raw };
  }

  private fits(desc: VmsdDescription, size: number): boolean {
    try {
      return vmStateSize(desc) === size;
    } catch {
      return false;
    }
  }

  private int(pos: number, size: 1 | 2 | 4 | 8, signed: boolean): VmStateValue {
    const v = this.view;
    switch (size) {
      case 1:
        return { kind: 'int', size, signed, value: signed ? v.getInt8(pos) : v.getUint8(pos) };
      case 2:
        return { kind: 'int', size, signed, value: signed ? v.getInt16(pos) : v.getUint16(pos) };
      case 4:
        return { kind: 'int', size, signed, value: signed ? v.getInt32(pos) : v.getUint32(pos) };
      case 8:
        return { kind: 'int64', signed, value: signed ? v.getBigInt64(pos) : v.getBigUint64(pos) };
    }
  }

  private need(pos: number, n: number, end: number, path: string, inStruct: boolean): void {
    if (pos + n <= end) return;
    if (!inStruct) {
      throw new StreamError(
        'device-size-mismatch',
        this.base + pos,
        `${path}: needs ${n} bytes at payload offset ${pos}, payload is ${this.bytes.length} bytes ` +
          `(the VM description accounts for ${this.expected})`,
        this.section,
      );
    }
    this.bad(pos, `${path}: needs ${n} bytes at payload offset ${pos}, the enclosing struct ends at ${end}`);
  }

  private bad(pos: number, message: string): never {
    throw new StreamError('bad-vmdesc', this.base + pos, message, this.section);
  }
}

function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

function latin1(b: Uint8Array): string {
  let s = '';
  for (const c of b) s += String.fromCharCode(c);
  return s;
}

function hex2(n: number): string {
  return n.toString(16).padStart(2, '0');
}

// ---- JSON output --------------------------------------------------------------

/** A JSON value (what `JSON.stringify` accepts without a replacer). */
export type JsonValue = null | boolean | number | string | JsonValue[] | { [key: string]: JsonValue };

/** Options of {@link deviceStateToJson}. */
export interface DeviceStateJsonOptions {
  /**
   * - `plain` (default): integers as numbers, 64-bit integers as decimal
   *   strings, bytes as one lowercase hex string, `tmp`/`vstruct` as objects,
   *   `nullptr` as `null`, `array_len` fields always as arrays.
   * - `analyze-migration`: exactly the value format of QEMU's
   *   `scripts/analyze-migration.py -d state` for one section: integers as
   *   `"0x%0Nx"` (plus `" (n)"` when signed and negative), bytes as
   *   space-separated hex, `tmp`/`vstruct` as bytes, `uint8 equal`,
   *   `uint16 equal` and `int64 equal` read as signed (as the script does),
   *   `nullptr` as `"nullptr"`.
   */
  readonly style?: 'plain' | 'analyze-migration';
}

/**
 * A JSON-friendly form of a decoded device (for `--devices` output): an object
 * keyed by field name in wire order, then by subsection name. Fields sharing a
 * name (arrays QEMU described element by element) are gathered into one array,
 * as analyze-migration.py does.
 */
export function deviceStateToJson(state: DecodedVmState, options: DeviceStateJsonOptions = {}): { [key: string]: JsonValue } {
  const analyze = options.style === 'analyze-migration';
  const out: { [key: string]: JsonValue } = {};
  const grouped = new Set<string>();
  for (const f of state.fields) {
    const values = Array.isArray(f.value) ? (f.value as readonly VmStateValue[]) : [f.value as VmStateValue];
    const rendered = values.map((v) => renderValue(v, f.type, analyze));
    const prev = out[f.name];
    if (prev === undefined) {
      const single = analyze ? rendered.length === 1 : !Array.isArray(f.value);
      const first = rendered[0];
      out[f.name] = single && first !== undefined ? first : rendered;
      if (!single) grouped.add(f.name);
    } else if (grouped.has(f.name)) {
      (prev as JsonValue[]).push(...rendered);
    } else {
      out[f.name] = [prev, ...rendered];
      grouped.add(f.name);
    }
  }
  for (const s of state.subsections) out[s.vmsdName ?? ''] = deviceStateToJson(s, options);
  return out;
}

// analyze-migration.py's reader classes for these read the value as signed.
const ANALYZE_SIGNED = new Set(['uint8 equal', 'uint16 equal', 'int64 equal']);

function renderValue(v: VmStateValue, type: string, analyze: boolean): JsonValue {
  switch (v.kind) {
    case 'int':
      if (!analyze) return v.value;
      return analyzeInt(BigInt(v.value), v.size, v.signed || ANALYZE_SIGNED.has(type));
    case 'int64':
      if (!analyze) return v.value.toString();
      return analyzeInt(v.value, 8, v.signed || ANALYZE_SIGNED.has(type));
    case 'bool':
      return v.value;
    case 'bytes':
      return hexBytes(v.value, analyze);
    case 'string':
      return v.value;
    case 'nullptr':
      return analyze ? 'nullptr' : null;
    case 'struct':
      // The script knows only "struct"; tmp/vstruct are opaque to it.
      if (analyze && type !== 'struct') return hexBytes(v.bytes, true);
      return deviceStateToJson(v.value, { style: analyze ? 'analyze-migration' : 'plain' });
  }
}

function analyzeInt(value: bigint, size: number, signed: boolean): string {
  const bits = BigInt(size * 8);
  const unsigned = BigInt.asUintN(Number(bits), value);
  const hex = `0x${unsigned.toString(16).padStart(size * 2, '0')}`;
  const s = BigInt.asIntN(Number(bits), value);
  return signed && s < 0n ? `${hex} (${s})` : hex;
}

function hexBytes(b: Uint8Array, spaced: boolean): string {
  let s = '';
  for (let i = 0; i < b.length; i++) {
    if (spaced && i > 0) s += ' ';
    s += hex2(b[i] ?? 0);
  }
  return s;
}
