// Time as the batcher sees it. `globalThis` satisfies this interface, and so
// does `@sinonjs/fake-timers`' `createClock()`, which tests inject so that the
// loop's timing is driven by hand while Postgres keeps its real timers.

export interface Clock {
  setTimeout(callback: () => void, ms: number): unknown;
  clearTimeout(handle: unknown): void;
  Date: { now(): number };
}

export const systemClock: Clock = globalThis;
