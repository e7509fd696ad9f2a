// A bounded FIFO between the request handlers and the batcher loop, the
// TypeScript form of the original's buffered Go channel: `trySend` never
// blocks and refuses when full; only the loop receives.

export class BoundedChannel<T> {
  readonly capacity: number;
  private readonly items: (T | undefined)[];
  private head = 0;
  private size = 0;

  constructor(capacity: number) {
    if (!Number.isSafeInteger(capacity) || capacity < 1) throw new RangeError(`capacity must be >= 1, got ${capacity}`);
    this.capacity = capacity;
    this.items = new Array<T | undefined>(capacity);
  }

  get length(): number {
    return this.size;
  }

  /** Queues `item` unless the channel is full; returns whether it was queued. */
  trySend(item: T): boolean {
    if (this.size === this.capacity) return false;
    this.items[(this.head + this.size) % this.capacity] = item;
    this.size++;
    return true;
  }

  /** Takes the oldest item, or undefined when empty. */
  receive(): T | undefined {
    if (this.size === 0) return undefined;
    const item = this.items[this.head];
    this.items[this.head] = undefined;
    this.head = (this.head + 1) % this.capacity;
    this.size--;
    return item;
  }
}
