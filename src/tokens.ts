// Agent tokens: how they are made, how their shape is checked before any
// lookup, and how they are stored and cached (their SHA-256 only).
//
// A token is `mbt_` and 48 base64url characters: 32 random bytes followed by
// their CRC-32 (big-endian), as GitHub's tokens carry a CRC-32 of their random
// part. The checksum is no secret and no signature: it lets the service refuse
// a mistyped, truncated or random token without asking the database (a random
// 48-character token passes with odds of 1 in 2^32), and lets a secret scanner
// recognise a real token offline.
//
// Tokens issued before the checksum (`mbt_` and 43 characters from 32 random
// bytes, or 32 characters from 24 bytes for provisioned agents) keep working:
// a token of `mbt_` and 32 to 43 base64url characters is legacy-shaped and is
// looked up as before. Nothing tells a random legacy-shaped token from a real
// one without the database, so each still costs one query (then 5 s remembered
// as unknown); the per-address bound on failures (authFailures.ts) caps that.

import crypto, { createHash, randomBytes } from 'node:crypto';
import { crc32 } from 'node:zlib';

export const TOKEN_PREFIX = 'mbt_';
/** Random bytes of a token: 256 bits, unguessable, so a fast hash is enough to store it. */
const RANDOM_BYTES = 32;
const CHECKSUM_BYTES = 4;
/** 36 bytes are exactly 48 base64url characters: no padding bits, one spelling per token. */
const CHECKSUMMED_LENGTH = ((RANDOM_BYTES + CHECKSUM_BYTES) * 4) / 3;
/** The lengths earlier versions issued: 32 (24 bytes, provisioned agents) to 43 (32 bytes). */
const LEGACY_MIN_LENGTH = 32;
const LEGACY_MAX_LENGTH = 43;
const BASE64URL = /^[A-Za-z0-9_-]+$/;

/** What a token's shape says before any lookup. */
export type TokenShape = 'checksummed' | 'legacy' | 'malformed';

/** A new agent token: `mbt_` and 48 base64url characters (32 random bytes and their CRC-32). */
export function newAgentToken(): string {
  const bytes = Buffer.alloc(RANDOM_BYTES + CHECKSUM_BYTES);
  randomBytes(RANDOM_BYTES).copy(bytes);
  bytes.writeUInt32BE(crc32(bytes.subarray(0, RANDOM_BYTES)), RANDOM_BYTES);
  return TOKEN_PREFIX + bytes.toString('base64url');
}

/** Whether a token can be an agent's, from its shape alone (no lookup). */
export function agentTokenShape(token: string): TokenShape {
  if (!token.startsWith(TOKEN_PREFIX)) return 'malformed';
  const body = token.slice(TOKEN_PREFIX.length);
  if (!BASE64URL.test(body)) return 'malformed';
  if (body.length === CHECKSUMMED_LENGTH) {
    const bytes = Buffer.from(body, 'base64url');
    const sum = bytes.readUInt32BE(RANDOM_BYTES);
    return crc32(bytes.subarray(0, RANDOM_BYTES)) === sum ? 'checksummed' : 'malformed';
  }
  return body.length >= LEGACY_MIN_LENGTH && body.length <= LEGACY_MAX_LENGTH ? 'legacy' : 'malformed';
}

// crypto.hash() is the one-shot form (Node >= 20.12), several times cheaper
// per call than a Hash object; this runs on every report.
const oneShotHash = (crypto as { hash?: (algorithm: string, data: string, encoding: 'base64') => string }).hash;

/** SHA-256 of an agent token: what the table stores. */
export function hashToken(token: string): Buffer {
  return createHash('sha256').update(token).digest();
}

/** SHA-256 of an agent token in base64: what the token cache keys on. */
export function hashTokenBase64(token: string): string {
  return oneShotHash ? oneShotHash('sha256', token, 'base64') : hashToken(token).toString('base64');
}
