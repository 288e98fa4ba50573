"""EvalScope's ``run_task`` in the ms-swift environment, as yichui's ``evalscope`` task runs it.

Run as a file by the ``swift_python`` interpreter (``python evalscope_runner.py SPEC.json``),
where yichui itself is not importable: standard library, EvalScope and what it brings (torch,
transformers, peft). The worker starts it with :func:`yichui.supervise.spawn` (it dies with the
worker), offline, with every cache pointed into the task's run folder and that folder as its
working directory, so EvalScope writes nowhere else.

What it adds around ``run_task``:

- a ``base@adapter`` model: the adapter merged into its base with peft first, saved in the run
  folder (``merged/``; the worker removes it afterwards), and that folder evaluated;
- the device and precision: yichui's ``inference_device`` (``auto``: CUDA when there is one),
  float32 on a CPU, bfloat16 (or float16) on a GPU;
- progress: EvalScope counts the samples into ``<work>/progress.json`` when it knows their
  total, which it reads from its own statistics of published benchmarks only; a custom
  dataset's total is the spec's;
- ``error.json`` on failure: EvalScope's own reason (``KeyError: 'answer'``), which the task
  reports as it is; ``result.json`` on success. Lines starting ``[yichui]`` on stdout are
  progress notes the task copies into its log.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

QA_TEMPLATE = "{question}"
"""``general_qa``'s default prompt here: the question as it is (EvalScope's own default asks,
in Chinese, to answer the question)."""


def note(line: str) -> None:
    print(f"[yichui] {line}", flush=True)


def device_and_dtype(wanted: str) -> tuple[str, str]:
    import torch

    device = wanted
    if wanted == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        return device, "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return device, "float32"


def merge_adapter(base: str, adapter: str, out: Path, dtype: str) -> Path:
    """``base`` with ``adapter`` folded in, saved to ``out`` with the adapter's tokenizer."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype))
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.save_pretrained(out)
    has_tokenizer = (Path(adapter) / "tokenizer_config.json").exists()
    AutoTokenizer.from_pretrained(adapter if has_tokenizer else base).save_pretrained(out)
    return out


def task_config(spec: dict[str, Any], model_dir: str, device: str, dtype: str) -> Any:
    from evalscope import TaskConfig

    benchmark = spec["format"]
    args: dict[str, Any] = {"local_path": spec["dataset"], "subset_list": ["default"]}
    template = spec.get("prompt_template")
    if benchmark == "general_qa":
        # BLEU tokenizes with NLTK's punkt_tab, which EvalScope would download: Rouge only
        args["metric_list"] = ["Rouge"]
        args["prompt_template"] = template or QA_TEMPLATE
    else:
        from evalscope.utils.multi_choices import MultipleChoiceTemplate

        args["prompt_template"] = template or MultipleChoiceTemplate.SINGLE_ANSWER
    return TaskConfig(
        model=model_dir,
        model_id=spec["model_id"],
        eval_type="llm_ckpt",
        model_args={"precision": dtype, "device_map": device},
        datasets=[benchmark],
        dataset_args={benchmark: args},
        dataset_dir=spec["dataset_dir"],
        generation_config={"max_tokens": spec["max_new_tokens"], "do_sample": False},
        eval_batch_size=spec["batch_size"],
        limit=spec.get("limit"),
        work_dir=spec["work_dir"],
        no_timestamp=True,
        enable_progress_tracker=True,
    )


def run(spec: dict[str, Any]) -> dict[str, Any]:
    import evalscope
    import evalscope.run as es_run
    from evalscope import run_task

    started = time.monotonic()
    device, dtype = device_and_dtype(spec.get("device") or "auto")
    note(f"EvalScope {evalscope.__version__}, {spec['format']}, on {device} ({dtype})")
    model_dir = spec["model_dir"]
    if spec.get("adapter_dir"):
        note(f"merging the adapter {spec['adapter_dir']} into its base")
        model_dir = str(
            merge_adapter(model_dir, spec["adapter_dir"], Path(spec["merged_dir"]), dtype)
        )
    total = int(spec["total"])
    # EvalScope sizes its progress file from statistics of the benchmarks it publishes; a local
    # dataset has none, so without this it writes no progress at all
    es_run.compute_eval_total_count = lambda _cfg: total
    reports = run_task(task_config(spec, model_dir, device, dtype))
    if not isinstance(reports, dict) or spec["format"] not in reports:
        raise RuntimeError(f"EvalScope returned no report for {spec['format']}")
    return {
        "version": evalscope.__version__,
        "device": device,
        "dtype": dtype,
        "seconds": round(time.monotonic() - started, 3),
    }


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    try:
        result = run(spec)
    except BaseException as exc:  # KeyboardInterrupt too: the task is told why it stopped
        reason = f"{type(exc).__name__}: {exc}".strip().rstrip(":")
        _write(spec["error_file"], {"reason": reason[:2000], "traceback": traceback.format_exc()})
        traceback.print_exc()
        return 1
    _write(spec["result_file"], result)
    return 0


def _write(path: str, data: dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
