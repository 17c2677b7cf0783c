import { expect } from 'vitest';
import { MigrationError } from '../../src/protocol/errors.js';

/** The MigrationError a promise rejects with (fails the test if it resolves or rejects with something else). */
export async function rejection(p: Promise<unknown>): Promise<MigrationError> {
  const e = await p.then(
    () => new Error('resolved'),
    (err: unknown) => err,
  );
  expect(e).toBeInstanceOf(MigrationError);
  return e as MigrationError;
}
