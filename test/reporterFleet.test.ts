// The README's agent ("From an agent: `createReporter`"), twenty times in one
// process, as a host running twenty agents runs it: each a reporter with
// `setInterval(() => reporter.report(…))` and the README's SIGTERM handler.
// One agent's token is rotated through the admin API. The process must keep
// running: the rotated reporter answers `stopped: true` (its onError said
// why), the other nineteen keep reporting, and SIGTERM ends the process
// cleanly, with nothing on stderr but the one fatal error. Before the
// reporter became a state machine, the rotated reporter's next report()
// threw inside the interval and took the whole process down.

import { pathToFileURL } from 'node:url';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { testDatabase, closedAfterEach } from './support/db.js';
import { ROOT, run, type Spawned } from './support/process.js';
import { ADMIN_TOKEN, startTestService } from './support/service.js';

const db = testDatabase();
// The service's clock an hour ahead of the agents' (real) one: it keeps their
// collected_at as sent (it clamps a later one to its own time), so the table
// shows when each stored value was reported.
const service = closedAfterEach(() => startTestService(db, { startAt: Date.now() + 3_600_000 }));

const AGENTS = 20;
// The README reports every 5 s; 50 ms keeps the test short and changes nothing else.
const PERIOD_MS = 50;

// Each agent exactly as the README writes it, but for the period, and one
// line on stdout per report() to watch it by (its answer, and the keys the
// service has acknowledged so far).
const FLEET = `
import os from 'node:os';
import { createReporter } from ${JSON.stringify(pathToFileURL(path.join(ROOT, 'dist', 'client.js')).href)};

// Twenty agents, each with the README's own SIGTERM handler.
process.setMaxListeners(${AGENTS + 10});

function agent(index, agentId, token) {
  const reporter = createReporter({
    url: process.env.METABATCH_URL,
    agentId,
    token,
    onError: (err) => console.error(\`metabatch: \${err.message}\`), // err.fatal: the token was refused
  });
  const report = () => reporter.report({ load: os.loadavg()[0].toFixed(2), free: \`\${os.freemem()}\` });
  const seen = () => console.log(JSON.stringify({ index, ...report(), acceptedKeys: reporter.stats().acceptedKeys }));
  const timer = setInterval(seen, ${PERIOD_MS});
  process.once('SIGTERM', async () => {
    clearInterval(timer);
    await reporter.close(); // sends what it holds first (5 s at most)
  });
}

JSON.parse(process.env.AGENTS).forEach(({ id, token }, index) => agent(index, id, token));
`;

interface Line {
  index: number;
  accepted: number;
  refused: number;
  stopped?: true;
  acceptedKeys: number;
}

function linesOf(fleet: Spawned): Line[] {
  return fleet
    .stdout()
    .split('\n')
    .filter((line) => line.startsWith('{'))
    .map((line) => JSON.parse(line) as Line);
}

/** Resolves on the stdout line after which `done` holds; rejects if the process exits first. */
function until(fleet: Spawned, what: string, done: (lines: Line[]) => boolean): Promise<void> {
  return new Promise((resolve, reject) => {
    const check = () => {
      if (done(linesOf(fleet))) {
        fleet.child.stdout!.off('data', check);
        fleet.child.off('exit', check);
        resolve();
      } else if (fleet.child.exitCode !== null || fleet.child.signalCode !== null) {
        reject(new Error(`the agents' process exited before ${what}: ${fleet.stderr().slice(-2000)}`));
      }
    };
    fleet.child.stdout!.on('data', check);
    fleet.child.on('exit', check);
    check();
  });
}

/** Each agent's largest count of acknowledged keys among `lines`. */
function acknowledged(lines: Line[]): number[] {
  const counts = new Array<number>(AGENTS).fill(0);
  for (const line of lines) counts[line.index] = Math.max(counts[line.index]!, line.acceptedKeys);
  return counts;
}

describe("the README's agent, twenty in one process", () => {
  it('survives a token rotation: the rotated reporter answers stopped, the other nineteen keep reporting', async () => {
    const h = await service();
    const agents = await Promise.all(Array.from({ length: AGENTS }, () => h.agent(['load', 'free'])));
    const fleet = run('node', ['--input-type=module', '-e', FLEET], {
      METABATCH_URL: h.base,
      AGENTS: JSON.stringify(agents),
    });
    try {
      await until(fleet, 'every agent reported', (lines) => acknowledged(lines).every((count) => count >= 2));

      const rotatedAt = new Date().toISOString();
      const rotated = await h.app.inject({
        method: 'POST',
        url: `/v1/agents/${agents[0]!.id}/token`,
        headers: { authorization: `Bearer ${ADMIN_TOKEN}` },
      });
      expect(rotated.statusCode).toBe(200);
      await fleet.waitFor(/^metabatch: metabatch refused the agent token \(close code 4001: token revoked\)/m);
      await until(fleet, 'agent 0 answered stopped', (lines) => lines.some((line) => line.index === 0 && line.stopped));
      const stoppedAt = linesOf(fleet).findIndex((line) => line.index === 0 && line.stopped);
      const before = acknowledged(linesOf(fleet).slice(0, stoppedAt + 1));

      // Every other agent reports on: a report made after agent 0 stopped is acknowledged (one send is in
      // flight at a time, of 2 keys: 4 more keys acknowledged than at that report's line take a later send).
      await until(fleet, 'the nineteen acknowledged a report made after the rotation', (lines) => {
        const after = lines.slice(stoppedAt + 1);
        return agents.every((_, index) => {
          if (index === 0) return true;
          const mine = after.filter((line) => line.index === index);
          return mine.length > 0 && mine.at(-1)!.acceptedKeys >= mine[0]!.acceptedKeys + 4;
        });
      });
      const after = linesOf(fleet).slice(stoppedAt);
      const rotatedLines = after.filter((line) => line.index === 0);
      expect(rotatedLines.length).toBeGreaterThan(0);
      for (const line of rotatedLines) {
        expect(line).toEqual({ index: 0, accepted: 0, refused: 2, stopped: true, acceptedKeys: before[0] });
      }
      expect(after.filter((line) => line.index !== 0 && (line.stopped || line.accepted !== 2))).toEqual([]);
      expect(fleet.child.exitCode).toBeNull();

      // What the nineteen reported after the rotation reached the table.
      await h.advance(5000);
      for (const [index, agent] of agents.entries()) {
        if (index === 0) continue;
        const rows = await h.stored(agent.id);
        expect(rows.load!.collected_at >= rotatedAt, `agent ${index}: ${rows.load!.collected_at}`).toBe(true);
      }

      // The README's SIGTERM handlers close every reporter; nothing is left to keep the process alive.
      fleet.child.kill('SIGTERM');
      expect(await fleet.exited).toEqual({ code: 0, signal: null });
      expect(fleet.stderr().trim().split('\n')).toEqual([
        expect.stringMatching(/^metabatch: metabatch refused the agent token \(close code 4001: token revoked\)/),
      ]);
    } finally {
      if (fleet.child.exitCode === null && fleet.child.signalCode === null) fleet.child.kill('SIGKILL');
      await fleet.closed;
    }
  });
});
