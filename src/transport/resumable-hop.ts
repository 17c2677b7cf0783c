/**
 * The handshake of a hop connection (`qmt tunnel`, resumable-frames.ts): the
 * entry's HELLO and the exit's WELCOME, each the first frame its sender
 * writes. Reading one waits at most `timeoutMs`; anything else (other bytes,
 * an end, a reset, silence) is a typed TransportError and the socket is
 * destroyed. The decoder that read the handshake, with the frames it decoded
 * after it, goes on to the ResumableConnection.
 */
import { HopFrameDecoder, encodeHello, encodeWelcome, type HopFrame, type HopRole, type WelcomeStatus } from './resumable-frames.js';
import type { HopSocket } from './resumable.js';
import { TransportError, type ChannelName } from './errors.js';

export interface HandshakeRead<F extends HopFrame> {
  readonly frame: F;
  readonly decoder: HopFrameDecoder;
  /** Frames that came after the handshake in the same reads. */
  readonly after: HopFrame[];
}

/** Reads the first frame of `socket`; it must be of type `type`. */
function readFirst<T extends 'hello' | 'welcome'>(socket: HopSocket, type: T, timeoutMs: number, channel?: ChannelName): Promise<HandshakeRead<Extract<HopFrame, { type: T }>>> {
  const decoder = new HopFrameDecoder();
  const where = channel ? { channel } : {};
  return new Promise((resolve, reject) => {
    const done = (): void => {
      clearTimeout(timer);
      socket.off('data', onData);
      socket.off('error', onError);
      socket.off('close', onClose);
      socket.off('end', onClose);
    };
    const failWith = (e: TransportError): void => {
      done();
      socket.on('error', () => undefined);
      socket.destroy();
      reject(e);
    };
    const onData = (c: Buffer): void => {
      let frames: HopFrame[];
      try {
        frames = decoder.push(c);
      } catch (e) {
        failWith(e as TransportError);
        return;
      }
      if (frames.length === 0) return;
      const [first, ...after] = frames;
      if (first!.type !== type) {
        failWith(new TransportError('hop-protocol', `the first hop frame is ${first!.type.toUpperCase()}, not ${type.toUpperCase()}`, where));
        return;
      }
      done();
      // Nothing is read until the connection takes the socket over (its own 'data' listener).
      socket.pause();
      resolve({ frame: first as Extract<HopFrame, { type: T }>, decoder, after });
    };
    const onError = (e: Error): void => failWith(TransportError.is(e) ? e : new TransportError((e as NodeJS.ErrnoException).code === 'ECONNRESET' ? 'reset' : 'closed', `before the ${type.toUpperCase()}: ${e.message}`, { ...where, cause: e }));
    const onClose = (): void => failWith(new TransportError('closed', `the hop connection ended before its ${type.toUpperCase()}`, where));
    const timer = setTimeout(() => failWith(new TransportError('qualify-timeout', `no ${type.toUpperCase()} within ${timeoutMs} ms`, where)), timeoutMs);
    socket.on('data', onData);
    socket.on('error', onError);
    socket.on('close', onClose);
    socket.on('end', onClose);
    socket.resume();
  });
}

/** The entry's side: HELLO, then the exit's WELCOME. */
export function hello(
  socket: HopSocket,
  f: { resume: boolean; tunnel: Uint8Array; connection: number; role: HopRole; received: number },
  timeoutMs: number,
  channel?: ChannelName,
): Promise<HandshakeRead<Extract<HopFrame, { type: 'welcome' }>>> {
  const read = readFirst(socket, 'welcome', timeoutMs, channel);
  socket.write(encodeHello(f));
  return read;
}

/** The exit's side: the entry's HELLO. */
export function readHello(socket: HopSocket, timeoutMs: number): Promise<HandshakeRead<Extract<HopFrame, { type: 'hello' }>>> {
  return readFirst(socket, 'hello', timeoutMs);
}

/** The exit's answer. */
export function welcome(socket: HopSocket, status: WelcomeStatus, received: number): void {
  socket.write(encodeWelcome({ status, received }));
}
