// The library: everything the service is made of, usable in-process.

export { Batcher, BatcherClosedError } from './batcher.js';
export type { AddResult, BatcherOptions, CloseResult, MetadataBatch, MetadataWriter, UpdateResult } from './batcher.js';
export { MetadataStore } from './store.js';
export type { MetadataDefinition, MetadataRow, MetadataOfAgents, MetadataReadOptions } from './store.js';
export { AgentStore } from './agentStore.js';
export type { Agent, AgentPage, AgentSummary, CreatedAgent } from './agentStore.js';
export { hashToken } from './tokens.js';
export { Publisher } from './publisher.js';
export { NOTIFY_SINK } from './announcers.js';
export type { Announcer } from './announcers.js';
export {
  decodeAgentIdChunk,
  encodeAgentId,
  encodeAgentIdChunks,
  MAX_AGENT_IDS_PER_CHUNK,
  UUID_BASE64_SIZE,
} from './agentIdChunks.js';
export { BatcherMetrics, WatchMetrics, FLUSH_REASONS } from './metrics.js';
export type { FlushReason } from './metrics.js';
export { Backoff, backoffDelay } from './backoff.js';
export type { BackoffOptions } from './backoff.js';
export type { Clock } from './clock.js';
export { systemClock } from './clock.js';
export { loadConfig, ConfigError, DEFAULTS, DEFAULT_NOTIFY_CHANNEL } from './config.js';
export type { Config } from './config.js';
export { createPool, migrate, openDatabase } from './database.js';
export type { Database, OpenDatabaseOptions } from './database.js';
export { DatabaseHealth } from './health.js';
export { Spill, replaySpills, SpillError } from './spill.js';
export { provisionAgents } from './provision.js';
export { EmbeddedPostgres } from './embedded.js';
export { buildApp } from './app.js';
export { startService } from './main.js';
export type { Service, ServiceOptions, StopResult } from './main.js';
export { normalizeReport, truncateUtf8, MAX_VALUE_BYTES, MAX_ERROR_BYTES, MAX_ALL_KEYS_BYTES } from './report.js';
export { WatchHub } from './watch.js';
export { subscribe, createReporter, ReporterError } from './client.js';
export type { SubscribeOptions, Subscription, Reporter, ReporterOptions } from './client.js';
export { StreamRegistry } from './streams.js';
