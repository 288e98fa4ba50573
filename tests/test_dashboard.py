"""The web dashboard (``/ui``) in a real browser: Playwright driving Debian's chromium against
a real ``yichui serve --workers 1`` on a throwaway Redis with a tiny model.

One server (local mode) and one browser serve the module; the keys-mode tests get a second
server. Every page must log no console error and no CSP violation, except the failed requests a
test provokes on purpose. With ``YICHUI_SCREENSHOTS=<dir>`` the tests also save the PNGs of
``docs/dashboard.md`` there (``tools/screenshots.py``).
"""

from __future__ import annotations

import http.client
import os
import re
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api_server import ServerProcess
from tests.redis_proc import RedisProcess
from tests.tiny_model import build_tiny_model
from tests.training_fixtures import qa_records, write_jsonl
from yichui.access import hash_key
from yichui.api.ui import CSP

CHROMIUM = "/usr/bin/chromium"
SHOTS = os.environ.get("YICHUI_SCREENSHOTS")
USER_KEY = "yc-dashboard-user-key-0123456789"
ADMIN_KEY = "yc-dashboard-admin-key-0123456789"
FAILED_LOAD = re.compile(r"Failed to load resource: the server responded with a status of (\d+)")

playwright_api = pytest.importorskip("playwright.sync_api")
expect = playwright_api.expect


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("dashboard")
    build_tiny_model(work / "models" / "tiny")
    (work / "datasets").mkdir()
    write_jsonl(work / "datasets" / "qa.jsonl", qa_records())
    return work


@pytest.fixture(scope="module")
def dash_redis(workdir: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(workdir / "redis", aof=True).start()  # restarted by a test
    yield server
    server.stop()


def _server(workdir: Path, redis: RedisProcess, name: str, **settings: Any) -> ServerProcess:
    folder = workdir / name
    folder.mkdir()
    return ServerProcess(
        folder,
        redis_url=redis.url,
        args=("--workers", "1"),
        models_root=str(workdir / "models"),
        datasets_dir=str(workdir / "datasets"),
        task_progress_interval="0.1",
        **settings,
    ).start()


@pytest.fixture(scope="module")
def server(workdir: Path, dash_redis: RedisProcess) -> Iterator[ServerProcess]:
    proc = _server(workdir, dash_redis, "local")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"the browser tests need {CHROMIUM}: apt-get install chromium (make chromium)")
    with playwright_api.sync_playwright() as p:
        instance = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield instance
        instance.close()


class Console:
    """What a page logged: errors, CSP violations, uncaught exceptions."""

    def __init__(self, page: Any) -> None:
        self.problems: list[str] = []
        self.failed: list[int] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.problems.append(f"uncaught: {exc}"))

    def _console(self, message: Any) -> None:
        text = message.text
        if "Content-Security-Policy" in text or "Refused to" in text:
            self.problems.append(f"CSP: {text}")
        elif message.type == "error":
            failed = FAILED_LOAD.search(text)
            if failed:
                self.failed.append(int(failed.group(1)))
            else:
                self.problems.append(f"console error: {text}")

    def check(self, *, allowed: tuple[int, ...] = ()) -> None:
        assert self.problems == []
        assert [s for s in self.failed if s not in allowed] == []


@pytest.fixture
def page(browser: Any, server: ServerProcess) -> Iterator[tuple[Any, Console]]:
    context = browser.new_context(base_url=server.url, viewport={"width": 1280, "height": 860})
    tab = context.new_page()
    tab.set_default_timeout(20_000)
    console = Console(tab)
    yield tab, console
    context.close()


def shot(tab: Any, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        tab.screenshot(path=str(Path(SHOTS) / f"dashboard-{name}.png"), full_page=False)


# --- serving: no browser needed


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[dict[str, str | None]] = []
        self.handlers: list[str] = []
        self.styles = 0
        self._in_script = False
        self.inline = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handlers += [name for name, _ in attrs if name.startswith("on")]
        self.styles += tag == "style" or any(name == "style" for name, _ in attrs)
        if tag == "script":
            self.scripts.append(dict(attrs))
            self._in_script = True

    def handle_endtag(self, tag: str) -> None:
        self._in_script = self._in_script and tag != "script"

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.inline += data.strip()


def _raw_get(server: ServerProcess, path: str) -> int:
    """The status of ``path`` sent as it is (httpx would normalise ``..`` away)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


def test_the_page_and_its_assets_are_served_with_a_strict_policy(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.url) as client:
        for path in ("/ui", "/ui/"):
            r = client.get(path)
            assert r.status_code == 200
            assert r.headers["content-type"] == "text/html; charset=utf-8"
            assert r.headers["content-security-policy"] == CSP
            assert "script-src 'self';" in CSP and "unsafe" not in CSP
            assert r.headers["x-content-type-options"] == "nosniff"
            assert r.headers["x-frame-options"] == "DENY"
            assert r.headers["referrer-policy"] == "no-referrer"
        tags = _Tags()
        tags.feed(r.text)
        assert tags.scripts and all(
            s.get("src", "").startswith("/ui/static/") for s in tags.scripts
        )
        assert (tags.inline, tags.handlers, tags.styles) == ("", [], 0)

        js = client.get("/ui/static/app.js")
        assert js.status_code == 200
        assert js.headers["content-type"] == "text/javascript; charset=utf-8"
        assert js.headers["content-security-policy"] == CSP
        assert js.headers["cache-control"] == "no-cache"
        again = client.get("/ui/static/app.js", headers={"if-none-match": js.headers["etag"]})
        assert (again.status_code, again.content) == (304, b"")
        assert client.get("/ui/static/app.css").headers["content-type"].startswith("text/css")
        vendor = client.get("/ui/static/vendor/uPlot.iife.min.js")
        assert vendor.status_code == 200 and b"uPlot" in vendor.content

        missing = client.get("/ui/static/nope.js")
        assert missing.status_code == 404
        assert missing.json()["error"]["message"] == "no such dashboard file: nope.js"
        assert missing.headers["content-security-policy"] == CSP

        front = client.get("/", follow_redirects=False)
        assert front.status_code == 307 and front.headers["location"] == "/ui"
        paths = client.get("/openapi.json").json()["paths"]
        assert not [p for p in paths if p == "/" or p.startswith("/ui")]
    for path in (
        "/ui/static/../__init__.py",
        "/ui/static/%2e%2e/__init__.py",
        "/ui/static/vendor/../../__init__.py",
        "/ui/static/..%2f..%2fapi%2fui.py",
        "/ui/static/.hidden.js",
        "/ui/static//etc/passwd",
        "/ui/static/vendor/x/y/z.js",
        "/ui/static/__init__.py",
    ):
        assert _raw_get(server, path) == 404, path


# --- in the browser


def test_a_selftest_task_started_from_the_page_runs_live_through_a_reload(
    page: tuple[Any, Console],
) -> None:
    tab, console = page
    tab.goto("/ui#/tasks")
    tab.select_option("#task-type", "selftest")
    tab.fill("#arg-steps", "12")
    tab.fill("#arg-step_seconds", "0.4")
    tab.click("#task-form button[type=submit]")
    tab.wait_for_url(re.compile(r"#/tasks/t"))
    facts = tab.locator("#task-facts")
    bar = tab.locator("#task-progress progress")
    expect(facts).to_have_attribute("data-state", "running")
    expect(bar).to_have_attribute("value", re.compile(r"^[1-9]"))
    first = float(bar.get_attribute("value") or 0)
    expect(tab.locator("#task-logs")).to_contain_text("step 1/12")
    shot(tab, "task")
    task_id = tab.url.rsplit("/", 1)[-1]

    tab.goto("/ui#/tasks")  # the list shows it running, with its bar
    row = tab.locator(f'tr[data-task-id="{task_id}"]')
    expect(row).to_contain_text("running")
    shot(tab, "tasks")

    tab.goto(f"/ui#/tasks/{task_id}")
    tab.reload()  # mid-task: the same live state, from the API
    expect(facts).to_have_attribute("data-state", "running")
    moved = "v => Number(document.querySelector('#task-progress progress')?.value) > v"
    tab.wait_for_function(moved, arg=first)  # the bar moves on after the reload
    expect(tab.locator("#task-logs")).to_contain_text("step 1/12")  # the log replayed
    expect(facts).to_have_attribute("data-state", "succeeded", timeout=30_000)  # no reload
    expect(bar).to_have_attribute("value", "100")
    expect(tab.locator("#task-logs")).to_contain_text("step 12/12")
    expect(tab.locator("#task-result")).to_contain_text('"steps": 12')
    console.check()


def test_the_playground_marks_a_repeated_question_as_a_cache_hit(
    page: tuple[Any, Console],
) -> None:
    tab, console = page
    tab.goto("/ui#/playground")
    expect(tab.locator("#chat-model")).to_have_value("tiny")
    answers = tab.locator(".bubble-assistant")
    for n in (1, 2):
        tab.fill("#chat-input", "What is the capital of France?")
        tab.click("#chat-send")
        expect(answers).to_have_count(n)
        # the first answer loads the model, importing torch first: seconds on a loaded box
        expect(answers.nth(n - 1).locator(".latency")).to_have_text(
            re.compile(r"^\d+ ms$"), timeout=60_000
        )
    expect(answers.nth(0).locator(".badge")).to_have_text("miss")
    expect(answers.nth(1).locator(".badge")).to_have_text("hit")
    first, second = (answers.nth(i).locator(".bubble-text").inner_text() for i in (0, 1))
    assert first and first == second
    shot(tab, "playground")
    console.check()


def test_the_overview_shows_redis_workers_running_tasks_and_the_hit_rate(
    page: tuple[Any, Console], server: ServerProcess
) -> None:
    tab, console = page
    task = httpx.post(
        f"{server.url}/api/tasks",
        json={"type": "selftest", "args": {"steps": 100, "step_seconds": 0.2}},
    ).json()
    tab.goto("/ui#/overview")
    overview = tab.locator("#page-overview")
    expect(overview).to_contain_text("reachable")
    expect(overview).to_contain_text("noeviction")
    expect(tab.locator("#workers")).to_contain_text("yes")  # a live worker
    expect(tab.locator("#servers")).to_contain_text(server.url)
    running = tab.locator(f'#running tr[data-task-id="{task["id"]}"]')
    expect(running).to_contain_text("running")
    expect(running.locator("progress")).to_have_attribute("value", re.compile(r"^[1-9]"))
    expect(tab.locator("#hit-chart canvas")).to_have_count(1)
    # a miss and a hit of its own (the fleet's counters are flushed to Redis once a second),
    # then the page shows the hit rate the API reports
    ask = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "What does the overview count?"}],
        "temperature": 0,
        "max_tokens": 4,
    }
    for _ in range(2):
        httpx.post(f"{server.url}/v1/chat/completions", json=ask, timeout=60).raise_for_status()
    deadline, stats = time.monotonic() + 15, {}
    while time.monotonic() < deadline:
        stats = httpx.get(f"{server.url}/api/cache/stats").json()
        if stats.get("hit", 0) >= 1 and stats.get("miss", 0) >= 1:
            break
        time.sleep(0.2)
    assert stats.get("hit", 0) >= 1, stats  # the repeat was counted as a hit
    # the page shows a hit rate above zero (its exact figure moves as counts come in)
    expect(overview).to_contain_text(re.compile(r"Hit rate(?!0\.0 %)\d+\.\d %"), timeout=10_000)
    if SHOTS:
        tab.wait_for_timeout(3500)  # a second sample of the hit rate: a line on the chart
    shot(tab, "overview")
    httpx.post(f"{server.url}/api/tasks/{task['id']}/cancel").raise_for_status()
    expect(running).to_have_count(0, timeout=15_000)  # cancelled: gone by itself
    console.check()


def test_a_three_step_fine_tune_from_the_form_draws_its_loss(page: tuple[Any, Console]) -> None:
    tab, console = page
    tab.goto("/ui#/training")
    tab.select_option("#train-model", "tiny")
    tab.select_option("#dataset-pick", index=1)  # qa.jsonl of the datasets folder
    tab.fill("#train-output", "tiny-ui")
    tab.fill("#train-max_steps", "3")
    tab.fill("#train-learning_rate", "0.01")
    tab.click("#train-form button[type=submit]")
    tab.wait_for_url(re.compile(r"#/training/task/t"))
    points = tab.locator("#loss-points")
    expect(points).to_have_attribute("data-count", re.compile(r"^[1-9]"), timeout=60_000)
    expect(tab.locator("#loss-chart canvas")).to_have_count(1)
    expect(points).to_have_attribute("data-count", "3", timeout=60_000)
    expect(tab.locator("#run-actions")).to_contain_text("tiny-ui")  # merge, evaluate
    shot(tab, "training")
    tab.goto("/ui#/training")
    expect(tab.locator("#runs")).to_contain_text("tiny-ui")
    console.check()


def test_an_upload_with_a_bad_line_is_refused_in_the_page(
    page: tuple[Any, Console], tmp_path: Path
) -> None:
    tab, console = page
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a", "answer": "b"}\n[1, 2]\n')
    tab.goto("/ui#/training")
    tab.set_input_files("#dataset-file", str(bad))
    expect(tab.locator("#dataset-check")).to_have_text("bad.jsonl: line 2: not a JSON object")
    tab.select_option("#train-model", "tiny")
    tab.click("#train-form button[type=submit]")
    expect(tab.locator("#toasts [role=alert]")).to_contain_text("line 2")
    assert "#/training" in tab.url and "task" not in tab.url
    console.check()


def test_an_unknown_task_is_a_message_in_the_page_and_markup_stays_text(
    page: tuple[Any, Console],
) -> None:
    tab, console = page
    tab.goto("/ui#/tasks/no-such-task")
    expect(tab.locator("#toasts [role=alert]")).to_contain_text("404")
    expect(tab.locator("#task-missing")).to_contain_text("no-such-task")
    tab.goto("/ui#/tasks/<img src=x id=injected>")  # a name with markup is shown as text
    expect(tab.locator("#task-missing")).to_contain_text("<img src=x id=injected>")
    assert tab.locator("#injected").count() == 0
    console.check(allowed=(404,))


def test_the_models_page_searches_ms_swifts_catalog_into_the_pull_form(
    page: tuple[Any, Console],
) -> None:
    tab, console = page
    tab.goto("/ui#/models")
    expect(tab.locator("#catalog-note")).to_contain_text("1193 models of ms-swift 4.6.0")
    tab.fill("#catalog-form input[name=search]", "glm-edge 4b")
    tab.select_option("#catalog-form select[name=kind]", "multimodal")
    tab.click("#catalog-form button[type=submit]")
    rows = tab.locator("#catalog-list tbody tr")
    expect(rows).to_have_count(1)
    expect(tab.locator("#catalog-note")).to_contain_text("1 model of ms-swift")
    expect(rows.first).to_contain_text("zai-org/glm-edge-4b-chat")
    tab.select_option("#pull-form select[name=source]", "modelscope")
    rows.first.get_by_role("button", name="Use").click()  # the id at the chosen source
    expect(tab.locator("#pull-form input[name=name]")).to_have_value("ZhipuAI/glm-edge-4b-chat")
    shot(tab, "models")
    console.check()


# --- keys mode: sign-in, roles


@pytest.fixture(scope="module")
def keys_server(workdir: Path, dash_redis: RedisProcess) -> Iterator[ServerProcess]:
    keys = {
        hash_key(USER_KEY): {"tenant": "team-a", "role": "user"},
        hash_key(ADMIN_KEY): {"tenant": "ops", "role": "admin"},
    }
    proc = _server(workdir, dash_redis, "keys", auth="keys", api_keys=keys)
    yield proc
    proc.stop()


def test_a_user_key_signs_in_once_and_cannot_press_an_admin_action(
    browser: Any, keys_server: ServerProcess
) -> None:
    context = browser.new_context(base_url=keys_server.url)
    tab = context.new_page()
    tab.set_default_timeout(20_000)
    console = Console(tab)
    try:
        tab.goto("/ui#/cache")
        expect(tab.locator("#signin")).to_be_visible()
        tab.fill("#signin-key", "yc-wrong")
        tab.click("#signin-form button[type=submit]")
        expect(tab.locator("#toasts [role=alert]")).to_contain_text("refused")
        tab.fill("#signin-key", USER_KEY)
        tab.click("#signin-form button[type=submit]")
        expect(tab.locator("#whoami")).to_contain_text("team-a")
        expect(tab.locator("#cache-clear")).to_be_disabled()
        expect(tab.locator("#nav a[data-route=audit]")).to_be_hidden()
        cookie = next(c for c in context.cookies() if c["name"] == "yichui_session")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert USER_KEY not in tab.evaluate("JSON.stringify(localStorage) + location.href")
        # pressed anyway, through the page's own session: the API refuses it
        status = tab.evaluate(
            """async () => {
                const s = await (await fetch('/api/session')).json();
                const r = await fetch('/api/cache/clear', {method: 'POST',
                  headers: {'X-CSRF-Token': s.csrf, 'Content-Type': 'application/json'},
                  body: '{}', credentials: 'same-origin'});
                const none = await fetch('/api/cache/clear', {method: 'POST', body: '{}',
                  headers: {'Content-Type': 'application/json'}});
                return [r.status, none.status];
            }"""
        )
        assert status[0] == 403 and status[1] in (401, 403)  # no CSRF token: refused too
        tab.goto("/ui#/audit")  # an admin page opened by hand: the 403 is shown
        expect(tab.locator("#toasts [role=alert]").last).to_contain_text("403: ")
        tab.reload()  # the cookie session: no second sign-in
        expect(tab.locator("#whoami")).to_contain_text("team-a")
        expect(tab.locator("#signin")).to_be_hidden()
        console.check(allowed=(401, 403))
    finally:
        context.close()


def test_redis_briefly_unreachable_is_shown_and_the_page_recovers_by_itself(
    browser: Any, keys_server: ServerProcess, dash_redis: RedisProcess
) -> None:
    """Last of the module: it kills the module's Redis (AOF on, as the embedded one) and starts
    it again. The
    signed-in page (keys mode, so its session too lives in Redis) says so, keeps its session
    (the server's last copy of it), and clears the banner by itself when Redis is back."""
    context = browser.new_context(base_url=keys_server.url)
    tab = context.new_page()
    tab.set_default_timeout(30_000)
    console = Console(tab)
    try:
        tab.goto("/ui#/overview")
        tab.fill("#signin-key", ADMIN_KEY)
        tab.click("#signin-form button[type=submit]")
        expect(tab.locator("#page-overview")).to_contain_text("reachable")
        banner = tab.locator("#banner")
        expect(banner).to_be_hidden()
        dash_redis.kill()
        try:
            expect(banner).to_be_visible()
            expect(banner).to_contain_text("Redis unreachable")
            expect(tab.locator("#signin")).to_be_hidden()  # not signed out by the outage
        finally:
            dash_redis.start()
        expect(banner).to_be_hidden()  # back, with no reload
        expect(tab.locator("#page-overview")).to_contain_text("reachable")
        expect(tab.locator("#whoami")).to_contain_text("ops")
        console.check(allowed=(401, 503))  # 401: the page's first look, before signing in
    finally:
        context.close()
