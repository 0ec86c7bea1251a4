"""``python _reaper.py DRIVER_PID``: when the driver dies, kill what it started.

A driver SIGKILLed on its own (the OOM killer, ``kill -9 PID``) leaves Ray's helper
processes (``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``) running: they are
orphaned before they notice that their raylet is gone, then wait on a dead GCS. The
search starts this watcher (in its own session, so signals to the driver's process
group do not reach it) right after it starts its local Ray instance. It records the
driver's descendants every second (pid and start time, from ``/proc``) and, once the
driver is gone, SIGKILLs those still running with the same start time (a reused pid
is left alone). It uses only the standard library and exits when the driver exits.
Linux only (``/proc``); elsewhere the search does not start it.
"""

from __future__ import annotations

import os
import signal
import sys
import time

POLL_S = 1.0


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time in clock ticks) of ``pid``, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
    return int(fields[1]), fields[19]


def descendants(root: int, *, exclude: int | None = None) -> dict[int, str]:
    """pid -> start time of every live descendant of ``root``."""
    children: dict[int, list[int]] = {}
    starts: dict[int, str] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (info := _stat(int(name))) is not None:
            children.setdefault(info[0], []).append(int(name))
            starts[int(name)] = info[1]
    out, stack = {}, [root]
    while stack:
        for pid in children.get(stack.pop(), []):
            if pid != exclude and pid not in out:
                out[pid] = starts[pid]
                stack.append(pid)
    return out


def watch(driver: int, *, poll_s: float = POLL_S) -> list[int]:
    """Block until ``driver`` is gone, then kill its recorded descendants; returns them.

    Started by the driver, this process is its child: it is re-parented the moment the
    driver dies (a dead driver that its own parent has not reaped yet still answers
    ``kill(pid, 0)``, so that cannot tell)."""
    known: dict[int, str] = {}
    own = os.getpid()
    while os.getppid() == driver:
        known.update(descendants(driver, exclude=own))
        time.sleep(poll_s)
    killed = []
    for pid, start in known.items():
        info = _stat(pid)
        if info is not None and info[1] == start:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except OSError:
                pass
    return killed


if __name__ == "__main__":
    watch(int(sys.argv[1]))
