// The container and the compose file, checked without a Docker engine: the
// files parse, everything they mount or build from is in the repository, the
// Dockerfile has the shape README promises (multi-stage, production
// dependencies only, a non-root user, node itself as the main process), and
// the compose file, the haproxy and Prometheus configs, Grafana's provisioning
// and the README name the same replicas, ports, variables and timeouts.

import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { parse as parseYaml } from 'yaml';
import { loadConfig } from '../src/config.js';
import { ROOT } from './support/process.js';

const read = (file: string): string => fs.readFileSync(path.join(ROOT, file), 'utf8');
// Compose files use merge keys (`<<: *metabatch`), as Docker Compose does.
const yaml = <T>(text: string): T => parseYaml(text, { merge: true }) as T;

// ---------------------------------------------------------------------------
// Docker Compose

// What these tests read of each file; the rest is ignored.
interface ComposeService {
  image?: string;
  build?: string | { context?: string; dockerfile?: string };
  environment?: Record<string, string | number | boolean | null> | string[];
  volumes?: (string | { source?: string; target: string })[];
  ports?: (string | number | { published: string | number; target: string | number })[];
  healthcheck?: { test?: string | string[] };
  depends_on?: string[] | Record<string, { condition?: string }>;
  stop_grace_period?: string;
  ulimits?: { nofile?: number | { soft: number; hard: number } };
}

interface ComposeFile {
  services: Record<string, ComposeService>;
  volumes?: Record<string, unknown>;
}

interface PrometheusConfig {
  rule_files?: string[];
  scrape_configs: { job_name: string; metrics_path?: string; static_configs: { targets: string[] }[] }[];
}

interface GrafanaProvisioning {
  datasources?: { name: string; uid?: string; type: string; url?: string }[];
  providers?: { name: string; options?: { path?: string } }[];
}

interface Mount {
  /** A path in the repository (bind mount), relative to ROOT; undefined for a named volume. */
  file: string | undefined;
  volume: string | undefined;
  target: string;
}

const compose = yaml<ComposeFile>(read('docker-compose.yml'));
const services = compose.services;

// The secrets the compose file's header says to set; nothing else is set.
const SECRETS = {
  ADMIN_TOKEN: 'a-long-admin-token-for-compose',
  POSTGRES_PASSWORD: 'a-postgres-password',
  GRAFANA_ADMIN_PASSWORD: 'a-grafana-password',
};

/** A variable compose refuses to start without (`${X:?message}`). */
class MissingVariable extends Error {}

/**
 * What compose substitutes with `vars` set: `${X}`, `${X:-default}` and
 * `${X-default}`, `${X:+alternative}`, and `${X:?message}`, which refuses.
 */
function interpolate(value: string, vars: Record<string, string> = SECRETS): string {
  return value.replace(
    /\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?)([-?+])([^}]*))?\}/g,
    (_, name: string, colon?: string, operator?: string, word?: string) => {
      const current = vars[name];
      const set = colon ? current !== undefined && current !== '' : current !== undefined;
      if (operator === '-') return set ? current! : word!;
      if (operator === '+') return set ? word! : '';
      if (operator === '?' && !set) throw new MissingVariable(`${name}: ${word}`);
      return current ?? '';
    },
  );
}

/** Interpolates every string of the compose file, as `docker compose up` does before anything starts. */
function interpolateAll(value: unknown, vars: Record<string, string>): unknown {
  if (typeof value === 'string') return interpolate(value, vars);
  if (Array.isArray(value)) return value.map((item) => interpolateAll(item, vars));
  if (value && typeof value === 'object') {
    return Object.fromEntries(Object.entries(value).map(([key, item]) => [key, interpolateAll(item, vars)]));
  }
  return value;
}

function environment(service: ComposeService): Record<string, string> {
  const env = service.environment ?? {};
  const entries: [string, string][] = Array.isArray(env)
    ? env.map((item: string) => {
        const at = item.indexOf('=');
        return at < 0 ? [item, ''] : [item.slice(0, at), item.slice(at + 1)];
      })
    : Object.entries(env).map(([key, value]) => [key, String(value ?? '')]);
  return Object.fromEntries(entries.map(([key, value]) => [key, interpolate(value)]));
}

function mounts(service: ComposeService): Mount[] {
  return (service.volumes ?? []).map((volume): Mount => {
    let source: string;
    let target: string;
    if (typeof volume === 'string') {
      [source = '', target = ''] = volume.split(':');
    } else {
      source = volume.source ?? '';
      target = volume.target;
    }
    const isPath = /^[./~]/.test(source);
    return {
      file: isPath ? path.posix.normalize(source) : undefined,
      volume: isPath ? undefined : source,
      target,
    };
  });
}

/** The container path where `file` (repository-relative) is mounted in `service`. */
function mountedAt(service: ComposeService, file: string): string | undefined {
  return mounts(service).find((mount) => mount.file === path.posix.normalize(file))?.target;
}

/** Published ports as [host, container]. */
function ports(service: ComposeService): [number, number][] {
  return (service.ports ?? []).map((port): [number, number] => {
    if (typeof port === 'object') return [Number(port.published), Number(port.target)];
    const parts = interpolate(String(port)).split(':');
    const container = Number(parts.at(-1));
    return [parts.length > 1 ? Number(parts.at(-2)) : container, container];
  });
}

function healthcheck(service: ComposeService): string {
  const test = service.healthcheck?.test;
  return Array.isArray(test) ? test.join(' ') : String(test ?? '');
}

/** A Go duration as compose takes it ("30s", "1m30s", "1500ms"), in milliseconds. */
function composeDuration(value: string): number {
  const units: Record<string, number> = { us: 0.001, ms: 1, s: 1000, m: 60_000, h: 3_600_000 };
  const parts = [...value.matchAll(/(\d+(?:\.\d+)?)(us|ms|s|m|h)/g)];
  expect(parts.map((part) => part[0]).join(''), `duration ${value}`).toBe(value);
  return parts.reduce((sum, [, amount, unit]) => sum + Number(amount) * units[unit!]!, 0);
}

/** The replicas: the services built from this repository's Dockerfile. */
const replicas = Object.entries(services).filter(([, service]) => service.build !== undefined);
/** host:port of every replica, as the other services must reach them. */
const replicaAddresses = replicas.map(([name, service]) => `${name}:${loadConfig(environment(service)).port}`);

/** The one service whose image is `image` (e.g. "haproxy"). */
function serviceOfImage(image: string): [string, ComposeService] {
  const found = Object.entries(services).filter(([, service]) =>
    String(service.image ?? '').match(new RegExp(`^(docker\\.io/)?(library/)?${image}(:|@|$)`)),
  );
  if (found.length !== 1) throw new Error(`expected one service of image ${image}, found ${found.length}`);
  return found[0]!;
}

// ---------------------------------------------------------------------------
// README

function section(markdown: string, heading: string): string {
  const lines = markdown.split('\n');
  const start = lines.indexOf(`## ${heading}`);
  expect(start, `README section "## ${heading}"`).toBeGreaterThanOrEqual(0);
  const end = lines.findIndex((line, index) => index > start && line.startsWith('## '));
  return lines.slice(start + 1, end < 0 ? undefined : end).join('\n');
}

const readme = read('README.md');
const configurationRows = section(readme, 'Configuration')
  .split('\n')
  .filter((line) => line.startsWith('|'))
  .map((line) => line.split('|').map((cell) => cell.trim()));
/** Every variable of the README's Configuration table. */
const documentedVariables = new Set(
  configurationRows.flatMap((cells) => [...(cells[1] ?? '').matchAll(/`([A-Z][A-Z0-9_]*)`/g)].map((match) => match[1])),
);

// ---------------------------------------------------------------------------
// Dockerfile

interface Instruction {
  keyword: string;
  args: string;
}

/** The Dockerfile's instructions, continuation lines joined and comments dropped. */
function dockerfileInstructions(text: string): Instruction[] {
  const joined = text
    .split('\n')
    .filter((line) => !/^\s*#/.test(line))
    .join('\n')
    .replace(/\\\n/g, ' ');
  return joined
    .split('\n')
    .map((line) => line.trim())
    .filter((line) => line !== '')
    .map((line) => {
      const [keyword = '', ...rest] = line.split(/\s+/);
      return { keyword: keyword.toUpperCase(), args: rest.join(' ') };
    });
}

const instructions = dockerfileInstructions(read('Dockerfile'));
const stages: Instruction[][] = [];
for (const instruction of instructions) {
  if (instruction.keyword === 'FROM') stages.push([]);
  stages.at(-1)?.push(instruction);
}
const lastStage = stages.at(-1) ?? [];
/** ARGs declared before the first FROM, with their defaults: what FROM lines may use. */
const globalArgs = Object.fromEntries(
  instructions
    .slice(
      0,
      instructions.findIndex((instruction) => instruction.keyword === 'FROM'),
    )
    .filter((instruction) => instruction.keyword === 'ARG')
    .map((instruction) => {
      const [name = '', value = ''] = instruction.args.split('=');
      return [name, value];
    }),
);

function dockerignorePatterns(): string[] {
  return read('.dockerignore')
    .split('\n')
    .map((line) => line.trim())
    .filter((line) => line !== '' && !line.startsWith('#'));
}

/** Whether .dockerignore keeps `file` (repository-relative) out of the build context. */
function ignored(file: string): boolean {
  const segments = path.posix.normalize(file).replace(/\/$/, '').split('/');
  return dockerignorePatterns().some((pattern) => {
    if (pattern.startsWith('!')) return false;
    const regex = new RegExp(
      '^' +
        pattern
          .replace(/\/$/, '')
          .replace(/[.+^${}()|[\]\\]/g, '\\$&')
          .replace(/\*/g, '[^/]*')
          .replace(/\?/g, '[^/]') +
        '$',
    );
    // A pattern excludes that path and everything under it.
    return segments.some((_, index) => regex.test(segments.slice(0, index + 1).join('/')));
  });
}

// ---------------------------------------------------------------------------
// haproxy.cfg

/** haproxy's sections: "backend metabatch" → its lines, comments dropped. */
function haproxySections(text: string): Map<string, string[]> {
  const sections = new Map<string, string[]>();
  let current: string[] | undefined;
  for (const raw of text.split('\n')) {
    const line = raw.replace(/#.*$/, '').trimEnd();
    if (line.trim() === '') continue;
    if (/^\S/.test(line)) {
      current = [];
      sections.set(line.trim().replace(/\s+/g, ' '), current);
    } else {
      current?.push(line.trim().replace(/\s+/g, ' '));
    }
  }
  return sections;
}

/** An haproxy time ("60s", "1h", "500" in ms), in milliseconds. */
function haproxyTime(value: string): number {
  const match = /^(\d+)(us|ms|s|m|h|d)?$/.exec(value);
  expect(match, `haproxy time ${value}`).not.toBeNull();
  const units: Record<string, number> = { us: 0.001, ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 };
  return Number(match![1]) * units[match![2] ?? 'ms']!;
}

// ---------------------------------------------------------------------------

describe('deployment files', () => {
  it('docker-compose.yml parses and defines Postgres, two replicas, a load balancer, Prometheus and Grafana', () => {
    expect(replicas.map(([name]) => name)).toEqual(['metabatch-1', 'metabatch-2']);
    serviceOfImage('postgres');
    serviceOfImage('haproxy');
    serviceOfImage('prom/prometheus');
    serviceOfImage('grafana/grafana');
    expect(Object.keys(services)).toHaveLength(6);
  });

  it('gives each replica the file limit the README recommends, above the one it warns below', () => {
    for (const [name, service] of replicas) {
      const nofile = service.ulimits?.nofile;
      const soft = typeof nofile === 'number' ? nofile : nofile?.soft;
      expect(soft, name).toBe(65_536);
    }
    expect(section(read('README.md'), 'Limits and security')).toContain('65536');
  });

  it('mounts and builds only from files and directories that are in the repository', () => {
    const declaredVolumes = Object.keys(compose.volumes ?? {});
    const missing: string[] = [];
    for (const [name, service] of Object.entries(services)) {
      if (service.build !== undefined) {
        const build = typeof service.build === 'string' ? { context: service.build } : service.build;
        const dockerfile = path.posix.join(build.context ?? '.', build.dockerfile ?? 'Dockerfile');
        if (!fs.existsSync(path.join(ROOT, dockerfile))) missing.push(`${name}: ${dockerfile}`);
      }
      for (const mount of mounts(service)) {
        expect(path.posix.isAbsolute(mount.target), `${name}: mount target ${mount.target}`).toBe(true);
        if (mount.file !== undefined && !fs.existsSync(path.join(ROOT, mount.file))) {
          missing.push(`${name}: ${mount.file}`);
        }
        if (mount.volume !== undefined)
          expect(declaredVolumes, `${name}: volume ${mount.volume}`).toContain(mount.volume);
      }
    }
    expect(missing).toEqual([]);
  });

  describe('Dockerfile', () => {
    it('builds in one stage and runs from another with production dependencies only', () => {
      expect(stages.length).toBeGreaterThanOrEqual(2);
      const runs = (stage: Instruction[]) =>
        stage.filter((instruction) => instruction.keyword === 'RUN').map((instruction) => instruction.args);
      // The build stage has the dev dependencies (TypeScript) and builds dist/.
      const buildStage = stages.find((stage) => runs(stage).some((run) => /\bnpm run build\b/.test(run)));
      expect(buildStage, 'a stage that runs npm run build').toBeDefined();
      expect(runs(buildStage!).some((run) => /\bnpm ci\b/.test(run) && !/--omit[= ]dev/.test(run))).toBe(true);
      // The last stage: npm ci --omit=dev, dist/ copied from the build stage.
      expect(runs(lastStage).some((run) => /\bnpm ci\b[^&;]*--omit[= ]dev/.test(run))).toBe(true);
      expect(
        lastStage.some(
          (instruction) => instruction.keyword === 'COPY' && /--from=\S+\s+\S*dist\/?\s/.test(instruction.args),
        ),
      ).toBe(true);
    });

    it('starts from an official Node 20 slim image at or above package.json engines', () => {
      const engines = JSON.parse(read('package.json')).engines.node as string;
      const [, , minimumMinor] = /^>=(\d+)\.(\d+)/.exec(engines) ?? [];
      for (const stage of stages) {
        const image = stage[0]!.args
          .split(/\s+/)
          .find((word) => !word.startsWith('--'))!
          .replace(/\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?/g, (_, name: string) => globalArgs[name] ?? '');
        const match = /^node:20\.(\d+)(\.\d+)?-bookworm-slim(@sha256:[0-9a-f]{64})?$/.exec(image);
        expect(match, `FROM ${image}`).not.toBeNull();
        expect(Number(match![1])).toBeGreaterThanOrEqual(Number(minimumMinor));
      }
    });

    it('runs node dist/cli.js serve in exec form as a non-root user, stopped by SIGTERM, health-checked on /healthz', () => {
      const last = (keyword: string) => lastStage.filter((instruction) => instruction.keyword === keyword).at(-1);
      const user = last('USER')?.args;
      expect(user).toBeDefined();
      expect(['root', '0']).not.toContain(user!.split(':')[0]);

      // Exec form (a JSON array): node is the main process and gets SIGTERM itself.
      const execForm = (instruction: Instruction | undefined): string[] => {
        if (instruction === undefined) return [];
        const parsed: unknown = JSON.parse(instruction.args);
        expect(Array.isArray(parsed), `${instruction.keyword} in exec form`).toBe(true);
        return parsed as string[];
      };
      const command = [...execForm(last('ENTRYPOINT')), ...execForm(last('CMD'))];
      expect(command).toEqual(['node', 'dist/cli.js', 'serve']);

      expect(last('STOPSIGNAL')?.args).toBe('SIGTERM');
      const healthcheck = last('HEALTHCHECK')?.args ?? '';
      expect(healthcheck).toMatch(/\bCMD\b.*\/healthz/);
      expect(last('EXPOSE')?.args.split(/\s+/)).toContain('8080');
      const env = lastStage
        .filter((instruction) => instruction.keyword === 'ENV')
        .map((instruction) => instruction.args)
        .join(' ');
      expect(env).toMatch(/\bHOST=0\.0\.0\.0\b/);
    });

    it('copies only what .dockerignore lets in, and .dockerignore keeps out what is built or kept locally', () => {
      for (const kept of ['node_modules', 'dist', '.metabatch', '.git', 'test-results', 'test-results.json']) {
        expect(ignored(kept), `.dockerignore excludes ${kept}`).toBe(true);
      }
      const sources = instructions
        .filter((instruction) => ['COPY', 'ADD'].includes(instruction.keyword) && !/--from=/.test(instruction.args))
        .flatMap((instruction) => {
          const words = instruction.args.split(/\s+/).filter((word) => !word.startsWith('--'));
          return words.slice(0, -1);
        });
      expect(sources.length).toBeGreaterThan(0);
      for (const source of sources) {
        expect(fs.existsSync(path.join(ROOT, source)), `COPY ${source}: exists`).toBe(true);
        expect(ignored(source), `COPY ${source}: not in .dockerignore`).toBe(false);
      }
    });
  });

  describe('the replicas', () => {
    it('are given only variables of the README Configuration table, with values the service accepts', () => {
      expect(documentedVariables.size).toBeGreaterThan(5);
      for (const [name, service] of replicas) {
        const env = environment(service);
        expect(
          Object.keys(env).filter((variable) => !documentedVariables.has(variable)),
          `${name}: variables missing from README's Configuration table`,
        ).toEqual([]);
        // Start-up would refuse a bad value (ConfigError); loadConfig is what it runs.
        const config = loadConfig(env);
        expect(config.host).toBe('0.0.0.0');
        expect(config.databaseUrl).toBeDefined();
        expect(new URL(config.databaseUrl!).hostname).toBe(serviceOfImage('postgres')[0]);
      }
    });

    it('take the admin token from the environment, as it is set', () => {
      for (const [, service] of replicas) expect(environment(service).ADMIN_TOKEN).toBe(SECRETS.ADMIN_TOKEN);
    });

    it('wait for a healthy Postgres and are health-checked on /readyz', () => {
      const [postgresName, postgres] = serviceOfImage('postgres');
      expect(healthcheck(postgres)).toContain('pg_isready');
      expect(mounts(postgres).some((mount) => mount.target === '/var/lib/postgresql/data')).toBe(true);
      for (const [, service] of replicas) {
        const dependsOn = service.depends_on as Record<string, { condition?: string }> | undefined;
        expect(dependsOn?.[postgresName]?.condition).toBe('service_healthy');
        expect(healthcheck(service)).toContain('/readyz');
      }
    });

    it('get a stop grace period longer than the final flush they run with', () => {
      for (const [name, service] of replicas) {
        const { finalFlushTimeoutMs } = loadConfig(environment(service));
        const grace = service.stop_grace_period;
        expect(grace, `${name}: stop_grace_period (Docker's default, 10 s, is too short)`).toBeDefined();
        expect(composeDuration(grace!)).toBeGreaterThan(finalFlushTimeoutMs);
      }
    });
  });

  describe('secrets and exposure', () => {
    it('refuses to start unless ADMIN_TOKEN, POSTGRES_PASSWORD and GRAFANA_ADMIN_PASSWORD are set', () => {
      expect(() => interpolateAll(compose, SECRETS)).not.toThrow();
      for (const name of Object.keys(SECRETS)) {
        for (const unset of [{}, { [name]: '' }]) {
          const vars = { ...SECRETS, ...unset } as Record<string, string>;
          if (!(name in unset)) delete vars[name];
          expect(() => interpolateAll(compose, vars), `${name} unset or empty`).toThrow(MissingVariable);
        }
      }
      // No default anywhere, not even in a comment's example.
      expect(read('docker-compose.yml')).not.toMatch(/change-me/);
    });

    it('publishes every port on 127.0.0.1 unless BIND_ADDRESS says otherwise', () => {
      const published = (vars: Record<string, string>) =>
        Object.values(services).flatMap((service) =>
          (service.ports ?? []).map((port) => {
            if (typeof port !== 'string')
              throw new Error(`ports in the short syntax, host address first: ${JSON.stringify(port)}`);
            const parts = interpolate(port, vars).split(':');
            expect(parts).toHaveLength(3);
            return parts[0];
          }),
        );
      expect(published(SECRETS)).toHaveLength(3);
      expect(new Set(published(SECRETS))).toEqual(new Set(['127.0.0.1']));
      expect(new Set(published({ ...SECRETS, BIND_ADDRESS: '0.0.0.0' }))).toEqual(new Set(['0.0.0.0']));
    });

    it('gives the replicas a Postgres role that is not the superuser the image makes', () => {
      const [, postgres] = serviceOfImage('postgres');
      const superuser = environment(postgres).POSTGRES_USER ?? 'postgres';
      const script = 'deploy/postgres/metabatch-role.sh';
      expect(mountedAt(postgres, script)).toMatch(/^\/docker-entrypoint-initdb\.d\//);
      expect(fs.statSync(path.join(ROOT, script)).mode & 0o111, `${script} is executable`).not.toBe(0);
      const text = read(script);
      for (const [, service] of replicas) {
        const role = new URL(environment(service).DATABASE_URL!).username;
        expect(role).not.toBe(superuser);
        expect(text).toMatch(new RegExp(`CREATE ROLE ${role} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE`));
        expect(text).toMatch(
          new RegExp(`CREATE DATABASE ${new URL(environment(service).DATABASE_URL!).pathname.slice(1)} OWNER ${role}`),
        );
      }
    });
  });

  describe('haproxy', () => {
    const [, haproxy] = serviceOfImage('haproxy');
    const configFile = 'deploy/haproxy/haproxy.cfg';
    const sections = haproxySections(read(configFile));
    const backends = [...sections].filter(([name]) => name.startsWith('backend '));

    it('is configured from deploy/haproxy/haproxy.cfg and published on the README port', () => {
      expect(mountedAt(haproxy, configFile)).toBe('/usr/local/etc/haproxy/haproxy.cfg');
      const frontend = [...sections].find(
        ([name, lines]) => name.startsWith('frontend ') && lines.some((line) => line.startsWith('default_backend ')),
      );
      expect(frontend).toBeDefined();
      const bindPort = Number(/^bind \S*:(\d+)/.exec(frontend![1].find((line) => line.startsWith('bind '))!)?.[1]);
      // The README's documented PORT (8080) on the host, to the frontend's port in the container.
      const portRow = configurationRows.find((cells) => cells[1]?.includes('`PORT`'));
      const documentedPort = Number([...(portRow?.[2] ?? '').matchAll(/`(\d+)`/g)].at(-1)?.[1]);
      expect(documentedPort).toBe(8080);
      expect(ports(haproxy)).toContainEqual([documentedPort, bindPort]);
    });

    it('balances over exactly the compose replicas, each checked on /readyz', () => {
      expect(backends).toHaveLength(1);
      const [, lines] = backends[0]!;
      const servers = lines.filter((line) => line.startsWith('server ')).map((line) => line.split(' ')[2]);
      expect(servers.sort()).toEqual([...replicaAddresses].sort());
      expect(lines).toContain('option httpchk');
      expect(lines.some((line) => /^http-check send .*\buri \/readyz\b/.test(line))).toBe(true);
      const checked = (line: string) => line.split(' ').includes('check');
      expect(
        lines.some((line) => line.startsWith('default-server ') && checked(line)) ||
          lines.every((line) => !line.startsWith('server ') || checked(line)),
      ).toBe(true);
    });

    it('keeps the watch streams open: its timeouts outlast their 15 s keepalive', () => {
      // README: every watch stream gets a ": ping" comment at least every 15 s.
      const ping = 15_000;
      const timeouts = new Map<string, number>();
      for (const section of ['defaults', ...backends.map(([name]) => name)]) {
        for (const line of sections.get(section) ?? []) {
          const match = /^timeout (\S+) (\S+)$/.exec(line);
          if (match) timeouts.set(match[1]!, haproxyTime(match[2]!));
        }
      }
      expect(timeouts.get('server')).toBeGreaterThanOrEqual(2 * ping);
      expect(timeouts.get('client')).toBeGreaterThanOrEqual(2 * ping);
      expect(timeouts.get('tunnel')).toBeGreaterThanOrEqual(timeouts.get('server')!);
    });

    it('is health-checked on its own readiness page', () => {
      const monitor = [...sections.values()].flat().find((line) => line.startsWith('monitor-uri '));
      expect(monitor).toBeDefined();
      expect(healthcheck(haproxy)).toContain(monitor!.split(' ')[1]);
    });
  });

  describe('Prometheus', () => {
    const [, prometheus] = serviceOfImage('prom/prometheus');
    const configFile = 'deploy/prometheus/prometheus.yml';
    const config = yaml<PrometheusConfig>(read(configFile));

    it('scrapes /metrics of exactly the compose replicas as job metabatch', () => {
      expect(mountedAt(prometheus, configFile)).toBe('/etc/prometheus/prometheus.yml');
      const jobs = config.scrape_configs.filter((job) => job.job_name === 'metabatch');
      expect(jobs).toHaveLength(1);
      expect(jobs[0]!.metrics_path ?? '/metrics').toBe('/metrics');
      const targets = jobs[0]!.static_configs.flatMap((group) => group.targets);
      expect([...targets].sort()).toEqual([...replicaAddresses].sort());
    });

    it('loads the alerting rules compose mounts', () => {
      const alerts = mountedAt(prometheus, 'deploy/prometheus/alerts.yml');
      expect(alerts).toBeDefined();
      const configDir = path.posix.dirname(mountedAt(prometheus, configFile)!);
      const loaded = (config.rule_files ?? []).map((file: string) => path.posix.resolve(configDir, file));
      expect(loaded).toEqual([alerts]);
    });

    it('is health-checked on its readiness endpoint and published on 9090', () => {
      expect(healthcheck(prometheus)).toContain('/-/ready');
      expect(ports(prometheus)).toContainEqual([9090, 9090]);
    });
  });

  describe('Grafana', () => {
    const [, grafana] = serviceOfImage('grafana/grafana');
    const [prometheusName] = serviceOfImage('prom/prometheus');
    const provisioning = 'deploy/grafana/provisioning';
    const provisioned = (kind: string): GrafanaProvisioning[] =>
      fs
        .readdirSync(path.join(ROOT, provisioning, kind))
        .filter((file) => /\.ya?ml$/.test(file))
        .map((file) => yaml<GrafanaProvisioning>(read(path.posix.join(provisioning, kind, file))));
    const datasources = provisioned('datasources').flatMap((file) => file.datasources ?? []);

    it('is provisioned with the compose Prometheus as its datasource', () => {
      expect(mountedAt(grafana, provisioning)).toBe('/etc/grafana/provisioning');
      const prometheusSources = datasources.filter((source) => source.type === 'prometheus');
      expect(prometheusSources).toHaveLength(1);
      expect(prometheusSources[0]!.url).toBe(`http://${prometheusName}:9090`);
      expect(prometheusSources[0]!.uid).toEqual(expect.any(String));
    });

    it('loads the dashboard compose mounts', () => {
      const dashboard = mountedAt(grafana, 'deploy/grafana/metabatch.json');
      expect(dashboard).toBeDefined();
      const providers = provisioned('dashboards').flatMap((file) => file.providers ?? []);
      expect(providers.map((provider) => provider.options?.path)).toContain(path.posix.dirname(dashboard!));
    });

    it('has the datasource the dashboard asks for', () => {
      const dashboard = JSON.parse(read('deploy/grafana/metabatch.json')) as {
        templating?: { list?: { type: string; query?: unknown }[] };
      };
      const uids = new Set(datasources.map((source) => source.uid));
      // The dashboard's `${datasource}` variable lists datasources of a type:
      // the provisioned one must be of it.
      const variables = (dashboard.templating?.list ?? []).filter((variable) => variable.type === 'datasource');
      for (const variable of variables) expect(variable.query).toBe('prometheus');
      // A datasource named by uid rather than by the variable must be the provisioned one.
      const fixed: string[] = [];
      JSON.stringify(dashboard, (key, value) => {
        if (key === 'datasource' && typeof value?.uid === 'string' && !value.uid.startsWith('$')) fixed.push(value.uid);
        return value;
      });
      const builtIn = ['grafana', '-- Grafana --', '-- Mixed --', '-- Dashboard --'];
      expect(fixed.filter((uid) => !uids.has(uid) && !builtIn.includes(uid))).toEqual([]);
    });

    it('is health-checked and published on 3000', () => {
      expect(healthcheck(grafana)).toContain('/api/health');
      expect(ports(grafana)).toContainEqual([3000, 3000]);
    });
  });

  describe('README "Running several replicas"', () => {
    const text = () => section(readme, 'Running several replicas');

    it('comes right before "Guarantees"', () => {
      const headings = readme.split('\n').filter((line) => line.startsWith('## '));
      expect(headings[headings.indexOf('## Running several replicas') + 1]).toBe('## Guarantees');
    });

    it('names every port compose publishes', () => {
      const published = Object.values(services).flatMap((service) => ports(service).map(([host]) => host));
      expect([...published].sort()).toEqual([3000, 8080, 9090]);
      for (const port of published) expect(text()).toContain(`localhost:${port}`);
    });

    it('states the connection budget, the grace period and the probes', () => {
      for (const phrase of ['PG_POOL_SIZE', 'max_connections', 'FINAL_FLUSH_TIMEOUT_MS', 'FLUSH_JITTER']) {
        expect(text()).toContain(phrase);
      }
      for (const phrase of ['/readyz', '/healthz', 'terminationGracePeriodSeconds', 'preStop']) {
        expect(text()).toContain(phrase);
      }
    });
  });
});
