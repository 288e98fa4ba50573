"""The pieces of a streamed answer on their way between processes: as the live stream carries
them (:func:`piece_of`, :func:`pieces`), and a follower's relay of them (:class:`Relayed`),
which a computation of the same answer can take over where the stream broke off."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import replace
from typing import Any

from yichui.errors import CoalescedError
from yichui.inference.engine import EngineChunk, Usage


class Relayed:
    """The pieces a follower relayed from a live stream (called with each, passes it on to
    ``out``); :meth:`resume` then takes a computation of the same answer over from there."""

    def __init__(self, out: Callable[[EngineChunk], None]) -> None:
        self.out = out
        self.sent: dict[int, str] = {}
        self.finished: set[int] = set()

    def __call__(self, chunk: EngineChunk) -> None:
        self.sent[chunk.index] = self.sent.get(chunk.index, "") + chunk.text
        if chunk.finish_reason is not None:
            self.finished.add(chunk.index)
        self.out(chunk)

    def resume(self) -> Callable[[EngineChunk], None]:
        """A sink for the chunks of the answer computed again: only what was not relayed yet
        goes out (the text past what each choice got; a choice that ended gets nothing more).
        :class:`CoalescedError` if the new answer does not begin with what was sent (an
        engine that is not deterministic after all)."""
        again: dict[int, str] = {}

        def out(chunk: EngineChunk) -> None:
            i = chunk.index
            before = again.get(i, "")
            again[i] = text = before + chunk.text
            sent = self.sent.get(i, "")
            if i in self.finished:
                return
            if not (text.startswith(sent) or sent.startswith(text)):
                raise CoalescedError(LIVE_LOST_DIVERGED)
            new = text[max(len(sent), len(before)) :]
            if new or chunk.finish_reason is not None or chunk.usage is not None:
                self.out(replace(chunk, text=new))

        return out


LIVE_LOST_DIVERGED: dict[str, Any] = {
    "message": "the stream this answer was read from broke off, and computing it again gave "
    "another answer: ask again",
    "status": 503,
}


def piece_of(chunk: EngineChunk) -> dict[str, Any]:
    """A piece of a streamed answer as the live stream carries it (see :func:`pieces`)."""
    piece: dict[str, Any] = {"i": chunk.index, "t": chunk.text}
    if chunk.finish_reason is not None:
        piece["f"] = chunk.finish_reason
    if chunk.usage is not None:
        piece["u"] = [chunk.usage.prompt_tokens, chunk.usage.completion_tokens]
    return piece


async def pieces(live: AsyncIterator[dict[str, Any]]) -> AsyncGenerator[EngineChunk, None]:
    """The pieces read from a live stream, as engine chunks again."""
    async for p in live:
        usage = Usage(int(p["u"][0]), int(p["u"][1])) if "u" in p else None
        yield EngineChunk(int(p["i"]), str(p.get("t", "")), p.get("f"), usage)
