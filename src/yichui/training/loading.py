"""What training needs beyond :mod:`yichui.ml.loading`: the QLoRA check.

The loaders themselves (the device and dtype rules, tokenizer, model, adapter) are shared with
inference and live in :mod:`yichui.ml.loading`.
"""

from __future__ import annotations

import importlib.util

from yichui.errors import TrainingError


def check_qlora(device: str) -> None:
    """QLoRA needs bitsandbytes and a CUDA GPU: a clear error (not retried) otherwise."""
    import torch

    if importlib.util.find_spec("bitsandbytes") is None:
        raise TrainingError(
            "QLoRA needs the bitsandbytes package, which this worker does not have",
            hint="pip install bitsandbytes on a GPU worker, or train without --qlora",
        )
    if not device.startswith("cuda") or not torch.cuda.is_available():
        raise TrainingError(
            "QLoRA needs a CUDA GPU; this worker has none",
            hint="queue it for a GPU worker (--queue), or train without --qlora",
        )
