/**
 * Admission (src/transport/admission.ts), the qualification MigrationListener
 * and the tap share: a connection that qualifies after its role was taken is
 * dropped with a stranger report (reason 'extra'), never silently.
 */
import { once } from 'node:events';
import net from 'node:net';
import { describe, expect, it } from 'vitest';
import { Admission } from '../../src/transport/admission.js';
import { parseEndpoint } from '../../src/transport/endpoint.js';
import type { StrangerEvent } from '../../src/transport/qualify.js';
import { listen } from '../../src/transport/sockets.js';

describe('Admission', () => {
  it('a connection that qualifies when its role is already taken is dropped and reported as extra', async () => {
    const l = await listen(parseEndpoint('tcp:127.0.0.1:0'));
    const strangers: StrangerEvent[] = [];
    let roleFree = true;
    const taken: net.Socket[] = [];
    const admission = new Admission(
      {
        offer: () => 'main',
        // Qualifies by its first byte, so that the role can go to another connection while it waits.
        judge: () => (seen) => (seen.length === 0 ? { verdict: 'more' } : { verdict: 'yes' }),
        take: (_role, s) => {
          if (!roleFree) return false;
          roleFree = false;
          taken.push(s);
          return true;
        },
      },
      { maxPending: 4, qualifyMs: 10_000, stranger: (ev) => strangers.push(ev) },
    );
    admission.wire(l.server, false);
    const port = (l.endpoint as { port: number }).port;
    try {
      const first = net.connect(port, '127.0.0.1');
      const second = net.connect(port, '127.0.0.1');
      for (const s of [first, second]) s.on('error', () => undefined);
      await Promise.all([once(first, 'connect'), once(second, 'connect')]);
      const until = async (ok: () => boolean): Promise<void> => {
        const deadline = Date.now() + 10_000;
        while (!ok()) {
          if (Date.now() > deadline) throw new Error(`timed out; strangers ${JSON.stringify(strangers)}`);
          await new Promise((r) => setTimeout(r, 10));
        }
      };
      await until(() => admission.size === 2);
      first.write('a');
      await until(() => taken.length === 1);
      const secondClosed = once(second, 'close');
      second.write('b');
      await until(() => strangers.length === 1);
      expect(strangers[0]).toMatchObject({ reason: 'extra', error: { code: 'channel-order', channel: 'main' } });
      expect(strangers[0]!.remote).toMatch(/^127\.0\.0\.1:\d+$/);
      await secondClosed;
      expect(admission.size).toBe(0);
      first.destroy();
      second.destroy();
    } finally {
      for (const s of taken) s.destroy();
      admission.close();
      await l.close();
    }
  });
});
