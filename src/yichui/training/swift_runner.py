"""ms-swift's ``sft`` in the ms-swift environment, as a yichui task runs it.

Run as a file by the ``swift_python`` interpreter (``python swift_runner.py SPEC.json``), where
yichui itself is not importable: standard library and ms-swift only. Unlike the ``swift sft``
command, which starts its trainer in a child process that nothing ties, the training runs in
this very process, so the death signal the worker's :func:`yichui.supervise.spawn` set (kept
across ``execv``) takes it down with a SIGKILLed worker: no orphan trains on beside the retry.

What it adds around ``sft_main``:

- the model type and template ms-swift needs for a folder it cannot name itself (a model
  yichui imported): the spec's, else ms-swift's own match of the folder's name, else the
  folder's ``config.json`` ``model_type`` when ms-swift registers it, with the template its
  registry gives it or, for a ChatML chat template, ``chatml``;
- the ``STOP`` file of yichui's launchers: a cancel or hand-back makes the trainer save a
  checkpoint at the end of the step and stop;
- ``error.json`` in the run folder on failure: the reason, and whether another attempt could
  succeed (bad arguments and out-of-memory would fail the same way).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any


def resolve_model(spec: dict[str, Any]) -> tuple[str, str]:
    """(model_type, template) for ms-swift, or ValueError naming what to pass."""
    from swift.model import MODEL_MAPPING
    from swift.model.model_meta import get_matched_model_meta

    model_dir = Path(spec["model_dir"])
    model_type, template = spec.get("model_type"), spec.get("template")
    if model_type and model_type not in MODEL_MAPPING:
        raise ValueError(f"ms-swift has no model type {model_type!r}")
    meta = MODEL_MAPPING[model_type] if model_type else get_matched_model_meta(str(model_dir))
    if meta is None:
        config = _json(model_dir / "config.json")
        own = str(config.get("model_type") or "")
        if own in MODEL_MAPPING:
            meta = MODEL_MAPPING[own]
    if meta is None:
        raise ValueError(
            f"ms-swift does not know the model type of {model_dir}: pass --swift-model-type"
        )
    if not template:
        template = meta.template or _chat_template_kind(model_dir)
    if not template:
        raise ValueError(
            f"ms-swift has no template for model type {meta.model_type!r} here: "
            "pass --swift-template"
        )
    return str(meta.model_type), str(template)


def _chat_template_kind(model_dir: Path) -> str | None:
    texts = [_text(model_dir / "chat_template.jinja")]
    texts.append(str(_json(model_dir / "tokenizer_config.json").get("chat_template") or ""))
    return "chatml" if any("<|im_start|>" in t for t in texts) else None


def _json(path: Path) -> dict[str, Any]:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def watch_stop_file(stop_file: Path) -> None:
    """Every Trainer ms-swift builds checks ``stop_file`` after each step: there, it saves a
    checkpoint and stops."""
    import transformers

    class StopFile(transformers.TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
            if stop_file.exists():
                control.should_save = True
                control.should_training_stop = True
            return control

    original = transformers.Trainer.__init__

    @functools.wraps(original)  # its signature too: ms-swift inspects it
    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.add_callback(StopFile)

    transformers.Trainer.__init__ = init  # type: ignore[method-assign]


def _fatal(exc: BaseException) -> bool:
    """Whether the same run would fail the same way (not worth another attempt)."""
    if isinstance(exc, ValueError | TypeError | KeyError | FileNotFoundError):
        return True
    name = type(exc).__name__
    return name == "OutOfMemoryError" or "out of memory" in str(exc).lower()


class _Tail:
    """A text stream written through to another, keeping the last few KB (the message an
    argument parser prints before it exits)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.tail = ""

    def write(self, text: str) -> int:
        self.tail = (self.tail + text)[-4000:]
        return int(self.stream.write(text))

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)

    def last_line(self) -> str:
        lines = [line.strip() for line in self.tail.splitlines() if line.strip()]
        return lines[-1] if lines else ""


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    run_dir = Path(spec["run_dir"])
    error_file = run_dir / "error.json"
    error_file.unlink(missing_ok=True)
    stderr = _Tail(sys.stderr)
    sys.stderr = stderr
    try:
        model_type, template = resolve_model(spec)
        print(f"ms-swift model type {model_type}, template {template}", flush=True)
        watch_stop_file(run_dir / spec.get("stop_file", "STOP"))
        from swift.pipelines import sft_main

        sft_main([*spec["argv"], "--model_type", model_type, "--template", template])
    except SystemExit as exc:  # ms-swift's argument parser refused the command line
        if exc.code in (0, None):
            return 0
        said = stderr.last_line() or f"exit {exc.code}"
        _write_error(error_file, f"ms-swift refused its arguments: {said}", True)
        return 2
    except BaseException as exc:
        traceback.print_exc()
        reason = f"{type(exc).__name__}: {exc}".strip()
        _write_error(error_file, reason[:2000], _fatal(exc))
        return 2 if _fatal(exc) else 1
    return 0


def _write_error(path: Path, reason: str, fatal: bool) -> None:
    path.write_text(json.dumps({"reason": reason, "retryable": not fatal}))


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    sys.exit(main(sys.argv[1]))
