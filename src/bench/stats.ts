// Small numeric helpers for the benchmark's figures.

export interface Summary {
  count: number;
  p50: number;
  p99: number;
  max: number;
  mean: number;
}

/** Percentiles by nearest rank of a list of numbers (milliseconds, usually). */
export function summarize(values: ArrayLike<number>): Summary {
  const sorted = Float64Array.from(values).sort();
  const count = sorted.length;
  if (count === 0) return { count, p50: 0, p99: 0, max: 0, mean: 0 };
  const rank = (q: number) => sorted[Math.min(count - 1, Math.max(0, Math.ceil(q * count) - 1))]!;
  let total = 0;
  for (const v of sorted) total += v;
  return { count, p50: rank(0.5), p99: rank(0.99), max: sorted[count - 1]!, mean: total / count };
}

export function round(value: number, digits = 2): number {
  const factor = 10 ** digits;
  return Math.round(value * factor) / factor;
}
