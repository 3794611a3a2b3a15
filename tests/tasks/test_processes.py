"""tasks/processes.py: which process wrote a record, and a child process that ends with its starter."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.processes import dies_with_this_process, process_gone, this_process

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_server_process_ends_when_its_starter_dies_without_running_code(tmp_path):
    """kill -9 (or an OOM kill) of nst runs none of its code: the kernel must end the server it
    started (old: it served on, in a session of its own, for ever). And a starter that is gone
    before the server's process set that up: the process exits at once instead of serving."""
    up = tmp_path / "up"
    starter = ("import os, signal, subprocess, sys, time\n"
               "from tasks.processes import dies_with_this_process\n"
               "p = subprocess.Popen(dies_with_this_process([sys.executable, '-c', "
               "'import os, time; print(os.getpid(), flush=True); time.sleep(120)']), stdout=open(sys.argv[1], 'w'))\n"
               "while not open(sys.argv[1]).read(): time.sleep(0.05)\n"
               "os.kill(os.getpid(), signal.SIGKILL)\n")
    done = subprocess.run([sys.executable, "-c", starter, str(up)], stdout=subprocess.DEVNULL, timeout=60,
                          cwd=ROOT)
    assert done.returncode == -signal.SIGKILL
    server = int(up.read_text())
    identity = this_process(server)  # None: already gone

    def alive() -> bool:  # running, not a zombie (an orphan's reaper may be slow, or absent in a container)
        return identity is not None and process_gone(identity) is None

    try:
        end = time.monotonic() + 10
        while alive() and time.monotonic() < end:
            time.sleep(0.1)
        assert not alive()
    finally:
        if alive():
            os.kill(server, signal.SIGKILL)

    gone = subprocess.run(dies_with_this_process(["/bin/false"])[:4] + ["1", "/bin/false"], timeout=30)
    assert gone.returncode == 0  # not /bin/false's 1: its starter (pid 1 here) is not its parent
