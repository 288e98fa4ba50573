"""What the README's Python snippets import is installed by `make run`, not only by `make test`."""

from __future__ import annotations

import ast
import re
import sys
import textwrap
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
# a fenced block, indented or not (the quick start's sits inside a list item)
PYTHON_BLOCK = re.compile(r"^([ \t]*)```python\n(.*?)^\1```", re.M | re.S)


def readme_imports(text: str) -> set[str]:
    """Top-level modules imported by the ```python blocks of a Markdown text."""
    names: set[str] = set()
    for match in PYTHON_BLOCK.finditer(text):
        for node in ast.walk(ast.parse(textwrap.dedent(match.group(2)))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def run_extras(makefile: str) -> list[str]:
    match = re.search(r"^RUN_EXTRAS\s*:?=\s*(\S+)\s*$", makefile, re.M)
    assert match, "no RUN_EXTRAS in the Makefile"
    return match.group(1).split(",")


def run_distributions(pyproject: dict[str, object], extras: list[str]) -> set[str]:
    """The distributions `pip install -e '.[extras]'` asks for by name (not their own deps)."""
    project = pyproject["project"]
    assert isinstance(project, dict)
    wanted = list(project["dependencies"])
    for extra in extras:
        wanted += project["optional-dependencies"][extra]
    names: set[str] = {canonicalize_name(project["name"])}
    for spec in wanted:
        req = Requirement(spec)
        if canonicalize_name(req.name) == canonicalize_name(project["name"]):
            names |= run_distributions(pyproject, sorted(req.extras))  # yichui[other]
        else:
            names.add(canonicalize_name(req.name))
    return names


def test_parsers_see_the_quick_start() -> None:
    text = "x\n\n  ```python\n  import a.b, c\n  from d.e import f\n  from . import g\n  ```\n"
    assert readme_imports(text) == {"a", "c", "d"}
    assert run_extras("X := 1\nRUN_EXTRAS := ml,hub\n") == ["ml", "hub"]
    assert "openai" in readme_imports((ROOT / "README.md").read_text())  # not vacuous


def test_readme_imports_come_with_make_run() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    provided = run_distributions(pyproject, run_extras((ROOT / "Makefile").read_text()))
    providers = packages_distributions()  # import name -> distributions (of this venv)
    missing = {}
    for module in sorted(readme_imports((ROOT / "README.md").read_text())):
        if module in sys.stdlib_module_names:
            continue
        dists = {canonicalize_name(d) for d in providers.get(module, [])}
        if not dists & provided:
            missing[module] = sorted(dists) or "not installed here"
    assert not missing, f"README imports that `make run` does not install: {missing}"
