// What every `metabatch` command shares: the database it works on, and the
// error that means "you called it wrong" (exit 2, one line).

import type { Config } from '../config.js';
import { openDatabase } from '../database.js';
import type { Logger } from '../logger.js';

export class UsageError extends Error {
  override name = 'UsageError';
}

/** Runs `work` against DATABASE_URL, the running service's embedded Postgres, or one started for the occasion. */
export async function withDatabase(
  config: Config,
  log: Logger,
  work: (url: string) => Promise<number>,
): Promise<number> {
  const database = await openDatabase({
    databaseUrl: config.databaseUrl,
    dataDir: config.dataDir,
    log,
    reuseRunning: true,
  });
  try {
    return await work(database.url);
  } finally {
    await database.close();
  }
}

/** Lines of columns, padded to the widest cell (the last column unpadded). */
export function table(rows: readonly (readonly string[])[]): string {
  const widths = rows[0]?.map((_, column) => Math.max(...rows.map((row) => (row[column] ?? '').length))) ?? [];
  return rows
    .map((row) =>
      row
        .map((cell, column) => (column === row.length - 1 ? cell : cell.padEnd(widths[column]!)))
        .join('  ')
        .trimEnd(),
    )
    .join('\n');
}
