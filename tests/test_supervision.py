"""Process supervision: children die with their parent, even by SIGKILL; a worker stops in
bounded time on SIGTERM whatever its Redis does.

Children are found by walking /proc (parent links, and members of the process groups and
sessions those children lead), and recorded before the kill: a killed parent's orphans are
re-parented, so they could not be found after it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.api_server import ServerProcess
from tests.redis_proc import RedisProcess, free_port, wait_until
from tests.test_tasks_faults import Harness
from tests.tiny_model import build_tiny_model
from tests.training_fixtures import qa_records, write_jsonl
from tests.worker_proc import WorkerProcess, worker_env
from yichui.runtime import Runtime
from yichui.state.keys import Keys
from yichui.supervise import PDEATHSIG, SPAWNED_PID_ENV, spawn

pytestmark = pytest.mark.skipif(not PDEATHSIG, reason="death signals are Linux only")

DEAD_WITHIN = 5.0
"""Seconds after the parent's SIGKILL by which no child of it may be alive."""
SIGTERM_BOUND = 8.0
"""Seconds an idle worker may take to exit on SIGTERM while its Redis is down or hung: one
blocking read (1 s) + 1 s, GOODBYE (3 s) for the last heartbeat, and slack for two busy cores."""


# -- /proc ----------------------------------------------------------------------------------------
def _stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, process group, session) of ``pid``, or None once it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = raw[raw.rindex(b")") + 2 :].split()
    return fields[0].decode(), int(fields[1]), int(fields[2]), int(fields[3])


def _alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")  # a zombie is dead, just not reaped


def _tree(root: int) -> set[int]:
    """Every live process below ``root``: by parent links, and in a group or session that one
    of them (or ``root``) leads."""
    stats = {int(p): s for p in os.listdir("/proc") if p.isdigit() and (s := _stat(int(p)))}
    found: set[int] = set()
    while True:
        more = {
            pid
            for pid, (state, ppid, pgrp, sid) in stats.items()
            if pid != root
            and pid not in found
            and state not in ("Z", "X")
            and ({ppid, pgrp, sid} & (found | {root}))
        }
        if not more:
            return found
        found |= more


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _assert_all_gone(pids: set[int], killed: float, within: float = DEAD_WITHIN) -> float:
    """Wait until none of ``pids`` is alive, ``within`` s of ``killed`` (a monotonic time);
    -> the seconds that took."""
    started = killed
    while time.monotonic() - started < within:
        if not any(_alive(p) for p in pids):
            return time.monotonic() - started
        time.sleep(0.05)
    left = {p: _cmdline(p) for p in pids if _alive(p)}
    for pid in left:  # do not leave them running past the test
        os.kill(pid, signal.SIGKILL)
    raise AssertionError(f"still alive {within}s after the parent's SIGKILL: {left}")


def _catches_sigterm(pid: int) -> bool:
    """Whether ``pid`` has a SIGTERM handler yet (before that, SIGTERM just kills it)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


def _tagged(proc: subprocess.Popen[str], n: int) -> dict[str, str]:
    """The first ``n`` lines ``TAG VALUE`` of ``proc`` (several processes write them)."""
    assert proc.stdout is not None
    return dict(proc.stdout.readline().split() for _ in range(n))


# -- the mechanism, with small processes -----------------------------------------------------
RANK = """
import signal, sys, time
from yichui.supervise import spawned_pid, tie_to_parent
tie_to_parent(signal.SIGKILL, parent=spawned_pid())
print("tied yes", flush=True)
time.sleep(60)
"""
LAUNCHER = """
import subprocess, sys, time
# like torchrun: its rank in a session of its own, and no tie of its own
rank = subprocess.Popen([sys.executable, "-c", sys.argv[1]], start_new_session=True)
print("rank", rank.pid, flush=True)
time.sleep(60)
"""
WORKER = """
import sys, threading, time
from yichui.supervise import spawn
out = []

def run_task():  # a worker's slot thread: it starts the launcher, later it ends
    out.append(spawn([sys.executable, "-c", *sys.argv[1:]]))
    time.sleep(0.5)  # the launcher has set its death signal by now

slot = threading.Thread(target=run_task)
slot.start()
slot.join()  # the thread that started the launcher is gone: the launcher must not die of it
print("launcher", out[0].pid, flush=True)
time.sleep(60)
"""


def test_a_sigkilled_parent_takes_its_child_and_the_child_s_ranks() -> None:
    with subprocess.Popen(
        [sys.executable, "-c", WORKER, LAUNCHER, RANK], stdout=subprocess.PIPE, text=True
    ) as worker:
        try:
            seen = _tagged(worker, 3)
            launcher, rank = int(seen["launcher"]), int(seen["rank"])
            time.sleep(0.3)
            assert _alive(launcher) and _alive(rank)  # the slot thread's end killed neither
            killed = time.monotonic()
            worker.kill()
            _assert_all_gone({launcher, rank}, killed, within=2.0)
        finally:
            worker.kill()


def test_a_rank_whose_launcher_died_before_it_tied_itself_exits_at_once() -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    code = "import signal, time; from yichui.supervise import tie_to_parent\n"
    code += f"tie_to_parent(signal.SIGKILL, parent={gone.pid}); time.sleep(30)"
    started = time.monotonic()
    assert subprocess.run([sys.executable, "-c", code], timeout=20).returncode == -signal.SIGKILL
    assert time.monotonic() - started < 10


def test_kill_tree_takes_descendants_in_their_own_sessions() -> None:
    child = spawn(
        [sys.executable, "-c", LAUNCHER, "import time; time.sleep(60)"], stdout=subprocess.PIPE
    )
    assert child.popen.stdout is not None
    rank = int(child.popen.stdout.readline().split()[1])
    killed = time.monotonic()
    child.kill_tree()
    child.popen.stdout.close()
    assert child.returncode == -signal.SIGKILL
    _assert_all_gone({rank}, killed, within=2.0)


def test_spawn_exports_the_child_s_pid_and_reports_a_missing_program() -> None:
    code = f"import os; print(os.environ[{SPAWNED_PID_ENV!r}] == str(os.getpid()))"
    child = spawn([sys.executable, "-c", code], stdout=subprocess.PIPE)
    out, _ = child.popen.communicate(timeout=20)
    assert out.strip() == b"True"
    with pytest.raises(FileNotFoundError):
        spawn(["yichui-no-such-program"])


# -- the real commands -------------------------------------------------------------------------
def test_sigkilled_serve_takes_its_workers(redis_url: str, tmp_path: Path, rt: Runtime) -> None:
    server = ServerProcess(tmp_path, redis_url=redis_url, args=("--workers", "2")).start()
    assert server.proc is not None
    try:
        wait_until(lambda: len(rt.task_store.workers()) == 2, 30, "two registered workers")
        children = _tree(server.proc.pid)
        assert {w["pid"] for w in rt.task_store.workers()} <= children
        killed = time.monotonic()
        server.proc.kill()
        server.proc.wait()
        took = _assert_all_gone(children, killed)
    finally:
        server.stop()
    # they were told (SIGHUP), not just killed: each said goodbye on its way out
    assert rt.task_store.workers() == [], f"took {took:.1f}s {children} {server.output()}"


@pytest.fixture
def harness(redis_url: str, tmp_path: Path) -> Iterator[Harness]:
    h = Harness(redis_url, tmp_path)
    build_tiny_model(h.rt.settings.models_path / "tiny")
    yield h
    h.close()


def test_sigkilled_worker_takes_its_training_launcher_and_ranks(
    harness: Harness, tmp_path: Path
) -> None:
    data = write_jsonl(tmp_path / "qa.jsonl", qa_records(32))
    t = harness.rt.training.train(
        "tiny", data, output="tiny-ddp", max_steps=400, save_steps=1000, batch_size=2,
        nproc_per_node=2,
    )  # fmt: skip
    worker = harness.worker("A")
    assert worker.proc is not None
    harness.wait_step(t["id"], 1, timeout=120)  # every rank tied itself before its first step
    tree = _tree(worker.proc.pid)
    launchers = {p for p in tree if "torch.distributed.run" in _cmdline(p)}
    ranks = {p for p in tree if "yichui.training.launch" in _cmdline(p)} - launchers
    assert len(launchers) == 1 and len(ranks) == 2, {p: _cmdline(p) for p in tree}
    killed = time.monotonic()
    worker.signal(signal.SIGKILL)
    worker.wait(5)
    _assert_all_gone(tree, killed)


def test_sigterm_stops_a_worker_in_bounded_time_while_redis_is_down(tmp_path: Path) -> None:
    hung = RedisProcess(tmp_path / "hung").start()  # SIGSTOPped: connects, never answers
    dead = RedisProcess(tmp_path / "dead").start()  # killed: connections refused
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    workers: dict[str, WorkerProcess] = {}

    def start(name: str, url: str) -> None:
        env = worker_env(url, tmp_path / name)
        workers[name] = WorkerProcess(env, name, tmp_path).start()

    def registered(server: RedisProcess) -> bool:
        with redis.Redis(port=server.port, socket_timeout=2) as c:
            return bool(c.hlen(Keys().task_workers()))

    try:
        start("hung", hung.url)
        start("dead", dead.url)
        start("never", nowhere)  # waits for a Redis that is not there before it even starts
        wait_until(lambda: registered(hung) and registered(dead), 30, "both workers running")
        assert hung.proc is not None
        hung.proc.send_signal(signal.SIGSTOP)
        dead.kill()
        start("hung-at-start", hung.url)  # its first PING hangs
        wait_until(lambda: "waiting for it" in workers["never"].output(), 30, "never waiting")
        for w in workers.values():  # each one past its start-up, SIGTERM handled by yichui
            assert w.proc is not None
            pid = w.proc.pid
            wait_until(lambda pid=pid: _catches_sigterm(pid), 30, f"a SIGTERM handler in {pid}")
        time.sleep(1.0)  # the slots are in reads that hang, or in their backoff
        sent = time.monotonic()
        for w in workers.values():
            w.signal(signal.SIGTERM)
        took: dict[str, float] = {}
        while len(took) < len(workers) and time.monotonic() - sent < SIGTERM_BOUND + 5:
            for name, w in workers.items():
                if name not in took and w.proc is not None and w.proc.poll() is not None:
                    took[name] = time.monotonic() - sent
            time.sleep(0.05)
        assert set(took) == set(workers), {n: w.output()[-2000:] for n, w in workers.items()}
        for w in workers.values():
            assert w.proc is not None and w.proc.returncode == 0, w.output()[-2000:]
        assert max(took.values()) < SIGTERM_BOUND, took
    finally:
        for w in workers.values():
            w.stop()
        if hung.proc is not None:
            hung.proc.send_signal(signal.SIGCONT)
        hung.stop()
        dead.stop()
