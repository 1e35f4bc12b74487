"""CPU used by a server's processes, read from ``/proc``: the front end and each engine child apart.

Our service is a front-end process that spawns engine processes; the serving benchmark reports the
cores each of them used during a step (``CpuMonitor``), besides the whole machine's, this client's
and the rest, since the machine may be shared. Linux only; elsewhere the figures are empty.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

CLOCK_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_seconds(pid: int, proc: Path = Path("/proc")) -> float | None:
    """utime + stime of one process (all its threads), from ``/proc/<pid>/stat``; None when it is gone."""
    try:
        text = (proc / str(pid) / "stat").read_text(encoding="ascii", errors="replace")
        fields = text.rsplit(")", 1)[1].split()  # the command name may hold spaces and parentheses
        return (float(fields[11]) + float(fields[12])) / CLOCK_TICK
    except (OSError, ValueError, IndexError):
        return None


def process_children(pid: int, proc: Path = Path("/proc")) -> list[int]:
    """Direct children of ``pid``: ``/proc/<pid>/task/<tid>/children`` of every thread (a child belongs
    to the thread that forked it, not always the main one)."""
    children: set[int] = set()
    try:
        tasks = list((proc / str(pid) / "task").iterdir())
    except OSError:
        return []
    for task in tasks:
        try:
            children.update(int(x) for x in (task / "children").read_text(encoding="ascii").split())
        except (OSError, ValueError):
            continue
    return sorted(children)


def process_role(pid: int, proc: Path = Path("/proc")) -> str:
    """``engineN`` for an engine process (``python -m service.engine.core '{"index": N, ...}'``), else
    ``child``: read from its command line."""
    try:
        argv = (proc / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return "child"
    words = [a.decode(errors="replace") for a in argv if a]
    if "service.engine.core" in words:
        position = words.index("service.engine.core")
        try:
            return f"engine{int(json.loads(words[position + 1])['index'])}"
        except (IndexError, ValueError, KeyError, TypeError):
            return "engine"
    return "child"


def process_tree_cpu(root: int, proc: Path = Path("/proc")) -> dict[int, tuple[str, float]]:
    """pid -> (role, CPU seconds so far) for ``root`` (role ``front_end``) and all its descendants."""
    tree: dict[int, tuple[str, float]] = {}
    todo = [(root, "front_end")]
    while todo:
        pid, role = todo.pop()
        seconds = process_cpu_seconds(pid, proc)
        if seconds is None or pid in tree:
            continue
        tree[pid] = (role, seconds)
        todo.extend((child, process_role(child, proc)) for child in process_children(pid, proc))
    return tree


def cpu_split(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], wall_s: float
) -> dict[str, float]:
    """Cores used per role between two ``process_tree_cpu`` readings ``wall_s`` apart.

    A process seen only at the end (an engine restarted mid-step) counts all its CPU time; one gone
    by the end is lost for that step (its last interval is not readable any more). Roles that repeat
    (several ``child`` processes) are summed.
    """
    wall = max(wall_s, 1e-9)
    split: dict[str, float] = {}
    for pid, (role, seconds) in after.items():
        used = seconds - before[pid][1] if pid in before else seconds
        split[role] = split.get(role, 0.0) + max(0.0, used) / wall
    return {role: round(cores, 2) for role, cores in sorted(split.items())}


class CpuMonitor:
    """CPU used during a step, in cores: the whole machine, the server (its process tree, split per
    process: front end and each engine), this client, and the rest, plus the load average.

    The machine is shared; "other" (busy time no benchmark process accounts for) tells a reader
    whether a step was disturbed by something else running.
    """

    def __init__(self, server_pid: int | None) -> None:
        self.server_pid = server_pid
        self.start = self._read()

    def _read(self) -> tuple[float, float, dict[int, tuple[str, float]], float]:
        busy = 0.0
        try:
            with open("/proc/stat", encoding="ascii") as handle:
                fields = [float(x) for x in handle.readline().split()[1:]]
            busy = (sum(fields) - fields[3] - fields[4]) / CLOCK_TICK  # minus idle and iowait
        except (OSError, ValueError, IndexError):
            pass
        tree = process_tree_cpu(self.server_pid) if self.server_pid else {}
        times = os.times()
        return time.monotonic(), busy, tree, times.user + times.system

    def cores(self) -> dict[str, Any]:
        end = self._read()
        wall = max(1e-9, end[0] - self.start[0])
        machine = (end[1] - self.start[1]) / wall
        client = (end[3] - self.start[3]) / wall
        split = cpu_split(self.start[2], end[2], wall)
        server = sum(split.values())
        return {
            "machine": round(machine, 2),
            "server": round(server, 2),
            "server_processes": split,
            "client": round(client, 2),
            "other": round(max(0.0, machine - server - client), 2),
            "loadavg_1m": round(os.getloadavg()[0], 2),
        }
