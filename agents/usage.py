"""What each agent process has spent: CPU time, system calls, context switches.

The trace says *when* things happened. It cannot say what they cost the
machine. Linux keeps that count for every process and every thread in
``/proc`` (see proc(5)):

- ``/proc/PID/task/TID/stat``: ``utime`` and ``stime``, the CPU time the
  thread spent running its own code (user) and in the kernel on its behalf
  (system), in clock ticks;
- ``/proc/PID/task/TID/status``: ``voluntary_ctxt_switches`` (the thread
  stopped to wait: for input, for the disk, for a lock) and
  ``nonvoluntary_ctxt_switches`` (the kernel took the CPU away from it);
- ``/proc/PID/task/TID/comm``: the thread's name (an agent names its disk
  thread ``disk``: see :class:`agents.durable.DiskThread`);
- ``/proc/PID/io``: ``syscr`` and ``syscw``, the read- and write-class system
  calls (sockets, files, pipes) of the whole process.

Take a :func:`snapshot` before and after a benchmark and :func:`per_message`
turns the difference into costs per message. This is how issue 3 learned
that the pipeline is limited by CPU: two cores divided by the CPU time all
agents spend on one message is the most the pipeline can carry. Linux only;
nothing here runs a reactor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")  # clock ticks per second, the unit of utime and stime


@dataclass
class ThreadUsage:
    """One thread's counters so far."""

    tid: int
    name: str
    user_s: float
    system_s: float
    voluntary: int
    involuntary: int

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.system_s


@dataclass
class ProcessUsage:
    """One process's counters so far: its CPU time (threads that ended
    included), its system calls, and each living thread's counters."""

    pid: int
    cpu_s: float
    syscalls: int
    threads: dict[int, ThreadUsage] = field(default_factory=dict)


def _user_and_system_s(stat_path: Path) -> tuple[float, float]:
    """``utime`` and ``stime`` (fields 14 and 15) of a ``stat`` file, in seconds."""
    # Field 2, the name in parentheses, may hold spaces: count from the last ")".
    fields = stat_path.read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def thread_usage(pid: int, tid: int) -> ThreadUsage:
    task = Path(f"/proc/{pid}/task/{tid}")
    user_s, system_s = _user_and_system_s(task / "stat")
    status = dict(line.partition(":")[::2] for line in (task / "status").read_text().splitlines())
    return ThreadUsage(
        tid=tid, name=(task / "comm").read_text().strip(), user_s=user_s, system_s=system_s,
        voluntary=int(status["voluntary_ctxt_switches"]),
        involuntary=int(status["nonvoluntary_ctxt_switches"]),
    )


def process_usage(pid: int) -> ProcessUsage:
    """A process's counters now."""
    io = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    usage = ProcessUsage(pid, sum(_user_and_system_s(Path(f"/proc/{pid}/stat"))),
                         int(io["syscr"]) + int(io["syscw"]))
    for entry in os.scandir(f"/proc/{pid}/task"):
        try:
            usage.threads[int(entry.name)] = thread_usage(pid, int(entry.name))
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended while we looked
    return usage


def snapshot(pids: dict[str, int]) -> dict[str, ProcessUsage]:
    """Every named process's counters now, e.g. ``snapshot({a: lab.pid(a) for a in agents})``."""
    return {name: process_usage(pid) for name, pid in pids.items()}


@dataclass
class Cost:
    """What one agent spent per message between two snapshots."""

    agent: str
    cpu_ms: float
    syscalls: float
    #: thread role ("main" for the reactor's thread, else its name) -> (CPU ms, voluntary, involuntary switches)
    threads: dict[str, tuple[float, float, float]]


def per_message(before: dict[str, ProcessUsage], after: dict[str, ProcessUsage], messages: int) -> list[Cost]:
    """The difference of two snapshots, divided by ``messages``, agent by agent.

    A thread that started in between counts from zero; one that ended is
    missing from the threads, but not from the agent's total. Threads of the
    same name (Twisted's thread pool, say) are added up.
    """
    costs = []
    for name, now in after.items():
        then = before.get(name) or ProcessUsage(now.pid, 0.0, 0)
        threads: dict[str, list[float]] = {}
        for tid, t in now.threads.items():
            old = then.threads.get(tid)
            role = "main" if tid == now.pid else t.name
            sums = threads.setdefault(role, [0.0, 0.0, 0.0])
            sums[0] += (t.cpu_s - (old.cpu_s if old else 0.0)) * 1000 / messages
            sums[1] += (t.voluntary - (old.voluntary if old else 0)) / messages
            sums[2] += (t.involuntary - (old.involuntary if old else 0)) / messages
        costs.append(Cost(
            agent=name,
            cpu_ms=(now.cpu_s - then.cpu_s) * 1000 / messages,
            syscalls=(now.syscalls - then.syscalls) / messages,
            threads={role: (round(c, 3), round(v, 2), round(i, 2)) for role, (c, v, i) in threads.items()},
        ))
    return costs
