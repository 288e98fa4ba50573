"""A warm pool of loaded local models, shared by every request of one process.

Loading a model takes seconds (a real one) and its weights take memory, so models stay loaded
between requests, within a memory budget::

    pool = ModelPool(budget_bytes=settings.model_memory_budget)
    async with pool.use(name, path, fingerprint) as loaded:
        async with loaded.lock:            # one generation at a time per model
            ...loaded.model, loaded.tokenizer...
    async with pool.use(name, path, fingerprint, kind="multimodal", setup=bound) as loaded:
        ...loaded.model, loaded.processor...

Text and vision-language models share the pool (one budget, one eviction order): a
``multimodal`` model is loaded with its processor (:func:`yichui.ml.loading.load_processor`),
whose tokenizer is the entry's ``tokenizer``.

- Concurrent first requests for a model share one load; a failed load is not kept (the next
  request tries again) and its error reaches every request that waited for it.
- A changed fingerprint (the model was re-downloaded or merged) loads the model again.
- Before a load, least recently used models that no request is using are evicted until the new
  one fits the budget; a model in use is never evicted. When nothing more can be evicted the
  model is loaded anyway (with a warning): the pool goes over budget rather than refuse, and
  comes back within it as models are released.

All methods are meant for one event loop; loads run in a worker thread so the loop keeps
answering. torch and transformers are imported only when a model is loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import json
import logging
import struct
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yichui.metrics import Metrics
from yichui.ml import loading as ml

log = logging.getLogger(__name__)

DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}
"""The dtypes a model may be loaded in, with their element size in bytes."""

# element sizes of safetensors dtypes, for the estimate read from the file headers
_ST_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
_ST_FLOATS = {"F64", "F32", "F16", "BF16"}


@dataclass(eq=False)
class LoadedModel:
    """A model in the pool. ``lock`` serializes generation on it; ``nbytes`` is the size of
    its weights in memory. A ``multimodal`` model has its ``processor`` (None for text), and
    ``tokenizer`` is the processor's."""

    name: str
    path: Path
    fingerprint: str
    model: Any
    tokenizer: Any
    device: str
    dtype: str
    nbytes: int
    load_seconds: float = 0.0
    kind: ml.ModelKind = "text"
    processor: Any = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    batcher: Any = None
    """The queue its requests wait in and batch from (``engines/batching.py``), made on use."""
    users: int = 0
    """Requests inside ``pool.use()`` of this model right now (in use: not evictable)."""
    requests: int = 0
    """Requests this model has run since it was loaded (cache hits never reach the pool)."""
    last_used: float = field(default_factory=time.monotonic)
    """When a request last took or gave back the model (``time.monotonic()``)."""


Setup = Callable[[LoadedModel], None]
"""What :meth:`ModelPool.use` runs on a newly loaded entry (in the load's thread)."""


@dataclass(frozen=True, slots=True)
class _Load:
    """How to load a model: the adapter to merge, the kind, the setup to run."""

    adapter: Path | None = None
    kind: ml.ModelKind = "text"
    setup: Setup | None = None


class ModelPool:
    """Loaded models of this process, least recently used first, within ``budget_bytes``.

    ``device``: ``auto`` (CUDA when there is one, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
    ``dtype``: ``auto`` (bfloat16 on a CUDA GPU that supports it, else float32: the rule of
    :func:`yichui.ml.loading.resolve_dtype`, which training follows too), ``bfloat16``,
    ``float16`` or ``float32``.
    """

    def __init__(
        self,
        *,
        budget_bytes: int,
        device: str = "auto",
        dtype: str = "auto",
        metrics: Metrics | None = None,
    ) -> None:
        if budget_bytes <= 0:
            raise ValueError("budget_bytes must be positive")
        if dtype != "auto" and dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}: use auto, {', '.join(DTYPES)}")
        self.budget_bytes = budget_bytes
        self.metrics = metrics or Metrics()
        self.metrics.watch_pool(self)
        self.device = device
        self.dtype = dtype
        self.loads = 0
        self.evictions = 0
        self.hits = 0
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()  # least recently used first
        self._loading: dict[str, asyncio.Future[LoadedModel]] = {}
        # One load at a time: each load decides what to evict from a settled set of models.
        self._load_lock = asyncio.Lock()

    # -- public -------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def use(
        self,
        name: str,
        path: Path,
        fingerprint: str,
        *,
        adapter: Path | None = None,
        kind: ml.ModelKind = "text",
        setup: Setup | None = None,
    ) -> AsyncIterator[LoadedModel]:
        """The loaded model ``name`` (loaded from ``path`` first if needed, with the LoRA
        ``adapter`` merged into it when given), kept from eviction until the block exits.

        ``kind`` picks the loader (``multimodal``: the model and its processor). ``setup``
        runs once on a newly loaded entry, in the load's thread, before any request gets it
        (the vision engine bounds the processor's visual tokens there); a name is always
        used with the same one."""
        entry = await self._acquire(name, Path(path), fingerprint, _Load(adapter, kind, setup))
        try:
            yield entry
        finally:
            self._release(entry)

    @property
    def nbytes(self) -> int:
        """Bytes of weights loaded now."""
        return sum(e.nbytes for e in self._models.values())

    def peek(self, name: str) -> LoadedModel | None:
        """The loaded model ``name``, if it is loaded (its place in the LRU order unchanged)."""
        return self._models.get(name)

    def loaded(self) -> list[str]:
        """Names of the loaded models, least recently used first."""
        return list(self._models)

    def snapshot(self) -> list[dict[str, Any]]:
        """One row per loaded model, least recently used first (the next to be evicted), for
        the fleet view: ``model``, ``bytes``, ``device``, ``dtype``, ``requests``, ``in_use``,
        ``last_used`` (epoch seconds, this host's clock) and ``idle_seconds`` (0 in use)."""
        mono, wall = time.monotonic(), time.time()
        return [
            {
                "model": e.name,
                "bytes": e.nbytes,
                "device": e.device,
                "dtype": e.dtype,
                "requests": e.requests,
                "in_use": e.users,
                "last_used": round(wall - (mono - e.last_used), 3),
                "idle_seconds": 0.0 if e.users else round(mono - e.last_used, 3),
            }
            for e in self._models.values()
        ]

    def stats(self) -> dict[str, Any]:
        """What is loaded and the counters, for the API's status endpoint and the tests."""
        return {
            "budget": self.budget_bytes,
            "bytes": self.nbytes,
            "loaded": self.loaded(),
            "loading": sorted(self._loading),
            "loads": self.loads,
            "evictions": self.evictions,
            "hits": self.hits,
            "models": [
                {
                    "name": e.name,
                    "bytes": e.nbytes,
                    "device": e.device,
                    "dtype": e.dtype,
                    "in_use": e.users,
                    "fingerprint": e.fingerprint,
                    "load_seconds": round(e.load_seconds, 3),
                }
                for e in self._models.values()
            ],
        }

    async def close(self) -> None:
        """Drop every model that is not in use (those in use go when their requests end)."""
        for entry in [e for e in self._models.values() if e.users == 0]:
            self._drop(entry)
        self._collect()

    # -- acquiring and releasing ----------------------------------------------------------------
    async def _acquire(self, name: str, path: Path, fingerprint: str, how: _Load) -> LoadedModel:
        while True:
            entry = self._models.get(name)
            if entry is not None and entry.fingerprint == fingerprint:
                self.hits += 1
                return self._checkout(entry)
            pending = self._loading.get(name)
            if pending is None:
                pending = asyncio.ensure_future(self._load(name, path, fingerprint, how))
                self._loading[name] = pending
                pending.add_done_callback(functools.partial(self._load_done, name))
            # shield: a waiter that is cancelled must not cancel the load the others await
            entry = await asyncio.shield(pending)
            if entry.fingerprint == fingerprint and self._models.get(name) is entry:
                return self._checkout(entry)
            # an older version finished loading, or it was evicted before we woke: go round

    def _load_done(self, name: str, fut: asyncio.Future[LoadedModel]) -> None:
        if self._loading.get(name) is fut:
            del self._loading[name]  # failed or not, the next request starts afresh
        if not fut.cancelled():
            fut.exception()  # retrieved here too, in case every waiter was cancelled

    def _checkout(self, entry: LoadedModel) -> LoadedModel:
        entry.users += 1
        entry.requests += 1
        entry.last_used = time.monotonic()
        self._models.move_to_end(entry.name)
        return entry

    def _release(self, entry: LoadedModel) -> None:
        entry.users -= 1
        entry.last_used = time.monotonic()
        if self._models.get(entry.name) is not entry:
            return  # replaced by a newer version meanwhile: freed with its last reference
        self._models.move_to_end(entry.name)
        # Back within budget once the models that kept us over it are free; the model just
        # released stays, or a model bigger than the budget would be reloaded every time.
        if self.nbytes > self.budget_bytes:
            self._make_room(0, keep=entry)

    # -- loading and evicting -------------------------------------------------------------------
    async def _load(self, name: str, path: Path, fingerprint: str, how: _Load) -> LoadedModel:
        async with self._load_lock:
            old = self._models.get(name)
            if old is not None:
                if old.fingerprint == fingerprint:
                    return old
                log.info("model %s changed on disk; loading it again", name)
                self._drop(old)
            device, dtype = await asyncio.to_thread(self._resolve)
            estimate = await asyncio.to_thread(estimate_bytes, path, DTYPES[dtype])
            self._make_room(estimate)
            if self.nbytes + estimate > self.budget_bytes:
                what = "the whole budget" if not self._models else "what can be evicted"
                log.warning(
                    "model %s needs about %d MiB, more than %s (budget %d MiB, in use %d MiB);"
                    " loading it anyway",
                    name,
                    estimate >> 20,
                    what,
                    self.budget_bytes >> 20,
                    self.nbytes >> 20,
                )
            started = time.monotonic()
            entry = await asyncio.to_thread(_load_sync, name, path, fingerprint, device, dtype, how)
            entry.load_seconds = time.monotonic() - started
            self._models[name] = entry
            self.loads += 1
            self.metrics.pool_loads.labels(name).inc()
            self.metrics.pool_load_seconds.labels(name).observe(entry.load_seconds)
            log.info(
                "loaded model %s on %s (%s, %d MiB) in %.2f s",
                name,
                device,
                dtype,
                entry.nbytes >> 20,
                entry.load_seconds,
            )
            return entry

    def _make_room(self, needed: int, *, keep: LoadedModel | None = None) -> None:
        """Evict idle models, least recently used first, until ``needed`` more bytes fit."""
        evicted = False
        while self.nbytes + needed > self.budget_bytes:
            victim = next(
                (e for e in self._models.values() if e.users == 0 and e is not keep), None
            )
            if victim is None:
                break
            log.info("evicting model %s (%d MiB) to make room", victim.name, victim.nbytes >> 20)
            self._drop(victim)
            self.evictions += 1
            self.metrics.pool_evictions.labels(victim.name).inc()
            evicted = True
        if evicted:
            self._collect()

    def _drop(self, entry: LoadedModel) -> None:
        if self._models.get(entry.name) is entry:
            del self._models[entry.name]
        if entry.users == 0:
            # nobody holds it: let the weights go now rather than with the entry
            entry.model = None
            entry.tokenizer = None
            entry.processor = None

    def _collect(self) -> None:
        # Module graphs can hold reference cycles, and CUDA keeps freed blocks cached: both
        # would keep an evicted model's memory from the next one.
        gc.collect()
        if self.device != "cpu":
            try:
                import torch
            except ImportError:
                return
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _resolve(self) -> tuple[str, str]:
        """The concrete device and dtype (``auto`` resolved: this imports torch)."""
        ml.require_ml("local inference", peft=False)
        device = ml.resolve_device(self.device)
        return device, ml.resolve_dtype(device, self.dtype)


def estimate_bytes(path: Path, element_size: int) -> int:
    """Bytes a model's weights will take once loaded with ``element_size``-byte floats.

    Read from the safetensors headers (element counts, so a bf16 file loaded as float32 counts
    double); a file whose header cannot be read counts its size on disk, as do ``.bin`` files.
    """
    total = 0
    files = sorted(path.glob("*.safetensors"))
    if not files:
        files = sorted(path.glob("*.bin")) + sorted(path.glob("*.pt"))
    for file in files:
        header = _safetensors_header(file) if file.suffix == ".safetensors" else None
        if header is None:
            with contextlib.suppress(OSError):
                total += file.stat().st_size
            continue
        for key, info in header.items():
            if key == "__metadata__" or not isinstance(info, dict):
                continue
            numel = 1
            for dim in info.get("shape", []):
                numel *= int(dim)
            st_dtype = str(info.get("dtype", ""))
            if st_dtype in _ST_FLOATS:
                total += numel * element_size
            else:  # integers (quantized weights, indices) are loaded as they are
                total += numel * _ST_SIZES.get(st_dtype, 1)
    return total


def _safetensors_header(file: Path) -> dict[str, Any] | None:
    # the format: 8 bytes little-endian header length, then that many bytes of JSON
    try:
        with open(file, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > 100 * 1024**2:
                return None
            data = json.loads(fh.read(length))
    except (OSError, ValueError, struct.error):
        return None
    return data if isinstance(data, dict) else None


def _load_sync(
    name: str, path: Path, fingerprint: str, device: str, dtype: str, how: _Load
) -> LoadedModel:
    """Load tokenizer (or processor) and model (in a worker thread), with a LoRA adapter
    merged in, and run the setup. The adapter's tokenizer (its chat template) wins."""
    adapter = how.adapter
    ml.require_ml("local inference", peft=adapter is not None)
    processor = None
    if how.kind == "multimodal":
        processor = ml.load_processor(path, name, adapter=adapter)
        tokenizer = processor.tokenizer
    else:
        tokenizer = ml.load_tokenizer(path, name, adapter=adapter)
    model = ml.load_model(path, name, device=device, dtype=dtype, kind=how.kind)
    if adapter is not None:
        # merged once at load: as fast per token as the base alone
        model = ml.apply_adapter(model, adapter, name, merge=True)
    model.eval()
    # parameters only (buffers such as rotary tables are tiny), as the estimate counts them
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    entry = LoadedModel(
        name=name,
        path=path,
        fingerprint=fingerprint,
        model=model,
        tokenizer=tokenizer,
        device=device,
        dtype=dtype,
        nbytes=int(nbytes),
        kind=how.kind,
        processor=processor,
    )
    if how.setup is not None:
        how.setup(entry)
    return entry
