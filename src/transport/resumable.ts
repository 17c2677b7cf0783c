/**
 * One end of a resumable hop connection: a local connection (a QEMU's
 * socket) whose bytes cross the network on hop sockets that may be cut and
 * replaced, without the local connection noticing anything but a delay.
 *
 * Each direction is numbered byte by byte (resumable-frames.ts). What this end
 * forwards stays in a bounded {@link ReplayBuffer} until the peer acknowledges
 * it; when the hop socket fails (a reset, an end, bytes that are not frames,
 * or silence: no frame for `silenceMs` while this end is reading — a frozen
 * path sends no RST), the link waits for its owner to {@link attach} a new hop
 * socket and then sends again everything from the peer's `received` on. If no
 * hop socket comes within `maxOutageMs`, the local connection is reset, so that
 * the QEMU behind it notices and its own recovery (or failure) takes over.
 *
 * Backpressure: the local connection is read only while the replay buffer has
 * room and the hop socket takes writes; the hop socket is read only while the
 * local connection takes writes. Keepalive: an ACK every `keepaliveMs` when
 * nothing else went out, so silence means a dead path, not an idle channel
 * (the preempt channel is silent until its first urgent page).
 *
 * The handshake (HELLO / WELCOME) is the owner's (src/protocol/tunnel): it
 * reads the first frame with a {@link HopFrameDecoder} and hands the decoder,
 * with any frames it already parsed, to attach().
 */
import { EventEmitter } from 'node:events';
import type net from 'node:net';
import { performance } from 'node:perf_hooks';
import type tls from 'node:tls';
import { classifySocketError } from './channel.js';
import { TransportError, type ChannelName } from './errors.js';
import { ReplayBuffer } from './resumable-buffer.js';
import { DATA_HEADER_LENGTH, HopFrameDecoder, MAX_DATA_PAYLOAD, encodeAck, encodeDataHeader, encodeFin, encodeReset, type HopFrame } from './resumable-frames.js';

export type HopSocket = net.Socket | tls.TLSSocket;

/** Defaults of {@link ResumableLinkOptions}. */
export const RESUMABLE_DEFAULTS = {
  capacityBytes: 16 << 20,
  keepaliveMs: 1000,
  silenceMs: 10_000,
  maxOutageMs: 30_000,
  ackBytes: 256 << 10,
} as const;

export interface ResumableLinkOptions {
  /** The local connection (allowHalfOpen: its end is forwarded as a FIN while the other direction goes on). */
  readonly local: net.Socket;
  /** Named in errors and stats. */
  readonly name: ChannelName;
  /** Most bytes forwarded and not yet acknowledged (default 16 MiB, at least 64 KiB); the local connection is not read beyond it. */
  readonly capacityBytes?: number;
  /** An ACK goes out at least this often (default 1000 ms): the keepalive. */
  readonly keepaliveMs?: number;
  /** No frame from the peer for this long while reading: the hop is dead (default 10 000 ms; more than 2 × keepaliveMs). */
  readonly silenceMs?: number;
  /** The hop down for longer than this: the local connection is reset (default 30 000 ms). */
  readonly maxOutageMs?: number;
  /** Acknowledge after this many bytes received (default 256 KiB), besides the keepalive. */
  readonly ackBytes?: number;
  /** Bytes read from the local connection (forwarded toward the peer), `t` = performance.now() of arrival. None may throw. */
  readonly onRead?: (chunk: Buffer, t: number) => void;
  /** Bytes written to the local connection (from the peer). */
  readonly onDelivered?: (chunk: Buffer, t: number) => void;
}

/** How a link ended: both directions ended and acknowledged (`ok`), or not (`error` says why). */
export interface LinkOutcome {
  readonly ok: boolean;
  readonly error?: TransportError;
}

export interface ResumableLinkStats {
  readonly name: ChannelName;
  readonly state: 'connecting' | 'up' | 'down' | 'done';
  /** Read from the local connection / written to it. */
  readonly bytesRead: number;
  readonly bytesDelivered: number;
  /** Bytes sent a second time after a reconnect (they had gone out on a hop socket that failed). */
  readonly replayedBytes: number;
  /** Hop sockets attached so far (1 without any reconnect). */
  readonly hopConnections: number;
  /** Times the hop went down while the link was open, and for how long in total and at most (ms; the current one included). */
  readonly outages: number;
  readonly outageMs: number;
  readonly longestOutageMs: number;
  /** Why the hop went down the last time (a TransportError code: `reset`, `closed`, `idle-timeout`, `hop-protocol` …). */
  readonly lastOutageCause: string | null;
  /** Bytes waiting for the peer's acknowledgement now, and at most. */
  readonly unacknowledgedBytes: number;
  readonly peakUnacknowledgedBytes: number;
  readonly capacityBytes: number;
}

export interface ResumableLinkEvents {
  /** The hop socket failed (the link waits for attach() within maxOutageMs). */
  down: [TransportError];
  /** A hop socket was attached; `replayedBytes` of it were sent before. */
  up: [{ hopConnection: number; outageMs: number; replayedBytes: number }];
  /** The link is over (see LinkOutcome); emitted once. */
  done: [LinkOutcome];
}

const noop = (): void => undefined;

export class ResumableLink extends EventEmitter<ResumableLinkEvents> {
  readonly name: ChannelName;
  private readonly local: net.Socket;
  private readonly buffer: ReplayBuffer;
  private readonly keepaliveMs: number;
  private readonly silenceMs: number;
  private readonly maxOutageMs: number;
  private readonly ackBytes: number;
  private readonly onRead: (chunk: Buffer, t: number) => void;
  private readonly onDelivered: (chunk: Buffer, t: number) => void;

  private hop: HopSocket | undefined;
  private decoder: HopFrameDecoder | undefined;
  private hopListeners: (() => void) | undefined;
  /** How far the current hop socket got our bytes (to count what a reconnect sends again). */
  private sentEnd = 0;
  /** The highest sequence number any hop socket got. */
  private sentEver = 0;
  private hopWriteBlocked = false;
  private hopReadPaused = false;
  private lastRx = 0;
  private lastTx = 0;

  /** The peer's direction: bytes (and its FIN) received and delivered. */
  private received = 0;
  private lastAckSent = 0;
  private peerEnded = false;
  private localEnded = false;
  private localFailed = false;

  private timer: NodeJS.Timeout | undefined;
  private outageTimer: NodeJS.Timeout | undefined;
  private downSince: number | undefined;
  private isDone = false;
  private everUp = false;

  private bytesRead = 0;
  private bytesDelivered = 0;
  private replayedBytes = 0;
  private hopConnections = 0;
  private outages = 0;
  private outageMsTotal = 0;
  private longestOutage = 0;
  private lastCause: string | null = null;
  private peakUnacked = 0;

  constructor(opts: ResumableLinkOptions) {
    super();
    this.name = opts.name;
    this.local = opts.local;
    this.buffer = new ReplayBuffer(Math.max(64 << 10, opts.capacityBytes ?? RESUMABLE_DEFAULTS.capacityBytes));
    this.keepaliveMs = opts.keepaliveMs ?? RESUMABLE_DEFAULTS.keepaliveMs;
    this.silenceMs = Math.max(opts.silenceMs ?? RESUMABLE_DEFAULTS.silenceMs, 2 * this.keepaliveMs);
    this.maxOutageMs = opts.maxOutageMs ?? RESUMABLE_DEFAULTS.maxOutageMs;
    this.ackBytes = opts.ackBytes ?? RESUMABLE_DEFAULTS.ackBytes;
    this.onRead = opts.onRead ?? noop;
    this.onDelivered = opts.onDelivered ?? noop;
    // Until the first hop socket is attached the link counts as down (bounded by maxOutageMs too).
    this.startOutage();
    const local = this.local;
    local.on('data', (c: Buffer) => this.localData(c));
    local.on('end', () => this.localEnd());
    local.on('error', (e: Error) => this.localFailure(classifySocketError(e, this.name)));
    local.on('close', () => {
      if (!this.isDone && !(this.localEnded && this.peerEnded)) this.localFailure(new TransportError('closed', 'the local connection closed before its end was forwarded', { channel: this.name }));
    });
    this.timer = setInterval(() => this.tick(), Math.max(10, Math.floor(this.keepaliveMs / 2)));
    this.timer.unref();
    local.resume();
  }

  /** Received from the peer so far (what a HELLO / WELCOME tells the peer). */
  get receivedSeq(): number {
    return this.received;
  }

  get done(): boolean {
    return this.isDone;
  }

  get connected(): boolean {
    return this.hop !== undefined;
  }

  stats(): ResumableLinkStats {
    const now = performance.now();
    const current = this.downSince === undefined || !this.everUp ? 0 : now - this.downSince;
    return {
      name: this.name,
      state: this.isDone ? 'done' : this.hop ? 'up' : this.everUp ? 'down' : 'connecting',
      bytesRead: this.bytesRead,
      bytesDelivered: this.bytesDelivered,
      replayedBytes: this.replayedBytes,
      hopConnections: this.hopConnections,
      outages: this.outages,
      outageMs: Math.round(this.outageMsTotal + current),
      longestOutageMs: Math.round(Math.max(this.longestOutage, current)),
      lastOutageCause: this.lastCause,
      unacknowledgedBytes: this.buffer.unacknowledged,
      peakUnacknowledgedBytes: this.peakUnacked,
      capacityBytes: this.buffer.capacity,
    };
  }

  /**
   * Carries on over `socket` (its handshake done): the peer has `peerReceived`
   * of our direction, so everything after it is sent (again). `decoder` and
   * `frames`: what the owner's handshake read already. A socket attached while
   * another is attached replaces it. Throws 'hop-protocol' when the peer's
   * position is impossible (the link is then failed).
   */
  attach(socket: HopSocket, peerReceived: number, decoder = new HopFrameDecoder(), frames: readonly HopFrame[] = []): void {
    if (this.isDone) {
      socket.destroy();
      return;
    }
    if (this.hop) this.detach(new TransportError('closed', 'replaced by a new hop connection', { channel: this.name }), false);
    let replay: Buffer[];
    try {
      this.buffer.ack(peerReceived);
      replay = this.buffer.from(peerReceived);
    } catch (e) {
      socket.destroy();
      this.finish({ ok: false, error: e as TransportError }, true);
      throw e;
    }
    const now = performance.now();
    const outageMs = this.downSince === undefined ? 0 : now - this.downSince;
    if (this.everUp && this.downSince !== undefined) {
      this.outageMsTotal += outageMs;
      this.longestOutage = Math.max(this.longestOutage, outageMs);
    }
    this.downSince = undefined;
    clearTimeout(this.outageTimer);
    this.outageTimer = undefined;
    this.hop = socket;
    this.decoder = decoder;
    this.hopConnections++;
    this.everUp = true;
    this.hopWriteBlocked = false;
    this.hopReadPaused = false;
    this.lastRx = now;
    const replayed = Math.max(0, Math.min(this.sentEver, this.buffer.end) - peerReceived);
    this.replayedBytes += replayed;
    this.sentEnd = peerReceived;
    const onData = (c: Buffer): void => this.hopData(c);
    const onDrain = (): void => {
      this.hopWriteBlocked = false;
      this.updateLocalReading();
    };
    const onError = (e: Error): void => this.hopFailed(socket, classifySocketError(e, this.name));
    const onEnd = (): void => this.hopFailed(socket, new TransportError('closed', 'the peer ended the hop connection', { channel: this.name }));
    const onClose = (): void => this.hopFailed(socket, new TransportError('closed', 'the hop connection closed', { channel: this.name }));
    socket.on('data', onData);
    socket.on('drain', onDrain);
    socket.on('error', onError);
    socket.on('end', onEnd);
    socket.on('close', onClose);
    this.hopListeners = () => {
      socket.off('data', onData);
      socket.off('drain', onDrain);
      socket.off('error', onError);
      socket.off('end', onEnd);
      socket.off('close', onClose);
    };
    socket.cork();
    let seq = peerReceived;
    for (const v of replay) {
      this.sendData(socket, seq, v);
      seq += v.length;
    }
    this.sentEnd = this.buffer.end;
    if (this.localFailed) socket.write(encodeReset());
    else if (this.buffer.ended) socket.write(encodeFin(this.buffer.end));
    this.sendAck(socket);
    socket.uncork();
    this.emit('up', { hopConnection: this.hopConnections, outageMs: Math.round(outageMs), replayedBytes: replayed });
    for (const f of frames) if (this.hop === socket) this.frame(f);
    if (this.hop === socket) {
      socket.resume();
      this.updateLocalReading();
      this.checkDone();
    }
  }

  /** Ends everything now: the hop socket and the local connection are destroyed (the local one reset). */
  close(error = new TransportError('closed', 'the tunnel was closed', { channel: this.name })): void {
    if (this.isDone) {
      this.hop?.destroy();
      return;
    }
    this.finish({ ok: false, error }, true);
  }

  // ---- local side ----------------------------------------------------------

  private localData(c: Buffer): void {
    const t = performance.now();
    this.bytesRead += c.length;
    const seq = this.buffer.append(c);
    if (this.buffer.unacknowledged > this.peakUnacked) this.peakUnacked = this.buffer.unacknowledged;
    const hop = this.hop;
    if (hop) {
      // Large reads are split to the frame bound; a socket read is 64 KiB at most, so this rarely loops.
      if (c.length <= MAX_DATA_PAYLOAD) this.sendData(hop, seq, c);
      else for (let at = 0; at < c.length; at += MAX_DATA_PAYLOAD) this.sendData(hop, seq + at, c.subarray(at, at + MAX_DATA_PAYLOAD));
      this.sentEnd = this.buffer.end;
    }
    this.onRead(c, t);
    this.updateLocalReading();
  }

  private localEnd(): void {
    if (this.localEnded) return;
    this.localEnded = true;
    this.buffer.finish();
    const hop = this.hop;
    if (hop) this.send(hop, encodeFin(this.buffer.end));
    this.checkDone();
  }

  private localFailure(e: TransportError): void {
    if (this.isDone || this.localFailed) return;
    this.localFailed = true;
    // The peer's QEMU connection goes too (a reset, so that its QEMU notices at once).
    const hop = this.hop;
    if (hop) {
      hop.write(encodeReset());
      hop.end();
    }
    this.finish({ ok: false, error: e }, false);
  }

  /** Reads the local connection only while the replay buffer has room and the hop socket takes writes. */
  private updateLocalReading(): void {
    if (this.isDone || this.local.destroyed) return;
    const hold = this.buffer.full || this.hopWriteBlocked;
    if (hold) this.local.pause();
    else this.local.resume();
  }

  // ---- hop side ------------------------------------------------------------

  private sendData(hop: HopSocket, seq: number, payload: Buffer): void {
    // Header and payload leave together; the payload is not copied.
    hop.cork();
    hop.write(encodeDataHeader(seq, payload.length));
    const more = hop.write(payload);
    hop.uncork();
    this.lastTx = performance.now();
    if (seq + payload.length > this.sentEver) this.sentEver = seq + payload.length;
    if (!more) this.hopWriteBlocked = true;
  }

  private send(hop: HopSocket, frame: Buffer): void {
    if (!hop.write(frame)) this.hopWriteBlocked = true;
    this.lastTx = performance.now();
  }

  private sendAck(hop: HopSocket): void {
    this.lastAckSent = this.received;
    this.send(hop, encodeAck(this.received));
  }

  private hopData(c: Buffer): void {
    const decoder = this.decoder;
    const hop = this.hop;
    if (!decoder || !hop) return;
    this.lastRx = performance.now();
    let frames: HopFrame[];
    try {
      frames = decoder.push(c);
    } catch (e) {
      this.hopFailed(hop, e as TransportError);
      return;
    }
    for (const f of frames) {
      if (this.hop !== hop) return;
      this.frame(f);
    }
    if (this.hop === hop && this.received - this.lastAckSent >= this.ackBytes) this.sendAck(hop);
  }

  private frame(f: HopFrame): void {
    const hop = this.hop!;
    switch (f.type) {
      case 'data':
        this.peerData(hop, f.seq, f.payload);
        return;
      case 'ack':
        try {
          this.buffer.ack(f.received);
        } catch (e) {
          this.hopFailed(hop, e as TransportError);
          return;
        }
        this.updateLocalReading();
        this.checkDone();
        return;
      case 'fin':
        if (f.seq + 1 === this.received && this.peerEnded) return; // sent again after a reconnect
        if (f.seq !== this.received) {
          this.hopFailed(hop, new TransportError('hop-protocol', `FIN at byte ${f.seq}, but ${this.received} bytes were received`, { channel: this.name }));
          return;
        }
        this.received++;
        this.peerEnded = true;
        if (!this.local.destroyed) this.local.end();
        this.sendAck(hop);
        this.checkDone();
        return;
      case 'reset':
        this.lastCause = 'reset';
        this.finish({ ok: false, error: new TransportError('reset', "the peer's connection failed", { channel: this.name }) }, true);
        return;
      case 'hello':
      case 'welcome':
        this.hopFailed(hop, new TransportError('hop-protocol', `a ${f.type.toUpperCase()} in the middle of a hop connection`, { channel: this.name }));
        return;
    }
  }

  private peerData(hop: HopSocket, seq: number, payload: Buffer): void {
    if (this.peerEnded) {
      this.hopFailed(hop, new TransportError('hop-protocol', 'DATA after the FIN', { channel: this.name }));
      return;
    }
    if (seq > this.received) {
      this.hopFailed(hop, new TransportError('hop-protocol', `DATA at byte ${seq}, but only ${this.received} bytes were received (a gap)`, { channel: this.name }));
      return;
    }
    const skip = this.received - seq;
    if (skip >= payload.length) return; // sent again after a reconnect, delivered already
    const fresh = skip > 0 ? payload.subarray(skip) : payload;
    this.received += fresh.length;
    this.bytesDelivered += fresh.length;
    const t = performance.now();
    if (this.local.destroyed || this.local.writableEnded) return;
    const more = this.local.write(fresh);
    this.onDelivered(fresh, t);
    if (!more && !this.hopReadPaused) {
      // The local side is slower: stop reading the hop until it drains (silence does not count meanwhile).
      this.hopReadPaused = true;
      hop.pause();
      this.local.once('drain', () => {
        this.hopReadPaused = false;
        this.lastRx = performance.now();
        if (this.hop === hop && !hop.destroyed) hop.resume();
      });
    }
  }

  private hopFailed(socket: HopSocket, e: TransportError): void {
    if (this.hop !== socket) return;
    this.detach(e, true);
  }

  /** Drops the current hop socket; `notify`: a failure the owner must hear of (it reconnects). */
  private detach(e: TransportError, notify: boolean): void {
    const hop = this.hop;
    if (!hop) return;
    this.hopListeners?.();
    this.hopListeners = undefined;
    this.hop = undefined;
    this.decoder = undefined;
    hop.on('error', noop);
    hop.destroy();
    if (this.isDone) return;
    this.lastCause = e.code;
    this.outages++;
    this.startOutage();
    // Bytes from the local side wait in the replay buffer (bounded) meanwhile.
    this.updateLocalReading();
    if (notify) this.emit('down', e);
  }

  private startOutage(): void {
    this.downSince = performance.now();
    clearTimeout(this.outageTimer);
    this.outageTimer = setTimeout(() => this.outageExpired(), this.maxOutageMs);
    this.outageTimer.unref();
  }

  private outageExpired(): void {
    if (this.isDone || this.hop) return;
    // Both ways ended and the peer has all our bytes: only the last acknowledgement was lost.
    if (this.peerEnded && this.localEnded && this.buffer.unacknowledged === 0) {
      this.finish({ ok: true }, false);
      return;
    }
    const e = new TransportError('outage-timeout', `the hop was down for more than ${this.maxOutageMs} ms`, { channel: this.name });
    this.lastCause = this.lastCause ?? e.code;
    this.finish({ ok: false, error: e }, true);
  }

  private tick(): void {
    const hop = this.hop;
    if (!hop || this.isDone) return;
    const now = performance.now();
    if (!this.hopReadPaused && now - this.lastRx > this.silenceMs) {
      this.hopFailed(hop, new TransportError('idle-timeout', `no frame from the peer for ${Math.round(now - this.lastRx)} ms`, { channel: this.name }));
      return;
    }
    if (now - this.lastTx >= this.keepaliveMs || this.received !== this.lastAckSent) this.sendAck(hop);
  }

  private checkDone(): void {
    if (this.isDone || !this.peerEnded || !this.buffer.drained) return;
    this.finish({ ok: true }, false);
  }

  /** The link is over; `reset`: the local connection is reset (its QEMU must notice), else it is left to close by itself. */
  private finish(outcome: LinkOutcome, reset: boolean): void {
    if (this.isDone) return;
    this.isDone = true;
    clearInterval(this.timer);
    clearTimeout(this.outageTimer);
    if (this.downSince !== undefined && this.everUp) {
      const ms = performance.now() - this.downSince;
      this.outageMsTotal += ms;
      this.longestOutage = Math.max(this.longestOutage, ms);
      this.downSince = undefined;
    }
    const hop = this.hop;
    if (hop) {
      this.hopListeners?.();
      this.hopListeners = undefined;
      this.hop = undefined;
      hop.on('error', noop);
      if (outcome.ok) {
        // The last ACK is still on its way out: end, and destroy if the peer does not close its side.
        hop.end();
        setTimeout(() => hop.destroy(), 5000).unref();
        hop.once('end', () => hop.destroy());
      } else {
        hop.destroy();
      }
    }
    const local = this.local;
    local.on('error', noop);
    if (reset) resetSocket(local);
    else if (!outcome.ok) local.destroy();
    this.emit('done', outcome);
  }
}

/** RST where the socket can (TCP), a plain close otherwise (unix sockets, a FIN already pending). */
export function resetSocket(s: net.Socket): void {
  if (s.destroyed) return;
  try {
    if (s.writableEnded && !s.writableFinished && s.writableLength === 0) s.destroy();
    else s.resetAndDestroy();
  } catch {
    s.destroy();
  }
}

/** Bytes of framing per DATA frame (for overhead figures). */
export const DATA_FRAME_OVERHEAD = DATA_HEADER_LENGTH;
