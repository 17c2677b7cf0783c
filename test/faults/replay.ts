/**
 * Replaying a failure fast-check reported. Its message names a seed and a
 * path ("seed: -1341018361, path: 7"); run the same file with
 * `FC_SEED=-1341018361 FC_PATH=7` to draw that scenario again first (the
 * guest's writes and the machine's timing are not part of the seed: a
 * timing-dependent failure may need several runs). The path counts a
 * test's `examples` first: after adding one, add one to an older path.
 * Unset: fresh seeds.
 */
export function replayParameters(): { seed?: number; path?: string } {
  const seed = process.env.FC_SEED;
  if (seed === undefined || seed === '') return {};
  const path = process.env.FC_PATH;
  return { seed: Number(seed), ...(path ? { path } : {}) };
}
