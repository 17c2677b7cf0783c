/**
 * Multifd library ↔ library, and the source's refusals of bad multifd input.
 */
import { describe, expect, it } from 'vitest';
import { InMemorySource } from '../../src/protocol/memory-source.js';
import { SourceSession, type SourceOptions } from '../../src/protocol/source.js';
import { qmt } from '../cli/qmt.js';

const MiB = 1 << 20;

function sourceOpts(extra: Partial<SourceOptions>): SourceOptions {
  return { to: 'tcp:127.0.0.1:1', memory: new InMemorySource([{ idstr: 'pc.ram', length: MiB }]), machineType: 'pc-q35-10.0', devices: [], ...extra };
}

describe('multifd: bad input is refused at the call', () => {
  it.each([0, 256, 1.5, -1, Number.NaN])('channels %s: a RangeError naming multifd.channels', (channels) => {
    let e: unknown;
    try {
      new SourceSession(sourceOpts({ multifd: { channels } }));
    } catch (x) {
      e = x;
    }
    expect(e).toBeInstanceOf(RangeError);
    expect(e).toMatchObject({ code: 'bad-option', option: 'multifd.channels' });
    expect((e as Error).message).toMatch(/from 1 to 255/);
  });

  it('channels of the wrong type, a UUID of 15 bytes, multifd with XBZRLE: TypeErrors naming the option', () => {
    const cases: [Partial<SourceOptions>, string][] = [
      [{ multifd: { channels: '4' as unknown as number } }, 'multifd.channels'],
      [{ multifd: null as unknown as { channels: number } }, 'multifd'],
      [{ multifd: { channels: 2, uuid: new Uint8Array(15) } }, 'multifd.uuid'],
      [{ multifd: { channels: 2 }, xbzrleCacheBytes: MiB }, 'multifd'],
    ];
    for (const [extra, option] of cases) {
      let e: unknown;
      try {
        new SourceSession(sourceOpts(extra));
      } catch (x) {
        e = x;
      }
      expect(e, option).toBeInstanceOf(Error);
      expect(e, option).toMatchObject({ code: 'bad-option', option });
    }
  });

  it('qmt send --multifd 0 and 256: usage errors (exit code 2), nothing sent', async () => {
    for (const n of ['0', '256', 'x']) {
      const r = await qmt(['send', '--from', '/nonexistent', '--to', 'tcp:127.0.0.1:1', '--multifd', n]);
      expect(r.code, r.stderr).toBe(2);
      expect(r.stderr).toMatch(new RegExp(`option '--multifd <n>' argument '${n}' is invalid.*from 1 to 255`));
    }
  }, 60_000);
});
