"""Fine-tuning, merging and evaluation on a tiny random Llama, with in-process workers and a
real redis-server: progress, checkpoints, cancel and resume, registration, the result cache."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.task_fixtures import burst, log_of, run_burst, state_changes, wait_state, worker_thread
from tests.training_fixtures import BASE, qa_records, write_jsonl
from yichui.errors import (
    DatasetError,
    InvalidTaskArgsError,
    ModelNotFoundError,
    TrainingError,
)
from yichui.runtime import Runtime
from yichui.training.runs import runs_root
from yichui.training.service import TrainingService


def _nothing_queued(rt: Runtime) -> None:
    assert rt.tasks.counts().get("queued", 0) == 0
    root = runs_root(rt.settings.data_dir)
    assert not root.exists() or not any(root.rglob("args.json"))


BAD_DATASETS: list[tuple[str, bytes | None, str]] = [
    ("missing", None, "does not exist"),
    ("empty", b"", "is empty"),
    ("blank", b"\n  \n", "has no records"),
    ("not-json", b'{"question": "a", "answer": "b"}\nnot json\n', "line 2: not valid JSON"),
    ("array", b"[1, 2]\n", "line 1: expected a JSON object"),
    ("shape", b'{"text": "hello"}\n', "line 1: unknown record shape"),
    (
        "last-role",
        b'{"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}',
        "line 1: the last message must be the assistant's",
    ),
    (
        "role",
        b'{"messages": [{"role": "robot", "content": "x"}]}\n',
        r"line 1: messages\[0\]\.role .robot. is not one of",
    ),
    ("no-output", b'\n{"instruction": "do it"}\n', "line 2: an 'instruction' record needs"),
    ("number", b'{"prompt": "a", "completion": 3}\n', "line 1: 'completion' must be a string"),
]


@pytest.mark.parametrize(
    ("case", "content", "message"), BAD_DATASETS, ids=[c[0] for c in BAD_DATASETS]
)
def test_bad_datasets_are_refused_before_queuing(
    training: TrainingService,
    trt: Runtime,
    tmp_path: Path,
    case: str,
    content: bytes | None,
    message: str,
) -> None:
    path = tmp_path / f"{case}.jsonl"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DatasetError, match=message) as err:
        training.train(BASE, path, max_steps=2)
    assert err.value.exit_code == 2 and not err.value.retryable
    with pytest.raises(DatasetError, match=message):
        training.evaluate(BASE, path)
    _nothing_queued(trt)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"rank": 0}, "rank"),
        ({"learning_rate": 0}, "learning_rate"),
        ({"dropout": 1.0}, "dropout"),
        ({"batch_size": 0}, "batch_size"),
        ({"max_steps": 0}, "max_steps"),
        ({"max_length": 4}, "max_length"),
        ({"target_modules": ("q_proj", "bad name")}, "target_modules"),
        ({"backend": "deepspeed"}, "backend"),
    ],
)
def test_out_of_range_hyperparameters(
    training: TrainingService, trt: Runtime, qa_file: Path, params: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidTaskArgsError, match=field):
        training.train(BASE, qa_file, **params)
    _nothing_queued(trt)


def test_unknown_models_and_taken_names(
    training: TrainingService, trt: Runtime, qa_file: Path
) -> None:
    with pytest.raises(ModelNotFoundError, match="nope"):
        training.train("nope", qa_file)
    with pytest.raises(ModelNotFoundError, match="nope"):
        training.evaluate(f"{BASE}@nope", qa_file)
    with pytest.raises(ModelNotFoundError, match="nope"):
        training.merge("nope")
    with pytest.raises(InvalidTaskArgsError, match="output must differ"):
        training.train(BASE, qa_file, output=BASE, replace=True)
    _nothing_queued(trt)


def test_output_name_taken(training: TrainingService, trt: Runtime, qa_file: Path) -> None:
    (trt.settings.models_path / "taken").mkdir()
    (trt.settings.models_path / "taken" / "model.safetensors").write_bytes(b"x")
    with pytest.raises(TrainingError, match="exists already"):
        training.train(BASE, qa_file, output="taken")
    with pytest.raises(TrainingError, match="not a LoRA adapter"):
        training.merge("taken")
    _nothing_queued(trt)


def test_train_registers_the_adapter_with_live_progress(
    training: TrainingService, trt: Runtime, qa_file: Path
) -> None:
    t = training.train(
        BASE, qa_file, output="tiny-qa", max_steps=6, save_steps=2, learning_rate=1e-2
    )
    run_dir = Path(t["run_dir"])
    assert (
        run_dir.name.startswith("v0-")
        and json.loads((run_dir / "args.json").read_text())["rank"] == 8
    )
    assert run_burst(trt)["succeeded"] == 1
    status = trt.tasks.get(t["id"])
    assert status["state"] == "succeeded"
    p = status["progress"]
    assert (p["step"], p["total"], p["unit"]) == (6, 6, "step")
    assert {"loss", "learning_rate", "grad_norm", "tokens_per_s", "epoch"} <= set(p["metrics"])
    result = status["result"]
    assert result["steps"] == 6 and result["resumed_from"] == 0 and result["train_loss"] > 0
    lines = [e.data.get("line", "") for e in log_of(trt.task_store, t["id"]) if e.kind == "log"]
    assert any(line.startswith("step 1/6 loss") for line in lines)
    assert any(line.startswith("step 6/6 loss") for line in lines)
    steps = [json.loads(x)["step"] for x in (run_dir / "logging.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "checkpoint-4",
        "checkpoint-6",
    ]  # keep_checkpoints=2
    # registered: the cache knows at once (no rescan), kind adapter, the manifest says whence
    cached = trt.model_store.get("tiny-qa") if trt.model_store else None
    assert cached is not None and cached["exists"] and cached["kind"] == "adapter"
    manifest = json.loads((Path(cached["path"]) / ".yichui.json").read_text())
    assert manifest["base"] == BASE and manifest["task"] == t["id"]
    assert manifest["dataset"]["sha256"] == result["dataset"]["sha256"]
    # a second run of the same name gets the next version folder
    t2 = training.train(BASE, qa_file, output="tiny-qa", replace=True, max_steps=1)
    assert Path(t2["run_dir"]).name.startswith("v1-")


def _wait_step(rt: Runtime, task_id: str, step: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (rt.tasks.get(task_id)["progress"].get("step") or 0) >= step:
            return
        time.sleep(0.01)
    raise AssertionError(f"{task_id} did not reach step {step}")


def test_cancel_keeps_a_checkpoint_and_retry_resumes_it(
    training: TrainingService, trt: Runtime, tmp_path: Path
) -> None:
    data = write_jsonl(tmp_path / "qa.jsonl", qa_records(64))
    t = training.train(BASE, data, output="tiny-long", max_steps=60, save_steps=1000, batch_size=2)
    run_dir = Path(t["run_dir"])
    with worker_thread(trt.worker()):
        _wait_step(trt, t["id"], 3)
        trt.tasks.cancel(t["id"])
        wait_state(trt.tasks, t["id"], "cancelled", timeout=30)
    cancelled = trt.tasks.get(t["id"])
    stopped_at = cancelled["progress"]["step"]
    assert 3 <= stopped_at < 60
    kept = sorted((run_dir / "checkpoints").iterdir())
    assert [k.name for k in kept] == [f"checkpoint-{stopped_at}"]  # saved at the cancel
    assert not trt.registry.status("tiny-long").status.exists

    trt.tasks.retry(t["id"])
    with worker_thread(trt.worker()):
        wait_state(trt.tasks, t["id"], "succeeded", timeout=120)
    result = trt.tasks.get(t["id"])["result"]
    assert result["resumed_from"] == stopped_at and result["steps"] == 60
    rows = [json.loads(x) for x in (run_dir / "logging.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    # the second run starts where the first stopped: no step counted from zero again
    assert steps == list(range(1, 61))
    assert state_changes(log_of(trt.task_store, t["id"])) == [
        "queued",
        "running",
        "cancelled",
        "queued",
        "running",
        "succeeded",
    ]


def test_worker_shutdown_saves_a_checkpoint_before_handing_back(
    training: TrainingService, trt: Runtime, tmp_path: Path
) -> None:
    data = write_jsonl(tmp_path / "qa.jsonl", qa_records(64))
    t = training.train(BASE, data, output="tiny-sd", max_steps=60, save_steps=1000, batch_size=2)
    run_dir = Path(t["run_dir"])
    worker = trt.worker()
    runner = threading.Thread(target=lambda: worker.run(install_signals=False))
    runner.start()
    _wait_step(trt, t["id"], 3)
    worker.stop(hand_back=True)  # what SIGTERM does
    runner.join(60)
    assert not runner.is_alive()
    status = trt.tasks.get(t["id"])
    # the run kept its lease until its checkpoint was saved, then gave the task back
    assert status["state"] == "queued" and status["attempt"] == 0
    kept = [p.name for p in (run_dir / "checkpoints").iterdir()]
    assert len(kept) == 1
    stopped_at = int(kept[0].split("-")[1])
    assert stopped_at >= 3 and worker.stats["handed_back"] == 1
    assert run_burst(trt)["succeeded"] == 1
    result = trt.tasks.get(t["id"])["result"]
    assert result["resumed_from"] == stopped_at and result["steps"] == 60


def test_merge_registers_a_model_that_matches_base_at_adapter(
    training: TrainingService, trt: Runtime, qa_file: Path
) -> None:
    training.train(BASE, qa_file, output="tiny-qa", max_steps=4, learning_rate=5e-2)
    assert run_burst(trt)["succeeded"] == 1
    m = training.merge("tiny-qa")
    assert m["output"] == "tiny-qa-merged"
    assert run_burst(trt)["succeeded"] == 1
    result = trt.tasks.get(m["id"])["result"]
    cached = trt.model_store.get("tiny-qa-merged") if trt.model_store else None
    assert cached is not None and cached["exists"] and cached["kind"] == "text"
    assert cached["fingerprint"] == result["fingerprint"]
    base_fp = trt.registry.status(BASE).status.fingerprint
    assert result["fingerprint"] != base_fp

    import asyncio

    from yichui.inference.engine import EngineRequest, GenerationParams, Message
    from yichui.inference.engines.local import LocalEngine
    from yichui.inference.pool import ModelPool

    async def answer(model: str) -> str:
        engine = LocalEngine(trt.registry, ModelPool(budget_bytes=1 << 30, device="cpu"))
        req = EngineRequest(
            model=model,
            kind="chat",
            messages=(Message("user", "What is 3 plus one?"),),
            params=GenerationParams(max_tokens=8, temperature=0.0),
        )
        try:
            return (await engine.complete(req)).choices[0].text
        finally:
            await engine.close()

    merged, unmerged, base = (
        asyncio.run(answer("tiny-qa-merged")),
        asyncio.run(answer(f"{BASE}@tiny-qa")),
        asyncio.run(answer(BASE)),
    )
    assert merged == unmerged and merged != base


def test_evaluation_asked_twice_is_answered_from_the_cache(
    training: TrainingService, trt: Runtime, qa_file: Path
) -> None:
    first = training.evaluate(BASE, qa_file, max_new_tokens=4)
    assert not first.cached and first.task is not None
    assert run_burst(trt)["succeeded"] == 1
    report = trt.tasks.get(first.task["id"])["result"]
    assert report["records"] == 16 and report["tokens"] > 0
    assert report["loss"] > 0 and report["perplexity"] > 1
    assert 0 <= report["exact_match"] <= report["contains"] <= 1
    assert len(report["samples"]) == 16 and report["samples"][0]["answers"] == ["1"]

    again = training.evaluate(BASE, qa_file, max_new_tokens=4)
    assert again.cached and again.source == "redis" and again.report == report
    assert again.key == first.key
    # Redis lost the entry: the report file answers, and warms Redis again
    assert trt.redis()[0].delete(trt.keys.eval_result(first.key)) == 1
    from_disk = training.evaluate(BASE, qa_file, max_new_tokens=4)
    assert from_disk.cached and from_disk.source == "disk" and from_disk.report == report
    assert training.evaluate(BASE, qa_file, max_new_tokens=4).source == "redis"
    # anything that changes the result changes the key
    assert not training.evaluate(BASE, qa_file, max_new_tokens=5).cached
    assert not training.evaluate(BASE, qa_file, max_new_tokens=4, limit=3).cached
    other = write_jsonl(qa_file.with_name("other.jsonl"), qa_records(15))
    assert not training.evaluate(BASE, other, max_new_tokens=4).cached
    assert training.evaluate(BASE, qa_file, max_new_tokens=4, refresh=True).cached is False


def test_evaluation_of_an_adapter_differs_from_its_base(
    training: TrainingService, trt: Runtime, qa_file: Path
) -> None:
    training.train(BASE, qa_file, output="tiny-qa", max_steps=12, learning_rate=1e-2)
    run_burst(trt)
    base = training.evaluate(BASE, qa_file, generate=False)
    tuned = training.evaluate(f"{BASE}@tiny-qa", qa_file, generate=False)
    assert base.key != tuned.key
    assert burst(trt.worker(burst=True))["succeeded"] == 2
    loss = {s.key: trt.tasks.get(s.task["id"])["result"]["loss"] for s in (base, tuned) if s.task}
    assert loss[tuned.key] < loss[base.key]  # it learned the training set


def test_qlora_without_a_gpu_fails_at_once_with_the_reason(
    training: TrainingService, trt: Runtime, qa_file: Path
) -> None:
    t = training.train(BASE, qa_file, qlora=True, max_steps=2)
    run_burst(trt)
    status = trt.tasks.get(t["id"])
    assert status["state"] == "failed" and status["attempt"] == 1  # not retried
    assert "QLoRA needs" in status["error"]["message"]


@pytest.mark.parametrize("fault", ["memory", "disk"])
def test_out_of_memory_or_disk_fails_with_the_reason_and_keeps_the_checkpoint(
    training: TrainingService,
    trt: Runtime,
    qa_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    fault: str,
) -> None:
    """Fault injection: the Trainer's step (memory) or its checkpoint write (disk) fails at
    step 3, after checkpoint-2 was saved."""
    import errno

    import torch
    from transformers import Trainer

    def failing(original: Any) -> Any:
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            if self.state.global_step >= 3:
                if fault == "memory":
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
                raise OSError(errno.ENOSPC, "No space left on device")
            return original(self, *args, **kwargs)

        return wrapper

    name = "training_step" if fault == "memory" else "_save_checkpoint"
    monkeypatch.setattr(Trainer, name, failing(getattr(Trainer, name)))
    t = training.train(BASE, qa_file, output="tiny-oom", max_steps=8, save_steps=2, batch_size=2)
    run_burst(trt)
    status = trt.tasks.get(t["id"])
    assert status["state"] == "failed" and status["attempt"] == 1  # not retried
    reason = "out of memory at step 3" if fault == "memory" else "no space left on the device"
    assert reason in status["error"]["message"]
    assert "the last checkpoint is kept" in status["error"]["message"]
    kept = [p.name for p in (Path(t["run_dir"]) / "checkpoints").iterdir()]
    assert "checkpoint-2" in kept
    assert not trt.registry.status("tiny-oom").status.exists


def test_a_changed_dataset_snapshot_is_refused(
    training: TrainingService, trt: Runtime, qa_file: Path
) -> None:
    t = training.train(BASE, qa_file, max_steps=2)
    e = training.evaluate(BASE, qa_file, generate=False)
    snapshot = Path(t["args"]["dataset"]["path"])
    assert e.task is not None and Path(e.task["args"]["dataset"]["path"]) == snapshot
    write_jsonl(snapshot, qa_records(3))  # not what was checked and queued
    run_burst(trt)
    for task_id in (t["id"], e.task["id"]):
        status = trt.tasks.get(task_id)
        assert status["state"] == "failed" and "SHA-256 differs" in status["error"]["message"]


def test_swift_logging_lines_become_progress() -> None:
    from yichui.training.launch import parse_swift_line

    line = {
        "loss": 1.25,
        "grad_norm": 0.5,
        "learning_rate": 1e-4,
        "epoch": 0.1,
        "global_step/max_steps": "5/100",
        "percentage": "5.00%",
        "elapsed_time": "10s",
    }
    assert parse_swift_line(line) == (
        5,
        100,
        {"loss": 1.25, "learning_rate": 1e-4, "grad_norm": 0.5, "epoch": 0.1},
    )
    assert parse_swift_line({"train_runtime": 3.0, "global_step/max_steps": "100/100"}) is None
