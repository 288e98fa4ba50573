"""What ``yichui bench load`` is asked to do, checked in full before any load is sent."""

from __future__ import annotations

import ipaddress
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

from yichui.bench.workload import WorkloadSpec

ARMS = ("upstream", "local")
SHORT_DURATION = 6.0
"""Seconds of load per arm in short mode (plus start and drain: well under 20 s an arm)."""


@dataclass(frozen=True)
class LoadOptions:
    """Every knob of a run; :meth:`check` raises ValueError with one line."""

    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    out: Path = Path("loadtest-out")
    arms: tuple[str, ...] = ARMS
    base: float = 0.3
    slope: float | None = None
    """None: calibrated so that the uncached arm's mean is :attr:`target_mean`."""
    target_mean: float = 1.8
    timeout: float = 30.0
    p95_bound: float = 2.0
    capacity: bool = True
    capacity_duration: float = 8.0
    local_rate: float | None = None
    """None: derived from the local engine's measured capacity."""
    local_duration: float | None = None
    target: str | None = None
    api_keys: tuple[str, ...] = ()
    model: str | None = None
    allow_remote: bool = False
    short: bool = False
    servers: int = 2
    """``yichui serve`` processes per upstream arm, requests dealt in turn (the local arms: 1)."""

    def shortened(self) -> LoadOptions:
        """Short mode: a few seconds an arm, one server, no calibration run, no capacity
        search, the upstream arms only unless ``arms`` names others."""
        wl = replace(self.workload, duration=min(self.workload.duration, SHORT_DURATION))
        return replace(
            self,
            workload=wl,
            capacity=False,
            slope=self.slope
            if self.slope is not None
            else analytic_slope(self.base, self.target_mean, wl.rate),
            local_duration=min(self.local_duration or 20.0, 20.0),
            arms=self.arms if self.arms != ARMS else ("upstream",),
            servers=1,  # half the start-up time; 6 s of load never fills the queue
            short=True,
        )

    def check(self) -> None:
        self.workload.check()
        for name in ("base", "target_mean", "timeout", "p95_bound", "capacity_duration"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name.replace('_', '-')} must be a number > 0, not {value}")
        if self.slope is not None and not (math.isfinite(self.slope) and self.slope >= 0):
            raise ValueError(f"slope must be a number >= 0, not {self.slope}")
        if self.slope is not None and self.slope * self.workload.rate >= 1:
            raise ValueError(
                f"slope x rate = {self.slope * self.workload.rate:.2f} >= 1: the upstream "
                "would never keep up"
            )
        if self.local_rate is not None and not (
            math.isfinite(self.local_rate) and self.local_rate > 0
        ):
            raise ValueError(f"local-rate must be a number > 0, not {self.local_rate}")
        if self.local_duration is not None and not (
            math.isfinite(self.local_duration) and self.local_duration > 0
        ):
            raise ValueError(f"local-duration must be a number > 0, not {self.local_duration}")
        for arm in self.arms:
            if arm not in ARMS:
                raise ValueError(f"unknown arm {arm!r}: use {', '.join(ARMS)}")
        if not self.arms:
            raise ValueError("no arm to run")
        if not 1 <= self.servers <= 8:
            raise ValueError(f"servers must be within [1, 8], not {self.servers}")
        if self.target is not None:
            check_target(self.target, allow_remote=self.allow_remote)
        check_out(self.out)


def analytic_slope(base: float, mean: float, rate: float) -> float:
    """The slope for which ``base / (1 - slope x rate) = mean``."""
    return max(0.0, (1 - base / mean) / rate)


LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def check_target(url: str, *, allow_remote: bool) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"target {url!r} is not an http(s) URL")
    if allow_remote:
        return
    host = parts.hostname
    if host in LOOPBACK_NAMES:
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(
            f"target {host} is not a loopback address: pass --allow-remote to load another host"
        )


def check_out(out: Path) -> None:
    """``out`` is a folder (or can be made one) that we can write into."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a folder")
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"--out {str(out)!r} is not writable")
