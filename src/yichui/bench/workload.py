"""The seeded request sequence of a load test: who asks what, when, and how.

Every request belongs to one of ``tenants`` tenants (its API key). With probability
``new_share`` it asks a prompt that tenant never asked; otherwise it repeats one of the
tenant's earlier prompts, drawn with Zipf popularity (the k-th prompt the tenant introduced
has weight ``1 / k ** zipf``). Repeats stay within a tenant because the response cache is
scoped per tenant, so :attr:`Workload.ideal_share` is exactly the share of requests a perfect
cache could answer without the upstream. A share of requests is streamed (the cache key leaves
``stream`` out: a streamed repeat of a whole answer is still a repeat), and a share of the
prompts carry a small seeded PNG picture (the picture is part of the prompt, so a repeat
repeats it)::

    wl = Workload.build(WorkloadSpec(rate=80, duration=60, seed=7))
    wl.requests[0].at, wl.requests[0].tenant, wl.ideal_share
"""

from __future__ import annotations

import base64
import bisect
import io
import json
import math
import random
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

Arrival = Literal["poisson", "constant"]

_VOCABULARY = """river mountain lamp copper violet engine harbor quiet silver forest
planet garden window coffee marble signal winter orange thunder pocket
candle saddle meadow rocket kettle beacon ladder velvet canyon falcon"""
WORDS = tuple(_VOCABULARY.split())


@dataclass(frozen=True)
class WorkloadSpec:
    """What the sequence looks like (all checked by :meth:`check`)."""

    rate: float = 80.0
    """Requests per second, on average."""
    duration: float = 60.0
    """Seconds over which requests are scheduled."""
    arrival: Arrival = "poisson"
    """``poisson``: exponential gaps; ``constant``: one every ``1 / rate`` s."""
    seed: int = 7
    new_share: float = 0.24
    """Probability that a request asks a prompt its tenant never asked (0.24: 76 % repeats)."""
    zipf: float = 1.1
    """Exponent of the repeats' popularity over each tenant's earlier prompts."""
    tenants: int = 4
    stream_share: float = 0.25
    image_share: float = 0.1
    """Share of fresh prompts that are an image plus a question."""
    image_size: int = 32
    """Side in pixels of the pictures."""
    max_tokens: int = 16
    salt: str = ""
    """Put in every prompt's text: another salt, other prompts (capacity steps, probes)."""

    def check(self) -> None:
        """ValueError with one line for the first thing out of range."""
        if not (math.isfinite(self.rate) and self.rate > 0):
            raise ValueError(f"rate must be a number > 0, not {self.rate}")
        if not (math.isfinite(self.duration) and self.duration > 0):
            raise ValueError(f"duration must be a number of seconds > 0, not {self.duration}")
        for name in ("new_share", "stream_share", "image_share"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"{name.replace('_', '-')} must be within [0, 1], not {value}")
        if not (math.isfinite(self.zipf) and 0.0 <= self.zipf <= 10.0):
            raise ValueError(f"zipf exponent must be within [0, 10], not {self.zipf}")
        if self.arrival not in ("poisson", "constant"):
            raise ValueError(f"arrival must be poisson or constant, not {self.arrival!r}")
        if not 1 <= self.tenants <= 1000:
            raise ValueError(f"tenants must be within [1, 1000], not {self.tenants}")
        if not 8 <= self.image_size <= 1024:
            raise ValueError(f"image size must be within [8, 1024], not {self.image_size}")
        if not 1 <= self.max_tokens <= 4096:
            raise ValueError(f"max-tokens must be within [1, 4096], not {self.max_tokens}")
        if self.rate * self.duration > 2_000_000:
            raise ValueError("rate x duration is over 2,000,000 requests")


@dataclass(frozen=True)
class Prompt:
    """One distinct prompt of one tenant."""

    tenant: int
    text: str
    image_seed: int | None = None


@dataclass(frozen=True)
class Request:
    """One request of the sequence."""

    index: int
    at: float
    """Scheduled send time, seconds from the start."""
    tenant: int
    prompt: Prompt
    stream: bool
    repeat: bool
    """Whether the same tenant asked this prompt before (what a perfect cache reuses)."""


@dataclass
class Workload:
    """The whole sequence and what it adds up to."""

    spec: WorkloadSpec
    requests: list[Request] = field(default_factory=list)

    @classmethod
    def build(cls, spec: WorkloadSpec) -> Workload:
        spec.check()
        rng = random.Random(spec.seed)
        history: list[list[Prompt]] = [[] for _ in range(spec.tenants)]
        cumulative: list[list[float]] = [[] for _ in range(spec.tenants)]
        out: list[Request] = []
        t = 0.0
        while True:
            if spec.arrival == "poisson":
                t += rng.expovariate(spec.rate)
            else:  # from the index: no rounding error adds up
                t = len(out) / spec.rate
            if t >= spec.duration:
                break
            tenant = rng.randrange(spec.tenants)
            seen, weights = history[tenant], cumulative[tenant]
            repeat = bool(seen) and rng.random() >= spec.new_share
            if repeat:
                pick = bisect.bisect_left(weights, rng.random() * weights[-1])
                prompt = seen[min(pick, len(seen) - 1)]
            else:
                prompt = _fresh(rng, spec, tenant, len(seen))
                seen.append(prompt)
                weight = 1.0 / len(seen) ** spec.zipf
                weights.append((weights[-1] if weights else 0.0) + weight)
            stream = rng.random() < spec.stream_share
            out.append(Request(len(out), t, tenant, prompt, stream, repeat))
        return cls(spec, out)

    @property
    def ideal_share(self) -> float:
        """Share of requests that repeat their tenant's earlier prompt."""
        return sum(r.repeat for r in self.requests) / len(self.requests) if self.requests else 0.0

    def summary(self) -> dict[str, Any]:
        n = len(self.requests) or 1
        return {
            "requests": len(self.requests),
            "ideal_share": round(self.ideal_share, 4),
            "stream_share": round(sum(r.stream for r in self.requests) / n, 4),
            "image_share": round(
                sum(r.prompt.image_seed is not None for r in self.requests) / n, 4
            ),
            "distinct_prompts": len({r.prompt for r in self.requests}),
            "tenants": self.spec.tenants,
        }


def _fresh(rng: random.Random, spec: WorkloadSpec, tenant: int, n: int) -> Prompt:
    words = " ".join(rng.choice(WORDS) for _ in range(6))
    text = f"{spec.salt}t{tenant} q{n}: {words}"
    if rng.random() < spec.image_share:
        return Prompt(tenant, f"{text}. What is in the picture?", rng.randrange(1 << 30))
    return Prompt(tenant, text)


@lru_cache(maxsize=4096)
def png_data_url(seed: int, size: int) -> str:
    """A ``size`` x ``size`` PNG of seeded random pixels, as a data URL."""
    from PIL import Image

    pixels = random.Random(seed).randbytes(size * size * 3)
    buffer = io.BytesIO()
    Image.frombytes("RGB", (size, size), pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def request_body(
    request: Request, *, model: str, max_tokens: int, image_size: int, temperature: float
) -> bytes:
    """The JSON body of ``request`` for ``/v1/chat/completions``."""
    prompt = request.prompt
    content: Any = prompt.text
    if prompt.image_seed is not None:
        content = [
            {
                "type": "image_url",
                "image_url": {"url": png_data_url(prompt.image_seed, image_size)},
            },
            {"type": "text", "text": prompt.text},
        ]
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "temperature": temperature,
        "max_tokens": max_tokens,
    }
    if request.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body, separators=(",", ":")).encode()
