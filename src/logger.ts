// pino JSON logs to stdout. Secrets never reach a log line: tokens are
// redacted wherever they could appear.

import { pino, type Logger, type DestinationStream } from 'pino';

export type { Logger };

export function createLogger(level: string, destination?: DestinationStream): Logger {
  return pino(
    {
      name: 'metabatch',
      level,
      redact: { paths: ['req.headers.authorization', 'token', '*.token', 'password'], censor: '[redacted]' },
    },
    destination,
  );
}
