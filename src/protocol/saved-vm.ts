import { mkdir, readFile, rename, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { DestinationResult } from './destination.js';
import { blockFileName } from './directory-sink.js';

/**
 * The saved-VM directory that `qmt receive` writes and `qmt send` restores:
 *
 *   DIR/manifest.json          this format (version 1)
 *   DIR/ram/<block>.bin        one sparse file per RAM block (DirectorySink)
 *   DIR/devices/NNN-<idstr>-<instance>.bin   each device section's payload
 *   DIR/vmdesc.json            the VM description, when the stream had one
 */
export interface SavedVmManifest {
  format: 'qemu-migration-transport/saved-vm';
  version: 1;
  /** False when the migration failed: what arrived is on disk, the rest is not. */
  complete: boolean;
  error?: { code: string; phase: string; message: string };
  machineType: string | null;
  capabilities: string[];
  postcopy: boolean;
  blocks: { idstr: string; length: number; file: string; pageSize?: number }[];
  /** In wire order. */
  devices: {
    sectionId: number;
    idstr: string;
    instanceId: number;
    versionId: number;
    kind: string;
    packaged: boolean;
    size: number;
    file: string;
  }[];
  vmdesc: string | null;
  stats: unknown;
  savedAt: string;
}

export const RAM_DIR = 'ram';
export const DEVICES_DIR = 'devices';
export const MANIFEST = 'manifest.json';

function deviceFileName(index: number, idstr: string, instanceId: number): string {
  return `${String(index).padStart(3, '0')}-${encodeURIComponent(idstr)}-${instanceId}.bin`;
}

/** Writes devices, the VM description and the manifest (RAM is already in DIR/ram via DirectorySink). */
export async function writeSavedVm(dir: string, result: DestinationResult): Promise<SavedVmManifest> {
  await mkdir(join(dir, DEVICES_DIR), { recursive: true });
  const devices: SavedVmManifest['devices'] = [];
  for (const [i, d] of result.devices.entries()) {
    const file = join(DEVICES_DIR, deviceFileName(i, d.idstr, d.instanceId));
    await writeFile(join(dir, file), d.data);
    devices.push({ sectionId: d.sectionId, idstr: d.idstr, instanceId: d.instanceId, versionId: d.versionId, kind: d.kind, packaged: d.packaged, size: d.data.length, file });
  }
  let vmdesc: string | null = null;
  if (result.vmdesc) {
    vmdesc = 'vmdesc.json';
    await writeFile(join(dir, vmdesc), result.vmdesc);
  }
  const manifest: SavedVmManifest = {
    format: 'qemu-migration-transport/saved-vm',
    version: 1,
    complete: result.complete,
    ...(result.error ? { error: { code: result.error.code, phase: result.error.phase, message: result.error.message } } : {}),
    machineType: result.machineType ?? null,
    capabilities: [...(result.configuration?.capabilities ?? [])],
    postcopy: result.postcopy,
    blocks: result.blocks.map((b) => ({ idstr: b.idstr, length: b.length, file: join(RAM_DIR, blockFileName(b.idstr)), ...(b.pageSize ? { pageSize: b.pageSize } : {}) })),
    devices,
    vmdesc,
    stats: result.stats,
    savedAt: new Date().toISOString(),
  };
  // Write-then-rename: a reader never sees half a manifest.
  const tmp = join(dir, `${MANIFEST}.tmp`);
  await writeFile(tmp, `${JSON.stringify(manifest, null, 2)}\n`);
  await rename(tmp, join(dir, MANIFEST));
  return manifest;
}

/** Reads and checks a saved-VM manifest. */
export async function readSavedVmManifest(dir: string): Promise<SavedVmManifest> {
  const m = JSON.parse(await readFile(join(dir, MANIFEST), 'utf8')) as SavedVmManifest;
  if (m.format !== 'qemu-migration-transport/saved-vm' || m.version !== 1) throw new Error(`${dir}: not a saved-VM directory (format ${String(m.format)} v${String(m.version)})`);
  return m;
}
