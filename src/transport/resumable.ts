/**
 * One QEMU connection carried across a resumable hop (`qmt tunnel`): the
 * local socket (to a QEMU, or whatever speaks the migration) on one side, and
 * at most one hop connection at a time to the other end of the tunnel, which
 * may be lost and replaced any number of times while the local socket stays
 * open.
 *
 * Each direction is numbered from 0 (resumable-frames.ts): what this side
 * reads from its local socket is kept in a ReplayBuffer until the peer
 * acknowledges it, so that on a new hop connection it is sent again from
 * wherever the peer got to; what the peer sends is written to the local
 * socket exactly once, in order (a DATA frame below what was delivered is a
 * replay's overlap and is skipped). The local socket's end (FIN) and failure
 * (RESET) cross the hop as frames; the connection is `done` once both
 * directions have ended and the peer acknowledged this side's end.
 *
 * Liveness: an ACK goes out every `keepaliveMs` (and after `ackBytes`
 * received), and a hop connection that brings no frame for `silenceMs` is
 * lost: a link that goes silent is found as a reset one is. While no hop
 * connection is attached (an outage) the local socket stays open; reading it
 * stops once `replayBytes` wait for an acknowledgement. An outage longer than
 * `outageMs` fails the connection ('outage-timeout'): the local socket is
 * destroyed, so that the QEMU behind it sees an error and its own recovery
 * (or failure) takes over. Batches: one DATA frame per local read, header and
 * payload in one corked write; acknowledgements are cumulative.
 */
import { EventEmitter } from 'node:events';
import type net from 'node:net';
import { performance } from 'node:perf_hooks';
import type tls from 'node:tls';
import { ReplayBuffer } from './resumable-buffer.js';
import { MAX_DATA_PAYLOAD, encodeAck, encodeDataHeader, encodeFin, encodeReset, type HopFrame, type HopFrameDecoder } from './resumable-frames.js';
import { TransportError, type ChannelName } from './errors.js';

export interface ResumableLimits {
  /** Bytes read locally and not yet acknowledged by the peer, at most; reading the local socket waits beyond (default 64 MiB). */
  readonly replayBytes?: number;
  /** Acknowledge once this many bytes came since the last ACK (default 1 MiB); the keepalive acknowledges the rest. */
  readonly ackBytes?: number;
  /** An ACK at least this often on an attached hop connection: the keepalive (default 250 ms). */
  readonly keepaliveMs?: number;
  /** A hop connection that brings no frame for this long is lost (default 2 s). */
  readonly silenceMs?: number;
  /** An outage longer than this fails the connection, 'outage-timeout' (default 30 s; 0: never). */
  readonly outageMs?: number;
  /**
   * What a full replay buffer does during an outage: 'wait' (default) keeps
   * the local socket open, unread, until the hop is back or `outageMs` passes;
   * 'close' fails the connection at once ('outage-timeout'), so that an
   * outage costs at most `replayBytes` of the source's progress before QEMU's
   * own recovery takes over. Outside an outage a full buffer only waits.
   */
  readonly whenFull?: 'wait' | 'close';
}

const DEFAULTS = { replayBytes: 64 << 20, ackBytes: 1 << 20, keepaliveMs: 250, silenceMs: 2000, outageMs: 30_000, whenFull: 'wait' } as const;

export type ResumableState = 'waiting' | 'attached' | 'outage' | 'done' | 'failed';

export interface ResumableStats {
  /** Bytes read from the local socket (this side's direction). */
  readonly sent: number;
  /** Bytes the peer acknowledged. */
  readonly acknowledged: number;
  /** Bytes written to the local socket (the peer's direction). */
  readonly received: number;
  /** Bytes sent again on a later hop connection. */
  readonly replayed: number;
  /** Hop connections attached so far. */
  readonly hops: number;
  /** Outages (hop connection lost) and their total length so far. */
  readonly outages: number;
  readonly outageMs: number;
  /** Bytes waiting for an acknowledgement now, and the most ever. */
  readonly unacknowledged: number;
  readonly peakUnacknowledged: number;
}

/** A hop socket: TLS in the tunnel, but anything that frames can ride on. */
export type HopSocket = net.Socket | tls.TLSSocket;

/** The hop connection attached now: its socket, its frame decoder, when it was last heard and written. */
interface Hop {
  readonly socket: HopSocket;
  readonly decoder: HopFrameDecoder;
  heard: number;
  sentAt: number;
  needsDrain: boolean;
}

export interface ResumableEvents {
  /** The hop connection was lost (reset, closed, silent, or bad frames); an outage begins. */
  lost: [error: TransportError];
  /** A new hop connection continues the connection after an outage. */
  resumed: [info: { outageMs: number; replayed: number }];
  /** The first bytes read from the local socket (a role can be told from them). */
  'first-bytes': [chunk: Buffer];
  /** The first bytes the peer sent (written to the local socket). */
  'peer-first-bytes': [chunk: Buffer];
  /** Both directions ended and this side's end is acknowledged. */
  done: [];
  /** The local connection failed, the peer's did (RESET), or the outage lasted too long; the local socket is destroyed. */
  failed: [error: TransportError];
}

export class ResumableConnection extends EventEmitter<ResumableEvents> {
  private readonly out: ReplayBuffer;
  private readonly limits: Required<ResumableLimits>;
  /** The peer's direction: bytes delivered to the local socket (+1 once its FIN is in). */
  private delivered = 0;
  private ackedToPeer = 0;
  private peerEnded = false;
  private hop: Hop | undefined;
  private stateNow: ResumableState = 'waiting';
  private readonly timer: NodeJS.Timeout;
  private outageStart = 0;
  private readonly counters = { replayed: 0, hops: 0, outages: 0, outageMs: 0, peak: 0 };
  /** The highest sequence number sent on any hop connection: what lies below it and is sent again is a replay. */
  private sentHigh = 0;
  private localPaused = false;
  private hopPaused = false;
  private sawFirst = false;
  private failure: TransportError | undefined;
  /** Bulk connections: bytes read (either socket) before reading yields to the event loop; undefined: never. */
  private yieldBytes: number | undefined;
  private turnBytes = 0;
  private yielded: { local: boolean; hop: Hop | undefined } | undefined;

  constructor(
    /** Opened with `allowHalfOpen` (the peer's FIN is passed on as such, and our direction goes on after it). */
    readonly local: net.Socket,
    /** Named in errors. */
    readonly channel: ChannelName,
    limits: ResumableLimits = {},
  ) {
    super();
    this.limits = { ...DEFAULTS, ...limits };
    this.out = new ReplayBuffer(this.limits.replayBytes);
    local.on('data', (c: Buffer) => this.onLocalData(c));
    local.on('end', () => this.onLocalEnd());
    local.on('error', (e) => this.onLocalGone(e));
    local.on('close', () => this.onLocalGone(undefined));
    local.on('drain', () => this.onLocalDrain());
    this.timer = setInterval(() => this.tick(), Math.max(10, Math.min(this.limits.keepaliveMs, this.limits.silenceMs / 4)));
    this.timer.unref();
  }

  get state(): ResumableState {
    return this.stateNow;
  }

  /** How much of the peer's direction this side holds (a HELLO's or WELCOME's `received`). */
  get received(): number {
    return this.delivered;
  }

  get error(): TransportError | undefined {
    return this.failure;
  }

  /** The first bytes read locally (up to what the first read brought), for telling the role. */
  firstBytes: Buffer | undefined;

  /**
   * Sees every chunk as it passes: `read` from the local socket (before it is
   * sent), `delivered` to it. Set it from 'first-bytes' / 'peer-first-bytes'
   * and it sees that first chunk too. Per chunk, never per page.
   */
  observer: { read(chunk: Buffer): void; delivered(chunk: Buffer): void } | undefined;

  stats(): ResumableStats {
    return {
      sent: this.out.end,
      acknowledged: Math.min(this.out.acknowledged, this.out.end),
      received: this.delivered - (this.peerEnded ? 1 : 0),
      replayed: this.counters.replayed,
      hops: this.counters.hops,
      outages: this.counters.outages,
      outageMs: this.counters.outageMs + (this.stateNow === 'outage' ? performance.now() - this.outageStart : 0),
      unacknowledged: this.out.unacknowledged,
      peakUnacknowledged: this.counters.peak,
    };
  }

  /**
   * A hop connection, its handshake done: the peer holds `peerReceived` of
   * this side's direction. Sends again what the peer lacks (and the FIN),
   * then goes on live. `decoder` has read the handshake; `frames` are those
   * it decoded after it. Any current hop connection is dropped first.
   */
  attach(socket: HopSocket, decoder: HopFrameDecoder, peerReceived: number, frames: readonly HopFrame[] = []): void {
    if (this.stateNow === 'done' || this.stateNow === 'failed') {
      // Ended: let what the caller wrote (a WELCOME with everything acknowledged) reach the peer.
      if (this.stateNow === 'done') socket.end();
      else socket.destroy();
      return;
    }
    if (this.hop) this.detach(new TransportError('closed', 'a newer hop connection replaced this one', { channel: this.channel }), false);
    try {
      this.out.ack(peerReceived);
      const resend = this.out.from(peerReceived);
      const hop = { socket, decoder, heard: performance.now(), sentAt: 0, needsDrain: false };
      this.hop = hop;
      const wasOutage = this.stateNow === 'outage';
      this.stateNow = 'attached';
      this.counters.hops++;
      socket.on('data', (c: Buffer) => this.onHopData(hop, c));
      socket.on('error', (e) => this.hopGone(hop, e));
      socket.on('close', () => this.hopGone(hop, undefined));
      socket.on('end', () => this.hopGone(hop, undefined));
      socket.on('drain', () => this.onHopDrain(hop));
      socket.resume(); // the handshake left it paused
      let seq = peerReceived;
      socket.cork();
      for (const c of resend) {
        this.writeData(hop, seq, c);
        seq += c.length;
      }
      if (this.out.ended && this.out.acknowledged < this.out.total) this.write(hop, encodeFin(this.out.end));
      this.sendAck(hop);
      socket.uncork();
      if (this.counters.hops > 1) {
        const outageMs = wasOutage ? performance.now() - this.outageStart : 0;
        this.counters.outageMs += outageMs;
        const replayed = Math.max(0, Math.min(this.sentHigh, this.out.end) - peerReceived);
        this.counters.replayed += replayed;
        this.emit('resumed', { outageMs, replayed });
      }
      this.sentHigh = Math.max(this.sentHigh, this.out.end);
      for (const f of frames) if (this.hop === hop) this.onFrame(hop, f);
      this.updateLocalFlow();
      this.checkDone();
    } catch (e) {
      socket.destroy();
      const err = TransportError.is(e) ? e : new TransportError('hop-protocol', (e as Error).message, { channel: this.channel });
      // A peer that resumes where it cannot be (outside what this side holds): that hop connection is
      // lost before it began — an outage, so that the owner tries again and the outage limit applies.
      if (this.hop) this.loseHop(err);
      else this.beginOutage(err);
    }
  }

  /**
   * A bulk connection yields: once `bytes` were read in one turn of the event
   * loop (from either socket), the socket that brought them pauses until the
   * next turn (setImmediate). libuv otherwise reads a ready socket up to 32
   * times in a row, 64 KiB each, and encrypts or decrypts all of it before
   * another connection on the same thread is served: a preempt channel's
   * urgent page, a page request on the way back. Undefined (the default):
   * never — the urgent connection's own reads are never held.
   */
  setYield(bytes: number | undefined): void {
    this.yieldBytes = bytes;
  }

  /** Counts `n` bytes read from `from`; past the turn's budget, that socket waits for the next turn. */
  private counted(n: number, from: 'local' | Hop): void {
    if (this.yieldBytes === undefined) return;
    this.turnBytes += n;
    if (this.turnBytes < this.yieldBytes) return;
    if (!this.yielded) {
      this.yielded = { local: false, hop: undefined };
      setImmediate(() => this.nextTurn());
    }
    if (from === 'local') {
      this.yielded.local = true;
      this.local.pause();
    } else {
      this.yielded.hop = from;
      from.socket.pause();
    }
  }

  private nextTurn(): void {
    const y = this.yielded!;
    this.yielded = undefined;
    this.turnBytes = 0;
    if (this.stateNow === 'done' || this.stateNow === 'failed') return;
    // Flow control may want them paused still (a full replay buffer, a slow reader): it resumes them itself.
    if (y.local && !this.localPaused) this.local.resume();
    if (y.hop && y.hop === this.hop && !this.hopPaused) y.hop.socket.resume();
  }

  /** Ends the connection from outside (the tunnel closes): the local socket is destroyed, the peer told. */
  fail(error: TransportError): void {
    if (this.stateNow === 'done' || this.stateNow === 'failed') return;
    if (this.hop) this.write(this.hop, encodeReset());
    this.finish('failed', error);
  }

  // --- local socket ----------------------------------------------------------

  private onLocalData(chunk: Buffer): void {
    if (this.stateNow === 'done' || this.stateNow === 'failed') return;
    if (!this.sawFirst) {
      this.sawFirst = true;
      this.firstBytes = chunk;
      this.emit('first-bytes', chunk);
    }
    this.observer?.read(chunk);
    const seq = this.out.append(chunk);
    if (this.out.unacknowledged > this.counters.peak) this.counters.peak = this.out.unacknowledged;
    const hop = this.hop;
    if (hop) {
      this.writeData(hop, seq, chunk);
      this.sentHigh = this.out.end;
    }
    this.updateLocalFlow();
    this.counted(chunk.length, 'local');
  }

  private onLocalEnd(): void {
    if (this.stateNow === 'done' || this.stateNow === 'failed' || this.out.ended) return;
    this.out.finish();
    if (this.hop) this.write(this.hop, encodeFin(this.out.end));
  }

  private onLocalGone(e: Error | undefined): void {
    if (this.stateNow === 'done' || this.stateNow === 'failed') return;
    // A close after both ends (the peer's FIN delivered, ours sent) is the normal end: done follows the ACK.
    if (!e && this.out.ended && this.peerEnded) return;
    if (this.hop) this.write(this.hop, encodeReset());
    const what = e ? `the local connection failed: ${e.message}` : 'the local connection closed before both directions ended';
    this.finish('failed', new TransportError(e ? 'reset' : 'closed', what, { channel: this.channel, ...(e ? { cause: e } : {}) }));
  }

  private onLocalDrain(): void {
    const hop = this.hop;
    if (this.hopPaused && hop) {
      this.hopPaused = false;
      if (this.yielded?.hop !== hop) hop.socket.resume();
    }
  }

  /** Reading the local socket waits while the replay buffer is full or the hop socket's buffer is. */
  private updateLocalFlow(): void {
    if (this.stateNow === 'done' || this.stateNow === 'failed') return;
    if (this.stateNow === 'outage' && this.out.full && this.limits.whenFull === 'close') {
      this.finish('failed', new TransportError('outage-timeout', `the replay buffer (${this.limits.replayBytes} bytes) filled while the hop was down: the local connection is closed`, { channel: this.channel }));
      return;
    }
    const stop = this.out.full || (this.hop?.needsDrain ?? false);
    if (stop && !this.localPaused) {
      this.localPaused = true;
      this.local.pause();
    } else if (!stop && this.localPaused) {
      this.localPaused = false;
      // Yielding this turn: the next turn resumes it.
      if (!this.yielded?.local) this.local.resume();
    }
  }

  // --- hop connection --------------------------------------------------------

  private write(hop: Hop, b: Buffer): boolean {
    hop.sentAt = performance.now();
    const ok = hop.socket.write(b);
    if (!ok) hop.needsDrain = true;
    return ok;
  }

  private writeData(hop: Hop, seq: number, chunk: Buffer): void {
    hop.socket.cork();
    for (let at = 0; at < chunk.length; at += MAX_DATA_PAYLOAD) {
      const part = at === 0 && chunk.length <= MAX_DATA_PAYLOAD ? chunk : chunk.subarray(at, at + MAX_DATA_PAYLOAD);
      this.write(hop, encodeDataHeader(seq + at, part.length));
      this.write(hop, part);
    }
    hop.socket.uncork();
  }

  private sendAck(hop: Hop): void {
    this.ackedToPeer = this.delivered;
    this.write(hop, encodeAck(this.delivered));
  }

  private onHopDrain(hop: Hop): void {
    if (this.hop !== hop) return;
    hop.needsDrain = false;
    this.updateLocalFlow();
  }

  private onHopData(hop: Hop, chunk: Buffer): void {
    if (this.hop !== hop) return;
    hop.heard = performance.now();
    let frames: HopFrame[];
    try {
      frames = hop.decoder.push(chunk);
    } catch (e) {
      this.loseHop(e as TransportError);
      return;
    }
    for (const f of frames) {
      if (this.hop !== hop) return;
      this.onFrame(hop, f);
    }
    if (this.hop === hop && this.delivered - this.ackedToPeer >= this.limits.ackBytes) this.sendAck(hop);
    if (this.hop === hop) this.counted(chunk.length, hop);
  }

  private onFrame(hop: Hop, f: HopFrame): void {
    try {
      switch (f.type) {
        case 'data': {
          const bytes = this.delivered - (this.peerEnded ? 1 : 0);
          if (f.seq > bytes) throw new TransportError('hop-protocol', `DATA at byte ${f.seq}, but ${bytes} came so far (a gap)`, { channel: this.channel });
          const skip = bytes - f.seq;
          if (skip >= f.payload.length) return; // a replay's overlap: delivered already
          if (this.peerEnded) throw new TransportError('hop-protocol', `DATA at byte ${f.seq} after the peer's end at ${bytes}`, { channel: this.channel });
          const part = skip > 0 ? f.payload.subarray(skip) : f.payload;
          if (this.delivered === 0) this.emit('peer-first-bytes', part);
          this.delivered += part.length;
          this.observer?.delivered(part);
          if (!this.local.write(part) && !this.hopPaused) {
            // The local reader is slower: the hop waits (the peer's replay buffer then fills, and its reading waits).
            this.hopPaused = true;
            hop.socket.pause();
          }
          return;
        }
        case 'ack':
          this.out.ack(f.received);
          this.updateLocalFlow();
          this.checkDone();
          return;
        case 'fin':
          if (this.peerEnded && f.seq === this.delivered - 1) return; // a replayed FIN
          if (this.peerEnded || f.seq !== this.delivered) throw new TransportError('hop-protocol', `FIN at byte ${f.seq}, but ${this.delivered} came`, { channel: this.channel });
          this.delivered += 1;
          this.peerEnded = true;
          this.local.end();
          this.sendAck(hop);
          this.checkDone();
          return;
        case 'reset':
          this.finish('failed', new TransportError('reset', "the other end's connection failed (RESET)", { channel: this.channel }));
          return;
        case 'hello':
        case 'welcome':
          throw new TransportError('hop-protocol', `a ${f.type.toUpperCase()} after the handshake`, { channel: this.channel });
      }
    } catch (e) {
      this.loseHop(TransportError.is(e) ? e : new TransportError('hop-protocol', (e as Error).message, { channel: this.channel }));
    }
  }

  private hopGone(hop: Hop, e: Error | undefined): void {
    if (this.hop !== hop) return;
    const err = e
      ? TransportError.is(e)
        ? e
        : new TransportError((e as NodeJS.ErrnoException).code === 'ECONNRESET' ? 'reset' : 'closed', `hop connection: ${e.message}`, { channel: this.channel, cause: e })
      : new TransportError('closed', 'the hop connection closed', { channel: this.channel });
    this.loseHop(err);
  }

  /** The hop connection is gone (or must go): an outage begins, unless the connection is over. */
  private loseHop(error: TransportError): void {
    if (!this.hop) return;
    this.detach(error, true);
  }

  private detach(error: TransportError, outage: boolean): void {
    const hop = this.hop!;
    this.hop = undefined;
    hop.socket.removeAllListeners('data');
    hop.socket.on('error', () => undefined);
    hop.socket.destroy();
    if (this.hopPaused) {
      this.hopPaused = false;
    }
    if (this.stateNow === 'done' || this.stateNow === 'failed') return;
    if (outage) this.beginOutage(error);
  }

  private beginOutage(error: TransportError): void {
    if (this.stateNow !== 'outage') {
      this.stateNow = 'outage';
      this.outageStart = performance.now();
      this.counters.outages++;
    }
    this.updateLocalFlow();
    this.emit('lost', error);
  }

  private tick(): void {
    const now = performance.now();
    const hop = this.hop;
    if (hop) {
      // Not reading it (the local reader is slower) is no silence of the peer's.
      if (this.hopPaused) hop.heard = now;
      if (now - hop.heard > this.limits.silenceMs) {
        this.loseHop(new TransportError('idle-timeout', `the hop connection was silent for ${Math.round(now - hop.heard)} ms`, { channel: this.channel }));
      } else if (this.delivered > this.ackedToPeer || now - hop.sentAt >= this.limits.keepaliveMs) {
        this.sendAck(hop);
      }
    } else if (this.stateNow === 'outage' && this.limits.outageMs > 0 && now - this.outageStart > this.limits.outageMs) {
      this.finish('failed', new TransportError('outage-timeout', `the hop was down for more than ${this.limits.outageMs} ms: the local connection is closed`, { channel: this.channel }));
    }
  }

  private checkDone(): void {
    if (this.stateNow !== 'attached' || !this.peerEnded || !this.out.drained) return;
    const hop = this.hop!;
    hop.socket.end();
    this.hop = undefined;
    this.finish('done', undefined);
  }

  private finish(state: 'done' | 'failed', error: TransportError | undefined): void {
    clearInterval(this.timer);
    if (this.stateNow === 'outage') this.counters.outageMs += performance.now() - this.outageStart;
    this.stateNow = state;
    if (this.hop) {
      const hop = this.hop;
      this.hop = undefined;
      hop.socket.end();
      hop.socket.on('error', () => undefined);
      setTimeout(() => hop.socket.destroy(), 1000).unref();
    }
    if (state === 'failed') {
      this.failure = error;
      this.local.on('error', () => undefined);
      // A reset, not a FIN: the QEMU behind it must see a failure, not the end of a stream (TCP only: a
      // unix socket has no reset, and resetAndDestroy throws on it).
      if (this.local.remoteFamily !== undefined && !this.local.destroyed && !this.local.connecting) this.local.resetAndDestroy();
      else this.local.destroy();
      this.emit('failed', error!);
    } else {
      this.emit('done');
    }
  }
}
