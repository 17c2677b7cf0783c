import { performance } from 'node:perf_hooks';
import { RAM_IDSTR, RAM_VERSION } from '../../stream/constants.js';
import { SourceConnection } from '../../transport/connection.js';
import { Link } from './link.js';
import { ThreadedSourceConnection, isThreaded } from './threads/connection.js';
import { onThreadNotice } from './threads/notices.js';
import { MigrationError } from '../errors.js';
import { writeMultifdBarrier } from './multifd-pass.js';
import type { SourceRun } from './run.js';

/** A new link on `conn`, wired to the run (requests, losses, fatal return-path errors). */
/** Connects a new link's main channel: in its own worker thread when the run uses threads. */
export function connectSource(run: SourceRun, to: string): Promise<SourceConnection | ThreadedSourceConnection> {
  const transport = run.opts.transport ?? {};
  return run.threads.used ? ThreadedSourceConnection.connect(to, transport, run.threadShared()) : SourceConnection.connect(to, transport);
}

export function attachLink(run: SourceRun, conn: SourceConnection | ThreadedSourceConnection): Link {
  // A recovery's new link: the old one's threads stay in the stats.
  if (run.link && isThreaded(run.link.conn)) run.endedThreads.push(...run.link.conn.threadStats());
  const link = new Link(
    conn,
    {
      onRequest: (l, block, offset, length, arrived) => {
        if (!l.dropped && l === run.link) run.requests.onRequest(l, block, offset, length, arrived);
      },
      onLost: (l, e) => run.linkLost(l, e),
      onFatal: (e) => run.fail(e),
      abortReason: () => run.failure ?? run.refusal,
      phase: () => run.phase,
      over: () => run.over,
      multifdIdle: () => run.postcopy || run.state.kind === 'completing' || run.multifdFinished,
    },
    run.replyTimeoutMs,
  );
  run.link = link;
  if (isThreaded(conn)) {
    const current = () => !link.dropped && link === run.link;
    conn.attach({
      onReturnPath: (msgs) => link.returnPath(msgs),
      onReturnPathError: (reason) => current() && run.fail(new MigrationError('protocol', run.phase, reason)),
      onBadRequest: (reason) => current() && run.requests.refuse(new MigrationError('bad-page-request', run.phase, reason)),
      onNotice: (e) => current() && onThreadNotice(run, e),
      // Pages that cannot be read are lost to the destination: the migration fails, in postcopy too (no pause).
      onStorageError: (e) => current() && run.fail(MigrationError.from(e, run.phase)),
      onCounts: (c) => {
        run.c.normal += c.normal;
        run.c.duplicate += c.duplicate;
        run.c.transferred += c.transferred;
      },
    });
  }
  return link;
}

/**
 * Setup: connect, then the header, the configuration, the return path,
 * PING 1, ADVISE (when postcopy may come) and the RAM block list; then the
 * first dirty sync.
 */
export async function runSetup(run: SourceRun): Promise<void> {
  const o = run.opts;
  const conn = await connectSource(run, o.to);
  if (run.over) {
    // cancelled while connecting
    conn.destroy();
    throw run.failure!;
  }
  const link = attachLink(run, conn);
  // Multifd channels right after main, before main says anything (QEMU's multifd_send_setup).
  if (o.multifd) await link.connectMultifd(o.multifd.channels, run.multifdPackets, o.multifd.uuid);
  run.check();
  run.state = { kind: 'setup', connected: true };
  run.emit('connected', { uri: o.to });

  run.write([
    { type: 'header', version: 3 },
    { type: 'configuration', machineType: o.machineType },
    { type: 'command', command: { cmd: 'open-return-path' } },
    { type: 'command', command: { cmd: 'ping', value: 1 } },
  ]);
  if ((o.postcopy ?? 'never') !== 'never') run.write([{ type: 'command', command: { cmd: 'postcopy-advise', pageSizeSummary: 0x1000n, targetPageSize: 0x1000n } }]);
  const ram = { type: 'section', sectionId: run.ramSection.sectionId, idstr: RAM_IDSTR, instanceId: 0, versionId: RAM_VERSION } as const;
  const blocks = run.ram.blocks;
  const total = blocks.reduce((s, b) => s + b.info.length, 0);
  run.write([
    { ...ram, kind: 'start' },
    { type: 'ram-blocks', total, blocks: blocks.map((b) => ({ idstr: b.info.idstr, length: b.info.length })) },
  ]);
  // With multifd, QEMU's setup ends with a barrier: every channel's SYNC, MULTIFD_FLUSH on main.
  if (o.multifd) await writeMultifdBarrier(run, link, 'start');
  run.write([
    { type: 'ram-eos' },
    { type: 'footer', sectionId: run.ramSection.sectionId },
  ]);
  await run.flushMain();
  run.t.setupMs = performance.now() - run.t.t0;

  // Every page goes in the first pass: what the guest dirtied before now is in it
  // already (QEMU's first bitmap sync at setup), so it must not count as dirty again.
  run.ram.syncDirty();
}
