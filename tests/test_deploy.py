"""deploy/: the Prometheus rules pass ``promtool check rules`` and their unit tests, and the
Grafana dashboard is well formed and never sums a per-deployment figure."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import deploy_metrics as dm

ROOT = dm.DEPLOY.parent

CLUSTER_METRIC = (
    r"yichui_(?:redis_\w+|tasks|task_\w+|workers_live|worker_heartbeat_age_seconds)(?![\w:])"
)
"""The per-deployment (``scope="cluster"``) families: every scraped process exports the same
value, so a sum over processes counts it once per process."""
_SUMMED_CLUSTER = re.compile(
    r"\bsum\s*(?:(?:by|without)\s*\([^()]*\)\s*)?\(\s*(?:\w+\s*\(\s*)*" + CLUSTER_METRIC
)


def sums_cluster_metric(expr: str) -> bool:
    """Whether ``expr`` applies ``sum`` directly (through functions like ``rate`` at most) to a
    per-deployment metric."""
    return bool(_SUMMED_CLUSTER.search(expr))


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail(
            "promtool not found: install Debian's `prometheus` package "
            "(apt-get install prometheus; `make tools` does it as root)",
            pytrace=False,
        )
    return subprocess.run(
        [exe, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )


def _assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, (
        f"{' '.join(result.args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    )


# -- Prometheus rules -----------------------------------------------------------------------------


def test_rules_pass_promtool_check() -> None:
    _assert_ok(promtool("check", "rules", str(dm.RULES.relative_to(ROOT))))


def test_rules_pass_their_unit_tests() -> None:
    _assert_ok(promtool("test", "rules", str(dm.RULES_TEST.relative_to(ROOT))))


def _alerts() -> list[dict[str, Any]]:
    return [r for g in dm.rules()["groups"] for r in g["rules"] if "alert" in r]


def test_every_alert_has_severity_annotations_and_runbook() -> None:
    alerts = _alerts()
    assert {a["alert"] for a in alerts} >= {
        "RedisMemoryNearMax",
        "RedisPeakMemoryGrowing",
        "RedisDown",
        "CacheHitRateFalling",
        "CacheBreakerOpen",
        "CacheFaults",
        "DeadTasksGrowing",
        "NoLiveWorker",
        "QueueGrowing",
        "WorkerHeartbeatStale",
    }
    for a in alerts:
        name = a["alert"]
        assert a["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert a["annotations"].keys() >= {"summary", "description", "runbook_url"}, name
        assert a["annotations"]["runbook_url"] == f"docs/operations.md#alert-{name.lower()}"


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    tests = yaml.safe_load(dm.RULES_TEST.read_text())["tests"]
    cases = [case for t in tests for case in t.get("alert_rule_test", [])]
    for name in {a["alert"] for a in _alerts()}:
        mine = [c for c in cases if c["alertname"] == name]
        assert any(c.get("exp_alerts") for c in mine), f"{name}: no case where it fires"
        assert any(not c.get("exp_alerts") for c in mine), f"{name}: no case where it is quiet"


def test_recording_rules_used_are_defined() -> None:
    used = dm.recording_rules_used()
    assert "yichui:cache_hit_ratio:rate30m" in used
    assert used <= dm.recording_rules_defined()


# -- Grafana dashboard ----------------------------------------------------------------------------


def test_dashboard_is_importable() -> None:
    dash = dm.dashboard()
    assert [i["name"] for i in dash["__inputs"]] == ["DS_PROMETHEUS"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["current"]["value"] == "${DS_PROMETHEUS}"
    assert dash["schemaVersion"] >= 36
    ids = [p["id"] for p in dm.panels(dash)]
    assert len(ids) == len(set(ids)), "panel ids repeat"


def test_every_panel_has_a_datasource_and_targets() -> None:
    shown = [p for p in dm.panels() if p["type"] != "row"]
    assert len(shown) > 20
    for p in shown:
        title = p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, title
        assert p["targets"], title
        for t in p["targets"]:
            assert t["expr"].strip(), title
            assert t["datasource"] == p["datasource"], title
        pos = p["gridPos"]
        assert pos["x"] + pos["w"] <= 24, title


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """Each target's PromQL, its Grafana variables replaced, checked by promtool as a rule."""
    exprs = [t["expr"] for p in dm.panels() for t in p.get("targets", [])]
    subst = {"$__rate_interval": "5m", "$job": ".*", "$instance": ".*"}
    rules = []
    for i, expr in enumerate(exprs):
        for var, value in subst.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard_query_{i}", "expr": expr})
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    _assert_ok(promtool("check", "rules", str(path)))


def test_no_sum_over_per_deployment_metrics() -> None:
    for expr in dm.dashboard_exprs() + dm.rule_exprs():
        assert not sums_cluster_metric(expr), f"sums a scope=cluster metric (use max): {expr}"


@pytest.mark.parametrize(
    ("expr", "bad"),
    [
        ("sum(yichui_tasks)", True),
        ('sum by (state) (yichui_tasks{job=~"$job"})', True),
        ("sum(yichui_tasks) by (state)", True),
        ("sum without (instance) (rate(yichui_redis_evicted_keys_total[5m]))", True),
        ("sum(yichui_task_queue_depth)", True),
        ("sum(yichui_workers_live)", True),
        ("sum by (worker) (yichui_worker_heartbeat_age_seconds)", True),
        ("max by (state) (yichui_tasks)", False),
        ("max by (redis) (rate(yichui_redis_evicted_keys_total[5m]))", False),
        ("sum(rate(yichui_tasks_submitted_total[5m]))", False),
        ("sum by (outcome) (rate(yichui_worker_tasks_total[5m]))", False),
        ("sum(yichui_worker_running)", False),
    ],
)
def test_sum_check(expr: str, bad: bool) -> None:
    assert sums_cluster_metric(expr) is bad


# -- the metric names deploy/ reads ---------------------------------------------------------------


def test_used_metric_names() -> None:
    names = dm.used_metric_names()
    assert names >= {
        "yichui_build_info",  # a variable's query
        "yichui_cache_requests_total",  # counters keep _total
        "yichui_cache_faults_total",
        "yichui_cache_breaker_state",
        "yichui_cache_lookup_seconds",  # histograms: _bucket, _sum, _count -> the histogram
        "yichui_request_seconds",
        "yichui_redis_up",
        "yichui_redis_used_memory_peak_bytes",
        "yichui_redis_evicted_keys_total",
        "yichui_tasks",
        "yichui_task_queue_depth",
        "yichui_workers_live",
        "yichui_worker_heartbeat_age_seconds",
    }
    for name in names:
        assert re.fullmatch(r"yichui_[a-z0-9_]+", name), name
        assert not re.search(r"_(bucket|sum|count)$", name), name


def test_identifiers_and_family() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le) (rate(yichui_x_seconds_bucket{job=~"$job", '
        'model="yichui_not_a_metric"}[$__rate_interval]))) / yichui:y:rate5m offset 1d'
    )
    found = {n for n in dm.identifiers(expr) if n.startswith("yichui")}
    assert found == {"yichui_x_seconds_bucket", "yichui:y:rate5m"}
    assert dm.family("yichui_x_seconds_bucket") == "yichui_x_seconds"
    assert dm.family("yichui_x_seconds_count") == "yichui_x_seconds"
    assert dm.family("yichui_x_total") == "yichui_x_total"
