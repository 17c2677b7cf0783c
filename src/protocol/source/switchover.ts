import { performance } from 'node:perf_hooks';
import { MAX_DISCARDS_PER_COMMAND, TARGET_PAGE_SIZE } from '../../stream/constants.js';
import type { StreamRecord } from '../../stream/records.js';
import { bitmapRanges } from './pages.js';
import { writeMultifdBarrier } from './multifd-pass.js';
import { sendPass } from './pass.js';
import { isThreaded } from './threads/connection.js';
import type { SourceRun } from './run.js';

/** Bytes a postcopy main channel's kernel may hold unsent (TCP_NOTSENT_LOWAT), unless configured. */
export const DEFAULT_POSTCOPY_NOTSENT_LOWAT = 128 << 10;
/** Bulk bytes handed over in a row before the producer lets the event loop read page requests (postcopy). */
export const POSTCOPY_BULK_YIELD_BYTES = 64 << 10;

/**
 * Precopy's end: stop the VM, the last dirty pages in RAM's END section, the
 * device state, EOF and the VM description.
 */
export async function completePrecopy(run: SourceRun): Promise<void> {
  await stopVm(run);
  run.state = { kind: 'switchover', listened: false };
  run.ram.syncDirty();
  run.c.syncs++;
  if (wantSwitchoverStart(run)) run.write([{ type: 'command', command: { cmd: 'switchover-start' } }]);
  await sendPass(run, { precopy: true, kind: 'end' });
  run.multifdFinished = true;
  const devices = await deviceRecords(run);
  run.write(devices);
  run.write([{ type: 'eof' }]);
  // A description after EOF: QEMU reads it, and our destination checks device sizes against it.
  run.write([{ type: 'vmdesc', json: run.opts.vmdesc ?? generatedVmdesc(devices) }]);
  await run.flushMain();
  const link = run.live;
  // Everything in the kernel's hands, multifd channels too: from here their close is the destination finishing.
  await Promise.all([link.main.flush(), ...link.conn.multifd.map((c) => c.flush())]);
}

/**
 * The postcopy switch in QEMU 10.0's order: the preempt channel (once PONG 1
 * proved the main channel accepted), stop, SWITCHOVER_START, discards,
 * PING 2, then PACKAGED with LISTEN + devices + PING 3 + RUN, PING 4.
 * Returns once the package is handed over (or postcopy paused on the way).
 */
export async function switchToPostcopy(run: SourceRun): Promise<void> {
  if (run.opts.preempt) {
    const link = run.live;
    await link.waitFor('PONG 1', () => link.pongs.has(1));
    await link.connectPreempt();
    run.check(); // cancelled meanwhile: fail() already tore the link down
  }
  const link = run.live;
  if (link.multifdChannels > 0) {
    // QEMU 10.1's save_postcopy_prepare, before the stop: the last multifd barrier. Every
    // page sent in multifd has landed before the discards; from here on multifd is idle.
    await writeMultifdBarrier(run, link, 'part');
    await run.flushMain();
  }
  await stopVm(run);
  run.state = { kind: 'switchover', listened: false };
  if (wantSwitchoverStart(run)) run.write([{ type: 'command', command: { cmd: 'switchover-start' } }]);
  run.ram.syncDirty();
  run.c.syncs++;
  writeDiscards(run);
  run.write([{ type: 'command', command: { cmd: 'ping', value: 2 } }]);
  // From LISTEN on, pages are exactly-once: requests are honoured from here.
  run.state = { kind: 'switchover', listened: true };
  tunePostcopyLink(run);
  // From here a partition pauses: watch for bytes that stop moving.
  run.stallWatch.start();
  // A new pacing window: the postcopy cap starts now, not in the precopy window.
  run.pacer.reset();
  const devices = await deviceRecords(run);
  run.write([
    { type: 'command', command: { cmd: 'packaged', length: 0 } },
    { type: 'command', command: { cmd: 'postcopy-listen' } },
    ...devices,
    { type: 'command', command: { cmd: 'ping', value: 3 } },
    { type: 'command', command: { cmd: 'postcopy-run' } },
    { type: 'package-end' },
    { type: 'command', command: { cmd: 'ping', value: 4 } },
  ]);
  try {
    await run.flushMain();
    await run.live.main.flush();
  } catch (e) {
    run.pauseOrThrow(e);
  }
  run.t.downtimeMs = Math.round(performance.now() - (run.t.stoppedAt ?? performance.now()));
  if (run.state.kind === 'switchover') run.state = { kind: 'postcopy' };
  run.emit('postcopy-active');
}

/**
 * Postcopy on a (new) link: the main channel's kernel holds little unsent
 * (TCP_NOTSENT_LOWAT), and the producer yields often, so that a request
 * answered on main waits behind little and one read from the return path
 * is read soon.
 */
export function tunePostcopyLink(run: SourceRun): void {
  const link = run.link;
  if (!link || link.dropped) return;
  const lowat = run.opts.transport?.main?.postcopyNotSentLowat ?? DEFAULT_POSTCOPY_NOTSENT_LOWAT;
  if (isThreaded(link.conn)) {
    // The main worker owns the socket: it tunes it, and from now on the workers answer requests.
    link.conn.enterPostcopy(lowat, POSTCOPY_BULK_YIELD_BYTES);
    return;
  }
  if (lowat > 0) link.main.setNotSentLowat(lowat);
  link.main.setBulkYield(POSTCOPY_BULK_YIELD_BYTES);
}

async function stopVm(run: SourceRun): Promise<void> {
  await drainBeforeStop(run);
  await run.opts.stopVm?.();
  run.t.stoppedAt = performance.now();
  run.emit('stopped', { at: run.t.stoppedAt, hrtime: process.hrtime.bigint() });
}

/**
 * Lets the precopy data already queued reach the peer while the VM still
 * runs: whatever sits in our queue and the kernel's send buffer at the stop
 * would otherwise go ahead of the device state, inside the downtime. Bounded
 * (1 s); pages the guest dirties meanwhile are caught by the final sync.
 */
async function drainBeforeStop(run: SourceRun): Promise<void> {
  const main = run.link?.main;
  if (!main) return;
  const deadline = performance.now() + 1000;
  let timer: NodeJS.Timeout | undefined;
  // The timer is cleared at once: a migration that ends soon after must not keep the process alive.
  const flushed = Promise.all([main.flush(), ...(run.link?.conn.multifd ?? []).map((c) => c.flush())]);
  await Promise.race([flushed, new Promise((r) => (timer = setTimeout(r, 1000)))]).finally(() => clearTimeout(timer));
  for (;;) {
    const q = main.unackedBytes;
    if (q === undefined || q <= 64 * 1024 || performance.now() >= deadline || run.over) return;
    await new Promise((r) => setTimeout(r, 1));
  }
}

function wantSwitchoverStart(run: SourceRun): boolean {
  if (run.opts.switchoverStart !== undefined) return run.opts.switchoverStart;
  const m = /-(\d+)\.(\d+)$/.exec(run.opts.machineType);
  return m ? Number(m[1]) >= 10 : true;
}

async function deviceRecords(run: SourceRun): Promise<StreamRecord[]> {
  const list = typeof run.opts.devices === 'function' ? await run.opts.devices() : run.opts.devices;
  const out: StreamRecord[] = [];
  let next = 0;
  const used = new Set(list.map((d) => d.sectionId).filter((x): x is number => x !== undefined));
  used.add(run.ramSection.sectionId);
  for (const d of list) {
    let id = d.sectionId;
    if (id === undefined) {
      while (used.has(next)) next++;
      id = next++;
    }
    const h = { sectionId: id, idstr: d.idstr, instanceId: d.instanceId, versionId: d.versionId };
    out.push({ type: 'section', kind: 'full', ...h }, { type: 'device-state', kind: 'full', ...h, data: d.data }, { type: 'footer', sectionId: id });
  }
  return out;
}

/**
 * Discards every page that is dirty again or was never sent; those, and only
 * those, are sent after LISTEN, each exactly once.
 *
 * A QEMU 10.0 destination must see at least one discard before LISTEN: its
 * LISTEN handler, finding no discard came (postcopy state ADVISE), runs the
 * first-discard preparation itself, and that preparation sets the state to
 * DISCARD after LISTEN had set LISTENING, so the RUN that follows fails with
 * "CMD_POSTCOPY_RUN in wrong postcopy state (2)". A saved VM that did not
 * change since its first pass has nothing to discard; then one page is
 * discarded (and so sent again after LISTEN, as every discarded page is):
 * the last page of the first block, which a booting guest touches last.
 */
function writeDiscards(run: SourceRun): void {
  let any = false;
  const blocks = run.ram.blocks;
  for (const st of blocks) {
    // toSend |= ~sentOnce, the tail beyond the last page kept clear.
    const w = st.toSend.words;
    const sent = st.sentOnce.words;
    for (let i = 0; i < w.length; i++) w[i]! |= ~(sent[i] as number);
    const full = st.pages >>> 5;
    const rest = st.pages & 31;
    if (rest > 0) w[full]! &= (1 << rest) - 1;
    w.fill(0, rest > 0 ? full + 1 : full);
    any ||= st.toSend.next(0) >= 0;
  }
  const first = blocks.find((st) => st.pages > 0);
  if (!any && first) first.toSend.set(first.pages - 1);
  for (const st of blocks) {
    const ranges = bitmapRanges(st.toSend);
    for (let i = 0; i < ranges.length; i += MAX_DISCARDS_PER_COMMAND) {
      run.write([{ type: 'command', command: { cmd: 'postcopy-ram-discard', block: st.info.idstr, ranges: ranges.slice(i, i + MAX_DISCARDS_PER_COMMAND) } }]);
    }
  }
}

/** A VM description of opaque devices (QEMU's form for old-style handlers): exact sizes, nothing else. */
function generatedVmdesc(devices: readonly StreamRecord[]): Uint8Array {
  const list = devices
    .filter((r): r is Extract<StreamRecord, { type: 'device-state' }> => r.type === 'device-state')
    .map((d) => ({ name: d.idstr, instance_id: d.instanceId, size: d.data.length, fields: [{ name: 'data', type: 'buffer', size: d.data.length }] }));
  return new TextEncoder().encode(JSON.stringify({ page_size: TARGET_PAGE_SIZE, devices: list }));
}
