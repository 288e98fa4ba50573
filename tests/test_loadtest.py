"""The shipped load test (``yichui bench load``): its seeded workload, its refusals of bad input
before any load is sent, and a short run end to end against the bench upstream."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from yichui.bench.options import LoadOptions, analytic_slope, check_target
from yichui.bench.stats import percentile
from yichui.bench.workload import Workload, WorkloadSpec, png_data_url, request_body

SPEC = WorkloadSpec(rate=80, duration=60, seed=11)


def test_the_same_seed_gives_the_same_sequence_and_another_seed_another() -> None:
    a, b = Workload.build(SPEC), Workload.build(SPEC)
    assert a.requests == b.requests
    other = Workload.build(replace(SPEC, seed=12))
    assert [r.prompt.text for r in other.requests[:50]] != [r.prompt.text for r in a.requests[:50]]
    assert len(a.requests) == pytest.approx(80 * 60, rel=0.05)  # poisson arrivals at 80/s
    gaps = [y.at - x.at for x, y in zip(a.requests, a.requests[1:], strict=False)]
    assert min(gaps) >= 0 and a.requests[-1].at < 60


def test_constant_arrivals_are_evenly_spaced() -> None:
    wl = Workload.build(replace(SPEC, arrival="constant", duration=2))
    assert len(wl.requests) == 160
    assert wl.requests[1].at - wl.requests[0].at == pytest.approx(1 / 80)


@pytest.mark.parametrize("new_share", [0.0, 0.24, 0.5, 1.0])
def test_the_repeat_share_follows_the_parameter(new_share: float) -> None:
    wl = Workload.build(replace(SPEC, new_share=new_share))
    assert wl.ideal_share == pytest.approx(1 - new_share, abs=0.02)


def test_repeats_stay_within_a_tenant_and_the_ideal_share_counts_exactly_them() -> None:
    wl = Workload.build(SPEC)
    seen: set[tuple[int, str, int | None]] = set()
    repeats = 0
    for r in wl.requests:
        key = (r.tenant, r.prompt.text, r.prompt.image_seed)
        assert r.prompt.tenant == r.tenant
        assert r.repeat == (key in seen)  # what a per-tenant cache can reuse, no more
        repeats += key in seen
        seen.add(key)
    assert wl.ideal_share == repeats / len(wl.requests)
    assert Counter(r.tenant for r in wl.requests).keys() == set(range(SPEC.tenants))
    # no prompt text is shared by two tenants: a repeat is never a cross-tenant one
    assert len({p for p in {r.prompt for r in wl.requests}}) == len({(t, x) for t, x, _ in seen})


def test_repeats_follow_zipf_popularity() -> None:
    wl = Workload.build(replace(SPEC, tenants=1))
    counts = Counter(r.prompt.text for r in wl.requests if r.repeat)
    ranked = [n for _, n in counts.most_common(3)]
    first = wl.requests[0].prompt.text
    assert counts[first] == ranked[0]  # the oldest prompt is the most popular
    assert ranked[0] > 2 * ranked[2]


def test_shares_of_streams_and_images() -> None:
    wl = Workload.build(replace(SPEC, stream_share=0.3, image_share=0.2))
    n = len(wl.requests)
    assert sum(r.stream for r in wl.requests) / n == pytest.approx(0.3, abs=0.03)
    fresh = [r for r in wl.requests if not r.repeat]
    with_image = sum(r.prompt.image_seed is not None for r in fresh) / len(fresh)
    assert with_image == pytest.approx(0.2, abs=0.04)  # of the prompts; repeats repeat them
    none = Workload.build(replace(SPEC, stream_share=0, image_share=0))
    assert not any(r.stream or r.prompt.image_seed is not None for r in none.requests)


def test_a_request_body_is_an_openai_chat_request_with_a_seeded_png() -> None:
    wl = Workload.build(replace(SPEC, image_share=1.0, stream_share=1.0, duration=1))
    r = wl.requests[0]
    body = json.loads(request_body(r, model="m", max_tokens=8, image_size=16, temperature=0))
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    parts = body["messages"][0]["content"]
    assert parts[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert parts[1] == {"type": "text", "text": r.prompt.text}
    assert png_data_url(5, 16) == png_data_url(5, 16) != png_data_url(6, 16)


def test_helpers() -> None:
    assert percentile([3.0, 1.0, 2.0, 4.0], 0.5) == 2.0
    assert percentile([1.0] * 99 + [9.0], 0.99) == 1.0 and percentile([], 0.5) == 0.0
    assert analytic_slope(0.3, 1.8, 80) == pytest.approx(0.0104, abs=1e-4)
    check_target("http://127.0.0.1:8000", allow_remote=False)
    check_target("http://[::1]:8000", allow_remote=False)
    check_target("http://localhost:8000", allow_remote=False)
    check_target("http://gpu-box:8000", allow_remote=True)
    short = LoadOptions().shortened()
    assert short.workload.duration <= 10 and not short.capacity and short.slope is not None


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("YICHUI_")}
    return subprocess.run(
        [sys.executable, "-m", "yichui.cli.main", "bench", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**env, "HF_HUB_OFFLINE": "1"},
    )


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["--rate", "0"], "rate must be a number > 0"),
        (["--rate", "-5"], "rate must be a number > 0"),
        (["--rate", "nan"], "rate must be a number > 0"),
        (["--duration", "0"], "duration must be"),
        (["--new-share", "1.5"], "new-share must be within [0, 1]"),
        (["--stream-share", "-0.1"], "stream-share must be within [0, 1]"),
        (["--image-share", "2"], "image-share must be within [0, 1]"),
        (["--zipf", "-1"], "zipf exponent"),
        (["--arrival", "bursty"], "arrival must be poisson or constant"),
        (["--tenants", "0"], "tenants must be"),
        (["--timeout", "0"], "timeout must be"),
        (["--slope", "0.02"], "would never keep up"),
        (["--arms", "gpu"], "unknown arm"),
        (["--target", "http://10.1.2.3:8000"], "not a loopback address"),
        (["--target", "ftp://127.0.0.1"], "not an http(s) URL"),
    ],
)
def test_bad_input_is_one_line_and_nothing_starts(
    tmp_path: Path, args: list[str], text: str
) -> None:
    out = tmp_path / "out"
    proc = run_cli("load", "--out", str(out), *args)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and text in lines[0], proc.stderr
    assert not out.exists()  # checked before anything was made or started
    assert proc.stdout == ""


def test_an_out_that_is_a_file_or_unwritable_is_refused(tmp_path: Path) -> None:
    afile = tmp_path / "file"
    afile.write_text("x")
    proc = run_cli("load", "--out", str(afile))
    assert proc.returncode == 2 and "is not a folder" in proc.stderr, proc.stderr
    proc = run_cli("load", "--out", str(afile / "sub"))  # under a file: never writable
    assert proc.returncode == 2 and "is not writable" in proc.stderr, proc.stderr
    assert afile.read_text() == "x"


def test_a_typo_in_a_number_is_a_usage_error(tmp_path: Path) -> None:
    proc = run_cli("load", "--out", str(tmp_path / "o"), "--rate", "fast")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error:")


@pytest.mark.slow
def test_the_short_mode_runs_both_arms_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "report"
    proc = run_cli("load", "--short", "--out", str(out), "--tenants", "3", timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(proc.stdout.strip().splitlines()[-1])  # the last line is the JSON
    part = figures["arms"]["upstream"]
    off, on = part["off"], part["on"]
    assert off["requests"] == on["requests"] == figures["workload"]["requests"] > 100
    assert off["cache"].get("bypass") == off["requests"]  # the cache-off arm never used it
    assert off["upstream_calls"] >= off["requests"]
    assert on["cache"].get("hit", 0) > 0 and on["upstream_calls"] < off["upstream_calls"]
    assert on["ideal_share"] == pytest.approx(0.76, abs=0.06)
    assert set(part["checks"]) >= {"zero errors", "hits p99 < 10 ms"}
    report = (out / "report.md").read_text()
    assert "upstream, cache on" in report and "hits p99" in report
    for name in ("cdf", "latency", "throughput", "hitrate"):
        assert (out / f"loadtest-{name}.png").stat().st_size > 1000
    assert "PASS" in proc.stdout or "FAIL" in proc.stdout


async def test_the_bench_upstream_answers_like_an_openai_server_and_counts() -> None:
    import httpx

    from yichui.bench.upstream import UpstreamState, build_app

    state = UpstreamState(base=0.01, slope=0.001)
    transport = httpx.ASGITransport(app=build_app(state))
    async with httpx.AsyncClient(transport=transport, base_url="http://up") as http:
        image = {"type": "image_url", "image_url": {"url": png_data_url(1, 8)}}
        question = {"type": "text", "text": "one two three"}
        whole = await http.post(
            "/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": [image, question]}]},
        )
        assert whole.json()["choices"][0]["message"]["content"] == "three two one"
        assert whole.json()["usage"]["completion_tokens"] == 3
        streamed = await http.post(
            "/v1/chat/completions",
            json={
                "model": "m",
                "messages": [{"role": "user", "content": "a b c d"}],
                "max_tokens": 2,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
        events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        assert text == "d c"
        assert chunks[-2]["choices"][0]["finish_reason"] == "length"
        assert chunks[-1]["usage"]["completion_tokens"] == 2
        stats = (await http.get("/_bench/stats")).json()
        assert stats["requests"] == 2 and stats["in_flight"] == 0
        await http.post("/_bench/config", json={"slope": 0.5})
        assert state.slope == 0.5
        assert (await http.post("/v1/chat/completions", content=b"nope")).status_code == 400


def test_the_serve_settings_of_an_arm_load(tmp_path: Path) -> None:
    from yichui.bench.procs import Tenants
    from yichui.bench.runner import UPSTREAM_CONNECTIONS, _serve_settings
    from yichui.config import load_settings
    from yichui.errors import ConfigError

    tenants = Tenants.make(3)
    env = _serve_settings(tenants, 30.0, "http://127.0.0.1:9/v1")
    settings = load_settings(
        data_dir=tmp_path, **{k: json.loads(v) if k != "auth" else v for k, v in env.items()}
    )
    route = settings.upstreams["bench"]
    assert route.accepts_images and route.max_connections == UPSTREAM_CONNECTIONS
    assert sorted(k.tenant for k in settings.api_keys.values()) == ["bench-0", "bench-1", "bench-2"]
    with pytest.raises(ConfigError, match="max_connections"):
        load_settings(
            data_dir=tmp_path, upstreams={"m": {"url": "http://h/v1", "max_connections": 0}}
        )
