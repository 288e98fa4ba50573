"""The ``evaluate`` task: loss and perplexity of the answers, and greedy answer accuracy.

The report is stored as ``<data_dir>/evals/<key>.json`` and in Redis under ``eval_result:<key>``
(see :mod:`yichui.state.eval_store`), where ``key`` covers the model's fingerprint, the dataset's
hash and the parameters: the same evaluation asked again is answered from there at once.

A multimodal model (or ``base@adapter`` on one) is scored and asked through its processor,
each record's images shown to it as in training and serving (:mod:`yichui.training.eval_inputs`);
its answers are scored as a text model's.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from yichui.ml.loading import (
    apply_adapter,
    load_model,
    load_processor,
    load_tokenizer,
    require_ml,
    resolve_device,
    resolve_dtype,
)
from yichui.models.targets import resolve_target
from yichui.tasks.context import TaskContext
from yichui.training.args import EvalArgs
from yichui.training.dataset import Example, read_examples
from yichui.training.report import contains, exact_match
from yichui.training.service import eval_key
from yichui.training.tasks import TrainingServices

SAMPLES = 20
"""Records whose question, answer and prediction the report shows."""


def evaluate(ctx: TaskContext[TrainingServices], args: EvalArgs) -> dict[str, Any]:
    require_ml("evaluation")
    from yichui.training.trainer import check_snapshot

    check_snapshot(args.dataset)
    rt = ctx.services
    svc = rt.training
    target = resolve_target(rt.registry, args.model)
    key = eval_key(target.fingerprint, args.dataset.sha256, args.model_dump(mode="json"))
    if key != args.key:
        ctx.log("the model changed since this evaluation was queued: scoring the current files")
    found = svc.cached_report(key)
    if found is not None:  # an identical evaluation finished meanwhile
        ctx.log(f"answered from the cache ({found[1]})")
        return found[0]
    started = time.monotonic()
    device = resolve_device(rt.settings.inference_device)
    dtype = resolve_dtype(device)
    base_path = Path(target.base.path or "")
    adapter = Path(target.adapter.path or "") if target.adapter is not None else None
    multimodal = target.kind == "multimodal"
    model = load_model(
        base_path,
        args.model,
        device=device,
        dtype=dtype,
        kind="multimodal" if multimodal else "text",
    )
    if adapter is not None:
        model = apply_adapter(model, adapter, args.model, merge=True)
    inputs = _inputs(args, base_path, adapter, multimodal=multimodal)
    model.eval()
    examples = read_examples(args.dataset.path)
    if args.limit is not None:
        examples = examples[: args.limit]
    batches = _chunks(examples, args.batch_size)
    total = len(batches) * (2 if args.generate else 1)
    ctx.log(f"evaluating {args.model} on {len(examples)} records ({device})")
    nll, tokens, step = 0.0, 0, 0
    for batch in batches:
        s, n = _batch_nll(model, inputs.scored(batch), device)
        nll, tokens, step = nll + s, tokens + n, step + 1
        ctx.report(step, total, unit="batch", loss=nll / max(tokens, 1))
    loss = nll / tokens if tokens else None
    report: dict[str, Any] = {
        "model": args.model,
        "fingerprint": target.fingerprint,
        "key": key,
        "dataset": args.dataset.model_dump(),
        "records": len(examples),
        "tokens": tokens,
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)) if loss is not None else None,
        "params": args.model_dump(mode="json", exclude={"model", "dataset", "key"}),
        "exact_match": None,
        "contains": None,
        "samples": [],
    }
    if args.generate:
        hits_exact = hits_contains = 0
        for batch in batches:
            predictions = _generate(model, inputs, batch, args, device)
            for ex, pred in zip(batch, predictions, strict=True):
                em, ct = exact_match(pred, ex.answers), contains(pred, ex.answers)
                hits_exact += em
                hits_contains += ct
                if len(report["samples"]) < SAMPLES:
                    report["samples"].append(
                        {
                            "question": ex.question,
                            "answers": list(ex.answers),
                            "prediction": pred,
                            "exact": em,
                            "contains": ct,
                        }
                    )
            step += 1
            ctx.report(step, total, unit="batch", exact_match=hits_exact / len(examples))
        report["exact_match"] = hits_exact / len(examples)
        report["contains"] = hits_contains / len(examples)
    report["seconds"] = round(time.monotonic() - started, 3)
    report["created"] = time.time()
    ctx.flush()  # a run whose lease was lost stops before storing anything
    svc.store_report(key, report)
    em_text = "" if report["exact_match"] is None else f", exact match {report['exact_match']:.1%}"
    ppl = report["perplexity"]
    ctx.log(f"loss {loss}, perplexity {ppl}{em_text}")
    return report


def _chunks(items: list[Example], size: int) -> list[list[Example]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _inputs(args: EvalArgs, base_path: Path, adapter: Path | None, *, multimodal: bool) -> Any:
    from yichui.training.eval_inputs import TextInputs, VisionInputs

    if not multimodal:
        return TextInputs(load_tokenizer(base_path, args.model, adapter=adapter), args.max_length)
    from yichui.training.trainer import vision_bounds

    return VisionInputs(
        load_processor(base_path, args.model, adapter=adapter),
        model=args.model,
        max_length=args.max_length,
        bounds=vision_bounds(args.vision_min_pixels, args.vision_max_pixels),
    )


def _batch_nll(model: Any, inputs: dict[str, Any], device: str) -> tuple[float, int]:
    """Summed negative log-likelihood of the answer tokens, and their count."""
    import torch

    labels = inputs["labels"].to(device)
    given = {k: v.to(device) for k, v in inputs.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**given).logits
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    losses = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )
    return float(losses), int((shift_labels != -100).sum())


def _generate(
    model: Any, inputs: Any, batch: list[Example], args: EvalArgs, device: str
) -> list[str]:
    """Greedy answers to each example's prompt (left-padded batch)."""
    import torch
    from transformers import GenerationConfig

    from yichui.training.data import pad_id

    tokenizer = inputs.tokenizer
    asked = {k: v.to(device) for k, v in inputs.asked(batch).items()}
    width = int(asked["input_ids"].shape[1])
    pad = pad_id(tokenizer)
    eos = getattr(model.generation_config, "eos_token_id", None) or tokenizer.eos_token_id
    config = GenerationConfig(  # type: ignore[no-untyped-call]
        max_new_tokens=args.max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=eos,
        pad_token_id=pad,
        # greedy means greedy: nothing from the model's generation_config.json
        repetition_penalty=1.0,
        temperature=None,
        top_p=None,
        top_k=None,
    )
    with torch.no_grad():
        out = model.generate(**asked, generation_config=config)
    texts: list[str] = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return [t.strip() for t in texts]
