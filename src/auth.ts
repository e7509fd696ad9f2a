// Who is calling. Agent tokens are looked up by their SHA-256, cached in a
// bounded LRU so that the ingest path does not touch the database on every
// request; unknown tokens are remembered briefly so that one bad token
// repeated cannot become a flood of queries, and a token whose shape no
// version ever issued (tokens.ts) is refused without any query at all. The
// cache forgets what the control channel says changed: a rotated or deleted
// agent's tokens at once, every "unknown" when an agent is created anywhere,
// everything after the LISTEN connection reconnects (messages may have been
// missed).

import { timingSafeEqual } from 'node:crypto';
import { LRUCache } from 'lru-cache';
import { agentTokenShape, hashToken, hashTokenBase64 } from './tokens.js';

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
  /** The cached token hashes of each agent, to forget them by agent. */
  private readonly byAgent = new Map<string, Set<string>>();
  private readonly pending = new Map<string, Promise<string | undefined>>();
  /** Bumped whenever something is forgotten: a lookup that started before caches nothing. */
  private generation = 0;

  constructor(
    private readonly store: TokenLookup,
    options: AuthenticatorOptions = {},
  ) {
    this.known = new LRUCache({
      max: options.maxEntries ?? 100_000,
      dispose: (agentId, key) => {
        const keys = this.byAgent.get(agentId);
        keys?.delete(key);
        if (keys?.size === 0) this.byAgent.delete(agentId);
      },
    });
    // 5 s, and forgotten as soon as any replica creates an agent.
    this.unknown = new LRUCache({ max: 10_000, ttl: options.unknownTtlMs ?? 5000 });
  }

  /** The agent a bearer token belongs to, or undefined. Concurrent lookups of one token share a query. */
  agentForToken(token: string): Promise<string | undefined> | string | undefined {
    const key = hashTokenBase64(token);
    const hit = this.known.get(key);
    if (hit !== undefined) return hit;
    if (this.unknown.has(key)) return undefined;
    // A token no version ever issued (a bad checksum, a wrong length) is refused without a query.
    if (agentTokenShape(token) === 'malformed') return undefined;
    let lookup = this.pending.get(key);
    if (!lookup) {
      const generation = this.generation;
      lookup = this.store
        .agentIdForTokenHash(Buffer.from(key, 'base64'))
        .then((agentId) => {
          if (generation === this.generation) {
            if (agentId === undefined) this.unknown.set(key, true);
            else this.cache(key, agentId);
          }
          return agentId;
        })
        .finally(() => this.pending.delete(key));
      this.pending.set(key, lookup);
    }
    return lookup;
  }

  /** The agent of a token this replica has cached as valid, without ever asking the database. */
  cachedAgentForToken(token: string): string | undefined {
    return this.known.get(hashTokenBase64(token));
  }

  /** Remembers a token just created or rotated here, and forgets that it was unknown. */
  remember(token: string, agentId: string): void {
    const key = hashTokenBase64(token);
    this.unknown.delete(key);
    this.cache(key, agentId);
  }

  /** The agent's tokens changed (rotated) or it is gone: refuse what was cached for it. */
  forgetAgent(agentId: string): void {
    this.generation++;
    for (const key of [...(this.byAgent.get(agentId) ?? [])]) this.known.delete(key);
    this.byAgent.delete(agentId);
    this.pending.clear();
  }

  /** An agent was created somewhere: a token that was unknown may be known now. */
  forgetUnknown(): void {
    this.generation++;
    this.unknown.clear();
    this.pending.clear();
  }

  /** Messages may have been missed (the LISTEN connection reconnected): forget everything. */
  clear(): void {
    this.generation++;
    this.known.clear();
    this.unknown.clear();
    this.byAgent.clear();
    this.pending.clear();
  }

  private cache(key: string, agentId: string): void {
    this.known.set(key, agentId);
    let keys = this.byAgent.get(agentId);
    if (!keys) this.byAgent.set(agentId, (keys = new Set()));
    keys.add(key);
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
