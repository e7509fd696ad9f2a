// The control channel: what one replica tells the others about agents,
// NOTIFYed by the statement that made the change (so a message goes out
// exactly when its change commits). Every replica LISTENs on it with its one
// LISTEN connection: a created agent's token is no longer "unknown", a
// rotated or deleted agent's old token is refused, a deleted agent leaves the
// watch streams and its ingest streams are closed (as are those of a rotated
// token), and a created one joins the streams that watch every agent.

/** One channel for every metabatch process on a database: the messages are about rows of that database. */
export const CONTROL_CHANNEL = 'metabatch_control';

export type ControlMessage =
  { type: 'created'; agent_id: string } | { type: 'deleted'; agent_id: string } | { type: 'token'; agent_id: string };

const TYPES = new Set(['created', 'deleted', 'token']);

/** Parses a control payload; throws on anything else. */
export function parseControlMessage(payload: string): ControlMessage {
  const message = JSON.parse(payload) as Partial<ControlMessage>;
  if (typeof message?.type !== 'string' || !TYPES.has(message.type) || typeof message.agent_id !== 'string') {
    throw new Error(`not a control message: ${payload.slice(0, 200)}`);
  }
  return message as ControlMessage;
}

/** What a control message changes on this replica. */
export interface ControlTargets {
  auth: { forgetAgent(agentId: string): void; forgetUnknown(): void };
  /** The watch streams: a deleted agent leaves them; those opened with a revoked token end (`event: revoked`). */
  watchHub: {
    onCreated(agentId: string): void;
    onDeleted(agentId: string): void;
    revoke(agentId: string, why: 'token rotated'): void;
  };
  /** The open ingest streams: a revoked agent's are closed (4001). */
  streams: { revoke(agentId: string): void };
}

/** Applies one control payload to this replica's caches and streams; a payload it cannot read goes to `onError`. */
export function applyControlPayload(
  payload: string,
  targets: ControlTargets,
  onError: (err: Error) => void,
): ControlMessage | undefined {
  let message: ControlMessage;
  try {
    message = parseControlMessage(payload);
  } catch (err) {
    onError(err as Error);
    return undefined;
  }
  switch (message.type) {
    case 'created':
      targets.auth.forgetUnknown();
      targets.watchHub.onCreated(message.agent_id);
      break;
    case 'deleted':
      targets.auth.forgetAgent(message.agent_id);
      targets.watchHub.onDeleted(message.agent_id);
      targets.streams.revoke(message.agent_id);
      break;
    case 'token':
      targets.auth.forgetAgent(message.agent_id);
      targets.watchHub.revoke(message.agent_id, 'token rotated');
      targets.streams.revoke(message.agent_id);
      break;
    default:
      message satisfies never;
  }
  return message;
}
