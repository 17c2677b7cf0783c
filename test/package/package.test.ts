/**
 * The package as a user gets it: `npm pack` of a copy of the repository (its
 * `prepare` script builds dist/), the tarball installed into an empty project
 * with `npm install`, then used from there — the `qmt` bin, `import` and
 * `require`, and a migration in an install without the optional `sockopt`
 * addon (`--omit=optional`: what npm leaves when the addon cannot be built).
 */
import { execFile, type ExecFileException } from 'node:child_process';
import { cpSync, existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, realpathSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';

const ROOT = join(import.meta.dirname, '..', '..');
/** What `npm pack` (and its prepare build) reads; a new build input belongs here and in package.json's files. */
const BUILD_INPUTS = ['package.json', 'tsup.config.ts', 'tsconfig.json', 'README.md', 'LICENSE', 'src', 'openssl'];

const work = mkdtempSync(join(tmpdir(), 'qmt-package-'));
const repo = join(work, 'repo');
const app = join(work, 'app');
const installed = join(app, 'node_modules', 'qemu-migration-transport');
afterAll(() => rmSync(work, { recursive: true, force: true }));

/** The environment of a user's shell: none of the npm_* variables of the `npm test` that may be running us. */
const userEnv = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.toLowerCase().startsWith('npm_')));

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}
function run(cmd: string, args: readonly string[], cwd: string, timeoutMs = 110_000): Promise<Run> {
  return new Promise((resolve) => {
    execFile(cmd, args, { cwd, env: userEnv, timeout: timeoutMs, maxBuffer: 16 << 20 }, (err: ExecFileException | null, stdout, stderr) => {
      resolve({ code: err ? (typeof err.code === 'number' ? err.code : 1) : 0, stdout, stderr });
    });
  });
}
const node = (args: readonly string[], cwd = app) => run(process.execPath, args, cwd);
const ok = (r: Run, what: string) => expect(r.code, `${what} failed:\n${r.stderr}\n${r.stdout}`).toBe(0);

describe('the packed package', () => {
  let tarball = '';

  it('npm pack builds through prepare and ships dist (ESM, CJS, types, the CLI), openssl/ and LICENSE, no sources', async () => {
    mkdirSync(repo);
    for (const f of BUILD_INPUTS) cpSync(join(ROOT, f), join(repo, f), { recursive: true });
    symlinkSync(realpathSync(join(ROOT, 'node_modules')), join(repo, 'node_modules'), 'dir');
    ok(await run('npm', ['pack', '--pack-destination', work, '--loglevel=error'], repo), 'npm pack');
    const tgz = readdirSync(work).filter((f) => f.endsWith('.tgz'));
    expect(tgz).toHaveLength(1);
    tarball = join(work, tgz[0]!);
    const list = await run('tar', ['-tzf', tarball], work);
    ok(list, 'tar -t');
    const files = list.stdout.split('\n').filter(Boolean).map((f) => f.replace(/^package\//, ''));
    for (const f of ['dist/index.js', 'dist/index.cjs', 'dist/index.d.ts', 'dist/index.d.cts', 'dist/cli/main.js', 'openssl/no-tls13-tickets.cnf', 'LICENSE', 'README.md', 'package.json']) {
      expect(files).toContain(f);
    }
    expect(files.filter((f) => f.startsWith('src/') || f.startsWith('test/') || (f.endsWith('.ts') && !f.endsWith('.d.ts') && !f.endsWith('.d.cts')))).toEqual([]);
  }, 120_000);

  it('installs into an empty project without the optional sockopt', async () => {
    expect(tarball).not.toBe('');
    mkdirSync(app);
    writeFileSync(join(app, 'package.json'), JSON.stringify({ name: 'qmt-user', version: '1.0.0', private: true }));
    ok(await run('npm', ['install', tarball, '--omit=optional', '--prefer-offline', '--no-audit', '--no-fund', '--loglevel=error'], app), 'npm install');
    expect(existsSync(join(installed, 'dist', 'index.js'))).toBe(true);
    // A real absence: nothing named sockopt anywhere Node would look from the package.
    const probe = await node(['-e', 'require.resolve("sockopt")'], installed);
    expect(probe.code).not.toBe(0);
    expect(probe.stderr).toMatch(/Cannot find module 'sockopt'/);
  }, 120_000);

  it('the installed qmt bin runs: --help lists the commands', async () => {
    const r = await run(join(app, 'node_modules', '.bin', 'qmt'), ['--help'], app);
    ok(r, 'qmt --help');
    for (const cmd of ['demo', 'inspect', 'recode', 'pki', 'receive', 'send', 'tap']) expect(r.stdout).toMatch(new RegExp(`^\\s+${cmd}\\b`, 'm'));
  });

  it('import and require give the same API; OPENSSL_NO_TICKETS_CONF is the shipped file; node-forge loads only for generatePki', async () => {
    const report = `
      const loaded = () => Object.keys(require.cache).filter((k) => /node_modules[\\\\/](node-forge|hdr-histogram-js)[\\\\/]/.test(k)).map((k) => k.match(/node_modules[\\\\/]([^\\\\/]+)/)[1]);
      const before = [...new Set(loaded())];
      const pki = await q.generatePki({ hostnames: ['localhost'] });
      console.log(JSON.stringify({ keys: Object.keys(q).sort(), conf: q.OPENSSL_NO_TICKETS_CONF, before, pki: pki.serverCert.startsWith('-----BEGIN CERTIFICATE-----') }));`;
    const esm = await node(['--input-type=module', '-e', `import * as q from 'qemu-migration-transport'; import { createRequire } from 'node:module'; const require = createRequire(import.meta.url); ${report}`]);
    const cjs = await node(['-e', `const q = require('qemu-migration-transport'); (async () => { ${report} })()`]);
    ok(esm, 'import');
    ok(cjs, 'require');
    const e = JSON.parse(esm.stdout) as { keys: string[]; conf: string; before: string[]; pki: boolean };
    const c = JSON.parse(cjs.stdout) as typeof e;
    expect(e.keys).toEqual(c.keys);
    for (const k of ['DestinationSession', 'SourceSession', 'StreamDecoder', 'generatePki', 'OPENSSL_NO_TICKETS_CONF', 'SOCKOPT_UNAVAILABLE_WARNING']) expect(e.keys).toContain(k);
    const shipped = realpathSync(join(installed, 'openssl', 'no-tls13-tickets.cnf'));
    expect(realpathSync(e.conf)).toBe(shipped);
    expect(realpathSync(c.conf)).toBe(shipped);
    expect(readFileSync(shipped, 'utf8')).toMatch(/^NumTickets = 0$/m);
    // CommonJS's module cache shows what `require` loaded: neither heavy module (ESM's graph is not inspectable this way).
    expect(c.before).toEqual([]);
    expect(e.pki && c.pki).toBe(true);
  }, 60_000);

  it('without sockopt, migrations run with one warning for the whole process', async () => {
    writeFileSync(
      join(app, 'migrate.mjs'),
      `import { randomFillSync } from 'node:crypto';
      import { DestinationSession, InMemorySink, InMemorySource, SourceSession } from 'qemu-migration-transport';
      const results = [];
      for (let i = 0; i < 2; i++) {
        const memory = new InMemorySource([{ idstr: 'pc.ram', length: 4 << 20 }]);
        randomFillSync(memory.memory.get('pc.ram'));
        const sink = new InMemorySink();
        const dst = await DestinationSession.listen({ listen: 'tcp:127.0.0.1:0', sink });
        const src = new SourceSession({ to: dst.uri, memory, machineType: 'pc-q35-10.0', devices: [], postcopy: 'never', stopVm: () => {} });
        src.start();
        await Promise.all([src.done, dst.done]);
        results.push(sink.blocks.get('pc.ram').equals(memory.memory.get('pc.ram')));
      }
      console.log(JSON.stringify(results));`,
    );
    const r = await node(['migrate.mjs']);
    ok(r, 'the migrations');
    expect(JSON.parse(r.stdout)).toEqual([true, true]);
    const warnings = r.stderr.split('\n').filter((l) => l.includes('Warning'));
    expect(warnings).toHaveLength(1);
    expect(warnings[0]).toMatch(/\[QMT_SOCKOPT_UNAVAILABLE\].*sockopt did not load \(Cannot find module 'sockopt'/);
  }, 60_000);

  it('with sockopt, both builds tune sockets (no warning)', async () => {
    // The repository copy's node_modules has the addon; tune one socket through each build.
    const probe = (load: string) => `
      const net = require('node:net');
      ${load}
      process.on('warning', (w) => { console.error('WARNING ' + w.code); process.exitCode = 1; });
      const server = net.createServer((c) => c.end()).listen(0, '127.0.0.1', () => {
        const s = net.connect(server.address().port, '127.0.0.1', () => {
          const t = q.applyTuning(s, q.URGENT_PROFILE, 'tcp');
          console.log(JSON.stringify({ warnings: t.warnings, sndbuf: t.sndbuf, lowat: t.notSentLowat }));
          s.destroy();
          server.close();
        });
      });`;
    const cjs = await node(['-e', probe(`const q = require('./dist/index.cjs');`)], repo);
    const esm = await node(['--input-type=module', '-e', `import { createRequire } from 'node:module'; const require = createRequire(import.meta.url); import * as q from './dist/index.js'; ${probe('')}`], repo);
    for (const [r, what] of [[cjs, 'CJS'], [esm, 'ESM']] as const) {
      ok(r, what);
      const t = JSON.parse(r.stdout) as { warnings: string[]; sndbuf?: number; lowat?: number };
      expect(t.warnings, what).toEqual([]);
      expect(t.sndbuf, what).toBeGreaterThanOrEqual(64 * 1024); // the kernel doubles what was asked
      expect(t.lowat, what).toBe(16 * 1024);
    }
  }, 60_000);
});
