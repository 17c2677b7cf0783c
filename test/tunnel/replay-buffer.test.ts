/**
 * The replay buffer of a hop direction (src/transport/resumable-buffer.ts):
 * it gives back exactly the bytes after any position between the
 * acknowledged point and the end, trims on acknowledgements, counts the FIN
 * as one number, and refuses impossible positions with 'hop-protocol'.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { TransportError } from '../../src/transport/errors.js';
import { ReplayBuffer } from '../../src/transport/resumable-buffer.js';

const join = (bs: Buffer[]): Buffer => Buffer.concat(bs);

describe('ReplayBuffer', () => {
  it('replays from any position and trims on acknowledgements', () => {
    const b = new ReplayBuffer(100);
    expect(b.append(Buffer.from('abc'))).toBe(0);
    expect(b.append(Buffer.from('defg'))).toBe(3);
    expect(b.append(Buffer.from('h'))).toBe(7);
    expect(b.end).toBe(8);
    for (let i = 0; i <= 8; i++) expect(join(b.from(i)).toString()).toBe('abcdefgh'.slice(i));
    b.ack(5);
    expect(b.unacknowledged).toBe(3);
    expect(join(b.from(5)).toString()).toBe('fgh');
    expect(join(b.from(7)).toString()).toBe('h');
    expect(() => b.from(4)).toThrow(/outside what this side holds \(5\.\.8\)/);
    b.ack(3); // acknowledgements never go back
    expect(b.acknowledged).toBe(5);
    b.ack(8);
    expect(b.from(8)).toEqual([]);
    expect(b.unacknowledged).toBe(0);
  });

  it('counts the FIN as one number after the last byte', () => {
    const b = new ReplayBuffer(10);
    b.append(Buffer.from('xy'));
    b.finish();
    expect(b.ended).toBe(true);
    expect(b.total).toBe(3);
    expect(b.drained).toBe(false);
    b.ack(2);
    expect(b.drained).toBe(false);
    expect(b.from(3)).toEqual([]);
    b.ack(3);
    expect(b.drained).toBe(true);
    expect(() => b.append(Buffer.from('z'))).toThrow(TransportError);
  });

  it('is full at its capacity, and refuses acknowledgements of bytes never sent', () => {
    const b = new ReplayBuffer(4);
    b.append(Buffer.from('abc'));
    expect(b.full).toBe(false);
    b.append(Buffer.from('de'));
    expect(b.full).toBe(true);
    b.ack(2);
    expect(b.full).toBe(false);
    let err: unknown;
    try {
      b.ack(6);
    } catch (e) {
      err = e;
    }
    expect((err as TransportError).code).toBe('hop-protocol');
    expect(() => new ReplayBuffer(0)).toThrow(RangeError);
  });

  it('keeps the chunks as views, not copies', () => {
    const b = new ReplayBuffer(100);
    const chunk = Buffer.from('0123456789');
    b.append(chunk);
    b.ack(4);
    const [v] = b.from(6);
    expect(v?.buffer).toBe(chunk.buffer);
    expect(v?.toString()).toBe('6789');
  });

  it('gives back exactly the bytes after any position under any appends and acks (fast-check)', () => {
    fc.assert(
      fc.property(
        fc.array(fc.oneof(fc.record({ append: fc.uint8Array({ minLength: 0, maxLength: 50 }) }), fc.record({ ack: fc.nat() })), { maxLength: 200 }),
        fc.nat(),
        (ops, probe) => {
          const b = new ReplayBuffer(1 << 20);
          const all: number[] = [];
          let acked = 0;
          for (const op of ops) {
            if ('append' in op) {
              expect(b.append(Buffer.from(op.append))).toBe(all.length);
              all.push(...op.append);
            } else {
              const to = all.length === 0 ? 0 : op.ack % (all.length + 1);
              b.ack(to);
              acked = Math.max(acked, to);
            }
          }
          expect(b.acknowledged).toBe(acked);
          expect(b.unacknowledged).toBe(all.length - acked);
          const at = acked + (all.length - acked === 0 ? 0 : probe % (all.length - acked + 1));
          expect([...join(b.from(at))]).toEqual(all.slice(at));
        },
      ),
      { numRuns: 300 },
    );
  });
});
