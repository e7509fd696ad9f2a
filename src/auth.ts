// Who is calling. Agent tokens are looked up by their SHA-256, cached in a
// bounded LRU so that the ingest path does not touch the database on every
// request; unknown tokens are remembered briefly so a flood of bad tokens
// cannot become a flood of queries.

import { timingSafeEqual } from 'node:crypto';
import { LRUCache } from 'lru-cache';
import { hashToken, hashTokenBase64 } from './store.js';

export interface TokenLookup {
  agentIdForTokenHash(tokenHash: Buffer): Promise<string | undefined>;
}

export interface AuthenticatorOptions {
  /** Tokens remembered (one entry is ~150 bytes): 100k agents fit in ~15 MB. */
  maxEntries?: number;
  /** How long an unknown token is remembered as unknown. */
  unknownTtlMs?: number;
}

export class AgentAuthenticator {
  private readonly known: LRUCache<string, string>;
  private readonly unknown: LRUCache<string, true>;
  private readonly pending = new Map<string, Promise<string | undefined>>();

  constructor(
    private readonly store: TokenLookup,
    options: AuthenticatorOptions = {},
  ) {
    this.known = new LRUCache({ max: options.maxEntries ?? 100_000 });
    // 5 s: an agent created on another replica is accepted here within 5 s.
    this.unknown = new LRUCache({ max: 10_000, ttl: options.unknownTtlMs ?? 5000 });
  }

  /** The agent a bearer token belongs to, or undefined. Concurrent lookups of one token share a query. */
  agentForToken(token: string): Promise<string | undefined> | string | undefined {
    const key = hashTokenBase64(token);
    const hit = this.known.get(key);
    if (hit !== undefined) return hit;
    if (this.unknown.has(key)) return undefined;
    let lookup = this.pending.get(key);
    if (!lookup) {
      lookup = this.store
        .agentIdForTokenHash(Buffer.from(key, 'base64'))
        .then((agentId) => {
          if (agentId === undefined) this.unknown.set(key, true);
          else this.known.set(key, agentId);
          return agentId;
        })
        .finally(() => this.pending.delete(key));
      this.pending.set(key, lookup);
    }
    return lookup;
  }

  /** Remembers a token just created, and forgets that it was unknown. */
  remember(token: string, agentId: string): void {
    const key = hashTokenBase64(token);
    this.unknown.delete(key);
    this.known.set(key, agentId);
  }
}

/** The token of an `Authorization: Bearer <token>` header. */
export function bearerToken(header: string | undefined): string | undefined {
  if (header === undefined) return undefined;
  const match = /^Bearer[ ]+(\S+)\s*$/i.exec(header);
  return match?.[1];
}

/** Constant-time comparison of two secrets (hashed first, so lengths leak nothing). */
export function secretsEqual(given: string, expected: string): boolean {
  return timingSafeEqual(hashToken(given), hashToken(expected));
}
