// The printed table: a header line about the machine, then each scenario's
// rows (see Scenario.rows) in aligned columns. The cell helpers are here so
// that every section formats numbers and targets alike.

/** The machine the figures were measured on, as the JSON report records it. */
export interface Machine {
  node: string;
  cpus: number;
  cpu: string;
  memoryGb: number;
  postgres: string;
  embedded: boolean;
}

/** A number with thousands separators, at most `digits` decimals; '-' when there is none. */
export const fmt = (n: number | undefined, digits = 0) =>
  n === undefined ? '-' : n.toLocaleString('en-US', { maximumFractionDigits: digits });

/** A target's verdict. */
export const check = (ok: boolean) => (ok ? 'met' : 'MISSED');

export function table(machine: Machine, seconds: number, rows: string[][]): string {
  const widths = rows[0]!.map((_, c) => Math.max(...rows.map((r) => (r[c] ?? '').length)));
  const header = `metabatch bench: Node ${machine.node}, ${machine.cpus} cores (${machine.cpu}), ${machine.memoryGb} GB, Postgres ${machine.postgres}${machine.embedded ? ' (embedded)' : ''}, ${seconds} s`;
  return [
    header,
    '',
    ...rows.map((r) =>
      r
        .map((cell, c) => (cell ?? '').padEnd(widths[c]!))
        .join('  ')
        .trimEnd(),
    ),
  ].join('\n');
}
