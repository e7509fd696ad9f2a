// Long synchronous work (flattening a 20,000-entry batch, building its array
// literals) done in pieces, with a turn of the event loop every couple of
// milliseconds: requests are answered meanwhile. The pieces are small and
// the turns are taken by time, not by count, so that cold (not yet
// optimised) code or a slow machine does not hold the loop any longer.

import { setImmediate as nextTurn } from 'node:timers/promises';

/** Work done between two turns of the event loop, at most (give or take one piece). */
export const SLICE_MS = 2;

/**
 * Runs `steps`, a generator that yields between small pieces of work, taking
 * a turn of the event loop whenever SLICE_MS have passed; resolves with what
 * it returns. `around` wraps each span of work (the flush's CPU accounting).
 */
export async function inSlices<T>(
  steps: Generator<void, T>,
  around: <R>(work: () => R) => R = (work) => work(),
): Promise<T> {
  const span = (): IteratorResult<void, T> => {
    const until = performance.now() + SLICE_MS;
    let step = steps.next();
    while (!step.done && performance.now() < until) step = steps.next();
    return step;
  };
  for (;;) {
    const step = around(span);
    if (step.done) return step.value;
    await nextTurn();
  }
}
