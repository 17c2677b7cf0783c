/**
 * The tap must not leak a socket when it resets a connection whose FIN it has
 * just forwarded.
 *
 * The source sends its last bytes and a FIN, then resets (it closes with
 * bytes unread); the destination answers at the same moment. The tap, in one
 * loop turn, forwards the FIN (ending its socket to the destination: a
 * shutdown is now pending in libuv), fails to write the answer to the source
 * (EPIPE), and passes the failure on as a reset to the destination. libuv
 * refuses a reset while a shutdown is pending (EINVAL) and Node then never
 * closes that handle: the socket stayed open after `tap.close()`, and the
 * destination could go on writing to it. Now the tap closes it (the
 * destination has its FIN already; its next write is refused).
 *
 * Both peers live in a child process, so that this process (the tap's) can
 * hold its event loop until they have done all of that: the tap then sees the
 * FIN, the reset and the answer in the same loop turn, every run.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTap } from '../../src/protocol/tap/index.js';

/** Resources vitest's worker owns and that come and go on their own. */
const IGNORED_RESOURCES = new Set(['MessagePort', 'TTYWrap', 'PipeWrap', 'FSReqCallback', 'FSReqPromise', 'ProcessWrap', 'SignalWrap', 'StatWatcher', 'FSEventWrap', 'Timeout', 'Immediate']);

/** Sockets and servers of this process, sorted. */
function sockets(): string[] {
  return process
    .getActiveResourcesInfo()
    .filter((r) => !IGNORED_RESOURCES.has(r))
    .sort();
}

/**
 * The child: a destination server and a source client. Commands on stdin:
 * `connect PORT` (the source connects to the tap, sends QEVM, and the
 * destination sends a first answer the source leaves unread); `go MARKER`
 * (FIN from the source, then its reset, then a second answer from the
 * destination; then MARKER is created); `late` (the destination writes
 * twice more). It prints `port N`, `connected`, and `dst-closed` when its
 * connection from the tap has closed.
 */
const PEERS = `
const net = require('node:net');
const fs = require('node:fs');
const say = (s) => process.stdout.write(s + '\\n');
let dst;
const server = net.createServer({ allowHalfOpen: true }, (s) => {
  dst = s;
  s.on('error', () => {});
  s.on('close', () => say('dst-closed'));
  s.resume();
});
server.listen(0, '127.0.0.1', () => say('port ' + server.address().port));
let src;
process.stdin.setEncoding('utf8');
process.stdin.on('data', (text) => {
  for (const line of text.split('\\n').filter(Boolean)) {
    const [cmd, arg] = line.split(' ');
    if (cmd === 'connect') {
      src = net.connect({ host: '127.0.0.1', port: Number(arg), allowHalfOpen: true });
      src.on('error', () => {});
      src.on('connect', () => {
        src.pause();
        src.write('QEVM');
        const wait = setInterval(() => {
          if (!dst) return;
          clearInterval(wait);
          dst.write('unread', () => say('connected'));
        }, 5);
      });
    } else if (cmd === 'go') {
      src.end(() =>
        setTimeout(() => {
          src.destroy(); // bytes unread: RST
          setTimeout(() => dst.write(Buffer.alloc(100), () => fs.writeFileSync(arg, 'done')), 20);
        }, 20),
      );
    } else if (cmd === 'late') {
      // The first write is answered by a RST, the next one fails on it.
      dst.write('late', () => setTimeout(() => dst.write('later'), 50));
    }
  }
});
`;

let work: string;
const children = new Set<ChildProcess>();
beforeAll(async () => {
  work = await mkdtemp(join(tmpdir(), 'qmt-tap-reset-'));
});
afterAll(async () => {
  for (const c of children) c.kill('SIGKILL');
  await rm(work, { recursive: true, force: true });
});

function startPeers(): { child: ChildProcess; send(line: string): void; line(re: RegExp, timeoutMs?: number): Promise<string>; lines: string[] } {
  const child = spawn(process.execPath, ['-e', PEERS], { stdio: ['pipe', 'pipe', 'inherit'] });
  children.add(child);
  child.once('exit', () => children.delete(child));
  const lines: string[] = [];
  const waiters = new Set<() => void>();
  child.stdout!.setEncoding('utf8').on('data', (s: string) => {
    lines.push(...s.split('\n').filter(Boolean));
    for (const w of waiters) w();
  });
  const line = (re: RegExp, timeoutMs = 20_000): Promise<string> =>
    new Promise((resolve, reject) => {
      const check = (): void => {
        const l = lines.find((x) => re.test(x));
        if (l === undefined) return;
        waiters.delete(check);
        clearTimeout(timer);
        resolve(l);
      };
      const timer = setTimeout(() => {
        waiters.delete(check);
        reject(new Error(`the peers never printed ${re}; they printed: ${lines.join(' | ')}`));
      }, timeoutMs);
      waiters.add(check);
      check();
    });
  return { child, send: (l) => child.stdin!.write(`${l}\n`), line, lines };
}

/** Blocks this thread (and so the tap) until `path` exists. */
function holdLoopUntil(path: string, limitMs: number): void {
  const cell = new Int32Array(new SharedArrayBuffer(4));
  const until = Date.now() + limitMs;
  while (!existsSync(path)) {
    if (Date.now() > until) throw new Error(`the peers did not finish their steps within ${limitMs} ms`);
    Atomics.wait(cell, 0, 0, 5);
  }
}

describe('tap: a reset right after a forwarded FIN', () => {
  it('closes the connection to the destination (no refused reset), and no socket is left open', async () => {
    const before = sockets();
    const peers = startPeers();
    const port = Number((await peers.line(/^port \d+$/)).split(' ')[1]);
    const tap = await startTap({ listen: 'tcp:127.0.0.1:0', to: `tcp:127.0.0.1:${port}` });
    const errors: string[] = [];
    tap.on('error', (e) => errors.push(`${e.code}: ${e.message}`));
    try {
      peers.send(`connect ${/:(\d+)$/.exec(tap.uri)![1]}`);
      await peers.line(/^connected$/);
      // QEVM and the first answer have gone through the tap: in the loop turn below, the first
      // read of the source's socket is its FIN (libuv reads once more only in a later turn).
      const through = (): boolean => (tap.report()?.main.bytes ?? 0) >= 4 && (tap.report()?.returnPath.bytes ?? 0) >= 'unread'.length;
      while (!through()) await new Promise((r) => setTimeout(r, 5));
      // A quiet loop turn: epoll (level-triggered) keeps the last socket it reported on its ready
      // list until the next wait; that socket would then be reported first below, before the FIN.
      await new Promise((r) => setTimeout(r, 20));
      const marker = join(work, 'done');
      peers.send(`go ${marker}`);
      // FIN, RST and the destination's bytes wait in the kernel; the tap sees them in one loop turn.
      holdLoopUntil(marker, 20_000);
      const report = await tap.sessionEnd(1);
      expect(errors.filter((e) => /EINVAL/.test(e)), 'a reset refused by libuv').toEqual([]);
      expect(report.transportErrors.map((e) => `${e.side} ${e.channel} ${e.code}`)).toEqual(['source main reset']);
      expect(report.main.bytes).toBe(4);
      // The tap's socket is closed: the destination's next write is refused and its connection ends.
      peers.send('late');
      await peers.line(/^dst-closed$/, 10_000);
    } finally {
      await tap.close();
      peers.child.kill();
    }
    // Sockets close a loop turn or two after destroy().
    for (let i = 0; i < 100 && sockets().length > before.length; i++) await new Promise((r) => setTimeout(r, 20));
    expect(sockets(), 'sockets left open').toEqual(before);
  });
});
