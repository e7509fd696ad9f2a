// A Server-Sent Events parser for streams read with fetch (EventSource
// cannot send an Authorization header). It follows the WHATWG event-stream
// rules the page needs: lines end in \r\n, \n or \r (a \r\n may be split
// across chunks); `:` starts a comment; `field: value` loses one leading
// space; `data` lines join with \n; a blank line dispatches the event (none
// when it has no data); `id` and `retry` are ignored.

export interface SseEvent {
  /** `message` when the stream named none. */
  event: string;
  data: string;
}

const LINE_END = /\r\n|\r|\n/g;

export class SseParser {
  private rest = '';
  /** The last chunk ended in \r: a \n starting the next one ends nothing. */
  private afterCR = false;
  private event = '';
  private data: string[] = [];

  constructor(private readonly onEvent: (event: SseEvent) => void) {}

  /** Feeds decoded text, as it arrives. */
  push(chunk: string): void {
    let text = chunk;
    if (this.afterCR && text.startsWith('\n')) text = text.slice(1);
    this.afterCR = false;
    LINE_END.lastIndex = 0;
    let start = 0;
    for (let match = LINE_END.exec(text); match; match = LINE_END.exec(text)) {
      const line = this.rest + text.slice(start, match.index);
      this.rest = '';
      start = match.index + match[0].length;
      if (match[0] === '\r' && start === text.length) this.afterCR = true;
      this.line(line);
    }
    this.rest += text.slice(start);
  }

  private line(line: string): void {
    if (line === '') return this.dispatch();
    if (line.startsWith(':')) return;
    const colon = line.indexOf(':');
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'event') this.event = value;
    else if (field === 'data') this.data.push(value);
  }

  private dispatch(): void {
    const event = this.event || 'message';
    const data = this.data;
    this.event = '';
    this.data = [];
    if (data.length > 0) this.onEvent({ event, data: data.join('\n') });
  }
}
