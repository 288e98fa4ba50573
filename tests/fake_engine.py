"""The fake OpenAI-compatible server of ``tests/fake_upstream.py`` as a process of its own: an
engine for the tests of launched (supervised) upstreams::

    python -m tests.fake_engine --port 8011 [--model NAME] [--api-key KEY] [--child-pidfile F]

It serves ``/v1/models`` (the model it is given) besides the fake's completions.
``--child-pidfile FILE`` starts a child that sleeps (in the engine's process group) and writes
its pid there: the tests show that stopping the engine, or serve's death, takes it too.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from tests.fake_upstream import FakeUpstream, build_app


def app(model: str, api_key: str | None) -> FastAPI:
    state = FakeUpstream(api_key=api_key)
    served = build_app(state)

    @served.get("/v1/models")
    async def models() -> dict[str, object]:
        return {"object": "list", "data": [{"id": model, "object": "model", "owned_by": "fake"}]}

    return served


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default="fake")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--child-pidfile", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.child_pidfile is not None:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        args.child_pidfile.write_text(str(child.pid))
    uvicorn.run(
        app(args.model, args.api_key),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
