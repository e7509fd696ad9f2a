// The HTTP server's fixed limits, shared by the app and its hooks.

// 1 MiB: a report holds at most 6144 bytes of keys, and values over 2048
// bytes are cut anyway; an agent's output of 10 KiB for each of 50 keys fits.
export const BODY_LIMIT_BYTES = 1024 * 1024;

// Slow clients must not hold sockets forever (slow-loris): headers within
// 10 s, the whole request within 30 s, no silence longer than 30 s. An idle
// keep-alive connection (a request answered, nothing since) is closed after
// 5 s, as load balancers expect (their own idle timeouts are longer: AWS 60 s,
// nginx 75 s, so the server closes first and the balancer reconnects);
// Node's and Fastify's 72 s let one client pin thousands of sockets for free.
export const DEFAULT_TIMEOUTS = { headersMs: 10_000, requestMs: 30_000, idleMs: 30_000, keepAliveMs: 5_000 };
