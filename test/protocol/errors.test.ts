/**
 * One error shape (issue 11 §6): every error of the library is a QmtError
 * with a stable `code`; a session's error carries the specific code of what
 * failed (not a generic 'transport' with the real code causes down), its
 * `kind`, phase and offset; class names survive the build; and an error made
 * by the CJS build is recognised by the ESM build (brand, code), where
 * `instanceof` cannot work.
 */
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import net from 'node:net';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { describe, expect, it } from 'vitest';
import { DestinationSession, InMemorySink, InMemorySource, MigrationError, QmtError, SourceSession, StreamDecoder, StreamError, TransportError, isNetworkFailure } from '../../src/index.js';
import { rejection } from '../support/rejection.js';

const PAGE = 4096;

function source(to: string, extra: Partial<ConstructorParameters<typeof SourceSession>[0]> = {}) {
  return new SourceSession({ to, memory: new InMemorySource([{ idstr: 'pc.ram', length: 16 * PAGE }]), machineType: 'pc-q35-10.0', devices: [], ...extra });
}

/** What a decoder refuses 'not a stream' with (thrown, or kept in `error`). */
function decodeError(dec: StreamDecoder): StreamError {
  try {
    dec.push(Buffer.from('not a stream'));
  } catch (e) {
    return e as StreamError;
  }
  return dec.error!;
}

/** A port nobody listens on: bound, then closed. */
async function deadPort(): Promise<number> {
  const s = net.createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', r));
  const port = (s.address() as net.AddressInfo).port;
  await new Promise((r) => s.close(r));
  return port;
}

describe('a session error carries the specific code', () => {
  it('connect-failed: a source to a port nobody listens on', async () => {
    const e = await rejection(source(`tcp:127.0.0.1:${await deadPort()}`).start().done);
    expect(e).toMatchObject({ code: 'connect-failed', kind: 'network', phase: 'setup', name: 'MigrationError', family: 'migration' });
    expect(e.cause).toBeInstanceOf(TransportError);
    expect((e.cause as TransportError).code).toBe('connect-failed');
    expect(e.message).not.toMatch(/^connect-failed/); // the CLI prints `code: message`: no code twice
    expect(e.describe()).toMatch(/^connect-failed: \(main channel\) connect ECONNREFUSED/);
    expect(isNetworkFailure(e)).toBe(true);
  });

  it('address-in-use: DestinationSession.listen on a port already taken', async () => {
    const taken = net.createServer();
    await new Promise<void>((r) => taken.listen(0, '127.0.0.1', r));
    const port = (taken.address() as net.AddressInfo).port;
    try {
      const e = await DestinationSession.listen({ listen: `tcp:127.0.0.1:${port}`, sink: new InMemorySink() }).then(
        () => new Error('listened'),
        (err: unknown) => err,
      );
      expect(QmtError.is(e)).toBe(true);
      expect(e).toMatchObject({ code: 'address-in-use' });
      expect((e as Error & { cause?: { code?: string } }).cause?.code).toBe('EADDRINUSE');
    } finally {
      await new Promise((r) => taken.close(r));
    }
  });

  it('a stream code with its offset: a migration stream that goes bad after its header', async () => {
    const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink: new InMemorySink() });
    const s = net.connect(Number(dst.uri.split(':').at(-1)), '127.0.0.1');
    s.on('error', () => undefined);
    // QEVM, version 3 (so the connection qualifies as the main channel), then a record type that does not exist.
    s.write(Buffer.from([0x51, 0x45, 0x56, 0x4d, 0, 0, 0, 3, 0xee, 0, 0, 0, 0]));
    const e = await rejection(dst.done);
    s.destroy();
    expect(e.cause).toBeInstanceOf(StreamError);
    const cause = e.cause as StreamError;
    expect(e).toMatchObject({ code: cause.code, kind: 'stream', offset: 8, phase: 'setup' });
    expect(cause.offset).toBe(8);
    expect(e.code).not.toBe('stream');
    expect(isNetworkFailure(e)).toBe(false);
  });

  it('idle-timeout and peer-disconnected are network failures; protocol ones are not', () => {
    expect(new MigrationError('idle-timeout', 'precopy', 'quiet').kind).toBe('network');
    expect(new MigrationError('peer-disconnected', 'postcopy', 'gone').kind).toBe('network');
    expect(isNetworkFailure(new MigrationError('protocol', 'postcopy', 'bad order'))).toBe(false);
    expect(new MigrationError('cancelled', 'setup', 'x').kind).toBe('cancelled');
    expect(MigrationError.from(new TransportError('reset', 'ECONNRESET'), 'postcopy')).toMatchObject({ code: 'reset', kind: 'network' });
    const reset = MigrationError.from(new TransportError('reset', 'ECONNRESET'), 'postcopy');
    expect(new MigrationError('reset', 'postcopy', 'recovery gave up', { cause: reset }), 'a restatement keeps the kind').toMatchObject({ code: 'reset', kind: 'network' });
    expect(MigrationError.from(Object.assign(new Error('no space'), { code: 'ENOSPC' }), 'precopy')).toMatchObject({ code: 'storage', kind: 'storage' });
  });

  it('every class is a QmtError with the brand; is() tells the families apart', () => {
    const se = decodeError(new StreamDecoder());
    const te = new TransportError('reset', 'x');
    const me = MigrationError.from(se, 'setup');
    for (const e of [se, te, me]) {
      expect(e).toBeInstanceOf(QmtError);
      expect(QmtError.is(e)).toBe(true);
    }
    expect(StreamError.is(se)).toBe(true);
    expect(StreamError.is(te)).toBe(false);
    expect(TransportError.is(te)).toBe(true);
    expect(MigrationError.is(me)).toBe(true);
    expect(MigrationError.is(se)).toBe(false);
    expect(QmtError.is(new Error('plain'))).toBe(false);
    expect(QmtError.is({ code: 'reset' })).toBe(false);
    expect(QmtError.is(null)).toBe(false);
  });
});

describe('across the ESM and CJS builds', () => {
  const root = join(import.meta.dirname, '..', '..');
  const esmPath = join(root, 'dist', 'index.js');
  const cjsPath = join(root, 'dist', 'index.cjs');

  it('dist/index.js and dist/index.cjs: class names kept, an error of one recognised by the other by brand and code', async () => {
    expect(existsSync(esmPath) && existsSync(cjsPath), 'npm run build first').toBe(true);
    type Lib = typeof import('../../src/index.js');
    const esm = (await import(pathToFileURL(esmPath).href)) as Lib;
    const cjs = createRequire(import.meta.url)(cjsPath) as Lib;
    expect(esm.MigrationError).not.toBe(cjs.MigrationError); // two builds, two class objects

    for (const lib of [esm, cjs]) {
      expect([lib.QmtError.name, lib.StreamError.name, lib.TransportError.name, lib.MigrationError.name]).toEqual(['QmtError', 'StreamError', 'TransportError', 'MigrationError']);
    }

    // A real failure made by the CJS build, judged by the ESM build.
    const s = new cjs.SourceSession({ to: `tcp:127.0.0.1:${await deadPort()}`, memory: new cjs.InMemorySource([{ idstr: 'pc.ram', length: 4 * PAGE }]), machineType: 'pc-q35-10.0', devices: [] });
    const e = await s.start().done.then(
      () => undefined,
      (err: unknown) => err,
    );
    expect(e instanceof esm.MigrationError, 'instanceof cannot work across builds').toBe(false);
    expect(esm.QmtError.is(e)).toBe(true);
    expect(esm.MigrationError.is(e)).toBe(true);
    expect(esm.TransportError.is(e)).toBe(false);
    expect(esm.TransportError.is((e as { cause?: unknown }).cause)).toBe(true);
    expect(e).toMatchObject({ code: 'connect-failed', kind: 'network', name: 'MigrationError' });
    expect(esm.isNetworkFailure(e)).toBe(true);

    // And the other way round: a StreamError of the ESM build, judged by the CJS build.
    const se = decodeError(new esm.StreamDecoder());
    expect(cjs.StreamError.is(se)).toBe(true);
    expect(cjs.QmtError.is(se)).toBe(true);
    expect(se).toMatchObject({ code: 'bad-magic', offset: 0, name: 'StreamError' });
  });
});
