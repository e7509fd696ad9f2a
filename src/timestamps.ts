// Timestamps as metabatch carries them: whole microseconds since the epoch
// (Postgres's own precision; a JavaScript Date has only milliseconds), read
// from RFC 3339 text with its time zone, and written back as RFC 3339 in UTC.
// A double holds every microsecond exactly from 1685 to 2255 (2^53 µs either
// side of 1970); times further away are rounded to the nearest value it can
// hold (at worst 8 µs off at year 1). Agents' times are near now: a time in
// the future is clamped to the server's.

const DIGIT_0 = 48;
// Days in each month of a common year; February gains one in a leap year.
const DAYS_IN_MONTH = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];

/** A Date's microseconds since the epoch. */
export function dateToMicros(date: Date): number {
  return date.getTime() * 1000;
}

/**
 * `2026-11-23T00:00:00Z`, `2026-11-23 10:00:00.123456789+02:00`, … as
 * microseconds since the epoch, rounded to the microsecond as Postgres
 * rounds; undefined for anything else (an impossible date included). A hand
 * parser: a regex plus Date.parse was the ingest route's largest cost.
 */
export function parseRfc3339Micros(text: string): number | undefined {
  const length = text.length;
  if (length < 20) return undefined;
  const year = digits(text, 0, 4);
  const month = digits(text, 5, 2);
  const day = digits(text, 8, 2);
  const hour = digits(text, 11, 2);
  const minute = digits(text, 14, 2);
  const second = digits(text, 17, 2);
  if (year < 1 || month < 1 || month > 12 || day < 1 || hour < 0 || hour > 23 || minute < 0 || minute > 59) {
    return undefined;
  }
  if (second < 0 || second > 59) return undefined;
  const separator = text.charCodeAt(10);
  if (
    text.charCodeAt(4) !== 45 || // -
    text.charCodeAt(7) !== 45 ||
    (separator !== 84 && separator !== 116 && separator !== 32) || // T, t, space
    text.charCodeAt(13) !== 58 || // :
    text.charCodeAt(16) !== 58
  ) {
    return undefined;
  }
  const leap = year % 4 === 0 && (year % 100 !== 0 || year % 400 === 0);
  if (day > DAYS_IN_MONTH[month - 1]! + (month === 2 && leap ? 1 : 0)) return undefined;
  let index = 19;
  // The fraction: as many digits as given, rounded to microseconds.
  let micros = 0;
  if (text.charCodeAt(index) === 46) {
    index++;
    const start = index;
    let fraction = 0;
    let scale = 1;
    while (index < length) {
      const digit = text.charCodeAt(index) - DIGIT_0;
      if (digit < 0 || digit > 9) break;
      if (index - start < 7) {
        fraction = fraction * 10 + digit;
        scale *= 10;
      }
      index++;
    }
    if (index === start) return undefined;
    micros = Math.round((fraction * 1_000_000) / scale);
  }
  let offsetMinutes = 0;
  const zone = text.charCodeAt(index);
  if (zone === 90 || zone === 122) {
    // Z, z
    index++;
  } else if (zone === 43 || zone === 45) {
    // +hh:mm, -hh:mm
    const offsetHour = digits(text, index + 1, 2);
    const offsetMinute = digits(text, index + 4, 2);
    if (offsetHour < 0 || offsetHour > 23 || offsetMinute < 0 || offsetMinute > 59) return undefined;
    if (text.charCodeAt(index + 3) !== 58) return undefined;
    offsetMinutes = (zone === 45 ? -1 : 1) * (offsetHour * 60 + offsetMinute);
    index += 6;
  } else {
    return undefined;
  }
  if (index !== length) return undefined;
  const ms = utcMillis(year, month, day, hour, minute, second) - offsetMinutes * 60_000;
  return ms * 1000 + micros;
}

/** Microseconds since the epoch as RFC 3339 in UTC, with all six digits: 2026-11-23T00:00:00.123456Z. */
export function microsToIso(micros: number): string {
  const ms = Math.floor(micros / 1000);
  const rest = micros - ms * 1000;
  const iso = new Date(ms).toISOString();
  return `${iso.slice(0, -1)}${rest < 10 ? '00' : rest < 100 ? '0' : ''}${rest}Z`;
}

/** A run of decimal digits as a number, or -1. */
function digits(text: string, start: number, count: number): number {
  let value = 0;
  for (let i = start; i < start + count; i++) {
    const digit = text.charCodeAt(i) - DIGIT_0;
    if (digit < 0 || digit > 9) return -1;
    value = value * 10 + digit;
  }
  return value;
}

/** Date.UTC, except that it reads years 0–99 as 1900–1999. */
function utcMillis(year: number, month: number, day: number, hour: number, minute: number, second: number): number {
  if (year >= 100) return Date.UTC(year, month - 1, day, hour, minute, second);
  const date = new Date(0);
  date.setUTCFullYear(year, month - 1, day);
  date.setUTCHours(hour, minute, second, 0);
  return date.getTime();
}
