/**
 * The README as a user reads it: every option of every command is in its
 * synopsis (and nothing else is), every TypeScript example compiles against
 * the package's types as `import … from 'qemu-migration-transport'`, and the
 * shell examples that need no QEMU run as written; those that need QEMU use
 * only options that exist.
 */
import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import type { Command } from 'commander';
import ts from 'typescript';
import { afterAll, describe, expect, it } from 'vitest';
import { buildProgram } from '../../src/cli/program.js';

const ROOT = join(import.meta.dirname, '..', '..');
const README = readFileSync(join(ROOT, 'README.md'), 'utf8');
const work = mkdtempSync(join(tmpdir(), 'qmt-readme-'));
afterAll(() => rmSync(work, { recursive: true, force: true }));

interface Fence {
  lang: string;
  body: string;
  line: number;
}

function fences(md: string): Fence[] {
  const out: Fence[] = [];
  const re = /^```(\w*)\n([\s\S]*?)^```$/gm;
  for (let m = re.exec(md); m; m = re.exec(md)) out.push({ lang: m[1]!, body: m[2]!, line: md.slice(0, m.index).split('\n').length });
  return out;
}

/** Every runnable command: 'inspect', 'pki init', ... */
function leafCommands(program: Command): Map<string, Command> {
  const out = new Map<string, Command>();
  const walk = (c: Command, prefix: string): void => {
    for (const sub of c.commands) {
      const name = `${prefix}${sub.name()}`;
      if (sub.commands.length > 0) walk(sub, `${name} `);
      else out.set(name, sub);
    }
  };
  walk(program, '');
  return out;
}

const commands = leafCommands(buildProgram());

/** The command a `qmt …` line runs: the longest registered name its words start with. */
function commandOf(line: string): string | undefined {
  const words = line.trim().replace(/^qmt\s+/, '').split(/\s+/);
  for (let n = 2; n >= 1; n--) {
    const name = words.slice(0, n).join(' ');
    if (commands.has(name)) return name;
  }
  return undefined;
}

function flagsIn(text: string): string[] {
  return [...new Set(text.match(/(?<![\w-])--[a-z][a-z0-9-]*/g) ?? [])].sort();
}

function registeredFlags(cmd: Command): string[] {
  return cmd.options.map((o) => o.long!).filter((f) => f !== '--help').sort();
}

describe('README: the CLI synopses', () => {
  const synopses = new Map<string, string>();
  for (const f of fences(README)) {
    if (f.lang !== '' || !f.body.startsWith('qmt ')) continue;
    const name = commandOf(f.body.split('\n')[0]!);
    if (name) synopses.set(name, f.body);
  }

  it('has a synopsis for every command', () => {
    expect([...synopses.keys()].sort()).toEqual([...commands.keys()].sort());
  });

  it.each([...commands.keys()])('qmt %s: the synopsis lists exactly the options commander registers', (name) => {
    expect(flagsIn(synopses.get(name) ?? '')).toEqual(registeredFlags(commands.get(name)!));
  });
});

/** Names the README's examples use without defining them (they stand for the user's own code). */
const PRELUDE = `
declare const bytes: Uint8Array;
declare const page: Uint8Array;
declare function captureDeviceState(): import('qemu-migration-transport').DeviceStateSection[];
declare const myVm: { pause(): void };
declare function log(...what: unknown[]): void;
declare const socket: import('node:net').Socket;
declare const guest: { write(block: string, offset: number, data: Uint8Array): void; zero(block: string, offset: number): void };
declare const listen: string;
declare const sink: import('qemu-migration-transport').GuestMemorySink;
declare const sourceOptions: import('qemu-migration-transport').SourceOptions;
`;

describe('README: the TypeScript examples', () => {
  it('every ```ts block typechecks against the package (strict)', () => {
    const blocks = fences(README).filter((f) => f.lang === 'ts');
    expect(blocks.length).toBeGreaterThanOrEqual(4);
    const dir = join(work, 'ts');
    rmSync(dir, { recursive: true, force: true });
    const files = [join(dir, 'prelude.d.ts')];
    mkdirSync(dir, { recursive: true });
    writeFileSync(files[0]!, PRELUDE);
    const where = new Map<string, number>();
    blocks.forEach((b, i) => {
      const file = join(dir, `example-${i + 1}.ts`);
      // Each block is a module of its own (top-level await allowed, names local to it).
      writeFileSync(file, `${b.body}\nexport {};\n`);
      files.push(file);
      where.set(file, b.line);
    });
    const program = ts.createProgram(files, {
      target: ts.ScriptTarget.ES2022,
      module: ts.ModuleKind.ESNext,
      moduleResolution: ts.ModuleResolutionKind.Bundler,
      lib: ['lib.es2023.d.ts'],
      types: ['node'],
      typeRoots: [join(ROOT, 'node_modules', '@types')],
      strict: true,
      noEmit: true,
      skipLibCheck: true,
      esModuleInterop: true,
      baseUrl: ROOT,
      paths: { 'qemu-migration-transport': [join(ROOT, 'src', 'index.ts')] },
    });
    const diags = ts.getPreEmitDiagnostics(program).map((d) => {
      const file = d.file?.fileName ?? '';
      const pos = d.file && d.start !== undefined ? d.file.getLineAndCharacterOfPosition(d.start) : undefined;
      const readmeLine = where.get(file);
      const at = readmeLine !== undefined && pos ? `README.md:${readmeLine + pos.line + 1}` : `${file}:${pos ? pos.line + 1 : '?'}`;
      return `${at}: ${ts.flattenDiagnosticMessageText(d.messageText, '\n')}`;
    });
    expect(diags).toEqual([]);
  }, 120_000);
});

describe('README: the shell examples', () => {
  const shBlocks = fences(README).filter((f) => f.lang === 'sh' && /^qmt /m.test(f.body));

  it('there are runnable ones and ones that need QEMU', () => {
    expect(shBlocks.filter((b) => !b.body.startsWith('# needs QEMU')).length).toBeGreaterThan(0);
    expect(shBlocks.filter((b) => b.body.startsWith('# needs QEMU')).length).toBeGreaterThan(0);
  });

  it('those that need QEMU use only commands and options that exist', () => {
    for (const b of shBlocks.filter((x) => x.body.startsWith('# needs QEMU'))) {
      for (const line of b.body.split('\n').filter((l) => l.startsWith('qmt '))) {
        const name = commandOf(line);
        expect(name, line).toBeDefined();
        const code = line.replace(/\s#.*$/, '');
        for (const flag of flagsIn(code)) expect(registeredFlags(commands.get(name!)!), `${line}: ${flag}`).toContain(flag);
      }
    }
  });

  it('those that need no QEMU run as written in an empty directory (qmt = this checkout)', async () => {
    const blocks = shBlocks.filter((b) => !b.body.startsWith('# needs QEMU'));
    for (const [i, b] of blocks.entries()) {
      const cwd = join(work, `sh-${i}`);
      mkdirSync(cwd, { recursive: true });
      // tsx by path: the example runs in a directory without node_modules.
      const tsx = pathToFileURL(join(ROOT, 'node_modules', 'tsx', 'dist', 'loader.mjs')).href;
      const script = `set -eo pipefail\nqmt() { node --import ${tsx} ${JSON.stringify(join(ROOT, 'src', 'cli', 'main.ts'))} "$@"; }\n${b.body}`;
      const r = await new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve) => {
        const child = spawn('bash', ['-c', script], { cwd, stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, NODE_OPTIONS: '' } });
        let stdout = '';
        let stderr = '';
        child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
        child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
        child.on('close', (code) => resolve({ code, stdout, stderr }));
      });
      expect(r.code, `README.md:${b.line}\n${r.stderr}`).toBe(0);
      expect(r.stderr).not.toMatch(/^\s+at /m);
      // What the examples say they produce.
      if (b.body.includes('qmt pki init ./pki')) expect(existsSync(join(cwd, 'pki', 'ca-cert.pem'))).toBe(true);
      if (b.body.includes('> demo.json')) {
        const j = JSON.parse(readFileSync(join(cwd, 'demo.json'), 'utf8')) as { version: number; command: string; ok: boolean; memoryIdentical: boolean };
        expect(j).toMatchObject({ version: 1, command: 'demo', ok: true, memoryIdentical: true });
      }
      if (b.body.includes('--size 0')) {
        expect(r.stdout).toContain('exit 2');
        expect(r.stderr).toContain("qmt: usage: option '--size <MiB>' argument '0' is invalid.");
      }
    }
  }, 120_000);
});
