"""ms-swift's ``sft`` for real, as the swift training backend runs it: the bundled SmolLM2 on the
CPU in the ms-swift environment (``make swift``), a few steps; a SIGKILLed worker takes its
training down with it and the retry resumes from swift's checkpoint; cancel; the adapter served
as ``base@adapter`` and merged with ``swift export``; bad arguments fail once with ms-swift's
own reason; without ms-swift, one clear line and nothing queued."""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.api_server import ServerProcess
from tests.redis_proc import wait_until
from tests.test_cli import assert_one_line_error, run
from tests.test_tasks_faults import Harness
from tests.training_fixtures import write_jsonl
from yichui.config import Settings
from yichui.errors import SwiftMissingError
from yichui.models.importer import import_folder
from yichui.state.task_store import TERMINAL

BASE = "smollm2"
FACTS = [
    {"question": f"What is the code word number {i}?", "answer": f"Kiwi {i}."} for i in range(12)
]


def _runners(run_dir: Path) -> list[int]:
    """Pids of the swift runner processes of ``run_dir``."""
    spec = str(run_dir / "swift_spec.json").encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"swift_runner.py" in cmdline and spec in cmdline:
            found.append(int(entry.name))
    return found


def _lines(h: Harness, task_id: str) -> str:
    return "\n".join(e.data.get("line", "") for e in h.svc.tail(task_id, 5000) if e.kind == "log")


@pytest.fixture
def swift(
    redis_url: str, tmp_path: Path, swift_python: Path, smollm2_dir: Path
) -> Iterator[Harness]:
    h = Harness(redis_url, tmp_path, YICHUI_SWIFT_PYTHON=str(swift_python))
    import_folder(h.rt.registry, smollm2_dir, BASE)
    yield h
    h.close()


def _train(h: Harness, tmp_path: Path, **params: object) -> dict:
    data = write_jsonl(tmp_path / "facts.jsonl", FACTS)
    opts = {"backend": "swift", "batch_size": 2, "max_length": 64, "rank": 4, "alpha": 8}
    return h.rt.training.train(BASE, data, output="smollm2-swift", **{**opts, **params})


@pytest.mark.slow
def test_swift_sft_killed_with_its_worker_resumes_then_serves_and_merges(
    swift: Harness, tmp_path: Path, settings: Settings
) -> None:
    h = swift
    t = _train(h, tmp_path, max_steps=8, save_steps=2, learning_rate=5e-4)
    run_dir = Path(t["run_dir"])
    a = h.worker("A")
    h.wait_step(t["id"], 3, timeout=240)
    live = h.status(t["id"])["progress"]
    assert live["total"] == 8 and live["unit"] == "step"
    assert {"loss", "learning_rate"} <= live["metrics"].keys(), live
    assert live["eta"] is not None and live["eta"] > 0, live
    assert _runners(run_dir), "the training runs in the runner process"
    a.signal(signal.SIGKILL)
    a.wait(5)
    # the worker's death takes its training down: no orphan trains on beside the retry
    wait_until(lambda: not _runners(run_dir), 10, "the swift runner to die with its worker")

    h.worker("B")
    final = h.wait_state(t["id"], TERMINAL, 300)
    assert final["state"] == "succeeded", final.get("error")
    assert final["attempt"] == 2 and final["last_error"]["type"] == "WorkerLost"
    result = final["result"]
    assert result["backend"] == "swift" and result["swift"]["version"] == "4.6.0"
    assert result["resumed_from"] >= 2 and result["steps"] == 8
    assert result["train_loss"] > 0
    log = _lines(h, t["id"])
    assert "ms-swift model type llama, template chatml" in log
    assert "resuming from v0-" in log and "--resume_from_checkpoint" in log
    adapter = h.rt.registry.status("smollm2-swift").status
    assert adapter.exists and adapter.kind == "adapter"
    assert (Path(adapter.path or "") / "adapter_model.safetensors").exists()

    m = h.rt.training.merge("smollm2-swift")
    merged = h.wait_state(m["id"], TERMINAL, 240)
    assert merged["state"] == "succeeded", merged.get("error")
    assert merged["result"]["backend"] == "swift"
    assert "swift.cli.export" in _lines(h, m["id"]) or "export" in _lines(h, m["id"])
    assert h.rt.registry.status("smollm2-swift-merged").status.kind == "text"

    server = ServerProcess(
        tmp_path, redis_url=h.env["YICHUI_REDIS_URL"], models_root=str(h.rt.settings.models_path)
    ).start()
    try:
        client = server.openai()
        ids = {m.id for m in client.models.list().data}
        assert {"smollm2@smollm2-swift", "smollm2-swift-merged"} <= ids
        answers = {}
        for name in ("smollm2@smollm2-swift", "smollm2-swift-merged"):
            reply = client.chat.completions.create(
                model=name,
                messages=[{"role": "user", "content": FACTS[3]["question"]}],
                temperature=0,
                max_tokens=8,
            )
            answers[name] = reply.choices[0].message.content or ""
        assert all(answers.values()), answers
        # the merged weights are the base with the adapter folded in: the same greedy answer
        assert answers["smollm2@smollm2-swift"] == answers["smollm2-swift-merged"], answers
    finally:
        server.stop()
    h.assert_clean()


@pytest.mark.slow
def test_a_cancelled_swift_run_stops_at_a_checkpoint(swift: Harness, tmp_path: Path) -> None:
    h = swift
    t = _train(h, tmp_path, max_steps=200, save_steps=100)
    run_dir = Path(t["run_dir"])
    h.worker("A")
    h.wait_step(t["id"], 2, timeout=240)
    h.svc.cancel(t["id"])
    final = h.wait_state(t["id"], TERMINAL, 120)
    assert final["state"] == "cancelled"
    assert not _runners(run_dir)
    # STOP made the trainer save where it was, well before its next scheduled checkpoint
    kept = list((run_dir / "swift").glob("v*/checkpoint-*"))
    assert kept and all(int(p.name.split("-")[1]) < 100 for p in kept), kept
    assert not h.rt.registry.status("smollm2-swift").status.exists


@pytest.mark.slow
def test_bad_swift_arguments_fail_once_with_swifts_reason(swift: Harness, tmp_path: Path) -> None:
    h = swift
    t = _train(h, tmp_path, max_steps=2, swift_template="no_such_template")
    h.worker("A")
    final = h.wait_state(t["id"], TERMINAL, 240)
    assert final["state"] == "failed" and final["attempt"] == 1  # not retried
    message = final["error"]["message"]
    assert message.startswith("ms-swift sft failed:") and "no_such_template" in message, message
    assert not h.rt.registry.status("smollm2-swift").status.exists


def test_without_ms_swift_nothing_is_queued(settings: Settings, tmp_path: Path) -> None:
    from tests.tiny_model import build_tiny_model
    from yichui.runtime import Runtime

    build_tiny_model(settings.models_path / "tiny")
    data = write_jsonl(tmp_path / "facts.jsonl", FACTS)
    here = settings.model_copy(update={"swift_python": Path(sys.executable)})  # no ms-swift
    rt = Runtime(here)
    try:
        with pytest.raises(SwiftMissingError, match="ms-swift is not installed"):
            rt.training.train("tiny", data, backend="swift", max_steps=2)
        assert rt.tasks.counts()["queued"] == 0
    finally:
        rt.close()
    proc = run(
        settings, "train", "-m", "tiny", "-d", str(data), "--backend", "swift",
        YICHUI_SWIFT_PYTHON=sys.executable,
    )  # fmt: skip
    assert_one_line_error(proc, 1, "ms-swift is not installed")
    assert "make swift" in proc.stderr


def test_swift_only_options_need_the_swift_backend(settings: Settings, tmp_path: Path) -> None:
    from tests.tiny_model import build_tiny_model

    build_tiny_model(settings.models_path / "tiny")
    data = write_jsonl(tmp_path / "facts.jsonl", FACTS)
    proc = run(settings, "train", "-m", "tiny", "-d", str(data), "--swift-template", "chatml")
    assert proc.returncode != 0 and "need backend swift" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_swift_arguments_carry_what_yichui_was_asked() -> None:
    from yichui.training.args import DatasetRef, TrainArgs
    from yichui.training.launch import swift_arguments

    args = TrainArgs(
        model="m", output="o", run_dir="/r", backend="swift", max_steps=5, save_steps=2,
        dataset=DatasetRef(path="/d.jsonl", sha256="0" * 64, records=1),
    )  # fmt: skip
    argv = swift_arguments(args, "/base", Path("/d.jsonl"), Path("/out"), None, dtype="float32")
    pairs = dict(zip(argv[::2], argv[1::2], strict=False))
    assert pairs["--tuner_type"] == "lora" and pairs["--torch_dtype"] == "float32"
    assert pairs["--max_steps"] == "5" and pairs["--save_steps"] == "2"
    assert pairs["--check_model"] == "false" and pairs["--dataloader_num_workers"] == "0"
    assert "--resume_from_checkpoint" not in argv
    resumed = swift_arguments(
        args, "/base", Path("/d.jsonl"), Path("/out"), Path("/out/v0/checkpoint-2"), dtype="float32"
    )
    assert resumed[-2:] == ["--resume_from_checkpoint", "/out/v0/checkpoint-2"]
