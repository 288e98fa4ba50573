"""A small process that SIGKILLs the process groups of the engines ``yichui serve`` launched
when serve dies, however it dies::

    reaper = GroupReaper()
    reaper.watch(engine.pid)     # the engine leads its own process group (supervise.spawn)
    reaper.forget(engine.pid)    # stopped in order
    reaper.close()               # serve stops: nothing is left to kill, it exits

The kernel SIGKILLs each engine with serve (its death signal), but not the processes the engine
started (an inference server's workers). Those keep the engine's process group, though, and the
reaper kills the groups it still watches once its input ends, which is when serve's end of the
pipe closes: an orderly stop has forgotten every group by then, a death has not. It needs no
death signal of its own, so it works where there is none (macOS) too.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading

from yichui.supervise import spawn

_REAPER = """\
import os, signal, sys
groups = set()
for line in sys.stdin:
    sign, pgid = line[:1], int(line[1:])
    (groups.add if sign == "+" else groups.discard)(pgid)
for pgid in groups:  # end of input: serve died (an orderly stop leaves none)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass
"""


class GroupReaper:
    """The reaper process, fed the engines' process groups through its stdin."""

    def __init__(self) -> None:
        self._child = spawn(
            [sys.executable, "-I", "-S", "-c", _REAPER],
            death_signal=None,  # it acts on the end of its input, whatever our death was
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
        )
        self._lock = threading.Lock()

    def _send(self, line: str) -> None:
        stdin = self._child.popen.stdin
        with self._lock, contextlib.suppress(OSError, ValueError):
            assert stdin is not None
            stdin.write(line.encode())
            stdin.flush()

    def watch(self, pgid: int) -> None:
        self._send(f"+{pgid}\n")

    def forget(self, pgid: int) -> None:
        self._send(f"-{pgid}\n")

    def close(self) -> None:
        """End its input (every group forgotten): it exits."""
        with self._lock, contextlib.suppress(OSError, ValueError):
            stdin = self._child.popen.stdin
            assert stdin is not None
            stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._child.wait(5)
