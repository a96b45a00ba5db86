"""The engine loop: requests wait in a queue that one asyncio task drains; each joins a free decode slot
at the next step and leaves when done. That task owns the engine and runs its device calls on one worker
thread, so the event loop stays free for clients while the device computes.

Each request gets its text as it is decoded (`Stream`), ending at a stop id, a stop string, its token
budget, its deadline or its cancellation (a client that went away): the slot is free at the next step.
A request can ask for its tokens' log-probabilities (`logprobs`) and its prompt's (`score_prompt`, then
max_tokens may be 0: the prompt is only scored). Knows nothing of HTTP.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import time
from typing import Callable, Sequence

import numpy as np

from jaxllm.inference.detokenize import TextStream
from jaxllm.inference.engine import Engine, Scores, SlotSampling

log = logging.getLogger("jaxllm.serve")


class ServerFull(RuntimeError):
    """No room for another request (or the server is shutting down): retry later."""


@dataclasses.dataclass
class Request:
    """prompt: ids; max_tokens: new tokens at most (0 only with score_prompt); stop_strings end the text
    before them; context: ids the text continues (a completion's prompt, for the first word's leading
    space); timeout: seconds from submission; logprobs: each new token's Scores in the events;
    score_prompt: the prompt's Scores in the first event."""
    prompt: list[int]
    max_tokens: int
    sampling: SlotSampling = SlotSampling()
    stop_strings: tuple[str, ...] = ()
    context: Sequence[int] = ()
    timeout: float | None = None
    logprobs: bool = False
    score_prompt: bool = False


@dataclasses.dataclass
class Event:
    """A piece of text; the last event of a stream has `finish_reason` ("stop", "length", "timeout",
    "cancelled" or "error", with `error` saying what went wrong). `tokens`: new tokens so far. With
    logprobs: `token_ids` are the new tokens since the last event and `logprobs` their Scores (every
    generated token once, the stop id included, though the text may not show all of them yet);
    `prompt` the prompt's Scores (tokens 1 onwards), in the first event of a request that asked."""
    text: str
    tokens: int
    finish_reason: str | None = None
    error: str | None = None
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: Scores | None = None
    prompt: Scores | None = None


class Stream:
    """One request's events, in order. Iterate it (`async for event in stream`) or await `result()`;
    `cancel()` ends it and frees its slot."""

    def __init__(self, request: Request, batcher: "Batcher"):
        self.request, self._batcher = request, batcher
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = False
        self.finished = False
        self.deadline = None if request.timeout is None else time.monotonic() + request.timeout

    def cancel(self) -> None:
        if not self.finished:
            self.cancelled = True
            self._batcher._wake.set()

    def __aiter__(self):
        return self._iterate()

    async def _iterate(self):
        while True:
            event = await self.events.get()
            yield event
            if event.finish_reason is not None:
                return

    async def result(self) -> Event:
        """All the text (and token ids, Scores) as one event, with the finish reason."""
        events = [event async for event in self]
        last, scored = events[-1], [e.logprobs for e in events if e.logprobs is not None]
        prompt = next((e.prompt for e in events if e.prompt is not None), None)
        return dataclasses.replace(last, text="".join(e.text for e in events),
                                   token_ids=[i for e in events for i in e.token_ids],
                                   logprobs=Scores.concat(scored) if self.request.logprobs else None, prompt=prompt)


@dataclasses.dataclass
class _Running:
    stream: Stream
    text: TextStream
    remaining: int
    tokens: int = 0
    ids: list[int] = dataclasses.field(default_factory=list)       # new tokens not yet in an event
    scores: list[Scores] = dataclasses.field(default_factory=list)  # their Scores
    prompt: Scores | None = None                                    # the prompt's, until the first event

    def pending(self) -> dict:
        """The event fields of what was not sent yet (then forgotten)."""
        logprobs = Scores.concat(self.scores) if self.stream.request.logprobs else None
        out = {"token_ids": self.ids, "logprobs": logprobs, "prompt": self.prompt}
        self.ids, self.scores, self.prompt = [], [], None
        return out


class Batcher:
    """Drives `engine` from an asyncio loop. `decode`: ids → text. `max_requests`: requests running or
    waiting at once; `submit` raises ServerFull past it."""

    def __init__(self, engine: Engine, decode: Callable[[list[int]], str], *, max_requests: int = 64):
        self.engine, self.decode, self.max_requests = engine, decode, max_requests
        self.waiting: collections.deque[Stream] = collections.deque()
        self.running: dict[int, _Running] = {}
        self.closing = False
        self.ended: collections.Counter[str] = collections.Counter()  # requests by finish reason
        self._wake = asyncio.Event()
        self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="jaxllm-engine")
        self._task: asyncio.Task | None = None

    # -- public ----------------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="jaxllm-engine-loop")

    def submit(self, request: Request) -> Stream:
        """Queue a request (ValueError if it can never fit; ServerFull if there is no room now)."""
        if self.closing:
            raise ServerFull("the server is shutting down")
        if self.load() >= self.max_requests:
            raise ServerFull(f"the server is at capacity ({self.max_requests} requests running or waiting); "
                             f"retry later")
        self.check(request)
        stream = Stream(request, self)
        self.waiting.append(stream)
        self._wake.set()
        return stream

    def check(self, request: Request) -> None:
        """ValueError naming what does not fit this engine."""
        engine = self.engine
        if not request.prompt:
            raise ValueError("the prompt is empty")
        if len(request.prompt) > engine.max_prompt:
            raise ValueError(f"the prompt has {len(request.prompt)} tokens; this server takes at most "
                             f"{engine.max_prompt}")
        if request.max_tokens < (0 if request.score_prompt else 1):
            raise ValueError(f"max_tokens must be >= 1 (0 only when scoring the prompt), got {request.max_tokens}")
        if len(request.sampling.stop_ids) > engine.max_stop_ids:
            raise ValueError(f"at most {engine.max_stop_ids} stop ids, got {len(request.sampling.stop_ids)}")

    def load(self) -> int:
        return len(self.running) + len(self.waiting)

    def stats(self) -> dict:
        """Slots, requests running and waiting, and requests ended so far by finish reason."""
        return {"slots": self.engine.slots, "running": len(self.running), "waiting": len(self.waiting),
                "ended": dict(self.ended)}

    async def shutdown(self) -> None:
        """Refuse new requests, finish every request already taken, then stop the loop."""
        self.closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        self._worker.shutdown(wait=True)

    # -- the loop --------------------------------------------------------------------------------------

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._drop_ended()
            await self._admit(loop)
            if not self.running:
                if self.closing and not self.waiting:
                    return
                if not self.waiting:
                    self._wake.clear()
                    await self._wake.wait()
                continue
            active = np.zeros(self.engine.slots, bool)
            remaining = np.zeros(self.engine.slots, np.int32)
            for slot, run in self.running.items():
                active[slot], remaining[slot] = True, run.remaining
            scored = any(run.stream.request.logprobs for run in self.running.values())
            try:
                tokens, valid, scores = await loop.run_in_executor(self._worker, self.engine.step_scored, active,
                                                                   remaining, scored)
            except Exception as err:  # a device failure: every running request learns of it
                log.exception("decode step failed")
                for slot in list(self.running):
                    self._finish(slot, "error", f"decode failed: {err}")
                continue
            for step, (step_tokens, step_valid) in enumerate(zip(tokens, valid)):
                for slot in np.flatnonzero(step_valid):
                    if int(slot) in self.running:
                        self._deliver(int(slot), int(step_tokens[slot]), scores[step, slot:slot + 1])

    async def _admit(self, loop) -> None:
        free = [s for s in range(self.engine.slots) if s not in self.running]
        while free and self.waiting:
            stream = self.waiting.popleft()
            if stream.cancelled or self._expired(stream):
                self._end_waiting(stream)
                continue
            slot, request = free.pop(0), stream.request
            budget = min(request.max_tokens, self.engine.max_len - len(request.prompt))
            self.running[slot] = _Running(stream, TextStream(self.decode, request.stop_strings, request.context),
                                          budget)
            try:
                token, first, prompt = await loop.run_in_executor(
                    self._worker, self.engine.admit_scored, slot, request.prompt, request.sampling,
                    request.score_prompt)
            except Exception as err:
                log.exception("prefill failed")
                self._finish(slot, "error", f"prefill failed: {err}")
                continue
            self.running[slot].prompt = prompt
            if budget <= 0:  # the prompt only scored: its first token is not wanted
                self._finish(slot, "length")
                continue
            self._deliver(slot, token, first)

    def _deliver(self, slot: int, token: int, scores: Scores) -> None:
        run = self.running[slot]
        run.tokens += 1
        run.remaining -= 1
        if run.stream.request.logprobs:
            run.ids.append(token)
            run.scores.append(scores)
        if token in run.stream.request.sampling.stop_ids:
            self._finish(slot, "stop")
            return
        piece = run.text.add(token)
        if run.text.stopped:
            self._finish(slot, "stop", piece=piece)
        elif run.remaining <= 0:
            self._finish(slot, "length", piece=piece)
        elif piece or run.ids:
            run.stream.events.put_nowait(Event(piece, run.tokens, **run.pending()))

    def _finish(self, slot: int, reason: str, error: str | None = None, piece: str = "") -> None:
        run = self.running.pop(slot)
        if reason in ("stop", "length"):
            piece += run.text.finish()
        run.stream.finished = True
        self.ended[reason] += 1
        run.stream.events.put_nowait(Event(piece, run.tokens, reason, error, **run.pending()))

    def _expired(self, stream: Stream) -> bool:
        return stream.deadline is not None and time.monotonic() > stream.deadline

    def _end_waiting(self, stream: Stream) -> None:
        stream.finished = True
        self.ended["cancelled" if stream.cancelled else "timeout"] += 1
        if stream.cancelled:
            stream.events.put_nowait(Event("", 0, "cancelled"))
        else:
            stream.events.put_nowait(Event("", 0, "timeout", f"timed out after {stream.request.timeout:g} s"))

    def _drop_ended(self) -> None:
        """Free the slots of cancelled and timed-out requests; drop such requests from the queue."""
        for slot, run in list(self.running.items()):
            if run.stream.cancelled:
                self._finish(slot, "cancelled")
            elif self._expired(run.stream):
                self._finish(slot, "timeout", f"timed out after {run.stream.request.timeout:g} s")
        for stream in [s for s in self.waiting if s.cancelled or self._expired(s)]:
            self.waiting.remove(stream)
            self._end_waiting(stream)
