"""The shipped load test, as a script: ``yichui bench load`` with the same options.

::

    .venv/bin/python bench/loadtest.py [--short] [--out loadtest-out] [--arms upstream,local]

See docs/benchmarks.md, *Load test*. The last stdout line is one JSON object of the figures.
"""

from __future__ import annotations

import sys

from yichui.cli.main import main

if __name__ == "__main__":
    main(["bench", "load", *sys.argv[1:]])
