/**
 * A plain-TCP relay that watches the switchover go by, as a child process
 * (`node --import tsx bench/lib/observer-peer.ts`). Connections are forwarded
 * unchanged in arrival order (the second one only once the first is
 * established upstream, so the destination tells the channels apart as
 * usual); the first connection's source → destination bytes are decoded, and
 * the moment each of these went past is kept: SWITCHOVER_START, the first
 * device-state section, PACKAGED, POSTCOPY_RUN, EOF. Times are
 * CLOCK_MONOTONIC µs (to compare with our sessions) and wall-clock µs (to
 * compare with QMP event timestamps).
 */
import { once } from 'node:events';
import net from 'node:net';
import { performance } from 'node:perf_hooks';
import { StreamDecoder } from '../../src/stream/decoder.js';
import type { StreamRecord } from '../../src/stream/records.js';
import { forward, type ForwardHooks } from '../../src/protocol/tap/forward.js';
import { monoUs, serve } from './child-server.js';

/** `to`: `tcp:HOST:PORT` or `unix:PATH`. */
export type ObserverCommand = { cmd: 'observer-start'; host: string; to: string } | { cmd: 'observer-wait'; timeoutMs: number };

export interface ObservedMoment {
  monoUs: number;
  wallUs: number;
  /** Bytes of the main channel (source → destination) before the chunk that carried it. */
  byte: number;
}

export interface Observed {
  connections: number;
  mainBytes: number;
  switchoverStart?: ObservedMoment;
  firstDevice?: ObservedMoment & { idstr: string };
  packaged?: ObservedMoment;
  postcopyRun?: ObservedMoment;
  eof?: ObservedMoment;
  parseError?: string;
}

const log = (msg: string): void => void process.stderr.write(`[observer] ${msg}\n`);
// performance.now() runs on the monotonic clock: one offset converts it for good.
const MONO_OFFSET_US = monoUs() - performance.now() * 1000;

let server: net.Server | undefined;
const sockets = new Set<net.Socket>();
const seen: Observed = { connections: 0, mainBytes: 0 };
let ended: Promise<void> | undefined;

function mainHooks(): ForwardHooks {
  const dec = new StreamDecoder();
  let broken = false;
  let afterSwitch = false;
  const moment = (t: number, byte: number): ObservedMoment => ({ monoUs: Math.round(MONO_OFFSET_US + t * 1000), wallUs: Math.round((performance.timeOrigin + t) * 1000), byte });
  const onRecord = (r: StreamRecord, t: number, byte: number): void => {
    if (r.type === 'command') {
      if (r.command.cmd === 'switchover-start' && !seen.switchoverStart) {
        seen.switchoverStart = moment(t, byte);
        afterSwitch = true;
      } else if (r.command.cmd === 'packaged' && !seen.packaged) seen.packaged = moment(t, byte);
      else if (r.command.cmd === 'postcopy-run' && !seen.postcopyRun) seen.postcopyRun = moment(t, byte);
    } else if (r.type === 'section' && r.kind === 'full' && r.idstr !== 'ram' && !seen.firstDevice && (afterSwitch || seen.packaged)) {
      seen.firstDevice = { ...moment(t, byte), idstr: r.idstr };
    } else if (r.type === 'eof' && !seen.eof) seen.eof = moment(t, byte);
  };
  return {
    chunk(chunk, arrivedAt) {
      const before = seen.mainBytes;
      seen.mainBytes += chunk.length;
      if (broken) return;
      try {
        for (const r of dec.push(chunk)) onRecord(r, arrivedAt, before);
      } catch (e) {
        broken = true;
        seen.parseError = e instanceof Error ? e.message : String(e);
      }
    },
    written() {},
    paused() {},
    queued() {},
  };
}

const quiet: ForwardHooks = { chunk() {}, written() {}, paused() {}, queued() {} };

async function start(c: Extract<ObserverCommand, { cmd: 'observer-start' }>): Promise<{ uri: string }> {
  const m = /^tcp:(.*):(\d+)$/.exec(c.to);
  const path = c.to.startsWith('unix:') ? c.to.slice(5) : undefined;
  if (!m && !path) throw new Error(`observer: bad upstream ${c.to}`);
  const upstream = (): net.Socket => (path ? net.connect({ path, allowHalfOpen: true }) : net.connect({ host: m![1]!, port: Number(m![2]), allowHalfOpen: true }));
  let chain: Promise<void> = Promise.resolve();
  let open = 0;
  let resolveEnded!: () => void;
  ended = new Promise((r) => (resolveEnded = r));
  const s = net.createServer({ allowHalfOpen: true, pauseOnConnect: true }, (src) => {
    const index = seen.connections++;
    open++;
    sockets.add(src);
    // Upstream connections in arrival order: the destination takes the first as the main channel.
    chain = chain.then(async () => {
      const dst = upstream();
      sockets.add(dst);
      if (!path) dst.setNoDelay(true);
      src.setNoDelay(true);
      try {
        await once(dst, 'connect');
      } catch (e) {
        log(`upstream connect: ${String(e)}`);
        src.destroy();
        if (--open === 0) resolveEnded();
        return;
      }
      let closed = 0;
      const closedOne = (): void => {
        if (++closed === 2 && --open === 0) resolveEnded();
      };
      src.once('close', () => {
        dst.destroy();
        closedOne();
      });
      dst.once('close', () => {
        src.destroy();
        closedOne();
      });
      src.on('error', () => dst.destroy());
      dst.on('error', () => src.destroy());
      forward(src, dst, index === 0 ? mainHooks() : quiet);
      forward(dst, src, quiet);
    });
  });
  server = s;
  await new Promise<void>((resolve, reject) => {
    s.once('error', reject);
    s.listen({ host: c.host, port: 0 }, () => resolve());
  });
  return { uri: `tcp:${c.host}:${(s.address() as net.AddressInfo).port}` };
}

async function wait(c: Extract<ObserverCommand, { cmd: 'observer-wait' }>): Promise<Observed> {
  if (!ended) throw new Error('observer-start first');
  let timer: NodeJS.Timeout | undefined;
  await Promise.race([ended, new Promise<void>((r) => (timer = setTimeout(r, c.timeoutMs)))]);
  clearTimeout(timer);
  for (const s of sockets) s.destroy();
  server?.close();
  return seen;
}

serve(
  'observer',
  {
    'observer-start': (c) => start(c as Extract<ObserverCommand, { cmd: 'observer-start' }>),
    'observer-wait': (c) => wait(c as Extract<ObserverCommand, { cmd: 'observer-wait' }>),
  },
  () => {
    for (const s of sockets) s.destroy();
    server?.close();
  },
);
