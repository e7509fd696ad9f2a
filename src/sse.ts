// Serving a watch over Server-Sent Events: register the stream with the hub
// first (429 past a bound), then read what is not cached (a batch in between
// marks the agent for a re-read), check that an agent's token is still its
// token as of that read, then take the response over and hand it to the hub.

import type { FastifyReply, FastifyRequest } from 'fastify';
import { bearerToken } from './auth.js';
import { HttpError } from './errors.js';
import type { MetadataOfAgents, MetadataRow, MetadataStore } from './store.js';
import { hashTokenBase64 } from './tokens.js';
import type { WatchFormat, WatchHub, WatchStream } from './watch.js';
import type { WatchOwner } from './watchLimits.js';

export interface WatchRequest {
  agentIds: readonly string[];
  format: WatchFormat;
  /** Every agent: those created later join. */
  all?: boolean;
  /** Adds the agents of an `all` stream once it is registered. */
  allAgentIds?: () => Promise<string[]>;
  /** A one-agent watch of an unknown agent is a 404. */
  requireAll?: boolean;
}

export async function serveWatch(
  request: FastifyRequest,
  reply: FastifyReply,
  hub: WatchHub,
  store: Pick<MetadataStore, 'getMetadataOfAgents'>,
  watch: WatchRequest,
): Promise<void> {
  const owner = ownerOf(request);
  const stream = hub.open(watch.agentIds, { format: watch.format, all: watch.all ?? false, owner });
  let read;
  try {
    if (watch.allAgentIds) hub.addAgents(stream, await watch.allAgentIds());
    read = await readFor(hub, store, stream);
  } catch (err) {
    hub.remove(stream);
    throw err;
  }
  if (watch.requireAll && read.missing.length > 0) {
    hub.remove(stream);
    throw new HttpError(404, `agent ${read.missing[0]} not found`);
  }
  // The token was revoked while the stream was read, or before this replica heard of it.
  if (
    stream.revoked !== undefined ||
    (owner?.kind === 'agent' && read.tokenHashes?.get(owner.agentId) !== owner.tokenHash)
  ) {
    hub.remove(stream);
    throw new HttpError(401, 'invalid token: revoked');
  }
  const res = reply.raw;
  reply.hijack();
  // The client left while its stream was read: its 'close' is past, so free its place now.
  if (request.raw.socket.destroyed) {
    hub.remove(stream);
    return;
  }
  res.writeHead(200, {
    'content-type': 'text/event-stream',
    'cache-control': 'no-cache',
    connection: 'keep-alive',
    'x-accel-buffering': 'no',
  });
  res.flushHeaders();
  request.raw.socket.setNoDelay(true);
  const stop = () => hub.remove(stream);
  res.on('close', stop);
  res.on('error', stop);
  hub.attach(
    stream,
    {
      write: (chunk) => res.write(chunk),
      onceDrained: (callback) => res.once('drain', callback),
      end: () => res.end(),
      destroy: () => res.destroy(),
    },
    read.agents,
    read.missing,
    read.tokenHashes,
  );
}

/** Who the stream speaks for (its bounds, and what revokes it): the admin, or one agent's token. */
function ownerOf(request: FastifyRequest): WatchOwner | undefined {
  const caller = request.caller;
  if (caller?.kind === 'admin') return { kind: 'admin' };
  if (caller?.kind !== 'agent') return undefined;
  // The hook that set the caller read this header.
  const token = bearerToken(request.headers.authorization)!;
  return { kind: 'agent', agentId: caller.agentId, tokenHash: hashTokenBase64(token) };
}

/** The stream's agents' rows: cached where no batch named them since, read (in one query) otherwise. */
async function readFor(
  hub: WatchHub,
  store: Pick<MetadataStore, 'getMetadataOfAgents'>,
  stream: WatchStream,
): Promise<MetadataOfAgents> {
  const ids = [...stream.agents];
  const { rows, unread, tokenHashes } = hub.cached(ids);
  const fetched: MetadataOfAgents =
    unread.length > 0 ? await store.getMetadataOfAgents(unread) : { agents: new Map(), missing: [] };
  const agents = new Map<string, MetadataRow[]>();
  for (const id of ids) {
    const list = rows.get(id) ?? fetched.agents.get(id);
    if (list) agents.set(id, list);
  }
  for (const [id, hash] of fetched.tokenHashes ?? []) tokenHashes.set(id, hash);
  return { agents, missing: fetched.missing, tokenHashes };
}
