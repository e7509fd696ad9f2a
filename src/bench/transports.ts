// The load generator's transports: how one agent's report reaches the
// service and what its answer was. By POST over a shared undici pool, through
// the agents' own client (createReporter, a stream each), or over raw
// WebSockets with several reports in flight.

import { Pool } from 'undici';
import WebSocket from 'ws';
import { createReporter, type Reporter } from '../reporter.js';
import type { Agent } from './context.js';

/** What a transport needs of the load's configuration (LoadConfig). */
export interface TransportConfig {
  baseUrl: string;
  keys: string[];
  /** POST: the connections shared by every agent. */
  concurrency: number;
}

/** Streams opened at a time before the load starts. */
const CONNECTING = 100;

/** One report's answer: the POST's status (or the stream's equivalent) and its key counts. */
export interface Answer {
  status: number;
  accepted: number;
  dropped: number;
}

export interface Transport {
  /** Before the load: opens every agent's connection, where each agent has its own. */
  connect?(): Promise<void>;
  /** Agent `index` reports every key with values of `round`; throws when no answer came. */
  send(index: number, round: number): Promise<Answer>;
  close(): Promise<void>;
  stream?(): { messages: number; streamsOpened: number };
}

/** The report's items, `"metadata":[…]`, every key with a value of this round (the POST's body, and each ws message). */
function metadataOf(keys: readonly string[], round: number): string {
  let items = '"metadata":[';
  for (let k = 0; k < keys.length; k++) items += `${k === 0 ? '' : ','}{"key":"${keys[k]}","value":"${round}-${k}"}`;
  return `${items}]`;
}

/** Each report a POST over a pool of `concurrency` connections. */
export function postTransport(config: TransportConfig, agents: Agent[]): Transport {
  const pool = new Pool(config.baseUrl, { connections: config.concurrency, pipelining: 1, keepAliveTimeout: 60_000 });
  return {
    async send(index, round) {
      const agent = agents[index]!;
      const body = `{${metadataOf(config.keys, round)}}`;
      const res = await pool.request({
        method: 'POST',
        path: `/v1/agents/${agent.id}/metadata`,
        headers: { authorization: `Bearer ${agent.token}`, 'content-type': 'application/json' },
        body,
      });
      const text = await res.body.text();
      const counts =
        res.statusCode === 202 || res.statusCode === 429
          ? (JSON.parse(text) as { accepted: number; dropped: number })
          : { accepted: 0, dropped: 0 };
      return { status: res.statusCode, ...counts };
    },
    close: () => pool.close(),
  };
}

/**
 * Each agent a reporter of its own, as agents run it: its stream opens at its
 * first report. A report is answered when flush() resolves, that is when the
 * service acknowledged every key of it (dropped keys sent again included).
 * The reporter recovers from failures by itself; `onFailure` hears of each.
 */
export function streamTransport(config: TransportConfig, agents: Agent[], onFailure: () => void): Transport {
  const reporters: Reporter[] = agents.map((agent) =>
    createReporter({ url: config.baseUrl, agentId: agent.id, token: agent.token, onError: onFailure }),
  );
  const transport: Transport = {
    // A fleet's streams are long-lived: they are open before the load starts,
    // so that opening thousands (a connect and a token check each) is not
    // what the load measures. Each agent's first report opens its stream.
    async connect() {
      let next = 0;
      const opener = async () => {
        for (let index = next++; index < reporters.length; index = next++) await transport.send(index, 0);
      };
      await Promise.all(Array.from({ length: Math.min(CONNECTING, reporters.length) }, opener));
    },
    async send(index, round) {
      const reporter = reporters[index]!;
      const values: Record<string, string> = {};
      for (let k = 0; k < config.keys.length; k++) values[config.keys[k]!] = `${round}-${k}`;
      // One report in flight per reporter: what its counters add meanwhile is
      // this report's. (In open mode, a report slower than the interval
      // overlaps the agent's next: the two merge in the reporter and both
      // count the same answers. Only runs that already fail are that slow.)
      const before = reporter.stats();
      reporter.report(values);
      await reporter.flush();
      const after = reporter.stats();
      const dropped = after.droppedKeys - before.droppedKeys;
      return { status: dropped > 0 ? 429 : 202, accepted: after.acceptedKeys - before.acceptedKeys, dropped };
    },
    async close() {
      await Promise.all(reporters.map((reporter) => reporter.close()));
    },
    stream() {
      const stats = reporters.map((reporter) => reporter.stats());
      return {
        messages: stats.reduce((n, s) => n + s.sent, 0),
        streamsOpened: stats.reduce((n, s) => n + s.streamsOpened, 0),
      };
    },
  };
  return transport;
}

/**
 * The streaming route with no client library: a raw WebSocket per agent,
 * opened at its first report, each message the POST's body with a `seq`.
 * The loops that share an agent pipeline their reports on its socket (the
 * route answers in order): what the route takes when the client costs
 * little and keeps several reports in flight.
 */
export function wsTransport(config: TransportConfig, agents: Agent[]): Transport {
  interface Socket {
    ws: WebSocket;
    /** The reports in flight, oldest first: answers come in order. */
    waiting: { resolve: (answer: Answer) => void; reject: (err: Error) => void }[];
  }
  const sockets = new Map<number, Promise<Socket>>();
  const base = config.baseUrl.replace(/^http/, 'ws');
  const open = (agent: Agent) =>
    new Promise<Socket>((resolve, reject) => {
      const ws = new WebSocket(`${base}/v1/agents/${agent.id}/metadata/stream`, {
        headers: { authorization: `Bearer ${agent.token}` },
        perMessageDeflate: false,
      });
      const socket: Socket = { ws, waiting: [] };
      ws.on('message', (data: Buffer) => {
        const answer = JSON.parse(data.toString()) as { accepted?: number; dropped?: number; error?: string };
        const waiter = socket.waiting.shift()!;
        if (answer.error !== undefined) return waiter.reject(new Error(answer.error));
        const dropped = answer.dropped ?? 0;
        waiter.resolve({ status: dropped > 0 ? 429 : 202, accepted: answer.accepted ?? 0, dropped });
      });
      ws.once('close', () => {
        for (const waiter of socket.waiting.splice(0)) waiter.reject(new Error('stream closed'));
      });
      ws.on('error', reject);
      ws.once('open', () => resolve(socket));
    });
  let seq = 0;
  return {
    async send(index, round) {
      let opening = sockets.get(index);
      if (!opening) sockets.set(index, (opening = open(agents[index]!)));
      const socket = await opening;
      // Closed (the service stopped, or cut it off): ws would drop the message and no answer would come.
      if (socket.ws.readyState !== WebSocket.OPEN) throw new Error('stream closed');
      return new Promise<Answer>((resolve, reject) => {
        socket.waiting.push({ resolve, reject });
        socket.ws.send(`{"seq":${seq++},${metadataOf(config.keys, round)}}`, (err) => {
          if (err) reject(err);
        });
      });
    },
    async close() {
      const opened = await Promise.allSettled(sockets.values());
      for (const socket of opened) if (socket.status === 'fulfilled') socket.value.ws.terminate();
    },
  };
}
