/**
 * Strangers before the real source, through the public API (issue 11 §3):
 * DestinationSession.listen, then a stranger on its port, then a
 * SourceSession. The stranger is reported as a 'stranger' event with its
 * reason, the migration completes, and the destination's memory equals the
 * source's bit for bit. Also a flood beyond maxPendingConnections.
 */
import { randomFillSync } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import type net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DestinationSession } from '../../src/protocol/destination.js';
import { InMemorySink } from '../../src/protocol/memory.js';
import { InMemorySource } from '../../src/protocol/memory-source.js';
import { SourceSession } from '../../src/protocol/source.js';
import type { TransportOptions } from '../../src/transport/connection.js';
import { initPkiDir } from '../../src/transport/pki.js';
import type { StrangerEvent } from '../../src/transport/qualify.js';
import { playStranger, type StrangerKind } from '../support/strangers.js';

const MiB = 1024 * 1024;
let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'qmt-session-strangers-'));
  await initPkiDir(join(dir, 'good'));
  await initPkiDir(join(dir, 'other'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

/** Half the pages random, half zero. */
function guest(): InMemorySource {
  const src = new InMemorySource([{ idstr: 'pc.ram', length: 4 * MiB }, { idstr: 'pc.bios', length: 256 * 1024 }]);
  for (const ram of src.memory.values()) for (let p = 0; p < ram.length; p += 8192) randomFillSync(ram, p, 4096);
  return src;
}

async function migrateAfter(play: (port: number) => Promise<net.Socket[]>, transport: TransportOptions = {}, postcopy = false) {
  const sink = new InMemorySink();
  const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink, transport, postcopy });
  const strangers: StrangerEvent[] = [];
  dst.on('stranger', (ev) => strangers.push(ev));
  const port = Number(dst.uri.split(':').pop());
  const held = await play(port);
  // Give the destination time to judge (or keep waiting for) the strangers first.
  await new Promise((r) => setTimeout(r, 100));
  const status = dst.stats().status;
  const memory = guest();
  const src = new SourceSession({
    to: dst.uri,
    memory,
    machineType: 'pc-q35-10.0',
    devices: [{ idstr: 'timer', instanceId: 0, versionId: 2, data: Buffer.alloc(24, 5) }],
    ...(postcopy ? { postcopy: { afterPasses: 1 }, preempt: true } : {}),
    ...(transport.tls ? { transport: { tls: transport.tls } } : {}),
  });
  src.start();
  try {
    const [, result] = await Promise.all([src.done, dst.done]);
    expect(result.complete).toBe(true);
    for (const [id, ram] of memory.memory) expect(sink.blocks.get(id)?.equals(ram), `${id} bit for bit`).toBe(true);
    return { strangers, statusBefore: status };
  } finally {
    for (const s of held) s.destroy();
    dst.close();
  }
}

describe('a stranger before the source does not end the migration', () => {
  const cases: [StrangerKind, boolean, string][] = [
    ['connect-close', false, 'closed/closed'],
    ['http', false, 'not-migration/not-a-migration-channel'],
    ['silent', false, 'extra/channel-order'],
    ['connect-close', true, 'tls/tls-not-tls|closed/closed'],
    ['http', true, 'tls/tls-not-tls'],
    ['tls-foreign-ca', true, 'tls/tls-unknown-ca'],
    ['silent', true, 'extra/channel-order'],
  ];
  it.each(cases)('%s (TLS: %s): reported as %s, the migration completes, memory identical', async (kind, useTls, want) => {
    const transport: TransportOptions = useTls ? { tls: { dir: join(dir, 'good') } } : {};
    const r = await migrateAfter(async (port) => {
      const s = await playStranger(kind, port, join(dir, 'other'));
      return s ? [s] : [];
    }, transport);
    expect(r.statusBefore, 'still waiting after the stranger').toBe('setup');
    expect(r.strangers.map((e) => `${e.reason}/${e.error.code}`)).toHaveLength(1);
    expect(want.split('|')).toContain(`${r.strangers[0]!.reason}/${r.strangers[0]!.error.code}`);
  });

  it('a flood of 100 connect-and-close and 40 silent connections beyond maxPendingConnections (16), then postcopy with preempt: completes, memory identical', async () => {
    const r = await migrateAfter(async (port) => {
      const held: net.Socket[] = [];
      await Promise.all(Array.from({ length: 100 }, () => playStranger('connect-close', port)));
      for (let i = 0; i < 40; i++) held.push((await playStranger('silent', port))!);
      return held;
    }, {}, true);
    const by = new Map<string, number>();
    for (const e of r.strangers) by.set(e.reason, (by.get(e.reason) ?? 0) + 1);
    console.log(`[strangers session] flood: ${[...by].map(([k, n]) => `${k} ${n}`).join(', ')}`);
    expect(by.get('closed')).toBe(100);
    // 40 silent: 24 made room for newer ones, one more for the source's main connection (the
    // bound was full when it came); the 15 left were dropped when the main channel qualified.
    expect(by.get('too-many')).toBe(25);
    expect(by.get('extra')).toBe(15);
  }, 60_000);
});
