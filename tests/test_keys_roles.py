"""The roles of ``docs/api.md`` (*Roles*) on a real ``yichui serve`` with ``auth = "keys"``:
a ``user`` key gets 403 on every admin action of ``/api`` and an ``admin`` key does not; a user
sees, and acts on, its own tenant's tasks only; keys of the settings keep the role the settings
give them. No worker runs: submitted tasks stay queued, which is all a listing needs."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.api_server import ServerProcess
from tests.redis_proc import RedisProcess
from yichui.runtime import Runtime

SETTINGS_ADMIN, SETTINGS_USER = "settings-admin-key", "settings-user-key"

ADMIN_ACTIONS = [
    ("GET", "/api/keys", None),
    ("POST", "/api/keys", {"tenant": "x", "role": "user"}),
    ("DELETE", "/api/keys/nobody", None),
    ("GET", "/api/audit", None),
    ("GET", "/api/servers", None),
    ("POST", "/api/cache/clear", {}),
    ("POST", "/api/models/rescan", None),
    ("POST", "/api/models/nope/verify", None),
    ("DELETE", "/api/models/nope", None),
]
"""Admin-only actions, each harmless for an admin on an empty deployment (or a 404)."""


@pytest.fixture(scope="module")
def server(
    redis_server: RedisProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    api_keys = {
        hashlib.sha256(SETTINGS_ADMIN.encode()).hexdigest(): {"tenant": "ops", "role": "admin"},
        hashlib.sha256(SETTINGS_USER.encode()).hexdigest(): "team-c",
    }
    proc = ServerProcess(
        tmp_path_factory.mktemp("roles"), redis_url=redis_server.url, auth="keys", api_keys=api_keys
    ).start()
    yield proc
    proc.stop()


def call(
    server: ServerProcess, key: str, method: str, path: str, body: Any = None
) -> httpx.Response:
    return httpx.request(
        method,
        server.url + path,
        json=body,
        headers={"authorization": f"Bearer {key}"},
        timeout=30,
    )


def keys_of(runtime: Runtime, server: ServerProcess) -> dict[str, str]:
    """An admin and two users in Redis, each accepted by the server."""
    made = {
        "admin": runtime.key_store.create("ops", "admin")[0],
        "a": runtime.key_store.create("team-a", "user")[0],
        "b": runtime.key_store.create("team-b", "user")[0],
    }
    for key in made.values():  # a create publishes: the server's table has it at once
        for _ in range(100):
            if call(server, key, "GET", "/api/tasks").status_code != 401:
                break
    return made


def test_user_keys_get_403_on_admin_actions(runtime: Runtime, server: ServerProcess) -> None:
    keys = keys_of(runtime, server)
    for name, key in (("redis user", keys["a"]), ("settings user", SETTINGS_USER)):
        for method, path, body in ADMIN_ACTIONS:
            response = call(server, key, method, path, body)
            assert response.status_code == 403, (name, method, path, response.text)
            error = response.json()["error"]
            assert error["code"] == "permission_denied" and error["type"] == "permission_error"
    assert runtime.key_store.listing()[-1]["tenant"] == "team-b"  # the user created nothing

    for name, key in (("redis admin", keys["admin"]), ("settings admin", SETTINGS_ADMIN)):
        for method, path, body in ADMIN_ACTIONS:
            response = call(server, key, method, path, body)
            assert response.status_code in (200, 201, 404), (name, method, path, response.text)
            if response.status_code == 404:  # the route's own answer, not an unknown path
                assert response.json()["error"]["code"] in ("not_found", "model_not_found")
    actions = [e["action"] for e in runtime.audit.entries(limit=100)]
    assert actions.count("keys.create") == 2 and actions.count("cache.clear") == 2

    # what a user may do, it may
    for key in (keys["a"], SETTINGS_USER):
        for path in ("/api/models", "/api/cache/stats", "/api/tasks", "/v1/models"):
            assert call(server, key, "GET", path).status_code == 200, path
    assert call(server, keys["a"], "GET", "/api/models/nope").status_code == 404


def test_users_see_their_own_tenants_tasks(runtime: Runtime, server: ServerProcess) -> None:
    keys = keys_of(runtime, server)
    ids = {}
    for who in ("a", "b"):
        response = call(server, keys[who], "POST", "/api/tasks", {"type": "noop", "args": {}})
        assert response.status_code == 202, response.text
        task = response.json()
        assert task["tenant"] == f"team-{who}"
        ids[who] = task["id"]

    def listed(key: str) -> set[str]:
        response = call(server, key, "GET", "/api/tasks")
        assert response.status_code == 200, response.text
        return {t["id"] for t in response.json()["data"]}

    assert listed(keys["a"]) == {ids["a"]}
    assert listed(keys["b"]) == {ids["b"]}
    assert listed(keys["admin"]) == {ids["a"], ids["b"]}
    assert call(server, keys["a"], "GET", f"/api/tasks/{ids['b']}").status_code == 404
    assert call(server, keys["a"], "POST", f"/api/tasks/{ids['b']}/cancel").status_code == 404
    assert runtime.tasks.get(ids["b"])["state"] == "queued"  # untouched

    own = call(server, keys["a"], "POST", f"/api/tasks/{ids['a']}/cancel")
    assert own.status_code == 200 and own.json()["state"] == "cancelled", own.text
    other = call(server, keys["admin"], "POST", f"/api/tasks/{ids['b']}/cancel")
    assert other.status_code == 200 and other.json()["state"] == "cancelled", other.text
    audit = [(e["action"], e["target"]) for e in runtime.audit.entries(limit=100)]
    assert ("tasks.cancel", ids["b"]) in audit and ("tasks.cancel", ids["a"]) not in audit
