// A server's /metrics scrape as numbers by series, and what grew between two
// scrapes: the service's own counters, read around each measured run.

/** Series name, labels included (`metabatch_metadata_batches_total{reason="capacity"}`), to value. */
export type Scrape = Map<string, number>;

/** The samples of a Prometheus text exposition; comments and anything else skipped. */
export function parseScrape(text: string): Scrape {
  const values: Scrape = new Map();
  for (const line of text.split('\n')) {
    const match = /^([a-z_]+(?:\{[^}]*\})?) ([\d.e+-]+|NaN)$/.exec(line);
    if (match) values.set(match[1]!, Number(match[2]));
  }
  return values;
}

/** How much each series of a /metrics scrape grew since an earlier one. */
export function since(before: Scrape, after: Scrape): (series: string) => number {
  return (series) => (after.get(series) ?? 0) - (before.get(series) ?? 0);
}
