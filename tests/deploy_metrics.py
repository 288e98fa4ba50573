"""The metrics that deploy/ (Prometheus rules, Grafana dashboard) uses, for tests.

::

    from tests.deploy_metrics import used_metric_names
    assert used_metric_names() <= names_in_a_live_scrape   # every family a `# TYPE` line names

Names are those of the Prometheus text format's ``# TYPE`` lines (prometheus-client 0.26): a
counter keeps its ``_total`` (``# TYPE yichui_cache_requests_total counter``), a histogram's
``_bucket``/``_sum``/``_count`` series map to the histogram (``# TYPE yichui_request_seconds
histogram``), a gauge is its own name. Recording rules (``yichui:…:…``) are left out: they are
no metric of yichui (:func:`recording_rules_used`, :func:`recording_rules_defined`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
RULES = DEPLOY / "prometheus" / "yichui.rules.yml"
RULES_TEST = DEPLOY / "prometheus" / "yichui.rules.test.yml"
DASHBOARD = DEPLOY / "grafana" / "yichui.json"

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"' + r"|'(?:[^'\\]|\\.)*'" + r"|`[^`]*`")
_NAME = re.compile(r"(?<![\w:$])[a-zA-Z_:][a-zA-Z0-9_:]*")
_HISTOGRAM_SERIES = re.compile(r"_(?:bucket|sum|count)$")


def rules() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(RULES.read_text())
    return data


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def rule_exprs() -> list[str]:
    """The ``expr`` of every recording and alerting rule."""
    return [rule["expr"] for group in rules()["groups"] for rule in group["rules"]]


def panels(dash: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """Every panel of the dashboard, those inside (collapsed) rows included; rows too."""

    def walk(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from walk(panel.get("panels", []))

    yield from walk((dash or dashboard())["panels"])


def dashboard_exprs() -> list[str]:
    """The PromQL of every panel's targets and of the query variables."""
    dash = dashboard()
    out = [t["expr"] for p in panels(dash) for t in p.get("targets", []) if t.get("expr")]
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]
            out.append(query["query"] if isinstance(query, dict) else query)
    return out


def identifiers(expr: str) -> set[str]:
    """Metric-like names in ``expr``: string literals (label values) and ``$variables`` aside.
    Function names, keywords and label names come along; callers filter by prefix."""
    return set(_NAME.findall(_STRING.sub('""', expr)))


def family(series: str) -> str:
    """The family (``# TYPE`` line) name of a series name."""
    return _HISTOGRAM_SERIES.sub("", series)


def _names(exprs: list[str]) -> set[str]:
    return {
        family(name)
        for expr in exprs
        for name in identifiers(expr)
        if name.startswith("yichui_") and ":" not in name
    }


def used_metric_names() -> set[str]:
    """Every ``yichui_*`` metric family the rules (their ``expr``, not the unit tests) and the
    dashboard (targets and variables) read, as a scrape's ``# TYPE`` lines name them."""
    return _names(rule_exprs()) | _names(dashboard_exprs())


def recording_rules_defined() -> set[str]:
    return {rule["record"] for group in rules()["groups"] for rule in group["rules"]
            if "record" in rule}  # fmt: skip


def recording_rules_used() -> set[str]:
    """The recording-rule names (``level:metric:operations``) that rules and panels read."""
    return {
        name
        for expr in rule_exprs() + dashboard_exprs()
        for name in identifiers(expr)
        if ":" in name
    }
