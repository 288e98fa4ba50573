"""ms-swift's model catalog: the dump, the snapshot against the live registry, searches, the
CLI and API that show it, and pulls of a catalog name (offline, from the hubs' SDK caches)."""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.test_cli import assert_one_line_error, run
from tests.test_huggingface_source import make_hf_cache
from tests.test_modelscope_source import make_ms_cache
from tests.test_tasks_cli import FAST
from yichui.api.app import create_app
from yichui.config import Settings
from yichui.errors import RequestError, SourceNotFoundError
from yichui.models import catalog, swift_registry
from yichui.models.catalog import Catalog, CatalogEntry, pull_target, snapshot
from yichui.models.status import MANIFEST
from yichui.runtime import Runtime

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "swift_catalog.py"

# glm_edge (text) and glm_edge_v (multimodal) list the same repo: ids that differ per hub
MS_ID, HF_ID = "ZhipuAI/glm-edge-4b-chat", "zai-org/glm-edge-4b-chat"
NO_HF_ID = "Qwen/Qwen3-Next-80B-A3B-Instruct"  # a ModelScope id only, in ms-swift 4.6.0
TWO_AT_MS = "baidu/ERNIE-4.5-0.3B-PT"  # the Hugging Face id of two ModelScope repos

needs_modelscope_hub = pytest.mark.skipif(
    importlib.util.find_spec("modelscope_hub") is None, reason="needs modelscope >= 1.38"
)


# -- the dump and the snapshot -----------------------------------------------------------------


FAKE_SWIFT = """
from dataclasses import dataclass, field

print("ms-swift says hello on stdout while it imports")


@dataclass
class Model:
    ms_model_id: str | None = None
    hf_model_id: str | None = None
    model_path: str | None = None


@dataclass
class ModelGroup:
    models: list
    template: str | None = None
    requires: list | None = None
    tags: list = field(default_factory=list)


@dataclass
class ModelMeta:
    model_type: str
    model_groups: list
    template: str | None = None
    architectures: list = field(default_factory=list)
    is_multimodal: bool = False
    is_reward: bool = False
    task_type: str | None = None
    requires: list = field(default_factory=list)
    tags: list = field(default_factory=list)


MODEL_MAPPING = {
    "zeta": ModelMeta(
        "zeta",
        [
            ModelGroup([Model("Z/zeta-1", "Zh/zeta-1")]),
            ModelGroup([Model("Z/zeta-2")], template="zeta2", requires=["x>1"], tags=["math"]),
        ],
        template="zeta",
        architectures=["ZetaForCausalLM"],
        requires=["transformers>=4"],
        tags=["coding"],
    ),
    "alpha_vl": ModelMeta(
        "alpha_vl",
        [ModelGroup([Model(None, "A/alpha-vl"), Model(model_path="/only/a/path")])],
        template="alpha",
        is_multimodal=True,
    ),
    "rm": ModelMeta("rm", [ModelGroup([Model("R/rm", "R/rm")])], is_reward=True),
    "empty": ModelMeta("empty", []),
}
"""


def fake_swift_python(tmp_path: Path) -> Path:
    """An interpreter with a fake ms-swift 9.9.9 and nothing else: no site-packages (-S), so
    neither yichui nor any package of this venv is importable there."""
    lib = tmp_path / "lib"
    (lib / "swift" / "model").mkdir(parents=True)
    (lib / "swift" / "__init__.py").write_text("")
    (lib / "swift" / "model" / "__init__.py").write_text(FAKE_SWIFT)
    meta = lib / "ms_swift-9.9.9.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: ms-swift\nVersion: 9.9.9\n")
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nPYTHONPATH={lib} exec {sys.executable} -S "$@"\n')
    python.chmod(0o755)
    return python


def test_the_dump_takes_the_groups_fields_over_the_types_in_order(
    settings: Settings, tmp_path: Path
) -> None:
    python = fake_swift_python(tmp_path)
    no_yichui = subprocess.run([str(python), "-c", "import yichui"], capture_output=True)
    assert no_yichui.returncode != 0  # the dump runs where yichui is not importable
    found = catalog.live(settings.model_copy(update={"swift_python": python}))
    assert (found.ms_swift, found.origin) == ("9.9.9", "swift")
    rows = [(e.model_type, e.ms_model_id, e.hf_model_id, e.template) for e in found.entries]
    assert rows == [  # types sorted, ms-swift's order inside one; a bare local path left out
        ("alpha_vl", None, "A/alpha-vl", "alpha"),
        ("rm", "R/rm", "R/rm", None),
        ("zeta", "Z/zeta-1", "Zh/zeta-1", "zeta"),
        ("zeta", "Z/zeta-2", None, "zeta2"),
    ]
    alpha, rm, zeta1, zeta2 = found.entries
    assert (alpha.kind, rm.kind, zeta1.kind) == ("multimodal", "text", "text")
    assert (rm.task, zeta1.task) == ("reward", None)
    assert zeta1.requires == ("transformers>=4",) and zeta2.requires == ("x>1",)
    assert zeta1.tags == ("coding",) and zeta2.tags == ("coding", "math")
    assert zeta1.architectures == ("ZetaForCausalLM",)


def test_the_dump_imports_the_standard_library_and_ms_swift_only() -> None:
    tree = ast.parse(Path(swift_registry.__file__).read_text())
    modules = {
        (alias.name if isinstance(node, ast.Import) else node.module or "").split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert modules - {"__future__", "swift"} <= sys.stdlib_module_names, modules


def test_the_snapshot_is_package_data_written_as_the_tool_writes_it() -> None:
    spec = importlib.util.spec_from_file_location("swift_catalog_tool", TOOL)
    assert spec is not None and spec.loader is not None
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    shipped = Path(catalog.__file__).with_name(catalog.SNAPSHOT)
    assert tool.render(snapshot().to_dump()) == shipped.read_text(encoding="utf-8")
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"models/swift_catalog.json"' in pyproject  # in the wheel, beside this module


@pytest.mark.slow
def test_the_snapshot_is_the_live_registry_of_its_ms_swift(
    settings: Settings, swift_python: Path
) -> None:
    found = catalog.live(settings.model_copy(update={"swift_python": swift_python}))
    shipped = snapshot()
    assert found.ms_swift == shipped.ms_swift, "regenerate it: tools/swift_catalog.py"
    assert found.entries == shipped.entries, "regenerate it: tools/swift_catalog.py"
    kinds = {e.model_type: e.kind for e in found.entries}
    assert len(found.entries) > 1000 and list(kinds.values()).count("multimodal") > 100


# -- searching ---------------------------------------------------------------------------------


def test_search_is_every_word_in_any_field_any_case_and_by_kind() -> None:
    cat = snapshot()
    edge = cat.search("GLM-Edge")
    assert {e.model_type for e in edge} == {"glm_edge", "glm_edge_v"}
    assert [e.model_type for e in cat.search("glm-edge", kind="multimodal")] == [
        "glm_edge_v",
        "glm_edge_v",
    ]
    assert cat.search("zai-org glm-edge 4b") == [e for e in edge if "4b" in (e.ms_model_id or "")]
    by_template = cat.search("chatglm4", kind="text")  # the effective template matches too
    assert by_template and all(
        "chatglm4" in f"{e.model_type} {e.ms_model_id} {e.hf_model_id} {e.template}".lower()
        for e in by_template
    )
    assert len(cat.search()) == len(cat.entries)
    assert len(cat.search(kind="text")) + len(cat.search(kind="multimodal")) == len(cat.entries)
    assert cat.search("no-such-model-anywhere") == []
    with pytest.raises(RequestError, match="unknown kind 'video'"):
        cat.search(kind="video")


def test_find_is_by_either_id_in_any_case() -> None:
    cat = snapshot()
    assert {e.model_type for e in cat.find(MS_ID.lower())} == {"glm_edge", "glm_edge_v"}
    assert cat.find(HF_ID.upper()) == cat.find(MS_ID)
    assert cat.find("glm_edge") == []  # a model type is no name (a family of repos)


# -- pulls of a catalog name -------------------------------------------------------------------


def test_a_catalog_name_pulls_the_id_of_its_source() -> None:
    assert pull_target(MS_ID, "huggingface").repo == pull_target(HF_ID, "huggingface").repo
    to_hf = pull_target(MS_ID, "huggingface")
    assert (to_hf.name, to_hf.repo) == (MS_ID, HF_ID) and to_hf.entry is not None
    to_ms = pull_target(HF_ID, "modelscope")
    assert (to_ms.name, to_ms.repo) == (HF_ID, MS_ID)
    typed = pull_target(MS_ID.lower(), "huggingface")  # named with the catalog's spelling
    assert (typed.name, typed.repo) == (MS_ID, HF_ID)
    # not mapped: a mirror folder, a repo given, a name the catalog does not have
    assert pull_target(MS_ID.lower(), "mirror") == catalog.PullTarget(MS_ID.lower(), MS_ID.lower())
    assert pull_target(MS_ID, "huggingface", "me/mine") == catalog.PullTarget(MS_ID, "me/mine")
    assert pull_target("acme/tiny-llm", "modelscope") == catalog.PullTarget(
        "acme/tiny-llm", "acme/tiny-llm"
    )


def test_a_catalog_name_without_an_id_at_the_source_or_with_two_is_refused() -> None:
    with pytest.raises(SourceNotFoundError, match="has no Hugging Face id") as err:
        pull_target(NO_HF_ID.lower(), "huggingface")
    assert err.value.hint and "--source modelscope" in err.value.hint
    assert err.value.name == NO_HF_ID and err.value.status == 404
    assert pull_target(NO_HF_ID, "modelscope").repo == NO_HF_ID
    with pytest.raises(RequestError, match="is 2 models at ModelScope") as two:
        pull_target(TWO_AT_MS, "modelscope")
    assert two.value.param == "name" and "--repo" in (two.value.hint or "")
    entries = (
        CatalogEntry("a", "x/one", "x/same", "text"),
        CatalogEntry("b", "x/ONE", "x/same", "text"),  # one repo in two spellings: one
    )
    assert pull_target("x/same", "modelscope", catalog=Catalog("0", "snapshot", entries)).repo


def hub_caches(tmp_path: Path) -> dict[str, str]:
    """Offline SDK caches holding the entry under each hub's own id, as the subprocess env."""
    make_hf_cache(tmp_path / "hf", repo=HF_ID)
    make_ms_cache(tmp_path / "ms", repo=MS_ID)
    return {
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(tmp_path / "hf"),
        "MODELSCOPE_CACHE": str(tmp_path / "ms"),
    }


def manifest_repo(settings: Settings, name: str) -> tuple[str, str]:
    shown = json.loads(run(settings, "models", "status", name, "--json").stdout)
    manifest = json.loads((Path(shown["path"]) / MANIFEST).read_text())
    return manifest["source"], manifest["repo"]


@needs_modelscope_hub
def test_models_pull_fetches_a_catalog_name_from_either_hub(
    settings: Settings, tmp_path: Path
) -> None:
    env = hub_caches(tmp_path)
    dry = run(
        settings, "models", "pull", MS_ID.lower(), "--source", "hf", "--dry-run", "--json", **env
    )
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["plan"]["repo"] == HF_ID
    hf = run(settings, "models", "pull", MS_ID.lower(), "--source", "hf", "--json", **env)
    assert hf.returncode == 0, hf.stderr
    assert json.loads(hf.stdout)["name"] == MS_ID  # the catalog's spelling
    assert manifest_repo(settings, MS_ID) == ("huggingface", HF_ID)
    ms = run(settings, "models", "pull", HF_ID, "--source", "ms", **env)
    assert ms.returncode == 0, ms.stderr
    assert f"ModelScope id {MS_ID}" in ms.stderr and f"{HF_ID}: pulled" in ms.stdout
    assert manifest_repo(settings, HF_ID) == ("modelscope", MS_ID)
    refused = run(settings, "models", "pull", NO_HF_ID, "--source", "hf", **env)
    assert_one_line_error(refused, 1, f"'{NO_HF_ID}' has no Hugging Face id")


@needs_modelscope_hub
def test_a_queued_pull_of_a_catalog_name_fetches_the_sources_id(
    settings: Settings, runtime: Runtime, tmp_path: Path
) -> None:
    env = hub_caches(tmp_path)
    detached = run(settings, "models", "pull", MS_ID, "--source", "hf", "--detach", "--json")
    assert detached.returncode == 0, detached.stderr
    assert json.loads(detached.stdout)["args"]["repo"] == HF_ID
    # queued by name alone (`tasks submit`, a script): the worker maps it the same way
    plain = runtime.tasks.submit("download", {"name": HF_ID, "source": "modelscope"})
    assert plain["args"]["repo"] is None
    worker = run(settings, "worker", "--burst", "-n", "1", **FAST, **env)
    assert worker.returncode == 0, worker.stderr
    assert runtime.tasks.get(plain["id"])["state"] == "succeeded"
    assert manifest_repo(settings, MS_ID) == ("huggingface", HF_ID)
    assert manifest_repo(settings, HF_ID) == ("modelscope", MS_ID)


# -- the CLI and the API -----------------------------------------------------------------------


def test_models_catalog_searches_and_prints_json_or_a_table(settings: Settings) -> None:
    proc = run(
        settings, "models", "catalog", "--search", "glm-edge", "--kind", "multimodal", "--json"
    )
    assert proc.returncode == 0, proc.stderr
    listed = json.loads(proc.stdout)
    assert [e["model_type"] for e in listed] == ["glm_edge_v", "glm_edge_v"]
    assert listed == [e.to_dict() for e in snapshot().search("glm-edge", kind="multimodal")]
    table = run(settings, "models", "catalog", "-s", "glm-edge-4b", COLUMNS="200")
    assert table.returncode == 0 and HF_ID in table.stdout and MS_ID in table.stdout
    assert f"2 of {len(snapshot().entries)} models, ms-swift {snapshot().ms_swift}" in table.stdout
    none = run(settings, "models", "catalog", "--search", "no-such-model-anywhere")
    assert_one_line_error(none, 1, "no model of ms-swift")
    assert proc.stdout and none.stdout == ""
    bad = run(settings, "models", "catalog", "--kind", "video")
    assert_one_line_error(bad, 2, "Invalid value for '--kind'")


def test_models_catalog_from_swift_without_ms_swift_says_how_to_install_it(
    settings: Settings,
) -> None:
    proc = run(
        settings, "models", "catalog", "--source", "swift", YICHUI_SWIFT_PYTHON=sys.executable
    )
    assert_one_line_error(proc, 1, "ms-swift is not installed in")
    assert "make swift" in proc.stderr


async def test_the_api_lists_the_catalog_and_pulls_a_name_by_the_sources_id(
    runtime: Runtime,
) -> None:
    transport = httpx.ASGITransport(app=create_app(runtime=runtime), client=("127.0.0.1", 1))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        page = (await client.get("/api/catalog", params={"search": "glm-edge", "limit": 3})).json()
        multimodal = await client.get(
            "/api/catalog", params={"search": "edge", "kind": "multimodal"}
        )
        bad_kind = await client.get("/api/catalog", params={"kind": "video"})
        pulled = await client.post("/api/models/pull", json={"name": MS_ID.lower(), "source": "hf"})
        plain = await client.post("/api/models/pull", json={"name": "acme/x", "source": "hf"})
        refused = await client.post("/api/models/pull", json={"name": NO_HF_ID, "source": "hf"})
        schema = (await client.get("/openapi.json")).json()
    assert (page["total"], page["limit"], len(page["data"])) == (4, 3, 3)
    assert page["ms_swift"] == snapshot().ms_swift and page["origin"] == "snapshot"
    assert {e["kind"] for e in multimodal.json()["data"]} == {"multimodal"}
    assert bad_kind.status_code == 400 and bad_kind.json()["error"]["param"] == "kind"
    assert pulled.status_code == 202, pulled.text
    args: dict[str, Any] = pulled.json()["args"]
    assert (args["name"], args["repo"], args["source"]) == (MS_ID, HF_ID, "hf")
    assert plain.json()["args"]["repo"] is None  # not a catalog name: as before
    assert refused.status_code == 404 and "no Hugging Face id" in refused.json()["error"]["message"]
    assert "/api/catalog" in schema["paths"]
