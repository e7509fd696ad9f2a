// The open ingest streams (GET /v1/agents/{agentId}/metadata/stream) of this
// replica, by agent: the bound of streams per agent, and what revocation
// closes. A deleted agent's or a rotated token's streams are closed at once
// by the lifecycle routes here, and by the control channel on every other
// replica (src/control.ts).

/** Streams one agent may hold open on one replica; one more is answered 429 at the upgrade. */
export const MAX_STREAMS_PER_AGENT = 4;
export const TOO_MANY_STREAMS = `too many streams for this agent (at most ${MAX_STREAMS_PER_AGENT})`;

/** The close code and reason of a stream whose token was revoked (agent deleted, token rotated). */
export const REVOKED_CLOSE_CODE = 4001;
export const REVOKED_CLOSE_REASON = 'token revoked';

/**
 * Revocations remembered for upgrades in flight (the newest, by agent). An
 * upgrade that began more revocations ago than this cannot be told apart
 * from a revoked one: it is refused as `unknown` (its client reconnects, and
 * its token is checked again).
 */
const REMEMBERED_REVOCATIONS = 4096;

/** What the registry closes. */
export interface RevocableStream {
  /** Closes the stream with REVOKED_CLOSE_CODE; nothing it sends afterwards is applied. */
  revoke(): void;
}

export type OpenResult = 'open' | 'full' | 'revoked' | 'unknown';

export class StreamRegistry {
  private readonly byAgent = new Map<string, Set<RevocableStream>>();
  private count = 0;
  /** Bumped by every revocation. */
  private generation = 0;
  /** The generation of each agent's latest revocation, the newest REMEMBERED_REVOCATIONS. */
  private readonly revokedAt = new Map<string, number>();

  /** Open streams, all agents. */
  get size(): number {
    return this.count;
  }

  /** Open streams of one agent. */
  streamsOf(agentId: string): number {
    return this.byAgent.get(agentId)?.size ?? 0;
  }

  /**
   * Taken before an upgrade's token is checked and given back to `open`: a
   * revocation in between (the token looked up in the database while the
   * agent was deleted) refuses the stream, which would otherwise outlive its
   * token.
   */
  epoch(): number {
    return this.generation;
  }

  /** Whether the agent may open one more stream. */
  hasRoom(agentId: string): boolean {
    return this.streamsOf(agentId) < MAX_STREAMS_PER_AGENT;
  }

  /**
   * Registers an upgraded stream. Registers nothing when the agent has its
   * streams already (`full`), was revoked since `epoch` (`revoked`), or
   * more revocations than are remembered happened since (`unknown`).
   */
  open(agentId: string, stream: RevocableStream, epoch: number): OpenResult {
    if (epoch !== this.generation) {
      if (this.generation - epoch > REMEMBERED_REVOCATIONS) return 'unknown';
      if ((this.revokedAt.get(agentId) ?? -1) > epoch) return 'revoked';
    }
    let streams = this.byAgent.get(agentId);
    if (!streams) this.byAgent.set(agentId, (streams = new Set()));
    else if (streams.size >= MAX_STREAMS_PER_AGENT) return 'full';
    streams.add(stream);
    this.count++;
    return 'open';
  }

  /** A stream closed. */
  remove(agentId: string, stream: RevocableStream): void {
    const streams = this.byAgent.get(agentId);
    if (!streams?.delete(stream)) return;
    this.count--;
    if (streams.size === 0) this.byAgent.delete(agentId);
  }

  /** The agent was deleted or its token rotated: closes its streams (4001), and refuses upgrades in flight. */
  revoke(agentId: string): number {
    this.generation++;
    this.revokedAt.delete(agentId);
    this.revokedAt.set(agentId, this.generation);
    if (this.revokedAt.size > REMEMBERED_REVOCATIONS) {
      const oldest = this.revokedAt.keys().next().value;
      if (oldest !== undefined) this.revokedAt.delete(oldest);
    }
    const streams = this.byAgent.get(agentId);
    if (!streams) return 0;
    // Each revoke() ends in remove(), which edits the set: close a copy.
    const closing = [...streams];
    for (const stream of closing) stream.revoke();
    return closing.length;
  }
}
