// Agent tokens are stored, and cached, as their SHA-256 only.

import crypto, { createHash } from 'node:crypto';

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
