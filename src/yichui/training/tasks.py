"""The training capability's task types: ``train``, ``merge``, ``evaluate`` and ``evalscope``.

Registered by the composition root through :func:`task_types`; their handlers (which import
torch, transformers and peft) are loaded by the worker that runs them.
"""

from __future__ import annotations

from typing import Protocol

from yichui.config import Settings
from yichui.models.registry import ModelRegistry
from yichui.tasks.types import TaskType
from yichui.training.args import EvalArgs, MergeArgs, TrainArgs
from yichui.training.evalscope_data import EvalScopeArgs
from yichui.training.service import TrainingService

TRAIN_STOP_GRACE = 300.0
"""Seconds a training run gets, when its worker stops, to finish its step and save a checkpoint."""


class TrainingServices(Protocol):
    """What the training task handlers use of the worker's services."""

    @property
    def settings(self) -> Settings: ...

    @property
    def registry(self) -> ModelRegistry: ...

    @property
    def training(self) -> TrainingService: ...


def task_types() -> list[TaskType]:
    return [
        TaskType(
            "train",
            TrainArgs,
            "yichui.training.lora:train",
            "LoRA/QLoRA fine-tuning; resumes from its last checkpoint",
            stop_grace=TRAIN_STOP_GRACE,
        ),
        TaskType(
            "merge", MergeArgs, "yichui.training.merge:merge", "fold an adapter into its base"
        ),
        TaskType(
            "evaluate",
            EvalArgs,
            "yichui.training.evaluate:evaluate",
            "loss, perplexity and answer accuracy on a dataset",
        ),
        TaskType(
            "evalscope",
            EvalScopeArgs,
            "yichui.training.evalscope_backend:run",
            "EvalScope's rule-based metrics on a local dataset (the ms-swift environment)",
        ),
    ]
