// How one send of the reporter ends (`Outcome`): the seam between its send
// loop (reporter.ts) and its two transports, the stream (reporterStream.ts)
// and POST (reporterPost.ts). Each transport turns what the service said, or
// did not say, into one of these; the loop settles the held keys by it. Also
// the reporter's one error type, and the readers of the service's answers
// that both transports share.

export class ReporterError extends Error {
  override name = 'ReporterError';
  /** The HTTP status of the answer, when there was one. */
  readonly status: number | undefined;
  /** The stream's close code, when it was closed. */
  readonly closeCode: number | undefined;
  /** The reporter stopped for good (the token was refused): create a new one with a valid token. */
  readonly fatal: boolean;

  constructor(
    message: string,
    details: { status?: number; closeCode?: number; fatal?: boolean; cause?: unknown } = {},
  ) {
    super(message, details.cause === undefined ? undefined : { cause: details.cause });
    this.status = details.status;
    this.closeCode = details.closeCode;
    this.fatal = details.fatal ?? false;
  }
}

/**
 * How a send ended:
 * - `ack`: answered, with how many keys were taken and dropped (and when to send the dropped again);
 * - `refused`: refused whole (400, 415, an `error` answer): its keys are not sent again;
 * - `tooBig`: refused as too big (413, close code 1009): sent again in smaller messages;
 * - `fatal`: the token was refused (401, 403, close code 4001): the reporter stops;
 * - `failed`: no usable answer (network, timeout, another status or close code): sent again after a backoff;
 * - `aborted`: the reporter stopped while it was in flight.
 */
export type Outcome =
  | { kind: 'ack'; accepted: number; dropped: number; retryAfterS: number }
  | { kind: 'refused'; error: ReporterError }
  | { kind: 'tooBig'; error: ReporterError }
  | { kind: 'fatal'; error: ReporterError }
  | { kind: 'failed'; error: ReporterError }
  | { kind: 'aborted' };

/** Hears how a send ended; called once per send. */
export type OutcomeListener = (outcome: Outcome) => void;

// How much of a refused upgrade's or POST's body is read for the error message.
export const MAX_ERROR_BODY_BYTES = 4096;
// Acknowledgements are small JSON objects.
export const MAX_ANSWER_BYTES = 64 * 1024;

/** The fatal error of a refused token (401, 403, or close code 4001). */
export function tokenRefused(status: number | undefined, message: string, closeCode?: number): ReporterError {
  return new ReporterError(
    `metabatch refused the agent token (${status ?? `close code ${closeCode}`}: ${message}); ` +
      'a wrong token stays wrong: create a new reporter with a valid token',
    { fatal: true, ...(status === undefined ? {} : { status }), ...(closeCode === undefined ? {} : { closeCode }) },
  );
}

/** The service's `{"error": …}` message, or the start of a body that is not one. */
export function errorMessage(body: string): string {
  try {
    const parsed = JSON.parse(body) as unknown;
    if (parsed && typeof parsed === 'object' && typeof (parsed as { error?: unknown }).error === 'string') {
      return (parsed as { error: string }).error;
    }
  } catch {
    // Not JSON: the text itself.
  }
  return body.trim().slice(0, 200);
}

/** `retry_after` (or Retry-After) in seconds; 1 when missing or unreadable, as the service's shortest. */
export function retryAfterSeconds(raw: unknown): number {
  const seconds = typeof raw === 'string' ? Number(raw.trim()) : typeof raw === 'number' ? raw : Number.NaN;
  return Number.isFinite(seconds) && seconds > 0 ? seconds : 1;
}
