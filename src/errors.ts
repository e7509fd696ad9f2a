// The error a route or hook throws to answer with a status and a message.
// The app's error handler turns it into `{"error": "<message>"}`.

export class HttpError extends Error {
  constructor(
    readonly statusCode: number,
    message: string,
  ) {
    super(message);
  }
}
