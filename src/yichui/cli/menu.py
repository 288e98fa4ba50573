"""The interactive menu: ``yichui`` with no arguments on a terminal (the old wizard's face).

::

    code = run_menu(load_settings())      # 0 after "Exit", 130 after Ctrl-C at the menu

Each step asks with questionary (imported here, when the menu opens, so ``yichui --help`` stays
fast), then calls the services the CLI calls: names are checked by ``validate_name`` as they
are typed, a hub pull offers a search of ms-swift's catalog (``yichui.models.catalog``), pulls
go through ``rt.sources`` and ``pull_model``, imports through
``import_path``, fine-tune / merge / evaluate through ``rt.training`` (the dataset is checked
line by line before anything is queued), tasks through ``rt.tasks`` and ``watch_task``. A
service's error is printed as the CLI prints it (``error: …`` and maybe a ``hint: …``) and the
menu comes back. Ctrl-C (or Ctrl-D) in a prompt or in the middle of a step goes back to the
menu; at the menu it leaves.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from yichui.cli.models import PULL_VERBS, byte_progress
from yichui.cli.output import console, err_console, human_size
from yichui.cli.tasks import watch_task
from yichui.config import Settings
from yichui.errors import SourceNotFoundError, YichuiError
from yichui.models.names import validate_name
from yichui.runtime import Runtime

if TYPE_CHECKING:
    from questionary import Choice, Question

EXIT_INTERRUPTED = 130

HUB_SUGGESTIONS = (
    "Qwen/Qwen2.5-0.5B-Instruct",
    "Qwen/Qwen2.5-1.5B-Instruct",
    "Qwen/Qwen2.5-7B-Instruct",
    "HuggingFaceTB/SmolLM2-135M-Instruct",
)
"""Offered first (not required) when typing a hub model id; any valid id can be typed."""

CATALOG_MATCHES = 30
"""At most this many matches of a catalog search are offered to pick from."""

TYPE_IT = ":type"  # not a model name (no ':' in one): "type an id instead" in a list of ids

DEFAULT_STEPS = 20
"""Fine-tuning steps the menu proposes (a short run to see that it works)."""

BACK = "back"


class Back(Exception):
    """The user left a step (Ctrl-C, Ctrl-D or "Back"): return to the menu."""


def run_menu(settings: Settings) -> int:
    """Open the menu on this terminal -> the exit status."""
    rt = Runtime(settings)
    try:
        return Menu(rt).loop()
    finally:
        rt.close()


def _ask(question: Question) -> Any:
    """The answer; :class:`Back` when the user pressed Ctrl-C or Ctrl-D."""
    try:
        answer = question.unsafe_ask()
    except (KeyboardInterrupt, EOFError):
        raise Back from None
    if answer is None or answer == BACK:
        raise Back
    return answer


def _name_check(allow_empty: bool = False) -> Callable[[str], bool | str]:
    """A questionary validator with the CLI's rule and message for a model name."""

    def check(text: str) -> bool | str:
        if allow_empty and not text.strip():
            return True
        try:
            validate_name(text.strip())
        except YichuiError as exc:
            return exc.message
        return True

    return check


def _positive_int(text: str) -> bool | str:
    return True if text.strip().isdigit() and int(text) > 0 else "a whole number above 0"


def _dataset_check(text: str) -> bool | str:
    """The whole file is read here, as ``yichui train`` reads it before queueing."""
    from yichui.training.dataset import inspect_dataset

    try:
        inspect_dataset(text.strip())
    except YichuiError as exc:
        return exc.message
    return True


def print_error(exc: YichuiError) -> None:
    """An error as the CLI prints it: one line, maybe a hint."""
    err_console.print(f"[red]error:[/red] {exc.message}", highlight=False)
    if exc.hint:
        err_console.print(f"hint: {exc.hint}", highlight=False)


class Menu:
    """The menu's loop and its steps, over one runtime."""

    def __init__(self, rt: Runtime) -> None:
        import questionary  # only the menu needs it

        self.q = questionary
        self.rt = rt
        self.current: str | None = None
        """The model last pulled or used: the default of the next step."""
        self.debug = os.environ.get("YICHUI_DEBUG", "") not in ("", "0", "false")

    def loop(self) -> int:
        actions: dict[str, tuple[str, Callable[[], None]]] = {
            "pull": ("Pull a model (ModelScope, Hugging Face, the mirror, a GGUF file)", self.pull),
            "chat": ("Chat with a model", self.chat),
            "train": ("Fine-tune a model (LoRA)", self.train),
            "merge": ("Merge an adapter into its base", self.merge),
            "eval": ("Evaluate a model", self.evaluate),
            "tasks": ("Watch tasks", self.tasks),
            "models": ("List models", self.models),
        }
        choices = [self.q.Choice(title, value=key) for key, (title, _) in actions.items()]
        choices.append(self.q.Choice("Exit", value="exit"))
        console.print("[bold]一锤 yichui[/bold] — Ctrl-C goes back (at this menu: leaves)")
        default = "pull"
        while True:
            try:
                choice = _ask(
                    self.q.select(
                        "What do you want to do?", choices, default=default, use_shortcuts=True
                    )
                )
            except Back:
                console.print("bye")
                return EXIT_INTERRUPTED
            if choice == "exit":
                return 0
            default = choice
            self._step(actions[choice][1])

    def _step(self, action: Callable[[], None]) -> None:
        try:
            action()
        except Back:
            console.print("[dim]back to the menu[/dim]")
        except KeyboardInterrupt:
            console.print("[dim]interrupted; back to the menu[/dim]")
        except typer.Exit:  # watch_task after Ctrl-C: it said so already
            pass
        except YichuiError as exc:
            if self.debug:
                raise
            print_error(exc)
        except Exception as exc:  # the menu stays up; YICHUI_DEBUG=1 for the traceback
            if self.debug:
                raise
            first = str(exc).splitlines()[0] if str(exc) else ""
            err_console.print(
                f"[red]error:[/red] unexpected {type(exc).__name__}: {first}", highlight=False
            )

    # -- picking models ---------------------------------------------------------------------

    def _installed(self, *, adapters: bool) -> list[str]:
        """Installed models: the adapters, or every other model."""
        from yichui.models.targets import ADAPTER_KIND

        models = self.rt.registry.listing().models
        return [m["name"] for m in models if (m.get("kind") == ADAPTER_KIND) == adapters]

    def _targets(self) -> list[str]:
        """The models, then each adapter on its base (``base@adapter``, served unmerged)."""
        from yichui.models.status import read_manifest

        out = self._installed(adapters=False)
        for adapter in self._installed(adapters=True):
            st = self.rt.registry.status(adapter).status
            base = read_manifest(Path(st.path or "")).get("base")
            if base:
                out.append(f"{base}@{adapter}")
        return out

    def _pick_model(self, message: str, names: list[str], *, none: str) -> str:
        if not names:
            raise YichuiError(none)
        default = self.current if self.current in names else names[0]
        choices: list[str | Choice] = [*names, self.q.Choice("← Back", value=BACK)]
        picked: str = _ask(self.q.select(message, choices, default=default))
        return picked

    # -- the steps ---------------------------------------------------------------------------

    def pull(self) -> None:
        """Pick a source, pick or type a model id, fetch it with a progress bar."""
        mirror = self.rt.settings.mirror_dir
        sources = [  # fixed keys: the mirror keeps its number when it is not configured
            self.q.Choice("ModelScope", value="modelscope", shortcut_key="1"),
            self.q.Choice("Hugging Face", value="huggingface", shortcut_key="2"),
            self.q.Choice(
                "The local mirror" + (f" ({mirror})" if mirror else ""),
                value="mirror",
                disabled=None if mirror else "set YICHUI_MIRROR_DIR",
                shortcut_key="3",
            ),
            self.q.Choice(
                "A GGUF file (or a model folder) on this machine", value="gguf", shortcut_key="4"
            ),
            self.q.Choice("← Back", value=BACK, shortcut_key="0"),
        ]
        source = _ask(
            self.q.select(
                "Pull from where?",
                sources,
                default="mirror" if mirror else "modelscope",
                use_shortcuts=True,
            )
        )
        if source == "gguf":
            self._import()
            return
        if source == "mirror":
            repo = _ask(
                self.q.autocomplete(
                    "Model id (type it; Tab shows suggestions):",
                    choices=_mirror_models(mirror) if mirror else [],
                    validate=_name_check(),
                )
            ).strip()
        else:
            repo = self._from_catalog(source)
        self._fetch(source, repo)

    def _from_catalog(self, source: str) -> str:
        """A hub id: picked from a search of ms-swift's catalog, or typed (any id will do)."""
        from yichui.models.catalog import HUB_TITLES, snapshot

        catalog, title = snapshot(), HUB_TITLES[source]
        at_source: dict[str, list[str]] = {}  # its id there -> "kind · model type" of each entry
        for e in catalog.entries:
            if (repo := e.repo_for(source)) is not None:
                at_source.setdefault(repo, []).append(f"{e.kind} · {e.model_type}")
        query = _ask(
            self.q.text(
                f"Search ms-swift's catalog ({len(at_source)} models at {title}; "
                "empty: type the id):"
            )
        ).strip()
        if query:
            found = list(
                dict.fromkeys(r for e in catalog.search(query) if (r := e.repo_for(source)))
            )
            if not found:
                console.print(f"nothing at {title} in the catalog matches {query!r}")
            else:
                if len(found) > CATALOG_MATCHES:
                    console.print(
                        f"{len(found)} matches, the first {CATALOG_MATCHES} below: more words "
                        "narrow the search",
                        highlight=False,
                    )
                choices: list[Choice] = [
                    self.q.Choice(f"{r:<52} {', '.join(at_source[r])}", value=r)
                    for r in found[:CATALOG_MATCHES]
                ]
                choices += [
                    self.q.Choice("Type an id instead", value=TYPE_IT),
                    self.q.Choice("← Back", value=BACK),
                ]
                picked = str(_ask(self.q.select("Pull which model?", choices)))
                if picked != TYPE_IT:
                    return picked
        suggestions = list(dict.fromkeys([*HUB_SUGGESTIONS, *at_source]))
        meta = {r: ", ".join(v) for r, v in at_source.items()}
        return str(
            _ask(
                self.q.autocomplete(
                    "Model id (type it; suggestions from the catalog as you type):",
                    choices=suggestions,
                    meta_information=meta,
                    match_middle=True,
                    validate=_name_check(),
                )
            )
        ).strip()

    def _fetch(self, source_name: str, repo: str) -> None:
        from yichui.models.catalog import HUB_TITLES, pull_target
        from yichui.models.pull import pull_model
        from yichui.models.sources.base import PullSpec

        source = self.rt.sources.get(source_name)
        target = pull_target(repo, source.name)  # a catalog name: its id at this source
        name = target.name
        if target.entry is not None and target.repo != name:
            console.print(
                f"{name}: {HUB_TITLES[source.name]} id {target.repo} (ms-swift's catalog)",
                highlight=False,
            )
        bar, progress = byte_progress(console, f"pulling {target.repo}")
        started = time.monotonic()
        with bar:
            result = pull_model(
                self.rt.registry, source, name, PullSpec(repo=target.repo), progress=progress
            )
        assert result.status is not None
        console.print(
            f"[green]{name}: {PULL_VERBS.get(result.action, result.action)}[/green] — "
            f"{human_size(result.status.size)}, {result.status.files} files "
            f"({time.monotonic() - started:.1f} s)",
            highlight=False,
        )
        self.current = name

    def _import(self) -> None:
        from yichui.models.importer import bundled_gguf, import_path

        try:
            bundled: Path | None = bundled_gguf()
        except SourceNotFoundError:
            bundled = None
        path = Path(
            _ask(
                self.q.path(
                    "Path of the .gguf file (or model folder):",
                    default=str(bundled or ""),
                    validate=lambda t: Path(t).expanduser().exists() or "no such file or folder",
                )
            ).strip()
        ).expanduser()
        default = (
            self.rt.settings.default_model if bundled and path == bundled else _slug(path.stem)
        )
        name = _ask(
            self.q.text("Save it as model:", default=default, validate=_name_check())
        ).strip()
        with console.status(f"importing {path.name} as {name} (a large file takes minutes)…"):
            result = import_path(self.rt.registry, path, name)
        console.print(
            f"[green]{name}: {result.action}[/green] — {human_size(result.status.size)} "
            f"at {result.status.path}",
            highlight=False,
        )
        self.current = name

    def chat(self) -> None:
        from yichui.cli.menu_chat import chat_session

        model = self._pick_model(
            "Chat with which model?", self._targets(), none="no models yet: pull one first"
        )
        self.current = model

        async def prompt(message: str) -> str:
            try:
                text = await self.q.text(message).unsafe_ask_async()
            except (KeyboardInterrupt, EOFError):
                raise Back from None
            return str(text or "")

        asyncio.run(chat_session(self.rt, model, prompt))

    def train(self) -> None:
        """Ask for the model, the dataset and the steps; queue the task; offer to watch it."""
        model = self._pick_model(
            "Fine-tune which model?",
            self._installed(adapters=False),
            none="no models yet: pull one first",
        )
        dataset = self._dataset("Training set (JSONL: messages, prompt/completion or text):")
        steps = int(_ask(self.q.text("Steps:", default=str(DEFAULT_STEPS), validate=_positive_int)))
        output = _ask(
            self.q.text("Adapter name (empty: <model>-lora-<time>):", validate=_name_check(True))
        ).strip()
        t = self.rt.training.train(model, dataset, output=output or None, max_steps=steps)
        console.print(
            f"{t['id']}: fine-tune queued; adapter {t['output']}, run folder {t['run_dir']}",
            highlight=False,
        )
        self.current = model
        self._offer_watch(t["id"])

    def merge(self) -> None:
        adapter = self._pick_model(
            "Merge which adapter?",
            self._installed(adapters=True),
            none="no adapters yet: fine-tune a model first",
        )
        output = _ask(
            self.q.text(
                "Name of the merged model (empty: <adapter>-merged):", validate=_name_check(True)
            )
        ).strip()
        t = self.rt.training.merge(adapter, output=output or None)
        console.print(f"{t['id']}: merge queued; new model {t['output']}", highlight=False)
        self._offer_watch(t["id"])

    def evaluate(self) -> None:
        from yichui.state.task_store import TaskState
        from yichui.training.report import summary_lines

        model = self._pick_model("Evaluate which model?", self._targets(), none="no models yet")
        dataset = self._dataset("Evaluation set (JSONL):")
        sub = self.rt.training.evaluate(model, dataset)
        if sub.cached:
            report = sub.report or {}
            note = f"from the cache ({sub.source})"
        else:
            assert sub.task is not None
            console.print(f"{sub.task['id']}: evaluation queued", highlight=False)
            if self._offer_watch(sub.task["id"]) != TaskState.SUCCEEDED:
                return
            report = self.rt.tasks.get(sub.task["id"]).get("result") or {}
            note = "computed"
        for line in summary_lines(report):
            console.print(line, highlight=False, markup=False)
        console.print(f"[dim]({note})[/dim]")

    def tasks(self) -> None:
        from yichui.cli.tasks import _progress_text

        tasks = self.rt.tasks.listing(None, limit=30)
        if not tasks:
            console.print("no tasks yet")
            return
        choices = [
            self.q.Choice(
                f"{t['id']}  {t.get('type', '?'):<9} {t['state']:<9} "
                + _progress_text(t["progress"]),
                value=t["id"],
            )
            for t in tasks
        ]
        choices.append(self.q.Choice("← Back", value=BACK))
        task_id = _ask(self.q.select("Watch which task? (newest first)", choices))
        watch_task(self.rt, task_id)

    def models(self) -> None:
        listing = self.rt.registry.listing().models
        if not listing:
            console.print("no models yet: pull one")
        for m in listing:
            console.print(
                f"  {m['name']:<40} {m.get('kind') or '-':<10} {human_size(m.get('size')):>9}"
                f"  {m.get('source') or '-'}",
                highlight=False,
            )

    # -- helpers -----------------------------------------------------------------------------

    def _dataset(self, message: str) -> str:
        return str(_ask(self.q.path(message, validate=_dataset_check))).strip()

    def _offer_watch(self, task_id: str) -> str | None:
        """Ask whether to watch the task now -> its final state if watched to the end."""
        queue = self.rt.tasks.get(task_id).get("queue") or self.rt.settings.task_queue
        alive = any(w.get("queue") == queue for w in self.rt.tasks.alive_workers())
        if not alive:
            console.print(
                f"[yellow]no worker is alive on queue {queue!r}[/yellow]: it starts when one does "
                "(`yichui worker`, or `yichui serve --workers 1`, in another terminal)",
                highlight=False,
            )
        if not _ask(self.q.confirm("Watch it now? (Ctrl-C stops watching, not the task)", alive)):
            console.print(f"later: yichui tasks watch {task_id}", highlight=False)
            return None
        return watch_task(self.rt, task_id)


def _mirror_models(root: Path, limit: int = 500) -> list[str]:
    """Model ids in a mirror folder: ``name`` or ``org/name`` folders that hold files."""
    out: list[str] = []
    if not root.is_dir():
        return out
    for first in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if any(p.is_file() for p in first.iterdir()):
            out.append(first.name)
            continue
        for second in sorted(p for p in first.iterdir() if p.is_dir()):
            if not second.name.startswith("."):
                out.append(f"{first.name}/{second.name}")
        if len(out) >= limit:
            break
    return out[:limit]


def _slug(stem: str) -> str:
    """A model name from a file name (``SmolLM2-135M.Q4_1`` -> ``smollm2-135m.q4_1``)."""
    return re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-.") or "model"
