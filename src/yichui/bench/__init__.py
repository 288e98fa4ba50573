"""The shipped load test (``yichui bench load``, ``bench/loadtest.py``).

It talks to yichui only over HTTP and through the processes it starts (``redis-server``,
``yichui serve``, ``yichui bench upstream``), so it imports next to nothing from the layers
below::

    workload.py   the seeded request sequence: tenants, Zipf repeats, streams, images
    upstream.py   an OpenAI-compatible server that behaves like a loaded GPU server
    procs.py      the processes an arm needs, on loopback free ports, always stopped
    client.py     the open-loop sender: requests leave on schedule whatever the latency
    stats.py      the figures of one arm; checks against the targets
    report.py     report.md and the plots
    runner.py     arms, calibration, capacity search: what ``yichui bench load`` runs
"""
