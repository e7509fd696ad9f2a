// Serving a watch over Server-Sent Events: register the stream with the hub
// first, then read what is not cached (a batch in between marks the agent
// for a re-read), then take the response over and hand it to the hub.

import type { FastifyReply, FastifyRequest } from 'fastify';
import { HttpError } from './errors.js';
import type { MetadataOfAgents, MetadataRow, MetadataStore } from './store.js';
import type { WatchFormat, WatchHub, WatchStream } from './watch.js';

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
  const stream = hub.open(watch.agentIds, { format: watch.format, all: watch.all ?? false });
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
  const res = reply.raw;
  reply.hijack();
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
    },
    read.agents,
    read.missing,
  );
}

/** The stream's agents' rows: cached where no batch named them since, read (in one query) otherwise. */
async function readFor(
  hub: WatchHub,
  store: Pick<MetadataStore, 'getMetadataOfAgents'>,
  stream: WatchStream,
): Promise<MetadataOfAgents> {
  const ids = [...stream.agents];
  const { rows, unread } = hub.cached(ids);
  const fetched: MetadataOfAgents =
    unread.length > 0 ? await store.getMetadataOfAgents(unread) : { agents: new Map(), missing: [] };
  const agents = new Map<string, MetadataRow[]>();
  for (const id of ids) {
    const list = rows.get(id) ?? fetched.agents.get(id);
    if (list) agents.set(id, list);
  }
  return { agents, missing: fetched.missing };
}
