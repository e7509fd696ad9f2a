// CPU time by process, read from /proc (Linux only): where the cores went
// during a run, the server's, Postgres's and the load generator's apart.

import { readdirSync, readFileSync } from 'node:fs';

/** CPU ticks (user + system, 1/100 s) used so far by each of these processes. */
export function cpuTicks(pids: number[]): Map<number, number> {
  const ticks = new Map<number, number>();
  for (const pid of pids) {
    try {
      const fields = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]!.split(' ');
      ticks.set(pid, Number(fields[11]) + Number(fields[12]));
    } catch {
      // gone
    }
  }
  return ticks;
}

/** CPU seconds used since `before` by the processes alive at both readings. */
export function cpuSecondsSince(before: Map<number, number>): number {
  let ticks = 0;
  for (const [pid, now] of cpuTicks([...before.keys()])) ticks += now - before.get(pid)!;
  return ticks / 100;
}

/** Every Postgres process on this machine (the cluster the bench uses, on a machine of its own). */
export function postgresPids(): number[] {
  const pids: number[] = [];
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      if (readFileSync(`/proc/${entry}/comm`, 'utf8').trim() === 'postgres') pids.push(Number(entry));
    } catch {
      // gone
    }
  }
  return pids;
}
