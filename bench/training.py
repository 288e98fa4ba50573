"""Benchmark of LoRA fine-tuning: the cost of yichui's progress reporting, per training step.

Two variants of the Trainer that ``train`` tasks run (:func:`yichui.training.trainer.build_trainer`,
same seed, data and steps): ``bare``, with no progress callback, and ``reported``, with
:class:`~yichui.training.progress.TaskProgress` on a real TaskContext (a ``train`` task on a
throwaway redis-server, claimed as a worker slot claims it: XREADGROUP, then the CLAIM script),
which reports every step (coalesced to one Redis write per ``task_progress_interval``) and
appends it to the run's ``logging.jsonl``. Each round runs one Trainer of each variant in two
threads that take turns step by step (who starts alternates), so each pair of steps runs back to
back under the same load of a shared machine. (Taking turns costs every step a little, in both
variants alike: the idle thread's OpenMP workers spin for a moment; ~5 ms on the tiny model.)

A step is timed from its ``on_step_begin`` to the next one, with the Trainer's logging and all
callbacks in it (``on_log`` runs after ``on_step_end``); the timing callback is in both variants.
The first ``--warmup`` steps of each run are skipped. "after on_step_end" (logging, reporting)
is the least noisy view of what reporting adds. Redis writes are the context's REPORT calls.

How to read it: the overhead is the median over the step pairs of reported / bare - 1 (target
< 1 %; a pair runs back to back, so load that drifts between rounds cancels out); the ratio of
the two medians is printed too. The last line of the output is
one JSON object with every figure, for scripts::

    .venv/bin/python bench/training.py [--model smollm2|tiny] [--steps 16] [--rounds 4] [--strict]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import secrets
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from common import redis_server

ROOT = Path(__file__).resolve().parents[1]
OVERHEAD_TARGET_PCT = 1.0
MODEL_NAMES = {"smollm2": "smollm2-135m-instruct", "tiny": "tiny-llama"}
VARIANTS = ("bare", "reported")
CAPITALS = {"France": "Paris", "Italy": "Rome", "Japan": "Tokyo", "Peru": "Lima"}


def write_dataset(path: Path, records: int) -> Path:
    """``records`` short question/answer pairs as JSONL (deterministic)."""
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(records):
            a, b = i % 10 + 1, (i * 7) % 10 + 1
            row = {"question": f"What is {a} plus {b}?", "answer": str(a + b)}
            if i % 4 == 3:
                country, city = list(CAPITALS.items())[(i // 4) % len(CAPITALS)]
                row = {"question": f"What is the capital of {country}?", "answer": city}
            fh.write(json.dumps(row) + "\n")
    return path


def prepare_model(kind: str, cache: Path, scratch: Path) -> Path:
    """The base model folder: the bundled SmolLM2 converted once (cached), or a tiny Llama."""
    if kind == "tiny":
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        from tests.tiny_model import build_tiny_model

        return build_tiny_model(scratch / "tiny-llama")
    from yichui.models.importer import bundled_gguf, convert_gguf

    dest = cache / MODEL_NAMES[kind]
    if not (dest / "config.json").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=cache))
        print(f"converting the bundled GGUF into {dest} (once) ...", file=sys.stderr, flush=True)
        convert_gguf(bundled_gguf(), staging)
        os.replace(staging, dest)
    return dest


def claim_task(rt: Any, targs: Any, worker_id: str) -> Any:
    """Submit a ``train`` task and claim it as a worker slot does -> its TaskContext."""
    from yichui.tasks.context import TaskContext

    store, s = rt.task_store, rt.settings
    q = s.task_queue
    task_id = rt.tasks.submit("train", targs.model_dump(mode="json"))["id"]
    store.ensure_group(q)
    deliveries = store.read(q, worker_id, block_ms=1000)
    assert deliveries and deliveries[0][1] == task_id, deliveries
    token, lease_ms = secrets.token_hex(16), int(s.task_lease * 1000)
    claim = store.claim(
        task_id, deliveries[0][0], queue=q, worker=worker_id, token=token, lease_ms=lease_ms
    )
    assert claim is not None, "the delivery was stale"
    interval = s.task_progress_interval
    return TaskContext(store, claim, queue=q, worker=worker_id, progress_interval=interval)


class Turns:
    """Two threads take turns, a step each (one that has finished drops out)."""

    def __init__(self, order: tuple[str, ...]) -> None:
        self.order, self.turn, self.done = order, order[0], set[str]()
        self.cond = threading.Condition()

    def wait(self, me: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.turn == me)

    def pass_on(self, me: str, *, finished: bool = False) -> None:
        with self.cond:
            if finished:
                self.done.add(me)
            other = self.order[1 - self.order.index(me)]
            if other not in self.done:
                self.turn = other
                self.cond.notify_all()


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import TrainerCallback
    from transformers.utils import logging as hf_logging

    from yichui.config import load_settings
    from yichui.ml.loading import resolve_device
    from yichui.runtime import Runtime
    from yichui.training.args import DatasetRef, TrainArgs
    from yichui.training.dataset import inspect_dataset
    from yichui.training.progress import TaskProgress
    from yichui.training.trainer import build_trainer

    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    # peft 0.21 reads transformers 5's deprecated ``is_gradient_checkpointing``: not ours to fix
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)

    class StepTimer(TrainerCallback):
        """Times its Trainer's steps; hands the turn to the other Trainer at each step begin."""

        def __init__(self, me: str, turns: Turns) -> None:
            self.me, self.turns, self.t0, self.end = me, turns, 0.0, 0.0
            self.steps: list[float] = []
            self.between: list[float] = []

        def on_train_begin(self, *a: Any, **kw: Any) -> None:
            self.turns.wait(self.me)

        def on_step_begin(self, *a: Any, **kw: Any) -> None:
            now = time.perf_counter()
            if self.t0:  # the previous step ends here, its logging and callbacks done
                self.steps.append(now - self.t0)
                self.between.append(now - self.end)
                self.turns.pass_on(self.me)
                self.turns.wait(self.me)
            self.t0 = time.perf_counter()

        def on_step_end(self, *a: Any, **kw: Any) -> None:
            self.end = time.perf_counter()

    steps = args.steps or (40 if args.model == "tiny" else 16)
    max_steps = args.warmup + steps + 1  # the last step only closes the one before it
    name = MODEL_NAMES[args.model]
    samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
    between: dict[str, list[float]] = {v: [] for v in VARIANTS}
    rounds: dict[str, list[float]] = {v: [] for v in VARIANTS}
    writes, entries = 0, {"progress": 0, "log": 0}

    common: dict[str, Any] = {"model": name, "output": "bench-adapter", "seed": args.seed}
    common.update(max_steps=max_steps, batch_size=args.batch_size, max_length=args.max_length)
    common.update(save_steps=10 * max_steps)  # no checkpoint inside the timed window

    def one_round(rt: Runtime, model_path: Path, r: int) -> None:
        order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
        turns, timers, trainers, errors = Turns(order), {}, {}, []
        ctx = progress = None
        for v in order:
            run_dir = base / "runs" / f"{v}-{r}"
            run_dir.mkdir(parents=True)
            targs = TrainArgs(run_dir=str(run_dir), **common)
            timers[v] = StepTimer(v, turns)
            callbacks: list[Any] = [timers[v]]
            if v == "reported":
                ctx = claim_task(rt, targs, f"bench:{os.getpid()}")
                progress = TaskProgress(ctx, run_dir)
                callbacks.append(progress)
            trainers[v], _tok = build_trainer(targs, model_path, name, device, callbacks)

        def go(v: str) -> None:
            try:
                trainers[v].train()
            except BaseException as exc:  # re-raised below
                errors.append(exc)
            finally:
                turns.pass_on(v, finished=True)

        threads = [threading.Thread(target=go, args=(v,), name=v) for v in order]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert ctx is not None and progress is not None
        progress.close()
        if errors:
            raise errors[0]
        store = rt.task_store  # what the worker does at the end (not timed)
        store.finish(ctx.id, ctx.queue, ctx.token, "succeeded", {}, progress=ctx.final_progress())
        for entry in store.log_entries(ctx.id, count=100_000):
            entries[entry.kind] = entries.get(entry.kind, 0) + 1
        for v, timer in timers.items():
            kept = timer.steps[args.warmup :]
            assert len(kept) == steps, f"{v}: {len(kept)} steps timed, {steps} expected"
            samples[v] += kept
            between[v] += timer.between[args.warmup :]
            rounds[v].append(statistics.median(kept) * 1000)

    with tempfile.TemporaryDirectory(prefix="yichui-bench-") as tmp:
        base = Path(tmp)
        (base / "redis").mkdir()
        model_path = prepare_model(args.model, Path(args.cache), base)
        data = inspect_dataset(write_dataset(base / "qa.jsonl", args.records))
        common["dataset"] = DatasetRef(
            path=str(data.path), sha256=data.sha256, records=data.records
        )
        device = resolve_device(args.device)
        with redis_server(base / "redis") as url:
            rt = Runtime(load_settings(data_dir=base / "data", redis_url=url))
            settings, report = rt.settings, rt.task_store.report

            def counted(*a: Any, **kw: Any) -> int:
                nonlocal writes
                writes += 1
                return report(*a, **kw)

            rt.task_store.report = counted  # type: ignore[method-assign]
            try:
                for r in range(args.rounds):
                    one_round(rt, model_path, r)
                    gc.collect()
                    line = ", ".join(f"{v} {rounds[v][-1]:.1f}" for v in VARIANTS)
                    print(f"  round {r + 1}/{args.rounds}: median ms/step {line}", file=sys.stderr)
            finally:
                rt.task_store.report = report  # type: ignore[method-assign]
                rt.close()

    f: dict[str, Any] = {"bench": "training", "model": name, "device": device}
    f.update(torch_threads=torch.get_num_threads(), cpus=os.cpu_count(), batch=args.batch_size)
    f.update(max_length=args.max_length, records=args.records, rounds=args.rounds)
    f.update(warmup=args.warmup, steps=steps, progress_interval_s=settings.task_progress_interval)
    for v in VARIANTS:
        ms = [x * 1000 for x in samples[v]]
        f[f"{v}_step_ms"] = round(statistics.median(ms), 2)
        f[f"{v}_p90_ms"] = round(statistics.quantiles(ms, n=10)[-1], 2)
        f[f"{v}_mean_ms"] = round(statistics.fmean(ms), 2)
        f[f"{v}_between_ms"] = round(statistics.median(between[v]) * 1000, 3)
        f[f"{v}_round_ms"] = [round(x, 1) for x in rounds[v]]
    f["overhead_pct"] = round((f["reported_step_ms"] / f["bare_step_ms"] - 1) * 100, 3)
    pairs = [p / b for b, p in zip(samples["bare"], samples["reported"], strict=True)]
    f["paired_overhead_pct"] = round((statistics.median(pairs) - 1) * 100, 3)
    f["between_delta_ms"] = round(f["reported_between_ms"] - f["bare_between_ms"], 3)
    f["between_overhead_pct"] = round(f["between_delta_ms"] / f["bare_step_ms"] * 100, 3)
    f["redis_writes"] = writes
    f["redis_writes_per_step"] = round(writes / (args.rounds * max_steps), 3)
    f["log_stream_progress"], f["log_stream_lines"] = entries["progress"], entries["log"]
    # judged on the pairs: each pair ran back to back, so a load that changes between rounds
    # (a shared machine) cancels out, as it does not in the ratio of the two medians
    f["target_met"] = f["paired_overhead_pct"] < OVERHEAD_TARGET_PCT
    return f


def report(f: dict[str, Any]) -> None:
    """The human-readable table (the JSON line follows it)."""
    print(
        f"\nLoRA fine-tuning, per-step time with and without progress reporting\n"
        f"model {f['model']} on {f['device']} ({f['torch_threads']} torch threads, {f['cpus']}"
        f" CPUs), batch {f['batch']}, max_length {f['max_length']}, {f['records']} records\n"
        f"{f['rounds']} rounds x {f['steps']} steps per variant, the two taking turns step by"
        f" step; the first {f['warmup']} steps of each run skipped\n"
    )
    print(
        f"{'variant':<10}{'median ms':>11}{'p90 ms':>10}{'mean ms':>10}{'between ms':>12}  rounds"
    )
    for v in VARIANTS:
        print(
            f"{v:<10}{f[f'{v}_step_ms']:>11.2f}{f[f'{v}_p90_ms']:>10.2f}{f[f'{v}_mean_ms']:>10.2f}"
            f"{f[f'{v}_between_ms']:>12.3f}  " + ", ".join(f"{x:.1f}" for x in f[f"{v}_round_ms"])
        )
    verdict = "PASS" if f["target_met"] else "FAIL"
    print(
        f"\noverhead, median of pair ratios: {f['paired_overhead_pct']:+.3f} % (target <"
        f" {OVERHEAD_TARGET_PCT:g} %: {verdict}); ratio of the medians:"
        f" {f['overhead_pct']:+.3f} %\n"
        f"between (on_step_end -> next step): {f['between_delta_ms']:+.3f} ms/step more reported"
        f" ({f['between_overhead_pct']:+.3f} % of a bare step)\n"
        f"Redis writes: {f['redis_writes']} REPORT calls ({f['redis_writes_per_step']:.2f}/step,"
        f" progress interval {f['progress_interval_s']:g} s); task log stream:"
        f" {f['log_stream_progress']} progress entries, {f['log_stream_lines']} log lines"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", choices=sorted(MODEL_NAMES), default="smollm2")
    parser.add_argument("--steps", type=int, help="timed steps per run (default 16; tiny 40)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="runs of each variant; even, so each variant goes first equally often",
    )
    parser.add_argument("--warmup", type=int, default=2, help="steps skipped at each run's start")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--records", type=int, default=64, help="QA records in the dataset")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    parser.add_argument(
        "--cache",
        default=str(Path(tempfile.gettempdir()) / "yichui-bench-training"),
        help="where the converted model is kept between runs",
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--strict", action="store_true", help="exit 1 when the target is missed")
    args = parser.parse_args(argv)
    if min(args.rounds, args.records, args.batch_size) < 1 or (args.steps or 2) < 2:
        parser.error("--rounds, --records and --batch-size must be >= 1, --steps >= 2")
    if args.rounds % 2:
        # the step that runs second in a pair pays for the first one's spinning OpenMP
        # threads: an odd count would charge one variant more often
        parser.error("--rounds must be even")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    for key in [k for k in os.environ if k.startswith("YICHUI_")]:
        del os.environ[key]  # the figures must not depend on the caller's settings
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TQDM_DISABLE"] = "1"
    figures = run(args)
    report(figures)
    print(json.dumps(figures, separators=(", ", ": ")))
    return 1 if args.strict and not figures["target_met"] else 0


if __name__ == "__main__":
    sys.exit(main())
