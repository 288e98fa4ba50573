"""Child processes that die with their parent, even when the parent is SIGKILLed or OOM-killed.

::

    child = spawn(["torchrun", ...])   # SIGKILLed if we die, however we die
    child.stop(timeout=15)             # orderly: SIGTERM, then SIGKILL of its whole tree

    tie_to_parent(signal.SIGKILL, parent=spawned_pid())  # in a grandchild running yichui code

How (Linux): :func:`spawn` starts the command through a few-line Python trampoline that sets
``PR_SET_PDEATHSIG`` (``prctl``), checks that its parent is still the one that forked it (the
parent may have died before the ``prctl``), exports its own pid as :data:`SPAWNED_PID_ENV` and
becomes the command (``execv``), which keeps the death signal. Not ``preexec_fn``: that is
unsafe in a process with threads (a worker has several). Three kernel rules shape the rest:

- The signal fires when the *thread* that forked the child exits, not the process. A child
  spawned from a short-lived thread (a worker's slot, an executor) would be signalled when that
  thread ends, so every spawn off the main thread is done by one long-lived spawner thread.
- When the parent dies, the child is handed from one of its dying threads to the next, and
  signalled each time: the signal may come several times in a row. The default, SIGKILL, does
  not care; a child that stops in order on its death signal must take repeats as one (yichui's
  worker: SIGHUP, see :data:`PARENT_GONE`), not as a second, impatient SIGTERM.
- A fork of the child does not inherit the setting. Launchers such as torchrun and accelerate
  start their rank processes themselves (in sessions of their own, beyond a group kill); a rank
  that runs yichui code ties itself to its launcher with :func:`tie_to_parent`.

Every child gets a session (and process group) of its own, so a Ctrl-C in a terminal reaches
only the parent, which stops its children in order; :meth:`Child.kill_tree` takes the group and
every descendant found in ``/proc``.

Elsewhere (macOS, Windows) there is no death signal: :func:`spawn` is a plain ``Popen`` in a new
session, children outlive a parent that is killed outright (an orderly stop still stops them),
and :func:`tie_to_parent` watches the parent pid from a thread once a second instead.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any

PDEATHSIG = sys.platform.startswith("linux")
"""Whether the kernel kills children with their parent here (``PR_SET_PDEATHSIG``, Linux)."""
SPAWNED_PID_ENV = "YICHUI_SPAWNED_PID"
"""Set in the environment of a child of :func:`spawn` (and so of its own children) to the
child's pid: the parent a rank started by that child should tie itself to."""
PARENT_GONE = getattr(signal, "SIGHUP", signal.SIGTERM)
"""The death signal of a child that stops in order when its parent dies: yichui's task worker
hands its tasks back and exits on it, however many times it comes."""
_PR_SET_PDEATHSIG = 1

_TRAMPOLINE = f"""\
import ctypes, os, signal, sys
sig, parent, exe = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
if sig != signal.SIGKILL:  # not ignored (nohup) while the command starts up
    signal.signal(sig, signal.SIG_DFL)
try:
    ctypes.CDLL(None, use_errno=True).prctl({_PR_SET_PDEATHSIG}, sig, 0, 0, 0)
except (OSError, AttributeError):
    pass
if os.getppid() != parent:
    os.kill(os.getpid(), sig)
    os._exit(128 + sig)
os.environ["{SPAWNED_PID_ENV}"] = str(os.getpid())
try:
    os.execv(exe, sys.argv[4:])
except OSError as exc:
    sys.stderr.write(f"cannot run {{exe}}: {{exc}}\\n")
    os._exit(127)
"""

File = int | IO[Any] | None


class Child:
    """A process started by :func:`spawn`, leader of its own session and process group."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.popen = popen
        self.pid = popen.pid
        self._terminated = False

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    def poll(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.popen.wait(timeout)

    def send_signal(self, sig: int) -> None:
        """``sig`` to the child alone (it stops its own children in its own order)."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(sig)

    def terminate(self) -> None:
        """SIGTERM, once: yichui's workers take a second one to mean "exit now"."""
        if not self._terminated:
            self._terminated = True
            self.send_signal(signal.SIGTERM)

    def kill_tree(self, timeout: float = 10.0) -> None:
        """SIGKILL the child, its process group and every descendant (those in sessions of
        their own too, such as torchrun's ranks), then reap the child."""
        if self.popen.poll() is None:
            found = descendants(self.pid)  # before any kill: an orphan's parent is no clue
            for pid in [self.pid, *found]:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout)

    def stop(self, timeout: float) -> int | None:
        """:meth:`terminate`, up to ``timeout`` seconds to exit, then :meth:`kill_tree`.
        -> the exit status."""
        self.terminate()
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_tree()
            return self.popen.returncode


def spawn(
    cmd: Sequence[str],
    *,
    death_signal: int | None = signal.SIGKILL,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    stdin: File = None,
    stdout: File = None,
    stderr: File = None,
) -> Child:
    """Start ``cmd`` in a session of its own; where the kernel allows, it gets ``death_signal``
    when this process dies (None: not tied). Raises FileNotFoundError when ``cmd[0]`` is not an
    executable, as ``Popen`` does."""
    exe = _resolve(cmd[0], env, cwd)
    child_env = dict(os.environ if env is None else env)
    child_env.pop(SPAWNED_PID_ENV, None)  # the trampoline sets our child's own
    argv = list(cmd)
    if death_signal is not None and PDEATHSIG:
        argv = [sys.executable, "-I", "-S", "-c", _TRAMPOLINE]
        argv += [str(int(death_signal)), str(os.getpid()), exe, *cmd]
        exe = sys.executable

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            argv,
            executable=exe,
            env=child_env,
            cwd=cwd,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
        )

    return Child(_on_lasting_thread(start))


def _resolve(name: str, env: Mapping[str, str] | None, cwd: str | os.PathLike[str] | None) -> str:
    """``name`` as an absolute path to an executable (the trampoline cannot report a missing
    program the way ``Popen`` does, so it is looked up here)."""
    if os.sep in name:
        path = os.path.join(cwd, name) if cwd is not None and not os.path.isabs(name) else name
        found = path if os.access(path, os.X_OK) and not os.path.isdir(path) else None
    else:
        found = shutil.which(name, path=(os.environ if env is None else env).get("PATH"))
    if found is None:
        raise FileNotFoundError(2, "No such file or directory", name)
    return os.path.abspath(found)


# -- the spawner thread ---------------------------------------------------------------------------
_requests: queue.SimpleQueue[
    tuple[Callable[[], subprocess.Popen[bytes]], concurrent.futures.Future[Any]]
] = queue.SimpleQueue()
_spawner: threading.Thread | None = None
_spawner_lock = threading.Lock()


def _on_lasting_thread(fn: Callable[[], subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    """``fn()`` on a thread that lives as long as the process: the main thread, else one
    daemon thread kept for this purpose (the death signal follows the forking thread)."""
    if threading.current_thread() is threading.main_thread():
        return fn()
    global _spawner
    with _spawner_lock:
        if _spawner is None or not _spawner.is_alive():
            _spawner = threading.Thread(target=_serve_spawns, name="yichui-spawner", daemon=True)
            _spawner.start()
    done: concurrent.futures.Future[subprocess.Popen[bytes]] = concurrent.futures.Future()
    _requests.put((fn, done))
    return done.result()


def _serve_spawns() -> None:
    while True:
        fn, done = _requests.get()
        try:
            done.set_result(fn())
        except BaseException as exc:  # handed to the caller, who raises it
            done.set_exception(exc)


# -- the child's side -----------------------------------------------------------------------------
def spawned_pid() -> int | None:
    """The pid :func:`spawn` exported to this process's environment (see
    :data:`SPAWNED_PID_ENV`), or None."""
    value = os.environ.get(SPAWNED_PID_ENV, "")
    return int(value) if value.isdigit() else None


def tie_to_parent(death_signal: int = signal.SIGKILL, *, parent: int | None = None) -> bool:
    """Die by ``death_signal`` when the parent process dies; at once if ``parent`` (the pid
    the parent should have, e.g. :func:`spawned_pid`) is already gone, which closes the race
    between being forked and this call. -> True where the kernel does it (Linux), False where
    a daemon thread polls the parent pid every second instead."""
    current = os.getppid()  # may be a process between `parent` and us (a nested launcher)
    if parent is not None and current != parent and not _alive(parent):
        _die(death_signal)  # re-parented: the parent we were started by died before we got here
    if PDEATHSIG and _prctl(_PR_SET_PDEATHSIG, death_signal):
        if os.getppid() != current:  # it died between the two calls
            _die(death_signal)
        return True
    threading.Thread(
        target=_watch_parent, args=(current, death_signal), name="parent-watch", daemon=True
    ).start()
    return False


def _watch_parent(parent: int, death_signal: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    _die(death_signal)


def _die(death_signal: int) -> None:
    os.kill(os.getpid(), death_signal)
    os._exit(128 + death_signal)  # the signal was ignored or blocked


def _prctl(option: int, value: int) -> bool:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(option, value, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _alive(pid: int) -> bool:
    """``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return True  # no /proc here: it exists
    return stat[stat.rindex(b")") + 2 :][:1] not in (b"Z", b"X")


# -- /proc ----------------------------------------------------------------------------------------
def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` by parent links in ``/proc`` (Linux; elsewhere [])."""
    parents: dict[int, int] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for name in entries:
        if name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(f"/proc/{name}/stat", "rb") as fh:
                    stat = fh.read()
                # the name in parentheses may hold spaces: fields after it are state, ppid, …
                parents[int(name)] = int(stat[stat.rindex(b")") + 2 :].split()[1])
    children: dict[int, list[int]] = {}
    for child, parent in parents.items():
        children.setdefault(parent, []).append(child)
    found: list[int] = []
    todo = list(children.get(pid, []))
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return found
