"""Which process wrote a record, and whether it is gone: enough for a later run on the same
machine to tell a dead run's report or claim from a live one (Linux; elsewhere nothing can tell).
And a child's command (a Prefect server nst starts) made to end when this process dies."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .storage import pid_space

__all__ = ["this_process", "process_gone", "process_alive", "dies_with_this_process"]


def this_process(pid: int | None = None) -> dict | None:
    """{boot, pid_ns, pid, started} of this process (or ``pid``, of this pid namespace) on Linux,
    else None: enough for a later run on this machine to know the process is gone, and never to
    mistake another machine's or container's process for it (a boot and a pid namespace of its
    own: pids repeat across them; ``started``, in clock ticks since boot: a pid is reused once its
    process is gone)."""
    space = pid_space()
    if space is None:
        return None
    try:
        return {"boot": space[0], "pid_ns": space[1], "pid": pid or os.getpid(), "started": _started(pid or os.getpid())}
    except (OSError, ValueError, IndexError):
        return None


def process_gone(process) -> str | None:
    """Why the process a report recorded (``this_process``) is gone, or None: it is alive, or it ran
    on another machine or container, or nothing usable was recorded (nothing here can tell)."""
    return f"its process (pid {process['pid']}) is gone from this machine" if _judged(process) is False else None


def process_alive(process) -> bool:
    """Whether the process a report recorded (``this_process``) is known alive: on this machine and
    pid namespace, the same process (its start time) and not a zombie. False where nothing can tell."""
    return _judged(process) is True


def _judged(process) -> bool | None:
    """True: the recorded process is alive here; False: it is gone from here; None: nothing here
    can tell (another machine or container, nothing usable recorded, hidden from this user)."""
    here = this_process()
    if not isinstance(process, dict) or here is None:
        return None
    if (process.get("boot"), process.get("pid_ns")) != (here["boot"], here["pid_ns"]):
        return None
    pid, started = process.get("pid"), process.get("started")
    if not all(type(v) is int and v > 0 for v in (pid, started)):  # not bool, float, or a JSON oddity
        return None
    try:
        fields = _stat(pid)
        if int(fields[19]) == started and fields[0] != "Z":  # starttime (field 22), state (3): a zombie has ended
            return True
    except (OSError, ValueError, IndexError):
        try:  # unreadable: gone, or hidden (/proc mounted hidepid: another user's process)
            os.kill(pid, 0)
            return None
        except ProcessLookupError:
            pass
        except OSError:
            return None
    return False


def _stat(pid: int) -> list[str]:
    """/proc/{pid}/stat's fields from the third on (after the command name, which may hold spaces)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _started(pid: int) -> int:
    return int(_stat(pid)[19])  # field 22, starttime


#: Runs first in the server's process, then execs Prefect's command: the kernel SIGTERMs the
#: server when nst dies however it dies (kill -9, an OOM kill, a crash: no code of nst runs then),
#: PR_SET_PDEATHSIG being kept across exec. nst already gone by then: exit at once. Linux only.
#: The signal follows the *thread* that started the process: the main thread, or the restarting
#: thread, which waits on the process it started.
_DIE_WITH_NST = """
import os, signal, sys
try:
    import ctypes
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
except Exception:
    pass  # serve without it rather than not at all
if os.getppid() != int(sys.argv[1]):
    sys.exit(0)
os.execv(sys.argv[2], sys.argv[2:])
"""


def dies_with_this_process(args: list[str]) -> list[str]:
    """``args`` (a Prefect server's command) run so that it ends when this process does (Linux); else as is."""
    if not sys.platform.startswith("linux"):
        return args
    # -I: the standard library only (no ctypes.py of the working directory, no PYTHON* variables)
    return [sys.executable, "-I", "-c", _DIE_WITH_NST, str(os.getpid()), *args]
