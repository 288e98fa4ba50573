"""Fine-tuning, merging and evaluating vision-language models on datasets with images: the
images checked before anything is queued (each refusal names its line and part), snapshotted
with the JSONL by their bytes, encoded with the processor (labels on the answer only, image
tokens counted in the prompt), LoRA on the language model alone; tiny random-weight LLaVA,
Qwen2-VL and Idefics3 (``tests/vision_models.py``), a real redis-server, real workers."""

from __future__ import annotations

import base64
import json
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.images import encode, picture, png
from tests.redis_proc import wait_until
from tests.task_fixtures import run_burst
from tests.tiny_model import build_tiny_model
from tests.training_fixtures import write_jsonl
from tests.vision_models import FAMILIES, build_llava, build_qwen2_vl
from yichui.errors import DatasetError, TaskFailedError, TrainingError
from yichui.runtime import Runtime
from yichui.state.task_store import TERMINAL
from yichui.training.args import DatasetRef
from yichui.training.dataset import (
    file_sha256,
    inspect_dataset,
    read_examples,
    snapshot,
)
from yichui.training.dataset_images import ImageRules
from yichui.training.runs import datasets_root, runs_root

VL = "tiny-vl"
TEXT = "tiny"
COLOURS = [("red", (220, 30, 30)), ("green", (30, 200, 40)), ("blue", (30, 40, 220))]


def _solid(path: Path, rgb: tuple[int, int, int], size: tuple[int, int] = (40, 32)) -> Path:
    from PIL import Image

    Image.new("RGB", size, rgb).save(path)
    return path


def colour_records(folder: Path) -> list[dict[str, Any]]:
    """One record per colour and form: content parts, OpenAI's image_url, ms-swift's images."""
    (folder / "img").mkdir(exist_ok=True)
    records: list[dict[str, Any]] = []
    for name, rgb in COLOURS:
        _solid(folder / "img" / f"{name}.png", rgb)
        records.append(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "image": f"img/{name}.png"},
                            {"type": "text", "text": "What colour is this?"},
                        ],
                    },
                    {"role": "assistant", "content": name},
                ]
            }
        )
        records.append(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "Name the colour."},
                            {"type": "image_url", "image_url": {"url": f"img/{name}.png"}},
                        ],
                    },
                    {"role": "assistant", "content": [{"type": "text", "text": name}]},
                ]
            }
        )
        records.append(
            {"question": "<image>Which colour?", "answer": name, "images": [f"img/{name}.png"]}
        )
    return records


def _nothing_queued(rt: Runtime) -> None:
    assert rt.tasks.counts().get("queued", 0) == 0
    root = runs_root(rt.settings.data_dir)
    assert not root.exists() or not any(root.rglob("args.json"))
    snaps = datasets_root(rt.settings.data_dir)
    assert not snaps.exists() or not any(snaps.iterdir())


@pytest.fixture
def vrt(make_rt: Callable[..., Runtime], tmp_path: Path) -> Runtime:
    """A runtime with a tiny Qwen2-VL ``tiny-vl`` and a tiny text model ``tiny``; absolute
    image paths allowed under ``<tmp>/shared``."""
    (tmp_path / "shared").mkdir()
    rt = make_rt(image_file_roots=[str(tmp_path / "shared")])
    build_qwen2_vl(rt.settings.models_path / VL)
    build_tiny_model(rt.settings.models_path / TEXT)
    return rt


def _user(*parts: Any) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "user", "content": list(parts)},
            {"role": "assistant", "content": "x"},
        ]
    }


def _img(ref: str) -> dict[str, Any]:
    return {"type": "image", "image": ref}


BAD: list[tuple[str, Callable[[Path], dict[str, Any]], str]] = [
    (
        "missing",
        lambda d: _user(_img("nope.png")),
        r"messages\[0\]\.content\[0\]: image 'nope.png' not found",
    ),
    (
        "not-an-image",
        lambda d: ((d / "notes.png").write_text("hello"), _user(_img("notes.png")))[1],
        r"messages\[0\]\.content\[0\]: image 'notes.png': not an image",
    ),
    (
        "escapes",
        lambda d: _user({"type": "image_url", "image_url": {"url": "../outside.png"}}),
        r"messages\[0\]\.content\[0\]: image '\.\./outside\.png' leads outside the dataset's"
        " folder",
    ),
    (
        "link-escapes",
        lambda d: (os.symlink(d.parent / "outside.png", d / "link.png"), _user(_img("link.png")))[
            1
        ],
        "leads outside the dataset's folder",
    ),
    (
        "absolute",
        lambda d: _user(_img(str(d.parent / "outside.png"))),
        r"messages\[0\]\.content\[0\]: image .* is outside image_file_roots",
    ),
    (
        "remote",
        lambda d: _user(_img("https://example.com/cat.png")),
        "remote images are not fetched",
    ),
    (
        "truncated",
        lambda d: ((d / "cut.png").write_bytes(png(64, 48)[:200]), _user(_img("cut.png")))[1],
        "image 'cut.png': image is truncated or corrupt",
    ),
    (
        "tags",
        lambda d: {"question": "<image><image>?", "answer": "a", "images": ["ok.png"]},
        r"2 <image> tag\(s\) in the user text for 1 image",
    ),
    (
        "assistant-image",
        lambda d: {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": [_img("ok.png")]},
            ]
        },
        r"messages\[1\]\.content\[0\]: images belong in user messages",
    ),
    (
        "bad-data-url",
        lambda d: _user({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}),
        "not valid base64",
    ),
]


@pytest.mark.parametrize(("case", "record", "message"), BAD, ids=[c[0] for c in BAD])
def test_bad_images_are_refused_before_queuing(
    vrt: Runtime,
    tmp_path: Path,
    case: str,
    record: Callable[[Path], dict[str, Any]],
    message: str,
) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    _solid(folder / "ok.png", (1, 2, 3))
    _solid(tmp_path / "outside.png", (1, 2, 3))
    good = {"question": "<image>?", "answer": "a", "images": ["ok.png"]}
    path = write_jsonl(folder / f"{case}.jsonl", [good, good, record(folder)])
    expected = f"line 3: .*{message}"  # "dataset '<path>', line 3: <part>: <what is wrong>"
    with pytest.raises(DatasetError, match=expected) as err:
        vrt.training.train(VL, path, max_steps=2)
    assert err.value.line == 3 and err.value.exit_code == 2
    with pytest.raises(DatasetError, match=expected):
        vrt.training.evaluate(VL, path)
    _nothing_queued(vrt)


def test_image_limits_and_roots(
    vrt: Runtime, make_rt: Callable[..., Runtime], tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    _solid(shared / "a.png", (9, 9, 9))
    far = tmp_path / "elsewhere"
    far.mkdir()
    ok = write_jsonl(
        far / "ok.jsonl", [_user(_img(str(shared / "a.png")), {"type": "text", "text": "?"})]
    )
    assert inspect_dataset(ok, ImageRules.from_settings(vrt.settings)).images == 1
    many = write_jsonl(far / "many.jsonl", [_user(*[_img(str(shared / "a.png"))] * 5)])
    with pytest.raises(DatasetError, match="line 1: messages\\[0\\] has 5 images, more than the 4"):
        vrt.training.train(VL, many)
    big = _solid(shared / "big.png", (1, 1, 1), (300, 300))
    rt = make_rt(image_file_roots=[str(shared)], image_max_pixels=200 * 200)  # same models
    huge = write_jsonl(far / "huge.jsonl", [_user(_img(str(big)))])
    with pytest.raises(DatasetError, match="300x300 pixels, more than the 40000 allowed"):
        rt.training.train(VL, huge)
    _nothing_queued(rt)


def test_images_on_a_text_model_are_refused(vrt: Runtime, tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "c.jsonl", [{"question": "2+2?", "answer": "4"}, *colour_records(tmp_path)]
    )
    with pytest.raises(
        DatasetError, match=r"has 9 image\(s\) \(the first on line 2\), but 'tiny' is a text model"
    ):
        vrt.training.train(TEXT, path, max_steps=2)
    with pytest.raises(DatasetError, match="is a text model"):
        vrt.training.evaluate(TEXT, path)
    text_only = write_jsonl(tmp_path / "t.jsonl", [{"question": "2+2?", "answer": "4"}])
    with pytest.raises(TrainingError, match="--train-projector needs a multimodal base"):
        vrt.training.train(TEXT, text_only, train_projector=True)
    _nothing_queued(vrt)


def test_snapshot_copies_images_and_the_hash_covers_their_bytes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    records = colour_records(src)
    inline = base64.b64encode(encode(picture(20, 10, seed=3))).decode()
    records.append(
        _user({"type": "image_url", "image_url": {"url": f"data:image/png;base64,{inline}"}})
    )
    path = write_jsonl(src / "colours.jsonl", records)
    rules = ImageRules()
    info = inspect_dataset(path, rules)
    assert (info.records, info.images, info.image_line) == (10, 10, 1)
    assert info.source_sha256 == file_sha256(path) != info.sha256
    folder = tmp_path / "datasets"
    snap = snapshot(info, folder, rules)
    assert snap.name == f"{info.sha256}.jsonl" and file_sha256(snap) == info.sha256
    stored = sorted(p.name for p in (folder / "images").iterdir())
    assert len(stored) == 4  # three colours (each named by three records) and the inline one
    lines = [json.loads(x) for x in snap.read_text().splitlines()]
    assert lines[0]["messages"][0]["content"][0]["image"].startswith("images/")
    assert lines[1]["messages"][0]["content"][1]["image_url"]["url"].startswith("images/")
    assert (
        lines[2]["images"][0].startswith("images/")
        and lines[2]["question"] == "<image>Which colour?"
    )
    assert lines[9]["messages"][0]["content"][0]["image_url"]["url"].startswith("images/")

    # the run reads the copies, whatever happens to the user's files
    _solid(src / "img" / "red.png", (0, 0, 0))
    examples = read_examples(snap)
    assert all(
        s.path is not None and s.path.parent.name == "images" for e in examples for s in e.images
    )
    from PIL import Image

    assert Image.open(examples[0].images[0].path).getpixel((0, 0)) == COLOURS[0][1]
    assert examples[2].messages[0]["content"] == [
        {"type": "image"},
        {"type": "text", "text": "Which colour?"},
    ]

    # one image's bytes changed: another dataset hash (and another evaluation key)
    changed = inspect_dataset(path, rules)
    assert changed.sha256 != info.sha256 and changed.source_sha256 == info.source_sha256

    # a text dataset keeps its own file's hash (the keys of reports cached before)
    text = write_jsonl(tmp_path / "t.jsonl", [{"question": "a", "answer": "b"}])
    assert inspect_dataset(text).sha256 == file_sha256(text)

    # a snapshot image tampered with: the task refuses it rather than train on other pixels
    from yichui.training.trainer import check_snapshot

    ref = DatasetRef(path=str(snap), sha256=info.sha256, records=info.records)
    check_snapshot(ref)
    victim = folder / "images" / stored[0]
    victim.write_bytes(png(8, 8))
    with pytest.raises(TaskFailedError, match=r"image images/.* is missing or changed"):
        check_snapshot(ref)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_encoding_labels_and_lora_targets(family: str, tmp_path: Path) -> None:
    """Per family: labels cover the answer alone, the prompt's length counts the image tokens,
    a batch of examples with different images (and one without) trains through the collator,
    and LoRA lands on the language model only (the projector with ``train_projector``)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from yichui.ml.loading import load_model, load_processor
    from yichui.training.targets import lora_targets
    from yichui.training.vision_data import VisionCollator, VisionEncoder

    path = FAMILIES[family](tmp_path / family)
    processor = load_processor(path, family)
    encoder = VisionEncoder(processor, model=family, max_length=512, bounds=(56 * 56, 112 * 112))
    folder = tmp_path / "data"
    folder.mkdir()
    records = [*colour_records(folder)[:2], {"question": "Hello?", "answer": "hi there"}]
    examples = read_examples(write_jsonl(folder / "d.jsonl", records))
    feats = [encoder.features(ex) for ex in examples]
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    for ex, f in zip(examples, feats, strict=True):
        ids, labels = f["input_ids"][0].tolist(), f["labels"][0].tolist()
        answer = [t for t in labels if t != -100]
        start = labels.index(answer[0])
        assert all(t == -100 for t in labels[:start]) and labels[start:] == ids[start:]
        assert processor.tokenizer.decode(answer, skip_special_tokens=True).strip() == ex.answers[0]
        assert (image_id in ids[:start]) == bool(ex.images)  # the image's tokens: prompt side
    batch = VisionCollator(processor.tokenizer.pad_token_id)(feats)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape

    model = load_model(path, family, device="cpu", dtype="float32", kind="multimodal")
    targets, to_save = lora_targets(model, (), multimodal=True, train_projector=True)
    peft_model = get_peft_model(
        model,
        LoraConfig(r=4, target_modules=targets, modules_to_save=to_save, task_type="CAUSAL_LM"),
    )
    trained = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    lora = [n for n in trained if "lora_" in n]
    assert lora and all(("language_model." in n or "text_model." in n) for n in lora)
    assert to_save and all(to_save[0] in n for n in trained if "lora_" not in n)
    loss = peft_model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    with pytest.raises(TrainingError, match="has no module named nope"):
        lora_targets(model, ("nope",), multimodal=True)


def _answers(rt: Runtime, name: str, image: Path) -> str:
    """A greedy answer of ``name`` (a model or base@adapter) to an image question, through
    ``load_model`` + the processor as evaluation asks (the engine's API path is the slow test's)."""
    from yichui.ml.loading import apply_adapter, load_model, load_processor
    from yichui.models.targets import resolve_target
    from yichui.training.dataset import parse_record
    from yichui.training.eval_inputs import VisionInputs

    target = resolve_target(rt.registry, name)
    base = Path(target.base.path or "")
    adapter = Path(target.adapter.path) if target.adapter and target.adapter.path else None
    model = load_model(base, name, device="cpu", dtype="float32", kind="multimodal")
    if adapter is not None:
        model = apply_adapter(model, adapter, name, merge=True)
    inputs = VisionInputs(
        load_processor(base, name, adapter=adapter),
        model=name,
        max_length=256,
        bounds=(3136, 12544),
    )
    _shape, ex = parse_record(
        {"question": "<image>What colour is this?", "answer": "?", "images": [str(image)]},
        1,
        image.parent / "q.jsonl",
        ImageRules(roots=(image.parent,)),
    )
    asked = inputs.asked([ex])
    out = model.generate(**asked, max_new_tokens=6, do_sample=False)
    return str(
        inputs.tokenizer.decode(out[0, asked["input_ids"].shape[1] :], skip_special_tokens=True)
    )


def test_train_merge_evaluate_an_image_dataset(
    make_rt: Callable[..., Runtime], tmp_path: Path
) -> None:
    """LLaVA: a 3-step LoRA (the projector too) in a burst worker, its adapter registered with
    the processor; merged into a multimodal model; both answer an image question; evaluated
    twice, the second answered from the cache."""
    rt = make_rt()
    build_llava(rt.settings.models_path / VL)
    data = write_jsonl(tmp_path / "colours.jsonl", colour_records(tmp_path))
    t = rt.training.train(
        VL, data, output="vl-ft", max_steps=3, batch_size=2, save_steps=2, train_projector=True
    )
    assert run_burst(rt)["succeeded"] == 1
    status = rt.tasks.get(t["id"])
    assert status["state"] == "succeeded", status.get("error")
    assert (status["progress"]["step"], status["progress"]["total"]) == (3, 3)
    assert status["progress"]["metrics"]["loss"] > 0
    assert status["args"]["vision_max_pixels"] == rt.settings.vision_max_pixels
    adapter = rt.registry.status("vl-ft").status
    assert adapter.kind == "adapter"
    files = {p.name for p in Path(adapter.path or "").iterdir()}
    assert {"adapter_config.json", "tokenizer_config.json", "chat_template.jinja"} <= files
    assert "processor_config.json" in files or "preprocessor_config.json" in files
    config = json.loads((Path(adapter.path or "") / "adapter_config.json").read_text())
    assert "language_model" in config["target_modules"] and config["modules_to_save"]
    assert (Path(t["run_dir"]) / "checkpoints" / "checkpoint-2").is_dir()

    m = rt.training.merge("vl-ft")
    assert run_burst(rt)["succeeded"] == 1
    merged = rt.registry.status(m["output"]).status
    assert merged.exists and merged.kind == "multimodal"
    assert rt.tasks.get(m["id"])["result"]["kind"] == "multimodal"
    image = _solid(tmp_path / "red.png", COLOURS[0][1])
    via_merge, via_adapter = _answers(rt, m["output"], image), _answers(rt, f"{VL}@vl-ft", image)
    assert via_merge.strip() and via_merge == via_adapter  # float32 both: the same weights

    first = rt.training.evaluate(m["output"], data, max_new_tokens=4)
    assert not first.cached
    assert run_burst(rt)["succeeded"] == 1
    report = rt.tasks.get(first.task["id"] if first.task else "")["result"]
    assert report["records"] == 9 and report["loss"] > 0 and report["exact_match"] is not None
    assert report["samples"][0]["question"] == "<image>What colour is this?"
    again = rt.training.evaluate(m["output"], data, max_new_tokens=4)
    assert again.cached and again.key == first.key and again.report == report
    other = rt.training.evaluate(f"{VL}@vl-ft", data, max_new_tokens=4)
    assert not other.cached  # another model, another key


# -- a worker SIGKILLed mid-training, the run resumed; served through the API ---------------------
@pytest.fixture
def harness(redis_url: str, tmp_path: Path) -> Iterator[Any]:
    from tests.test_tasks_faults import Harness

    h = Harness(redis_url, tmp_path)
    build_qwen2_vl(h.rt.settings.models_path / VL)
    yield h
    h.close()


def _steps(run_dir: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run_dir / "logging.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_sigkill_resume_merge_and_serve(harness: Any, tmp_path: Path) -> None:
    h = harness
    data = write_jsonl(tmp_path / "colours.jsonl", colour_records(tmp_path))
    t = h.rt.training.train(VL, data, output="vl-ft", max_steps=20, save_steps=4, batch_size=2)
    run_dir = Path(t["run_dir"])
    a = h.worker("A")
    h.wait_step(t["id"], 9, timeout=120)
    a.signal(signal.SIGKILL)
    a.wait(5)
    killed_at = max(_steps(run_dir))
    h.worker("B")
    final = h.wait_state(t["id"], TERMINAL, 240)
    assert final["state"] == "succeeded", final.get("error")
    assert final["attempt"] == 2 and final["last_error"]["type"] == "WorkerLost"
    result = final["result"]
    assert 8 <= result["resumed_from"] <= killed_at and result["resumed_from"] % 4 == 0
    assert result["steps"] == 20
    steps = _steps(run_dir)
    assert steps[-(20 - result["resumed_from"]) :] == list(range(result["resumed_from"] + 1, 21))

    m = h.rt.training.merge("vl-ft")
    wait_until(lambda: h.status(m["id"])["state"] in TERMINAL, 120, "merge")
    assert h.status(m["id"])["state"] == "succeeded"
    assert h.rt.registry.status("vl-ft-merged").status.kind == "multimodal"

    from tests.api_server import ServerProcess
    from tests.images import data_url

    settings = h.rt.settings
    server = ServerProcess(
        tmp_path, redis_url=str(settings.redis_url), models_root=str(settings.models_path)
    ).start(timeout=120)
    try:
        client = server.openai()
        ids = {model.id for model in client.models.list()}
        assert {"vl-ft-merged", f"{VL}@vl-ft"} <= ids
        url = data_url((tmp_path / "img" / "red.png").read_bytes())
        answers = {}
        for name in ("vl-ft-merged", f"{VL}@vl-ft"):
            reply = client.chat.completions.create(
                model=name,
                temperature=0,
                max_tokens=6,
                messages=[
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": url}},
                            {"type": "text", "text": "What colour is this?"},
                        ],
                    }
                ],
            )
            answers[name] = reply.choices[0].message.content or ""
        assert all(answers.values()), answers
    finally:
        server.stop()
    h.assert_clean()
