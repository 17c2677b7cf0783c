import net from 'node:net';
import { ReturnPathDecoder, StreamEncoder, concatPieces, type ReturnPathMessage, type StreamRecord } from '../../src/index.js';

/** A scripted source: a raw socket that writes records and reads the return path. */
export async function scriptedSource(uri: string) {
  const port = Number(uri.split(':').pop());
  const sock = net.connect(port, '127.0.0.1');
  await new Promise((r) => sock.once('connect', r));
  const rp = new ReturnPathDecoder();
  const messages: ReturnPathMessage[] = [];
  let wake: (() => void) | undefined;
  sock.on('data', (c) => {
    messages.push(...rp.push(c));
    wake?.();
  });
  sock.on('error', () => undefined);
  const enc = new StreamEncoder({ continueMode: 'as-recorded' });
  return {
    sock,
    messages,
    write(records: StreamRecord[]) {
      enc.writeAll(records);
      sock.write(concatPieces(enc.take()));
    },
    async waitFor(pred: (m: ReturnPathMessage[]) => boolean, ms = 5000): Promise<void> {
      const deadline = Date.now() + ms;
      while (!pred(messages)) {
        if (Date.now() > deadline) throw new Error(`timeout; got ${JSON.stringify(messages)}`);
        await new Promise<void>((r) => {
          wake = r;
          setTimeout(r, 20);
        });
      }
    },
  };
}
