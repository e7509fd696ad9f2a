// The NOTIFY payload, byte-compatible with coder's metadatabatcher: each agent
// id is its 16 UUID bytes in standard base64 with the `==` padding removed (22
// ASCII characters), concatenated with no separator. Postgres NOTIFY payloads
// must stay under 8000 bytes, so a payload carries at most 8000 / 22 = 363 ids.

export const UUID_BASE64_SIZE = 22;
export const MAX_PAYLOAD_BYTES = 8000;
export const MAX_AGENT_IDS_PER_CHUNK = Math.floor(MAX_PAYLOAD_BYTES / UUID_BASE64_SIZE);

const UUID_PATTERN = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
const BASE64_UNIT = /^[A-Za-z0-9+/]{21}[AQgw]$/;

export function isUuid(value: string): boolean {
  return UUID_PATTERN.test(value);
}

/** One agent id as its 22-character unpadded base64 form. */
export function encodeAgentId(agentId: string): string {
  if (!isUuid(agentId)) throw new TypeError(`not a UUID: ${JSON.stringify(agentId)}`);
  return Buffer.from(agentId.replaceAll('-', ''), 'hex').toString('base64').slice(0, UUID_BASE64_SIZE);
}

/** Splits agent ids into NOTIFY payloads of at most 363 ids, in input order. */
export function encodeAgentIdChunks(agentIds: readonly string[]): string[] {
  const chunks: string[] = [];
  for (let start = 0; start < agentIds.length; start += MAX_AGENT_IDS_PER_CHUNK) {
    let payload = '';
    for (const id of agentIds.slice(start, start + MAX_AGENT_IDS_PER_CHUNK)) payload += encodeAgentId(id);
    chunks.push(payload);
  }
  return chunks;
}

/**
 * Decodes one NOTIFY payload into lower-case UUID strings, in order.
 * Throws on a payload that is not a whole number of valid 22-character units.
 */
export function decodeAgentIdChunk(payload: string): string[] {
  if (payload.length % UUID_BASE64_SIZE !== 0) {
    throw new Error(`invalid payload size ${payload.length}, must be a multiple of ${UUID_BASE64_SIZE}`);
  }
  const ids: string[] = [];
  for (let offset = 0; offset < payload.length; offset += UUID_BASE64_SIZE) {
    const unit = payload.slice(offset, offset + UUID_BASE64_SIZE);
    if (!BASE64_UNIT.test(unit)) throw new Error(`invalid agent id at offset ${offset}: ${JSON.stringify(unit)}`);
    const hex = Buffer.from(unit, 'base64').toString('hex');
    ids.push(`${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`);
  }
  return ids;
}
