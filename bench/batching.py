"""Benchmark of batched local generation: N concurrent distinct requests against the same
requests one at a time and against the ideal padded batch, in one run, on the real model.

What it measures, for N = ``--sizes`` (default 1, 4, 8, 16), on the bundled SmolLM2 (the
engine's default dtype: float32 on a CPU), greedy chat questions from a fixed list (distinct,
each answered to its natural end, ``--max-tokens`` at most):

- **sequential**: the N requests one after another on an engine without batching (each alone:
  what yichui did before batching);
- **concurrent**: the N requests at once on the engine as ``yichui serve`` builds it (its
  batcher, the shipped ``batch_*`` defaults);
- **ideal**: the same N prompts left-padded into one ``model.generate`` call, nothing else.

Tokens/s is completion tokens (to each answer's end) over the wall time. The concurrent
answers are checked to be the sequential ones, token for token.

Targets: 8 concurrent requests at >= 4x the sequential tokens/s and >= 0.7x the ideal's. The
last line of the output is one JSON object with every figure::

    .venv/bin/python bench/batching.py [--sizes 1,4,8,16] [--max-tokens 96] [--strict]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import finish, redis_server
from training import prepare_model

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2"
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain gravity to a child in one sentence.",
    "What is 2+2?",
    "Name a famous painter.",
    "Translate 'good morning' into Spanish.",
    "What colour is the sky on a clear day?",
    "Give me a synonym for happy.",
    "How many legs does a spider have?",
    "What is the boiling point of water in Celsius?",
    "Name a planet in our solar system.",
    "Suggest a name for a pet cat.",
    "What do bees make?",
    "Which ocean is the largest?",
    "Say hello in French.",
]


def requests(n: int, max_tokens: int) -> list[Any]:
    from yichui.inference.engine import EngineRequest, GenerationParams, Message

    params = GenerationParams(max_tokens=max_tokens, temperature=0.0)
    return [
        EngineRequest(model=MODEL, kind="chat", params=params, messages=(Message("user", q),))
        for q in QUESTIONS[:n]
    ]


def ideal(loaded: Any, batch: list[Any], max_tokens: int) -> tuple[int, float]:
    """(completion tokens to each row's end, seconds) of one padded generate call."""
    import torch

    from yichui.inference.engines.generation import eos_ids, generation_config, pad_id
    from yichui.inference.engines.local import prompt_ids

    seqs = [prompt_ids(loaded.tokenizer, r) for r in batch]
    longest = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), longest), pad_id(loaded), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, longest - len(s) :] = torch.tensor(s)
        mask[i, longest - len(s) :] = 1
    eos = set(eos_ids(loaded))
    started = time.perf_counter()
    with torch.inference_mode():
        out = loaded.model.generate(
            input_ids=ids,
            attention_mask=mask,
            generation_config=generation_config(loaded, max_tokens),
        )
    took = time.perf_counter() - started
    tokens = 0
    for row in out[:, longest:].tolist():
        for token in row:
            tokens += 1
            if token in eos:
                break
    return tokens, took


async def measure(registry: Any, metrics: Any, sizes: list[int], max_tokens: int) -> dict[str, Any]:
    from yichui.config import Settings
    from yichui.inference.engines.batching import BatchSettings
    from yichui.inference.engines.local import LocalEngine
    from yichui.inference.pool import ModelPool

    budget = Settings.model_fields["model_memory_budget"].default
    pool = ModelPool(budget_bytes=budget)
    batching = BatchSettings.of(
        Settings(), headroom=lambda: pool.budget_bytes - pool.nbytes, metrics=metrics
    )
    batched = LocalEngine(registry, pool, batching=batching)
    alone = LocalEngine(registry, ModelPool(budget_bytes=budget))
    everything = requests(max(sizes), max_tokens)
    await alone.complete(everything[0])  # both loaded before any timing
    await batched.complete(everything[0])
    singles, seconds = [], []
    for request in everything:
        started = time.perf_counter()
        singles.append(await alone.complete(request))
        seconds.append(time.perf_counter() - started)
    out: dict[str, Any] = {"max_tokens": max_tokens, "batch_max_size": batching.max_size}
    async with pool.use(MODEL, *_paths(registry)) as loaded:  # the ideal's model: the same
        for n in sizes:
            out[str(n)] = await _round(batched, loaded, everything[:n], singles[:n], seconds[:n])
    await batched.close()
    await alone.close()
    return out


async def _round(
    batched: Any, loaded: Any, batch: list[Any], singles: list[Any], seconds: list[float]
) -> dict[str, Any]:
    tokens = sum(r.usage.completion_tokens for r in singles)
    sequential = tokens / sum(seconds)
    started = time.perf_counter()
    together = await asyncio.gather(*(batched.complete(r) for r in batch))
    concurrent = tokens / (time.perf_counter() - started)
    max_tokens = batch[0].params.max_tokens
    async with loaded.lock:
        ideal_tokens, ideal_seconds = await asyncio.to_thread(ideal, loaded, batch, max_tokens)
    best = ideal_tokens / ideal_seconds
    return {
        "completion_tokens": tokens,
        "sequential_tps": round(sequential, 1),
        "concurrent_tps": round(concurrent, 1),
        "ideal_tps": round(best, 1),
        "concurrent_over_sequential": round(concurrent / sequential, 2),
        "concurrent_over_ideal": round(concurrent / best, 2),
        "same_answers": list(together) == singles,
    }


def _paths(registry: Any) -> tuple[Path, str]:
    from yichui.models.targets import resolve_target

    target = resolve_target(registry, MODEL)
    return Path(target.base.path or ""), target.fingerprint


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1,4,8,16", help="concurrent requests per round")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args()
    sizes = sorted({int(s) for s in args.sizes.split(",") if s})
    if not sizes or sizes[0] < 1 or sizes[-1] > len(QUESTIONS):
        parser.error(f"sizes must be between 1 and {len(QUESTIONS)}")
    from yichui.config import load_settings
    from yichui.metrics import Metrics
    from yichui.runtime import Runtime

    with tempfile.TemporaryDirectory(prefix="yichui-bench-batch-") as tmp:
        base = Path(tmp)
        # the converted model, kept where bench/training.py keeps it
        source = prepare_model(
            "smollm2", Path(tempfile.gettempdir()) / "yichui-bench-training", base
        )
        with redis_server(base) as url:
            rt = Runtime(load_settings(data_dir=base / "data", redis_url=url))
            rt.settings.models_path.mkdir(parents=True, exist_ok=True)
            shutil.copytree(source, rt.settings.models_path / MODEL)
            figures = asyncio.run(measure(rt.registry, Metrics(), sizes, args.max_tokens))
            rt.close()
    print(f"{'N':>3} {'tokens':>7} {'seq tok/s':>10} {'conc tok/s':>11} {'ideal tok/s':>12} "
          f"{'conc/seq':>9} {'conc/ideal':>11} same")  # fmt: skip
    for n in sizes:
        row = figures[str(n)]
        print(
            f"{n:>3} {row['completion_tokens']:>7} {row['sequential_tps']:>10} "
            f"{row['concurrent_tps']:>11} {row['ideal_tps']:>12} "
            f"{row['concurrent_over_sequential']:>9} {row['concurrent_over_ideal']:>11} "
            f"{row['same_answers']}"
        )
    eight = figures.get("8")
    checks = {
        "same_answers": all(figures[str(n)]["same_answers"] for n in sizes),
        **(
            {
                "8_concurrent_ge_4x_sequential": eight["concurrent_over_sequential"] >= 4.0,
                "8_concurrent_ge_0.7x_ideal": eight["concurrent_over_ideal"] >= 0.7,
            }
            if eight
            else {}
        ),
    }
    return finish(figures, checks, args.strict)


if __name__ == "__main__":
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
