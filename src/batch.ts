// The batch the loop holds between flushes: the newest update per agent and
// key (a later collected_at wins; on a tie, the later arrival), and its
// flattening into the parallel arrays that `UPDATE … FROM unnest` takes.

/** One flush, as parallel arrays (the shape `UPDATE … FROM unnest` takes). */
export interface MetadataBatch {
  agentIds: string[];
  keys: string[];
  values: string[];
  errors: string[];
  /** Microseconds since the epoch (timestamps.ts). */
  collectedAtMicros: number[];
}

/** One report of one key, as it travels through the channel. */
export interface Update {
  agentId: string;
  key: string;
  value: string;
  error: string;
  /** Microseconds since the epoch. */
  collectedAt: number;
}

interface Held {
  value: string;
  error: string;
  collectedAt: number;
}

/** Keys of one agent flattened between two steps of `fill`. */
const FILL_SLICE = 256;

export function emptyBatch(): MetadataBatch {
  return { agentIds: [], keys: [], values: [], errors: [], collectedAtMicros: [] };
}

export class PendingBatch {
  // Per agent, then per key: a flush groups by agent (utilization, NOTIFY).
  private agents = new Map<string, Map<string, Held>>();
  private count = 0;

  /** Distinct (agent, key) entries held. */
  get size(): number {
    return this.count;
  }

  has(agentId: string, key: string): boolean {
    return this.agents.get(agentId)?.has(key) ?? false;
  }

  /** Keeps the update unless the entry held for its agent and key is newer. */
  merge(update: Update): void {
    let keys = this.agents.get(update.agentId);
    if (!keys) {
      keys = new Map();
      this.agents.set(update.agentId, keys);
    }
    const held = keys.get(update.key);
    if (held) {
      if (update.collectedAt < held.collectedAt) return;
      held.value = update.value;
      held.error = update.error;
      held.collectedAt = update.collectedAt;
      return;
    }
    keys.set(update.key, { value: update.value, error: update.error, collectedAt: update.collectedAt });
    this.count++;
  }

  /** The entries as the UPDATE's arrays, at once; `perAgent` sees each agent's number of keys. */
  toArrays(perAgent?: (keys: number) => void): MetadataBatch {
    const filling = this.fill(perAgent);
    for (let step = filling.next(); ; step = filling.next()) if (step.done) return step.value;
  }

  /**
   * The entries as the UPDATE's arrays, yielding after every agent (and
   * every FILL_SLICE keys of one): the caller may take a turn of the event
   * loop between steps (slices.ts). Nothing may merge until it is done.
   */
  *fill(perAgent?: (keys: number) => void): Generator<void, MetadataBatch> {
    // Sized once: no array grows (and is copied) on the way.
    const batch: MetadataBatch = {
      agentIds: new Array<string>(this.count),
      keys: new Array<string>(this.count),
      values: new Array<string>(this.count),
      errors: new Array<string>(this.count),
      collectedAtMicros: new Array<number>(this.count),
    };
    let i = 0;
    for (const [agentId, keys] of this.agents) {
      perAgent?.(keys.size);
      for (const [key, held] of keys) {
        batch.agentIds[i] = agentId;
        batch.keys[i] = key;
        batch.values[i] = held.value;
        batch.errors[i] = held.error;
        batch.collectedAtMicros[i] = held.collectedAt;
        if (++i % FILL_SLICE === 0) yield;
      }
      yield;
    }
    return batch;
  }

  clear(): void {
    this.agents = new Map();
    this.count = 0;
  }
}
