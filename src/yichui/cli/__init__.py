"""The ``yichui`` command line: one Typer sub-app per noun."""
