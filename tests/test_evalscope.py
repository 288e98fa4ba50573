"""EvalScope as an evaluation backend (``yichui eval --backend evalscope``): its dataset formats
checked before queuing, the task in the ms-swift environment (a real, offline EvalScope on the
tiny model and on the bundled SmolLM2), the report stored and cached like yichui's own, and
clear failures without EvalScope or with a dataset it cannot read."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.redis_proc import wait_until
from tests.task_fixtures import burst, log_of, run_burst, wait_state, worker_thread
from tests.test_cli import assert_one_line_error, run
from tests.tiny_model import build_tiny_model
from tests.training_fixtures import BASE, qa_records, write_jsonl
from yichui.config import Settings
from yichui.errors import DatasetError, SwiftMissingError
from yichui.models.importer import import_folder
from yichui.runtime import Runtime
from yichui.training.evalscope_backend import evaluate, run_folder
from yichui.training.evalscope_data import inspect_evalscope_dataset
from yichui.training.evalscope_report import read_outputs, summary_lines
from yichui.training.runs import datasets_root, evals_root

QA = [
    {"question": "What is the capital of France?", "answer": "The capital of France is Paris."},
    {"question": "What is the capital of Japan?", "answer": "The capital of Japan is Tokyo."},
    {"question": "What is the capital of Italy?", "answer": "The capital of Italy is Rome."},
]
MCQ = [
    {"question": "Which animal barks?", "A": "A dog", "B": "A cat", "answer": "A"},
    {
        "question": "Which is a fruit?",
        "A": "A stone",
        "B": "A chair",
        "C": "An apple",
        "answer": "C",
    },
]


def _nothing_stored(rt: Runtime) -> None:
    evals = evals_root(rt.settings.data_dir)
    assert not evals.exists() or not list(evals.glob("*.json"))
    assert not rt.redis()[0].keys(rt.keys.eval_result("*"))


def _nothing_queued(rt: Runtime) -> None:
    assert rt.tasks.counts().get("queued", 0) == 0
    snaps = datasets_root(rt.settings.data_dir)
    assert not snaps.exists() or not any(snaps.iterdir())
    _nothing_stored(rt)


@pytest.fixture
def es_rt(make_rt: Callable[..., Runtime], swift_python: Path) -> Runtime:
    """A runtime whose ``swift_python`` is the real ms-swift environment, with ``tiny``."""
    rt = make_rt(swift_python=swift_python)
    build_tiny_model(rt.settings.models_path / BASE)
    return rt


# -- datasets ---------------------------------------------------------------------------------
def test_datasets_in_evalscope_formats_are_checked(tmp_path: Path) -> None:
    qa = inspect_evalscope_dataset(write_jsonl(tmp_path / "qa.jsonl", QA))
    assert (qa.format, qa.records, qa.suffix) == ("general_qa", 3, ".jsonl")
    mcq = inspect_evalscope_dataset(write_jsonl(tmp_path / "mcq.jsonl", MCQ))
    assert (mcq.format, mcq.records) == ("general_mcq", 2)
    csv = tmp_path / "mcq.csv"
    csv.write_text('question,A,B,answer\n"Which barks, a dog or a cat?",dog,cat,A\n')
    assert inspect_evalscope_dataset(csv, "general_mcq").records == 1
    chat = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {"messages": [{"role": "user", "content": "Hi"}], "answer": "Hello"},
            {"query": "x", "response": "y"},
        ],
    )
    assert inspect_evalscope_dataset(chat).format == "general_qa"


BAD: list[tuple[str, str, str | None, str]] = [
    ("suffix", "data.txt", None, "must be a .jsonl or .csv file"),
    ("json", "data.jsonl", None, "line 2: not valid JSON"),
    ("qa-answer", "data.jsonl", "general_qa", "line 1: a general_qa record needs an 'answer'"),
    ("mcq-answer", "data.jsonl", "general_mcq", "line 1: a general_mcq record needs an 'answer'"),
    ("mcq-gap", "data.jsonl", "general_mcq", "has choice 'D' after a missing 'C'"),
    ("csv-header", "data.csv", None, "line 1: needs a header row"),
    ("format", "data.jsonl", "general_vqa", "unknown format 'general_vqa'"),
]
CONTENT = {
    "suffix": '{"question": "a", "answer": "b"}\n',
    "json": '{"question": "a", "answer": "b"}\nnot json\n',
    "qa-answer": '{"question": "a"}\n',
    "mcq-answer": '{"question": "a", "A": "x", "B": "y", "answer": "C"}\n',
    "mcq-gap": '{"question": "a", "A": "x", "B": "y", "D": "z", "answer": "A"}\n',
    "csv-header": ",A\n1,2\n",
    "format": '{"question": "a", "answer": "b"}\n',
}


@pytest.mark.parametrize(("case", "name", "fmt", "message"), BAD, ids=[b[0] for b in BAD])
def test_malformed_datasets_are_refused_with_the_line(
    tmp_path: Path, case: str, name: str, fmt: str | None, message: str
) -> None:
    path = tmp_path / name
    path.write_text(CONTENT[case])
    with pytest.raises(DatasetError, match=message) as err:
        inspect_evalscope_dataset(path, fmt)
    assert err.value.hint and "#evalscope" in err.value.hint


# -- the report -------------------------------------------------------------------------------
def _outputs(work: Path) -> None:
    """What EvalScope 1.14.1 writes for general_qa (cut to the fields that are read)."""
    (work / "reports" / "model").mkdir(parents=True)
    (work / "reviews" / "model").mkdir(parents=True)

    def metric(dims: dict[str, Any], score: float) -> dict[str, Any]:
        return {
            "identity": {"name": "rouge", "aggregation": "mean", "dimensions": dims},
            "num": 2,
            "score": score,
        }

    report = {
        "name": "model@general_qa",
        "dataset_description": "long text",
        "metrics": [
            metric({"statistic": "recall", "ngram": 1}, 0.75),
            metric({"variant": "l", "statistic": "recall"}, 0.5),
        ],
        "primary_metric_identity": {
            "name": "rouge",
            "aggregation": "mean",
            "dimensions": {"variant": "l", "statistic": "recall"},
        },
        "num": 2,
    }
    (work / "reports" / "model" / "general_qa.json").write_text(json.dumps(report))
    score = {
        "value": {"Rouge-L-R": 1.0},
        "prediction": "Paris is.",
        "extracted_prediction": "Paris is.",
        "main_score_name": "Rouge-L-R",
    }
    review = {
        "target": ["Paris is."],
        "messages": [
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris is."},
        ],
        "sample_score": {"score": score},
    }
    (work / "reviews" / "model" / "general_qa_default.jsonl").write_text(json.dumps(review) + "\n")


def test_the_report_is_read_from_evalscope_outputs(tmp_path: Path) -> None:
    _outputs(tmp_path)
    out = read_outputs(tmp_path, "general_qa")
    assert out["metrics"] == {"rouge/1/recall": 0.75, "rouge/l/recall": 0.5}
    assert (out["primary_metric"], out["score"], out["records"]) == ("rouge/l/recall", 0.5, 2)
    assert out["samples"] == [
        {
            "question": "Capital of France?",
            "answers": ["Paris is."],
            "prediction": "Paris is.",
            "extracted": "Paris is.",
            "score": 1.0,
        }
    ]
    assert "dataset_description" not in out["report"]
    lines = summary_lines(
        {**out, "model": "m", "format": "general_qa", "evalscope": {"version": "1.14.1"}}
    )
    assert any(line.startswith("rouge/l/recall") and "(primary)" in line for line in lines)
    assert "  [1.00] 'Capital of France?' -> 'Paris is.'" in lines


# -- without EvalScope ------------------------------------------------------------------------
def test_without_evalscope_one_clear_line_and_nothing_queued(
    settings: Settings, trt: Runtime, make_rt: Callable[..., Runtime], tmp_path: Path
) -> None:
    data = write_jsonl(tmp_path / "qa.jsonl", QA)
    ask = ("eval", BASE, "-d", str(data), "--backend", "evalscope")
    proc = run(settings, *ask, YICHUI_SWIFT_PYTHON=sys.executable)
    assert_one_line_error(proc, 1, "make swift")
    assert "EvalScope" in proc.stderr.splitlines()[0]
    _nothing_queued(trt)
    here = make_rt(swift_python=Path(sys.executable))  # an interpreter without EvalScope
    with pytest.raises(SwiftMissingError, match="make swift") as err:
        evaluate(here.training, BASE, data)
    assert err.value.hint and "make swift" in err.value.hint
    _nothing_queued(trt)
    # the options of one backend are refused with the other, before anything else
    proc = run(settings, "eval", BASE, "-d", str(data), "--format", "general_qa")
    assert_one_line_error(proc, 2, "--format")
    proc = run(settings, "eval", BASE, "-d", str(data), "--backend", "evalscope", "--no-generate")
    assert_one_line_error(proc, 2, "--no-generate")
    proc = run(settings, "eval", BASE, "-d", str(data), "--backend", "lm-eval")
    assert_one_line_error(proc, 2, "lm-eval")
    _nothing_queued(trt)


async def test_the_management_api_takes_the_backend(
    make_rt: Callable[..., Runtime], tmp_path: Path
) -> None:
    import httpx

    from yichui.api.app import create_app

    rt = make_rt(swift_python=Path(sys.executable), datasets_dir=tmp_path)
    build_tiny_model(rt.settings.models_path / BASE)
    write_jsonl(tmp_path / "qa.jsonl", QA)
    ask = {"model": BASE, "dataset": "qa.jsonl"}
    transport = httpx.ASGITransport(app=create_app(runtime=rt), client=("127.0.0.1", 1))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        missing = await client.post("/api/eval", json={**ask, "backend": "evalscope"})
        mixed = await client.post(
            "/api/eval", json={**ask, "backend": "evalscope", "max_length": 9}
        )
        other = await client.post("/api/eval", json={**ask, "format": "general_qa"})
    assert missing.status_code == 501 and "make swift" in missing.json()["error"]["message"]
    assert mixed.status_code == 400 and mixed.json()["error"]["param"] == "max_length"
    assert other.status_code == 400 and other.json()["error"]["param"] == "format"
    _nothing_queued(rt)


def _queue_directly(rt: Runtime, data: Path, fmt: str, version: str = "1.14.1") -> dict[str, Any]:
    """An ``evalscope`` task submitted as ``yichui tasks submit`` would: the dataset unchecked."""
    import hashlib

    snaps = datasets_root(rt.settings.data_dir)
    snaps.mkdir(parents=True, exist_ok=True)
    sha = hashlib.sha256(data.read_bytes()).hexdigest()
    snap = snaps / f"{sha}{data.suffix}"
    snap.write_bytes(data.read_bytes())
    ref = {"path": str(snap), "sha256": sha, "records": 1, "origin": str(data)}
    args = {
        "model": BASE,
        "dataset": ref,
        "key": "0" * 64,
        "format": fmt,
        "evalscope_version": version,
    }
    return rt.tasks.submit("evalscope", args)


def test_a_worker_without_evalscope_fails_the_task_once(
    make_rt: Callable[..., Runtime], tmp_path: Path
) -> None:
    rt = make_rt(swift_python=Path(sys.executable))
    build_tiny_model(rt.settings.models_path / BASE)
    t = _queue_directly(rt, write_jsonl(tmp_path / "qa.jsonl", QA), "general_qa")
    assert run_burst(rt)["failed"] == 1
    status = rt.tasks.get(t["id"])
    assert status["state"] == "failed" and status["attempt"] == 1
    assert "EvalScope" in status["error"]["message"] and "make swift" in status["error"]["message"]
    _nothing_stored(rt)


# -- a real EvalScope, offline ----------------------------------------------------------------
def test_a_dataset_evalscope_cannot_read_fails_the_task_once(
    es_rt: Runtime, tmp_path: Path
) -> None:
    bad = write_jsonl(
        tmp_path / "mcq.jsonl", [{"question": "Which barks?", "A": "dog", "B": "cat"}]
    )
    t = _queue_directly(es_rt, bad, "general_mcq")
    assert burst(es_rt.worker(burst=True), timeout=120)["failed"] == 1
    status = es_rt.tasks.get(t["id"])
    assert status["state"] == "failed" and status["attempt"] == 1, status
    assert status["error"]["message"] == "EvalScope failed: KeyError: 'answer'"
    _nothing_stored(es_rt)
    folder = run_folder(es_rt.settings, t["id"])
    assert json.loads((folder / "error.json").read_text())["reason"] == "KeyError: 'answer'"
    assert not (folder / "cache").exists() and not (folder / "tmp").exists()
    lines = [e.data.get("line", "") for e in log_of(es_rt.task_store, t["id"]) if e.kind == "log"]
    assert any(line.startswith("evalscope: ") for line in lines), lines


def test_an_adapter_is_merged_first_and_its_report_keyed_by_both(
    es_rt: Runtime, tmp_path: Path
) -> None:
    svc = es_rt.training
    svc.train(
        BASE, write_jsonl(tmp_path / "train.jsonl", qa_records(8)), output="tiny-qa", max_steps=2
    )
    assert run_burst(es_rt)["succeeded"] == 1
    data = write_jsonl(tmp_path / "mcq.jsonl", MCQ)
    sub = evaluate(svc, f"{BASE}@tiny-qa", data, max_new_tokens=4)
    assert not sub.cached and sub.task is not None
    assert sub.task["args"]["format"] == "general_mcq"
    assert burst(es_rt.worker(burst=True), timeout=180)["succeeded"] == 1
    status = es_rt.tasks.get(sub.task["id"])
    report = status["result"]
    assert report["backend"] == "evalscope" and report["model"] == f"{BASE}@tiny-qa"
    assert report["fingerprint"].startswith("fp1a-")  # base and adapter
    assert report["primary_metric"] == "accuracy" and 0 <= report["score"] <= 1
    assert report["records"] == 2 and len(report["samples"]) == 2
    assert status["progress"]["step"] == status["progress"]["total"] == 2
    folder = run_folder(es_rt.settings, sub.task["id"])
    assert not (folder / "merged").exists()  # the merged copy is gone, EvalScope's outputs stay
    assert (folder / "work" / "reports" / "model" / "general_mcq.json").is_file()
    again = evaluate(svc, f"{BASE}@tiny-qa", data, max_new_tokens=4)
    assert again.cached and again.report == report
    assert not evaluate(svc, BASE, data, max_new_tokens=4).cached  # the base alone: another key


def _running(marker: str) -> list[int]:
    """Pids of the processes whose command line holds ``marker``."""
    pids = []
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if proc.name.isdigit() and marker in (proc / "cmdline").read_text():
                pids.append(int(proc.name))
    return pids


def test_a_cancel_stops_evalscope_at_once(es_rt: Runtime, tmp_path: Path) -> None:
    sub = evaluate(es_rt.training, BASE, write_jsonl(tmp_path / "qa.jsonl", QA * 20))
    assert sub.task is not None
    spec = str(run_folder(es_rt.settings, sub.task["id"]) / "spec.json")
    with worker_thread(es_rt.worker()):
        wait_until(lambda: _running(spec), timeout=30)
        es_rt.tasks.cancel(sub.task["id"])
        wait_state(es_rt.tasks, sub.task["id"], "cancelled", timeout=30)
    assert not _running(spec)  # the runner was killed, not left to finish
    _nothing_stored(es_rt)


@pytest.mark.slow
def test_the_bundled_model_offline_report_stored_and_the_repeat_cached(
    settings: Settings,
    make_rt: Callable[..., Runtime],
    swift_python: Path,
    smollm2_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory
    rt = make_rt(swift_python=swift_python)
    import_folder(rt.registry, smollm2_dir, "smollm2")
    data = write_jsonl(tmp_path / "qa.jsonl", QA)
    started = time.monotonic()
    sub = evaluate(rt.training, "smollm2", data, max_new_tokens=16)
    assert not sub.cached and sub.task is not None
    assert burst(rt.worker(burst=True), timeout=240)["succeeded"] == 1
    took = time.monotonic() - started
    status = rt.tasks.get(sub.task["id"])
    report = status["result"]
    assert report["records"] == 3 and report["format"] == "general_qa"
    assert report["primary_metric"] == "rouge/l/recall"
    assert set(report["metrics"]) >= {"rouge/1/recall", "rouge/l/f1", "rouge/l/recall"}
    assert report["score"] > 0.3, report["samples"]  # SmolLM2 answers these in sentences
    assert "Paris" in report["samples"][0]["prediction"]
    assert report["evalscope"]["version"] == "1.14.1" and report["evalscope"]["device"] == "cpu"
    assert (status["progress"]["step"], status["progress"]["total"]) == (3, 3)
    lines = [
        e.data.get("line", "") for e in log_of(rt.task_store, sub.task["id"]) if e.kind == "log"
    ]
    assert any(line.startswith("EvalScope 1.14.1, general_qa, on cpu") for line in lines), lines
    assert any(line.startswith("evalscope: ") for line in lines), lines
    # stored: the file, then Redis
    assert json.loads((evals_root(rt.settings.data_dir) / f"{sub.key}.json").read_text()) == report
    assert rt.training.cached_report(sub.key) == (report, "redis")
    assert not (tmp_path / "outputs").exists()
    # the repeat, through the CLI: from the cache, EvalScope not started
    t0 = time.monotonic()
    ask = ("eval", "smollm2", "-d", str(data), "--backend", "evalscope", "--max-new-tokens", "16")
    again = run(settings, *ask, YICHUI_SWIFT_PYTHON=str(swift_python))
    assert again.returncode == 0 and "(cached (redis))" in again.stderr, again.stderr
    assert "rouge/l/recall" in again.stdout and "(primary)" in again.stdout
    print(f"EvalScope run {took:.1f} s; the cached repeat {time.monotonic() - t0:.1f} s")
    assert rt.tasks.counts().get("queued", 0) == 0
