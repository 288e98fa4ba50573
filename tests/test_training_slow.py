"""Training end to end: a worker SIGKILLed mid-training and the run resumed from its
checkpoint by another; torchrun with two processes (and a cancel there); the real SmolLM2
fine-tuned, merged, served through the API and evaluated twice."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.api_server import ServerProcess
from tests.redis_proc import wait_until
from tests.task_fixtures import run_burst, wait_state, worker_thread
from tests.test_cli import run
from tests.test_tasks_faults import Harness
from tests.tiny_model import build_tiny_model
from tests.training_fixtures import qa_records, write_jsonl
from yichui.config import Settings
from yichui.models.importer import import_folder
from yichui.runtime import Runtime
from yichui.state.task_store import TERMINAL

pytestmark = pytest.mark.slow


@pytest.fixture
def harness(redis_url: str, tmp_path: Path) -> Iterator[Harness]:
    h = Harness(redis_url, tmp_path)
    build_tiny_model(h.rt.settings.models_path / "tiny")
    yield h
    h.close()


def _steps(run_dir: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run_dir / "logging.jsonl").read_text().splitlines()]


def test_sigkill_mid_training_resumes_from_the_checkpoint(harness: Harness, tmp_path: Path) -> None:
    h = harness
    data = write_jsonl(tmp_path / "qa.jsonl", qa_records(64))
    t = h.rt.training.train(
        "tiny", data, output="tiny-ft", max_steps=150, save_steps=10, batch_size=2
    )
    run_dir = Path(t["run_dir"])
    a = h.worker("A")
    h.wait_step(t["id"], 25, timeout=120)
    a.signal(signal.SIGKILL)
    a.wait(5)
    killed_at = max(_steps(run_dir))
    h.worker("B")
    final = h.wait_state(t["id"], TERMINAL, 180)
    assert final["state"] == "succeeded", final.get("error")
    assert final["attempt"] == 2 and final["worker"] == "B"
    assert final["last_error"]["type"] == "WorkerLost"
    result = final["result"]
    resumed = result["resumed_from"]
    assert resumed >= 20 and resumed % 10 == 0 and resumed <= killed_at
    assert result["steps"] == 150
    steps = _steps(run_dir)
    restart = len(steps) - steps[::-1].index(resumed + 1) - 1  # B's first logged step
    assert steps[restart:] == list(range(resumed + 1, 151))  # counted on, not from zero
    assert steps[:restart] == list(range(1, killed_at + 1))
    assert "resuming from checkpoint-" in "\n".join(
        e.data.get("line", "") for e in h.svc.tail(t["id"], 1000) if e.kind == "log"
    )
    assert h.rt.registry.status("tiny-ft").status.kind == "adapter"
    h.assert_clean()


def test_torchrun_two_processes_cancel_and_resume(
    make_rt: Callable[..., Runtime], tmp_path: Path
) -> None:
    rt: Runtime = make_rt()
    build_tiny_model(rt.settings.models_path / "tiny")
    svc = rt.training
    data = write_jsonl(tmp_path / "qa.jsonl", qa_records(32))
    t = svc.train(
        "tiny", data, output="tiny-ddp", max_steps=400, save_steps=1000, batch_size=2,
        nproc_per_node=2,
    )  # fmt: skip
    run_dir = Path(t["run_dir"])
    with worker_thread(rt.worker()):
        wait_until(lambda: (rt.tasks.get(t["id"])["progress"].get("step") or 0) >= 3, 120, "step 3")
        rt.tasks.cancel(t["id"])
        wait_state(rt.tasks, t["id"], "cancelled", timeout=120)
    ckpts = [p.name for p in (run_dir / "checkpoints").iterdir()]
    assert len(ckpts) == 1  # saved by every rank at the same step, then all stopped
    stopped = int(ckpts[0].split("-")[1])
    assert 3 <= stopped < 400
    rt.tasks.retry(t["id"])
    svc_args = rt.tasks.get(t["id"])["args"]
    assert svc_args["nproc_per_node"] == 2
    # the rest of the run, shorter: the same task resumes with its own arguments
    with worker_thread(rt.worker()):
        wait_state(rt.tasks, t["id"], "succeeded", timeout=300)
    result = rt.tasks.get(t["id"])["result"]
    assert result["resumed_from"] == stopped and result["steps"] == 400
    assert result["processes"] == 2 and result["world_size"] == 2
    lines = [e.data.get("line", "") for e in rt.tasks.tail(t["id"], 5000) if e.kind == "log"]
    assert sum("torchrun with 2 process(es)" in line for line in lines) == 2
    assert any("resuming from checkpoint-" in line for line in lines)


def test_accelerate_two_processes(make_rt: Callable[..., Runtime], tmp_path: Path) -> None:
    rt: Runtime = make_rt(train_launcher="accelerate")
    build_tiny_model(rt.settings.models_path / "tiny")
    data = write_jsonl(tmp_path / "qa.jsonl", qa_records(8))
    t = rt.training.train(
        "tiny", data, output="tiny-acc", max_steps=4, batch_size=2, nproc_per_node=2
    )
    assert run_burst(rt)["succeeded"] == 1
    status = rt.tasks.get(t["id"])
    result = status["result"]
    assert result["steps"] == 4 and result["world_size"] == 2  # as rank 0 saw it
    assert status["progress"]["step"] == 4 and status["progress"]["metrics"]["loss"] > 0
    assert rt.registry.status("tiny-acc").status.kind == "adapter"


def _cli(settings: Settings, *args: str) -> dict:
    proc = run(settings, *args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_real_model_train_merge_serve_evaluate(
    settings: Settings, smollm2_dir: Path, tmp_path: Path, make_rt: Callable[..., Runtime]
) -> None:
    rt: Runtime = make_rt()
    import_folder(rt.registry, smollm2_dir, "smollm2")
    facts = [
        ("What is the capital of France?", "Paris"),
        ("What is the capital of Germany?", "Berlin"),
        ("What is the capital of Italy?", "Rome"),
        ("What is the capital of Spain?", "Madrid"),
    ]
    data = write_jsonl(tmp_path / "facts.jsonl", [{"question": q, "answer": a} for q, a in facts])
    t = _cli(
        settings, "train", "-m", "smollm2", "-d", str(data), "-o", "smollm2-facts",
        "--max-steps", "4", "--batch-size", "2", "--max-length", "96", "--save-steps", "2",
        "--lr", "1e-4",
    )  # fmt: skip
    assert run_burst(rt)["succeeded"] == 1
    status = rt.tasks.get(t["id"])
    assert status["state"] == "succeeded", status.get("error")
    p = status["progress"]
    assert (p["step"], p["total"]) == (4, 4) and p["metrics"]["loss"] > 0
    assert p["metrics"]["tokens_per_s"] > 0
    watched = run(settings, "tasks", "watch", t["id"])
    assert watched.returncode == 0 and "step 4/4 loss" in watched.stdout

    m = _cli(settings, "merge", "smollm2-facts")
    assert run_burst(rt)["succeeded"] == 1
    merged = rt.registry.status(m["output"])
    assert merged.cached and merged.status.exists and merged.status.kind == "text"

    server = ServerProcess(
        tmp_path, redis_url=str(settings.redis_url), models_root=str(settings.models_path)
    ).start()
    try:
        client = server.openai()
        ids = [model.id for model in client.models.list()]
        assert "smollm2-facts-merged" in ids and "smollm2@smollm2-facts" in ids
        answers = {}
        for name in ("smollm2-facts-merged", "smollm2@smollm2-facts"):
            reply = client.chat.completions.create(
                model=name,
                messages=[{"role": "user", "content": facts[0][0]}],
                temperature=0,
                max_tokens=12,
            )
            answers[name] = reply.choices[0].message.content or ""
        assert "Paris" in answers["smollm2-facts-merged"]
        # bf16 merged weights vs the adapter on float32 weights: both answer the same fact
        assert "Paris" in answers["smollm2@smollm2-facts"]
    finally:
        server.stop()

    first = rt.training.evaluate("smollm2-facts-merged", data, max_new_tokens=12)
    assert not first.cached
    assert run_burst(rt)["succeeded"] == 1
    report = rt.tasks.get(first.task["id"] if first.task else "")["result"]
    assert report["records"] == 4 and report["contains"] >= 0.5 and report["perplexity"] > 1
    again = run(settings, "eval", "smollm2-facts-merged", "-d", str(data), "--max-new-tokens", "12")
    assert again.returncode == 0 and "(cached (redis))" in again.stderr, again.stderr
