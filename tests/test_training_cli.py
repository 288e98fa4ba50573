"""``yichui train``, ``merge`` and ``eval`` as users run them: ids, JSON, one-line errors,
an evaluation answered from the cache the second time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_cli import assert_one_line_error, run
from tests.tiny_model import build_tiny_model
from tests.training_fixtures import qa_records, write_jsonl
from yichui.config import Settings

FAST = {"YICHUI_TASK_HEARTBEAT": "0.1", "YICHUI_TASK_LEASE": "2", "YICHUI_TASK_BACKOFF": "0"}


@pytest.fixture
def tiny(settings: Settings) -> str:
    build_tiny_model(settings.models_path / "tiny")
    return "tiny"


def test_bad_input_is_one_line_and_queues_nothing(
    settings: Settings, tiny: str, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n{"question": "q"}\n')
    proc = run(settings, "train", "--model", tiny, "--dataset", str(bad))
    assert_one_line_error(proc, 2, "line 2: a 'question' record needs an 'answer'")
    good = write_jsonl(tmp_path / "qa.jsonl", qa_records(4))
    assert_one_line_error(
        run(settings, "train", "-m", tiny, "-d", str(good), "--rank", "0"), 2, "rank"
    )
    assert_one_line_error(
        run(settings, "train", "-m", "nope", "-d", str(good)), 1, "model 'nope' not found"
    )
    assert_one_line_error(run(settings, "merge", "nope"), 1, "model 'nope' not found")
    assert_one_line_error(
        run(settings, "eval", f"{tiny}@nope", "-d", str(good)), 1, "model 'nope' not found"
    )
    assert_one_line_error(
        run(settings, "eval", tiny, "-d", str(tmp_path / "gone.jsonl")), 2, "does not exist"
    )
    listed = json.loads(run(settings, "tasks", "list", "--json").stdout)
    assert listed["tasks"] == []
    assert not (settings.data_dir / "runs").exists()


def test_train_prints_the_id_and_json(settings: Settings, tiny: str, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "qa.jsonl", qa_records(4))
    plain = run(settings, "train", "-m", tiny, "-d", str(data), "--max-steps", "2")
    assert plain.returncode == 0, plain.stderr
    task_id = plain.stdout.strip()
    assert "\n" not in task_id and "yichui tasks watch " + task_id in plain.stderr
    as_json = run(
        settings, "train", "-m", tiny, "-d", str(data), "-o", "tiny-b", "--lr", "1e-3",
        "--lr-scheduler", "cosine", "--keep-checkpoints", "3", "--json",
    )  # fmt: skip
    assert as_json.returncode == 0, as_json.stderr
    obj = json.loads(as_json.stdout)
    assert obj["id"] and obj["state"] == "queued" and obj["output"] == "tiny-b"
    saved = json.loads((Path(obj["run_dir"]) / "args.json").read_text())
    assert (saved["learning_rate"], saved["lr_scheduler"], saved["keep_checkpoints"]) == (
        1e-3,
        "cosine",
        3,
    )
    shown = json.loads(run(settings, "tasks", "show", task_id, "--json").stdout)
    assert shown["type"] == "train" and shown["args"]["max_steps"] == 2


def test_eval_twice_second_from_cache(settings: Settings, tiny: str, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "qa.jsonl", qa_records(4))
    queued = run(settings, "eval", tiny, "-d", str(data), "--max-new-tokens", "2", "--json")
    assert queued.returncode == 0, queued.stderr
    first = json.loads(queued.stdout)
    assert first["cached"] is False and first["id"]
    worker = run(settings, "worker", "--burst", **FAST)
    assert worker.returncode == 0, worker.stderr
    again = run(settings, "eval", tiny, "-d", str(data), "--max-new-tokens", "2")
    assert again.returncode == 0, again.stderr
    assert "perplexity" in again.stdout and "exact match" in again.stdout
    assert "(cached (redis))" in again.stderr
    as_json = json.loads(
        run(settings, "eval", tiny, "-d", str(data), "--max-new-tokens", "2", "--json").stdout
    )
    assert as_json["cached"] is True and as_json["key"] == first["key"]
    assert as_json["report"]["records"] == 4
