import { readFileSync } from 'node:fs';
import { gunzipSync } from 'node:zlib';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { StreamError, type StreamErrorCode } from '../../src/stream/errors.js';
import {
  decodeDeviceState,
  decodeVmState,
  deviceSectionSize,
  deviceStateToJson,
  findTrailingVmDescription,
  parseVmDescription,
  vmdescSectionSizes,
  vmStateSize,
  type DecodedVmState,
  type VmDescription,
  type VmDevice,
  type VmStateValue,
} from '../../src/stream/vmdesc.js';

// ---- fixtures -------------------------------------------------------------------
// Complete `file:` migration streams of paused QEMU 10.0.2 VMs and analyze-migration.py's
// `-d state` output for each (see test/fixtures/vmdesc/README.md).

const fixture = (name: string): Buffer => gunzipSync(readFileSync(new URL(`../fixtures/vmdesc/${name}`, import.meta.url)));

interface Section {
  readonly sectionId: number;
  readonly idstr: string;
  readonly instanceId: number;
  readonly versionId: number;
  /** Offset of the 0x04 byte. */
  readonly start: number;
  readonly payloadOffset: number;
  readonly payload: Uint8Array;
  readonly device: VmDevice;
}

interface Capture {
  readonly name: string;
  readonly stream: Uint8Array;
  readonly desc: VmDescription;
  readonly vmdescOffset: number;
  readonly sections: readonly Section[];
  readonly reference: Record<string, unknown>;
  readonly ramSectionId: number;
  readonly configEnd: number;
}

const be32 = (b: Uint8Array, p: number): number => new DataView(b.buffer, b.byteOffset, b.byteLength).getUint32(p);
const ascii = (b: Uint8Array): string => Buffer.from(b).toString('latin1');

/**
 * Cuts a capture's device block into FULL sections using only the sizes the VM
 * description gives. The first FULL section is located independently (the RAM
 * END footer followed by the first described device's header); every later
 * boundary must then fall exactly on a footer with the same section id,
 * followed by the next FULL header, and the last one exactly on the EOF byte.
 */
function loadCapture(name: string): Capture {
  const stream = new Uint8Array(fixture(`${name}.bin.gz`));
  const reference = JSON.parse(fixture(`${name}.analyze-state.json.gz`).toString('utf8')) as Record<string, unknown>;
  const found = findTrailingVmDescription(stream);
  if (!found) throw new Error(`${name}: no VM description`);
  const desc = parseVmDescription(found.json, found.offset + 5);
  if (!desc.configuration) throw new Error(`${name}: no configuration description`);

  // header (8) | 07 + configuration payload | 01 <id> 03 "ram" ...
  expect(be32(stream, 0)).toBe(0x5145564d);
  expect(stream[8]).toBe(0x07);
  const configEnd = 9 + vmStateSize(desc.configuration);
  expect(stream[configEnd]).toBe(0x01);
  expect(ascii(stream.subarray(configEnd + 5, configEnd + 9))).toBe('\x03ram');
  const ramSectionId = be32(stream, configEnd + 1);

  const first = desc.devices[0];
  if (!first || first.kind !== 'vmstate') throw new Error(`${name}: unexpected first device`);
  const header = (d: VmDevice): number[] => [d.name.length, ...Buffer.from(d.name, 'latin1'), ...u32(d.instanceId)];
  const firstHeader = header(first);
  let start = -1;
  for (let p = configEnd; p + 10 + firstHeader.length < stream.length; p++) {
    if (stream[p] === 0x7e && be32(stream, p + 1) === ramSectionId && stream[p + 5] === 0x04 && firstHeader.every((b, i) => stream[p + 10 + i] === b)) {
      start = p + 5;
      break;
    }
  }
  if (start < 0) throw new Error(`${name}: first FULL section not found`);

  const sizes = vmdescSectionSizes(desc);
  const sections: Section[] = [];
  let p = start;
  for (const [i, device] of desc.devices.entries()) {
    const size = sizes[i]?.size ?? -1;
    expect(stream[p], `${device.name}: FULL type byte`).toBe(0x04);
    const sectionId = be32(stream, p + 1);
    const idLen = stream[p + 5] ?? 0;
    const idstr = ascii(stream.subarray(p + 6, p + 6 + idLen));
    const instanceId = be32(stream, p + 6 + idLen);
    const versionId = be32(stream, p + 10 + idLen);
    const payloadOffset = p + 14 + idLen;
    const footer = payloadOffset + size;
    expect({ idstr, instanceId }).toEqual({ idstr: device.name, instanceId: device.instanceId });
    if (device.kind === 'vmstate') expect(versionId, `${device.name}: version`).toBe(device.version);
    expect(stream[footer], `${device.name}: footer byte after ${size} payload bytes`).toBe(0x7e);
    expect(be32(stream, footer + 1), `${device.name}: footer section id`).toBe(sectionId);
    const next = stream[footer + 5];
    expect(next === 0x04 || (next === 0x00 && i === desc.devices.length - 1), `${device.name}: next record 0x${next?.toString(16)}`).toBe(true);
    sections.push({ sectionId, idstr, instanceId, versionId, start: p, payloadOffset, payload: stream.subarray(payloadOffset, footer), device });
    p = footer + 5;
  }
  expect(p, `${name}: the last section ends on the EOF byte before VMDESCRIPTION`).toBe(found.offset - 1);
  return { name, stream, desc, vmdescOffset: found.offset, sections, reference, ramSectionId, configEnd };
}

function u32(n: number): number[] {
  return [(n >>> 24) & 0xff, (n >>> 16) & 0xff, (n >>> 8) & 0xff, n & 0xff];
}

const captures = {
  q35: loadCapture('q35'),
  pc: loadCapture('pc'),
  extras: loadCapture('extras'),
};
const allCaptures = Object.values(captures);

function section(c: Capture, idstr: string, instanceId = 0): Section {
  const s = c.sections.find((x) => x.idstr === idstr && x.instanceId === instanceId);
  if (!s) throw new Error(`${c.name}: no section ${idstr}/${instanceId}`);
  return s;
}

function field(state: DecodedVmState, name: string): VmStateValue | readonly VmStateValue[] {
  const f = state.fields.find((x) => x.name === name);
  if (!f) throw new Error(`no field ${name}`);
  return f.value;
}

function catchStreamError(fn: () => unknown): StreamError {
  try {
    fn();
  } catch (e) {
    if (e instanceof StreamError) return e;
    throw e;
  }
  throw new Error('expected a StreamError');
}

function expectStreamError(fn: () => unknown, code: StreamErrorCode, offset?: number, message?: RegExp): StreamError {
  const e = catchStreamError(fn);
  expect(e.code).toBe(code);
  if (offset !== undefined) expect(e.offset).toBe(offset);
  if (message) expect(e.message).toMatch(message);
  return e;
}

// ---- real captures --------------------------------------------------------------

describe('VM description of real QEMU 10.0.2 captures', () => {
  it('finds the trailing record right after EOF', () => {
    for (const c of allCaptures) {
      const found = findTrailingVmDescription(c.stream);
      expect(found?.offset).toBe(c.vmdescOffset);
      expect(c.stream[c.vmdescOffset - 1]).toBe(0x00);
      expect(be32(c.stream, c.vmdescOffset + 1)).toBe(c.stream.length - c.vmdescOffset - 5);
      // A view, not a copy.
      expect(found?.json.buffer).toBe(c.stream.buffer);
    }
  });

  it('parses the top level and the configuration description', () => {
    const { desc } = captures.q35;
    expect(desc.pageSize).toBe(4096);
    expect(desc.configuration).toEqual({
      vmsdName: 'configuration',
      version: 1,
      fields: [
        { name: 'len', type: 'uint32', size: 4 },
        { name: 'name', type: 'buffer', size: 11 },
      ],
      subsections: [],
    });
    expect(captures.pc.desc.configuration?.fields[1]?.size).toBe('pc-i440fx-10.0'.length);
  });

  it('delimits every device section exactly by the sizes of the description', () => {
    // loadCapture() did the boundary checks; here: the counts and a few sizes.
    expect(allCaptures.map((c) => c.sections.length)).toEqual([29, 30, 37]);
    expect(section(captures.q35, 'timer').payload.length).toBe(24); // the wire doc's example
    expect(section(captures.q35, 'cpu').payload.length).toBe(1851);
    expect(section(captures.pc, 'fdc').payload.length).toBe(593);
    expect(section(captures.extras, '0000:00:01.0/e1000').payload.length).toBe(198785);
    for (const c of allCaptures) {
      for (const s of c.sections) expect(deviceSectionSize(s.device)).toBe(s.payload.length);
    }
  });

  it('matches the q35 device list of the wire doc (section 3.1)', () => {
    const doc = `0 timer 0 2; 3 cpu_common 0 1; 4 cpu 0 12; 5 kvm-tpr-opt 0 1; 6 apic 0 3; 7 fw_cfg 0 2;
      8 0000:00:00.0/mch 0 1; 9 PCIHost 0 1; 10 PCIBUS 0 1; 11 dma 0 1; 12 dma 1 1; 13 mc146818rtc 0 3;
      14 0000:00:1f.0/ICH9LPC 0 1; 15 i8259 0 1; 16 i8259 1 1; 17 ioapic 0 3; 18 hpet 0 2; 19 i8254 0 3;
      20 pcspk 0 1; 21 ps2kbd 0 3; 22 ps2mouse 0 2; 23 pckbd 0 3; 24 vmmouse 0 0; 25 port92 0 1;
      26 0000:00:1f.2/ich9_ahci 0 1; 27 i2c_bus 0 1; 28 0000:00:1f.3/ich9_smb 0 1; 37 acpi_build 0 1; 38 globalstate 0 1`;
    const expected = doc.split(';').map((e) => e.trim().split(/\s+/));
    expect(captures.q35.sections.map((s) => [String(s.sectionId), s.idstr, String(s.instanceId), String(s.versionId)])).toEqual(expected);
  });

  it('describes old-style handlers as one data buffer', () => {
    const slirp = section(captures.extras, 'slirp', 1).device;
    expect(slirp).toEqual({ kind: 'legacy', name: 'slirp', instanceId: 1, size: 131, fields: [{ name: 'data', type: 'buffer', size: 131 }] });
    const decoded = decodeDeviceState(slirp, section(captures.extras, 'slirp', 1).payload);
    expect(decoded.vmsdName).toBeUndefined();
    expect(decoded.fields).toHaveLength(1);
  });

  it('decodes every device exactly like analyze-migration.py -d state', () => {
    let compared = 0;
    for (const c of allCaptures) {
      for (const s of c.sections) {
        const decoded = decodeDeviceState(s.device, s.payload, { baseOffset: s.payloadOffset });
        expect(decoded.length).toBe(s.payload.length);
        const ours = deviceStateToJson(decoded, { style: 'analyze-migration' });
        expect(ours, `${c.name}: ${s.idstr}`).toEqual(c.reference[`${s.idstr} (${s.sectionId})`]);
        compared++;
      }
    }
    expect(compared).toBe(96);
  });

  it('gives typed values: numbers, bigints, bools, bytes, structs, subsections', () => {
    const cpu = decodeDeviceState(section(captures.q35, 'cpu').device, section(captures.q35, 'cpu').payload);
    expect(cpu).toMatchObject({ name: 'cpu', instanceId: 0, vmsdName: 'cpu', version: 12, offset: 0, length: 1851 });
    expect(field(cpu, 'env.eip')).toEqual({ kind: 'int64', signed: false, value: 0xfff0n });
    expect(field(cpu, 'env.fpuc')).toEqual({ kind: 'int', size: 2, signed: false, value: 0x37f });
    const regs = field(cpu, 'env.regs') as VmStateValue[];
    expect(regs).toHaveLength(16);
    expect(regs[2]).toEqual({ kind: 'int64', signed: false, value: 0x60fb1n }); // EDX = CPUID signature at reset
    const segs = field(cpu, 'env.segs') as VmStateValue[];
    const cs = segs[1];
    if (cs?.kind !== 'struct') throw new Error('env.segs[1] is not a struct');
    expect(field(cs.value, 'selector')).toEqual({ kind: 'int', size: 4, signed: false, value: 0xf000 });
    expect(field(cs.value, 'base')).toEqual({ kind: 'int64', signed: false, value: 0xffff0000n });
    expect(cs.bytes.length).toBe(cs.value.length);
    expect(cpu.subsections.length).toBeGreaterThan(0);
    for (const sub of cpu.subsections) expect(sub.vmsdName?.startsWith('cpu/')).toBe(true);

    const timer = decodeDeviceState(section(captures.q35, 'timer').device, section(captures.q35, 'timer').payload);
    expect(deviceStateToJson(timer)).toEqual({ cpu_ticks_offset: '0', unused: '0000000000000000', cpu_clock_offset: '0' });

    // The configuration record's payload decodes against the same machinery.
    const q = captures.q35;
    const config = decodeVmState(q.desc.configuration!, q.stream.subarray(9, q.configEnd));
    expect(deviceStateToJson(config)).toEqual({ len: 11, name: Buffer.from('pc-q35-10.0').toString('hex') });
  });

  it('decodes subsections of nested structs (fdc drives) and checks their headers', () => {
    const fdc = section(captures.pc, 'fdc');
    const json = deviceStateToJson(decodeDeviceState(fdc.device, fdc.payload)) as { state: { drives: Array<Record<string, unknown>> } };
    expect(json.state.drives).toHaveLength(2);
    expect(json.state.drives[0]).toHaveProperty(['fdrive/media_rate', 'media_rate']);
    // Corrupt the first drive's subsection name: bad-vmdesc, named by path, at its offset.
    const at = Buffer.from(fdc.payload).indexOf('fdrive/media_rate');
    const bad = Uint8Array.from(fdc.payload);
    bad[at] = 0x46;
    expectStreamError(() => decodeDeviceState(fdc.device, bad, { baseOffset: 1000 }), 'bad-vmdesc', 1000 + at - 1, /drives\[0\]\.\{fdrive\/media_rate\}/);
  });

  it('decodes vstruct/tmp through their inline description, keeps opaque types as bytes', () => {
    const ipmi = section(captures.extras, 'ipmi-interface');
    const d = decodeDeviceState(ipmi.device, ipmi.payload);
    const kcs = field(d, 'kcs[1]');
    expect(!Array.isArray(kcs) && (kcs as VmStateValue).kind).toBe('struct');
    const plain = deviceStateToJson(d) as { 'kcs[1]': { outmsg: number[]; data_in_reg: number } };
    expect(plain['kcs[1]'].outmsg).toHaveLength(300);
    expect(typeof plain['kcs[1]'].data_in_reg).toBe('number');
    const virtio = section(captures.extras, '0000:00:03.0/virtio-net');
    const v = field(decodeDeviceState(virtio.device, virtio.payload), 'virtio') as VmStateValue;
    expect(v.kind).toBe('bytes');
    expect(v.kind === 'bytes' && v.value.length).toBe(46143);
  });

  it('refuses every truncation and every extension of real payloads with device-size-mismatch', () => {
    const cases: Array<[Capture, string]> = [
      [captures.q35, 'timer'],
      [captures.q35, 'cpu'],
      [captures.q35, 'apic'],
      [captures.pc, 'fdc'],
      [captures.pc, '0000:00:01.1/ide'],
      [captures.extras, 'ipmi-interface'],
      [captures.extras, 'slirp'],
    ];
    for (const [c, idstr] of cases) {
      const s = section(c, idstr);
      const section_ = { sectionId: s.sectionId, idstr: s.idstr, instanceId: s.instanceId };
      for (let k = 0; k < s.payload.length; k++) {
        const e = expectStreamError(
          () => decodeDeviceState(s.device, s.payload.subarray(0, k), { baseOffset: s.payloadOffset, section: section_ }),
          'device-size-mismatch',
        );
        expect(e.offset).toBeGreaterThanOrEqual(s.payloadOffset);
        expect(e.offset).toBeLessThanOrEqual(s.payloadOffset + k);
        expect(e.section).toEqual(section_);
      }
      const longer = new Uint8Array(s.payload.length + 1);
      longer.set(s.payload);
      expectStreamError(() => decodeDeviceState(s.device, longer, { baseOffset: 7 }), 'device-size-mismatch', 7 + s.payload.length);
    }
  });

  it('names the field that does not fit', () => {
    const s = section(captures.q35, 'cpu');
    const regs = decodeDeviceState(s.device, s.payload).fields.find((f) => f.name === 'env.regs')!;
    expectStreamError(() => decodeDeviceState(s.device, s.payload.subarray(0, regs.offset + 3), { baseOffset: 100 }), 'device-size-mismatch', 100 + regs.offset, /cpu\.env\.regs/);
  });
});

// ---- malformed descriptions -----------------------------------------------------

describe('parseVmDescription refuses what QEMU does not write', () => {
  const ok = { page_size: 4096, devices: [{ name: 'd', instance_id: 0, vmsd_name: 'd', version: 1, fields: [{ name: 'a', type: 'uint8', size: 1 }] }] };
  const withDevice = (d: unknown): string => JSON.stringify({ page_size: 4096, devices: [d] });
  const withField = (f: unknown): string => withDevice({ name: 'd', instance_id: 0, vmsd_name: 'd', version: 1, fields: [f] });
  const cases: Array<[string, string | Uint8Array, RegExp]> = [
    ['not JSON', '{"page_size": 4096, "devices": [', /malformed JSON/],
    ['empty', '', /malformed JSON/],
    ['invalid UTF-8', Uint8Array.from([0x7b, 0xff, 0x7d]), /UTF-8/],
    ['top-level array', '[]', /top level: expected an object/],
    ['no devices', '{"page_size": 4096}', /"devices" must be an array/],
    ['no page_size', '{"devices": []}', /page_size/],
    ['page_size 0', '{"page_size": 0, "devices": []}', /page_size/],
    ['device not an object', withDevice(3), /devices\[0\]: expected an object/],
    ['device without name', withDevice({ instance_id: 0, vmsd_name: 'd', version: 1, fields: [] }), /"name" must be a string/],
    ['negative instance_id', withDevice({ name: 'd', instance_id: -1, vmsd_name: 'd', version: 1, fields: [] }), /instance_id/],
    ['fractional instance_id', withDevice({ name: 'd', instance_id: 0.5, vmsd_name: 'd', version: 1, fields: [] }), /instance_id/],
    ['string instance_id', withDevice({ name: 'd', instance_id: '0', vmsd_name: 'd', version: 1, fields: [] }), /instance_id/],
    ['instance_id above u32', withDevice({ name: 'd', instance_id: 2 ** 32, vmsd_name: 'd', version: 1, fields: [] }), /instance_id/],
    ['no version', withDevice({ name: 'd', instance_id: 0, vmsd_name: 'd', fields: [] }), /"version"/],
    ['fields not an array', withDevice({ name: 'd', instance_id: 0, vmsd_name: 'd', version: 1, fields: {} }), /"fields" must be an array/],
    ['neither vmsd_name nor size', withDevice({ name: 'd', instance_id: 0, fields: [] }), /neither "vmsd_name" nor "size"/],
    ['old-style fields not adding up', withDevice({ name: 'd', instance_id: 0, size: 5, fields: [{ name: 'data', size: 4, type: 'buffer' }] }), /add up to 4 bytes/],
    ['field without size', withField({ name: 'a', type: 'uint8' }), /"size"/],
    ['negative size', withField({ name: 'a', type: 'uint8', size: -1 }), /"size"/],
    ['unsafe size', withField({ name: 'a', type: 'buffer', size: 2 ** 60 }), /"size"/],
    ['field without type', withField({ name: 'a', size: 1 }), /"type"/],
    ['array_len 0', withField({ name: 'a', type: 'uint8', size: 1, array_len: 0 }), /array_len/],
    ['struct without description', withField({ name: 'a', type: 'struct', size: 1 }), /struct without/],
    ['struct description not an object', withField({ name: 'a', type: 'struct', size: 1, struct: [] }), /expected an object/],
    [
      'subsection name longer than 255 bytes',
      withDevice({ name: 'd', instance_id: 0, vmsd_name: 'd', version: 1, fields: [], subsections: [{ vmsd_name: `d/${'x'.repeat(254)}`, version: 1, fields: [] }] }),
      /256 bytes cannot be sent/,
    ],
  ];
  for (const [what, input, message] of cases) {
    it(what, () => {
      expectStreamError(() => parseVmDescription(input, 1234), 'bad-vmdesc', 1234, message);
    });
  }

  it('refuses absurd nesting', () => {
    let d: unknown = { vmsd_name: 's', version: 0, fields: [] };
    for (let i = 0; i < 100; i++) d = { vmsd_name: 's', version: 0, fields: [{ name: 'x', type: 'struct', size: 0, struct: d }] };
    expectStreamError(() => parseVmDescription(withDevice({ name: 'd', instance_id: 0, ...(d as object) })), 'bad-vmdesc', 0, /nested deeper/);
  });

  it('accepts the minimal forms and ignores unknown keys', () => {
    expect(parseVmDescription(JSON.stringify(ok))).toEqual({
      pageSize: 4096,
      devices: [{ kind: 'vmstate', name: 'd', instanceId: 0, vmsdName: 'd', version: 1, fields: [{ name: 'a', type: 'uint8', size: 1 }], subsections: [] }],
    });
    expect(parseVmDescription(new TextEncoder().encode(JSON.stringify({ ...ok, extra: [1] }))).devices).toHaveLength(1);
  });

  it('refuses a device whose size overflows', () => {
    expectStreamError(() => parseVmDescription(withField({ name: 'a', type: 'buffer', size: 2 ** 40, array_len: 2 ** 20 }), 9), 'bad-vmdesc', 9, /overflows/);
    const sub = { vmsd_name: 'd/s', version: 1, fields: [{ name: 'b', type: 'buffer', size: 2 ** 52 }] };
    expectStreamError(() => parseVmDescription(withDevice({ name: 'd', instance_id: 0, vmsd_name: 'd', version: 1, fields: [], subsections: [sub, sub] })), 'bad-vmdesc', 0, /overflows/);
    // A hand-built description is checked when its size is asked for.
    const device: VmDevice = { kind: 'vmstate', name: 'd', instanceId: 0, vmsdName: 'd', version: 1, fields: [{ name: 'a', type: 'buffer', size: 2 ** 52, arrayLen: 4 }], subsections: [] };
    expectStreamError(() => deviceSectionSize(device), 'bad-vmdesc', 0, /overflows/);
  });
});

describe('decode errors', () => {
  const device = (d: object): VmDevice => parseVmDescription(JSON.stringify({ page_size: 4096, devices: [{ name: 'dev', instance_id: 0, vmsd_name: 'dev', version: 1, ...d }] })).devices[0]!;

  it('checks the subsection type byte, name and version', () => {
    const d = device({ fields: [{ name: 'a', type: 'uint8', size: 1 }], subsections: [{ vmsd_name: 'dev/s', version: 3, fields: [] }] });
    const good = Uint8Array.from([9, 0x05, 5, ...Buffer.from('dev/s'), 0, 0, 0, 3]);
    expect(deviceSectionSize(d)).toBe(good.length);
    expect(deviceStateToJson(decodeDeviceState(d, good))).toEqual({ a: 9, 'dev/s': {} });
    const mutate = (i: number, v: number): Uint8Array => {
      const b = Uint8Array.from(good);
      b[i] = v;
      return b;
    };
    expectStreamError(() => decodeDeviceState(d, mutate(1, 0x04), { baseOffset: 10 }), 'bad-vmdesc', 11, /dev\.\{dev\/s\}: expected subsection byte 0x05/);
    expectStreamError(() => decodeDeviceState(d, mutate(7, 0x74)), 'bad-vmdesc', 2, /expected subsection "dev\/s", got "dev\/t"/);
    expectStreamError(() => decodeDeviceState(d, mutate(2, 4)), 'bad-vmdesc', 2, /expected subsection "dev\/s", got "dev\/"/);
    expectStreamError(() => decodeDeviceState(d, mutate(11, 4)), 'bad-vmdesc', 8, /version 4, description says 3/);
  });

  it('refuses a struct whose description does not account for its recorded size', () => {
    const d = device({ fields: [{ name: 's', type: 'struct', struct: { vmsd_name: 'in', version: 1, fields: [{ name: 'x', type: 'uint16', size: 2 }] }, size: 3 }] });
    expectStreamError(() => decodeDeviceState(d, new Uint8Array(3), { baseOffset: 50 }), 'bad-vmdesc', 52, /dev\.s: description accounts for 2 bytes, QEMU recorded 3/);
    const over = device({ fields: [{ name: 's', type: 'struct', struct: { vmsd_name: 'in', version: 1, fields: [{ name: 'x', type: 'uint32', size: 4 }] }, size: 3 }] });
    expectStreamError(() => decodeDeviceState(over, new Uint8Array(3)), 'bad-vmdesc', 0, /dev\.s\.x: needs 4 bytes/);
  });

  it('checks the nullptr marker', () => {
    const d = device({ fields: [{ name: 'p', type: 'nullptr', size: 1 }] });
    expect(decodeDeviceState(d, Uint8Array.from([0x30])).fields[0]?.value).toEqual({ kind: 'nullptr' });
    expectStreamError(() => decodeDeviceState(d, Uint8Array.from([0])), 'bad-vmdesc', 0, /nullptr marker/);
  });

  it('keeps types it cannot interpret as bytes', () => {
    const d = device({
      fields: [
        { name: 'odd', type: 'uint32', size: 3 },
        { name: 'q', type: 'qtailq', vmsd_name: 'e', version: 1, fields: [{ name: 'v', type: 'uint8', size: 1 }], size: 3 },
        { name: 'f', type: 'float64', size: 8 },
      ],
    });
    const values = decodeDeviceState(d, new Uint8Array(14)).fields.map((f) => (f.value as VmStateValue).kind);
    expect(values).toEqual(['bytes', 'bytes', 'bytes']);
  });
});

// ---- findTrailingVmDescription -------------------------------------------------

describe('findTrailingVmDescription', () => {
  const record = (json: string, before: number[] = [0x00]): Uint8Array => {
    const j = Buffer.from(json, 'latin1');
    return Uint8Array.from([...before, 0x06, ...u32(j.length), ...j]);
  };

  it('finds a record whose length bytes contain "{" after the last NUL (analyze-migration.py would not)', () => {
    const json = `{"a": "${'x'.repeat(0x7b0c - 9)}"}`;
    expect(json.length).toBe(0x7b0c);
    const s = record(json, [1, 2, 3, 0x00]);
    expect(findTrailingVmDescription(s)).toEqual({ offset: 4, json: s.subarray(9) });
  });

  it('finds a record whose length has no zero byte', () => {
    const json = `{"a": "${'y'.repeat(0x01010101 & 0xff)}"}`;
    const s = record(json);
    expect(findTrailingVmDescription(s)?.offset).toBe(1);
  });

  it('works on a view into a larger buffer', () => {
    const s = record('{}', [7, 7, 0]);
    const big = new Uint8Array(s.length + 20);
    big.set(s, 10);
    expect(findTrailingVmDescription(big.subarray(10, 10 + s.length))?.offset).toBe(3);
  });

  it('needs EOF before, the exact length, and a JSON object', () => {
    expect(findTrailingVmDescription(new Uint8Array())).toBeUndefined();
    expect(findTrailingVmDescription(record('{}', [0x7e]))).toBeUndefined(); // no EOF byte
    expect(findTrailingVmDescription(record('{}', []))).toBeUndefined(); // nothing before
    expect(findTrailingVmDescription(record('[1]'))).toBeUndefined();
    const long = record('{}');
    expect(findTrailingVmDescription(Uint8Array.from([...long, 0x20]))).toBeUndefined(); // length off by one
    expect(findTrailingVmDescription(long.subarray(0, long.length - 1))).toBeUndefined(); // truncated
    expect(findTrailingVmDescription(Uint8Array.from([0x00, 0x00]))).toBeUndefined(); // stream without VMDESCRIPTION
  });

  it('never throws on random input, and what it returns is a well-formed record', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 64 }), fc.option(fc.string({ maxLength: 20 })), (junk, json) => {
        const s = json === null ? junk : Uint8Array.from([...junk, ...record(`{${json.replace(/\0/g, '')}}`)]);
        const found = findTrailingVmDescription(s);
        if (json !== null) expect(found).toBeDefined();
        if (found) {
          expect(s[found.offset - 1]).toBe(0);
          expect(s[found.offset]).toBe(6);
          expect(be32(s, found.offset + 1)).toBe(found.json.length);
          expect(found.offset + 5 + found.json.length).toBe(s.length);
          expect(found.json.includes(0)).toBe(false);
        }
      }),
    );
  });
});

// ---- properties -----------------------------------------------------------------

/** A generated description tree; `build` turns it into QEMU-shaped JSON and matching payload bytes. */
type Leaf = { t: 'leaf'; name: string; type: string; size: number; arrayLen: number | null; index: number | null };
type Nested = { t: 'struct' | 'tmp'; name: string; desc: Desc; arrayLen: number | null };
type Desc = { vmsdName: string; version: number; fields: Array<Leaf | Nested>; subs: Desc[] };

const NATURAL: Record<string, number> = {
  bool: 1, int8: 1, int16: 2, int32: 4, int64: 8, uint8: 1, uint16: 2, uint32: 4, uint64: 8,
  'int32 equal': 4, 'int32 le': 4, 'uint32 equal': 4, 'uint8 equal': 1, 'uint16 equal': 2, 'int64 equal': 8, nullptr: 1,
};
const OPAQUE = ['buffer', 'unused_buffer', 'timer', 'bitmap', 'pci config', 'something new'];

const nameArb = fc.string({ minLength: 1, maxLength: 6, unit: fc.constantFrom('a', 'b', 'x', '_', '.', '[', '1') });
const leafArb: fc.Arbitrary<Leaf> = fc.oneof(
  fc.record({
    t: fc.constant('leaf' as const),
    name: nameArb,
    type: fc.constantFrom(...Object.keys(NATURAL)),
    size: fc.constant(0),
    arrayLen: fc.option(fc.integer({ min: 2, max: 4 })),
    index: fc.option(fc.integer({ min: 0, max: 3 })),
  }).map((l) => ({ ...l, size: NATURAL[l.type] ?? 0, arrayLen: l.index === null ? l.arrayLen : null })),
  fc.record({
    t: fc.constant('leaf' as const),
    name: nameArb,
    type: fc.constantFrom(...OPAQUE),
    size: fc.integer({ min: 0, max: 12 }),
    arrayLen: fc.option(fc.integer({ min: 2, max: 3 })),
    index: fc.constant(null),
  }),
);

/** Descriptions nested at most `depth` levels (structs, tmp fields, subsections). */
const descArb = (depth: number): fc.Arbitrary<Desc> =>
  fc.record({
    vmsdName: nameArb.map((n) => `dev${n}`),
    version: fc.integer({ min: 0, max: 2 ** 32 - 1 }),
    fields: fc.array(depth === 0 ? leafArb : fc.oneof({ weight: 3, arbitrary: leafArb }, { weight: 1, arbitrary: nestedArb(depth - 1) }), { maxLength: 5 }),
    subs: depth === 0 ? fc.constant([]) : fc.array(descArb(depth - 1), { maxLength: 2 }),
  });
const nestedArb = (depth: number): fc.Arbitrary<Nested> =>
  fc.record({
    t: fc.constantFrom('struct' as const, 'tmp' as const),
    name: nameArb,
    desc: descArb(depth),
    arrayLen: fc.option(fc.integer({ min: 2, max: 3 })),
  });

/** Produces the JSON QEMU would write and the bytes it would have saved, drawing field bytes from `rnd`. */
function build(desc: Desc, rnd: () => number): { json: Record<string, unknown>; bytes: number[] } {
  const bytes: number[] = [];
  const fields: Record<string, unknown>[] = [];
  for (const f of desc.fields) {
    const n = f.arrayLen ?? 1;
    if (f.t === 'leaf') {
      for (let i = 0; i < n * f.size; i++) bytes.push(f.type === 'nullptr' ? 0x30 : rnd());
      fields.push({ name: f.name, ...(f.arrayLen !== null ? { array_len: f.arrayLen } : {}), ...(f.index !== null ? { index: f.index } : {}), type: f.type, size: f.size });
      continue;
    }
    let inner: Record<string, unknown> = {};
    let size = 0;
    for (let i = 0; i < n; i++) {
      const b = build(f.desc, rnd);
      inner = b.json;
      size = b.bytes.length;
      bytes.push(...b.bytes);
    }
    fields.push(
      f.t === 'struct'
        ? { name: f.name, ...(f.arrayLen !== null ? { array_len: f.arrayLen } : {}), type: 'struct', struct: inner, size }
        : { name: f.name, ...(f.arrayLen !== null ? { array_len: f.arrayLen } : {}), type: 'tmp', ...inner, size },
    );
  }
  const subsections: Record<string, unknown>[] = [];
  for (const s of desc.subs) {
    const b = build(s, rnd);
    bytes.push(0x05, s.vmsdName.length, ...Buffer.from(s.vmsdName, 'latin1'), ...u32(s.version), ...b.bytes);
    subsections.push(b.json);
  }
  const json: Record<string, unknown> = { vmsd_name: desc.vmsdName, version: desc.version, fields };
  if (subsections.length > 0) json.subsections = subsections;
  return { json, bytes };
}

/** Re-serializes a decoded state from its values (not from raw bytes). */
function reencode(state: DecodedVmState, isSubsection: boolean): number[] {
  const out: number[] = [];
  if (isSubsection) out.push(0x05, state.vmsdName!.length, ...Buffer.from(state.vmsdName!, 'latin1'), ...u32(state.version!));
  for (const f of state.fields) {
    const values = Array.isArray(f.value) ? (f.value as readonly VmStateValue[]) : [f.value as VmStateValue];
    for (const v of values) {
      switch (v.kind) {
        case 'int': {
          const b = Buffer.alloc(v.size);
          b.writeUIntBE(v.value < 0 ? v.value + 2 ** (8 * v.size) : v.value, 0, v.size);
          out.push(...b);
          break;
        }
        case 'int64': {
          const b = Buffer.alloc(8);
          b.writeBigUInt64BE(BigInt.asUintN(64, v.value));
          out.push(...b);
          break;
        }
        case 'bool':
          out.push(v.value ? 1 : 0);
          break;
        case 'bytes':
          out.push(...v.value);
          break;
        case 'nullptr':
          out.push(0x30);
          break;
        case 'string':
          out.push(v.value.length, ...Buffer.from(v.value, 'latin1'));
          break;
        case 'struct':
          out.push(...reencode(v.value, false));
          break;
      }
    }
  }
  for (const s of state.subsections) out.push(...reencode(s, true));
  return out;
}

const seeded = (seed: number): (() => number) => {
  let x = seed | 1;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return x & 0xff;
  };
};

const deviceArb = fc.record({ desc: descArb(3), seed: fc.integer(), instance: fc.integer({ min: 0, max: 2 ** 32 - 1 }) }).map(({ desc, seed, instance }) => {
  const { json, bytes } = build(desc, seeded(seed));
  const text = JSON.stringify({ page_size: 4096, devices: [{ name: 'dev', instance_id: instance, ...json }] });
  return { text, payload: Uint8Array.from(bytes) };
});

describe('properties', () => {
  it('random valid descriptions: decode succeeds, consumes exactly deviceSectionSize bytes, values re-encode to the payload', () => {
    fc.assert(
      fc.property(deviceArb, ({ text, payload }) => {
        const desc = parseVmDescription(text);
        const device = desc.devices[0]!;
        expect(deviceSectionSize(device)).toBe(payload.length);
        expect(vmdescSectionSizes(desc)).toEqual([{ name: 'dev', instanceId: device.instanceId, size: payload.length }]);
        const decoded = decodeDeviceState(device, payload);
        expect(decoded.length).toBe(payload.length);
        // Fields tile the payload up to the subsections.
        let pos = 0;
        for (const f of decoded.fields) {
          expect(f.offset).toBe(pos);
          pos += f.length;
        }
        for (const s of decoded.subsections) {
          expect(s.offset).toBe(pos);
          pos += s.length;
        }
        expect(pos).toBe(payload.length);
        const normalized = Uint8Array.from(payload);
        // A bool decodes any non-zero byte as true (as QEMU loads it); re-encoding writes 1.
        for (const f of boolOffsets(decoded)) normalized[f] = normalized[f] ? 1 : 0;
        expect(Uint8Array.from(reencode(decoded, false))).toEqual(normalized);
        // Both JSON styles are plain JSON (no bigint, no Uint8Array).
        for (const style of ['plain', 'analyze-migration'] as const) {
          const j = deviceStateToJson(decoded, { style });
          expect(JSON.parse(JSON.stringify(j))).toEqual(j);
        }
      }),
      { numRuns: 300 },
    );
  });

  it('random valid descriptions: every truncation and any extension is device-size-mismatch', () => {
    fc.assert(
      fc.property(deviceArb, fc.nat(), fc.integer({ min: 1, max: 8 }), ({ text, payload }, cut, extra) => {
        const device = parseVmDescription(text).devices[0]!;
        if (payload.length > 0) {
          const k = cut % payload.length;
          const e = expectStreamError(() => decodeDeviceState(device, payload.subarray(0, k), { baseOffset: 3 }), 'device-size-mismatch');
          expect(e.offset).toBeGreaterThanOrEqual(3);
          expect(e.offset).toBeLessThanOrEqual(3 + k);
        }
        const longer = new Uint8Array(payload.length + extra);
        longer.set(payload);
        expectStreamError(() => decodeDeviceState(device, longer, { baseOffset: 3 }), 'device-size-mismatch', 3 + payload.length);
      }),
      { numRuns: 300 },
    );
  });

  it('random bytes against a real description: a result or a StreamError, nothing else', () => {
    const devices = allCaptures.flatMap((c) => c.sections.map((s) => s.device)).filter((d) => deviceSectionSize(d) < 5000);
    fc.assert(
      fc.property(fc.constantFrom(...devices), fc.integer(), fc.integer({ min: -3, max: 3 }), (device, seed, delta) => {
        const rnd = seeded(seed);
        const payload = Uint8Array.from({ length: Math.max(0, deviceSectionSize(device) + delta) }, rnd);
        try {
          decodeDeviceState(device, payload);
        } catch (e) {
          expect(e).toBeInstanceOf(StreamError);
          expect(['bad-vmdesc', 'device-size-mismatch']).toContain((e as StreamError).code);
        }
      }),
      { numRuns: 500 },
    );
  });

  it('random JSON and mangled real descriptions: a description or bad-vmdesc, nothing else', () => {
    const real = JSON.parse(new TextDecoder().decode(findTrailingVmDescription(captures.q35.stream)!.json)) as unknown;
    const mangle = (v: unknown, path: number[], replacement: unknown): unknown => {
      if (path.length === 0 || v === null || typeof v !== 'object') return replacement;
      const entries = Array.isArray(v) ? v.map((x, i) => [String(i), x] as const) : Object.entries(v);
      if (entries.length === 0) return replacement;
      const [head, ...rest] = path;
      const pick = (head ?? 0) % entries.length;
      const out: Record<string, unknown> | unknown[] = Array.isArray(v) ? [...v] : { ...v };
      const [k, child] = entries[pick]!;
      (out as Record<string, unknown>)[k] = mangle(child, rest, replacement);
      return out;
    };
    fc.assert(
      fc.property(fc.oneof(fc.jsonValue(), fc.tuple(fc.array(fc.nat(), { maxLength: 8 }), fc.jsonValue()).map(([path, r]) => mangle(real, path, r))), (value) => {
        try {
          const d = parseVmDescription(JSON.stringify(value) ?? 'undefined');
          vmdescSectionSizes(d);
        } catch (e) {
          expect(e).toBeInstanceOf(StreamError);
          expect((e as StreamError).code).toBe('bad-vmdesc');
        }
      }),
      { numRuns: 500 },
    );
  });
});

/** Payload offsets of every bool element (nested states carry payload-absolute offsets). */
function boolOffsets(state: DecodedVmState): number[] {
  const out: number[] = [];
  const walk = (s: DecodedVmState): void => {
    for (const f of s.fields) {
      const values = Array.isArray(f.value) ? (f.value as readonly VmStateValue[]) : [f.value as VmStateValue];
      const each = values.length > 0 ? f.length / values.length : 0;
      values.forEach((v, i) => {
        if (v.kind === 'bool') out.push(f.offset + i * each);
        if (v.kind === 'struct') walk(v.value);
      });
    }
    for (const sub of s.subsections) walk(sub);
  };
  walk(state);
  return out;
}
