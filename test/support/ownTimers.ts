// The timers one piece of code arms, and only those: for an object that
// takes no clock (the listener SDK runs on pg-listen's and pg's own timers),
// where counting the whole process's timers would count other tests' too.
//
// Work run through `run()` executes in an AsyncLocalStorage context of its
// own, which Node carries into every callback it causes (socket events,
// promise continuations, timer callbacks). An async hook keeps each Timeout
// created while that context is current. Timers of code started outside
// `run()` are never kept, whenever they come and go.

import { AsyncLocalStorage, createHook } from 'node:async_hooks';

export interface OwnTimers {
  /** Runs `work` (and everything it starts, now or later) as the owner of the timers counted. */
  run<T>(work: () => T): T;
  /** Timers armed by the owner's work that are still pending. */
  pending(): number;
  /** Stops watching. */
  dispose(): void;
}

// Node marks a Timeout `_destroyed` synchronously when it is cleared, or when
// it has fired and does not repeat (lib/internal/timers.js). The async hook's
// own `destroy` callback comes later, from a queue drained on a later turn:
// reading it right after close() would count timers already gone.
type Timeout = { _destroyed?: boolean };

export function ownTimers(): OwnTimers {
  const owner = new AsyncLocalStorage<true>();
  const timers: Timeout[] = [];
  const hook = createHook({
    init(_asyncId, type, _triggerAsyncId, resource) {
      if (type === 'Timeout' && owner.getStore() === true) timers.push(resource);
    },
  }).enable();
  return {
    run: (work) => owner.run(true, work),
    pending: () => timers.filter((t) => t._destroyed !== true).length,
    dispose: () => hook.disable(),
  };
}
