"""The OpenAI-compatible HTTP API (FastAPI): /v1/chat/completions, /v1/completions, /v1/models, /health.

Requests become `Request`s for the batcher (jaxllm.inference.batcher), which runs the engine; this
module only translates: bodies to prompt ids and sampling settings (the family's chat template and
generation defaults for what a request leaves out), events to JSON or server-sent events, and
failures to OpenAI's error shape with the right status (400 bad request, 401 bad key, 404 unknown
model, 413 body too large, 503 full or shutting down, 504 timed out).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import secrets
import time
import uuid

from fastapi import Depends, FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from jaxllm.inference.batcher import Batcher, Event, Request, ServerFull, Stream
from jaxllm.inference.detokenize import TokenTexts
from jaxllm.inference.engine import Engine, SlotSampling
from jaxllm.inference.sampling import FAMILY_DEFAULTS, SamplingParams
from jaxllm.serve.protocol import (APIError, ChatRequest, CompletionRequest, chat_logprobs, completion_logprobs,
                                   merge_logprobs, validation_message)
from jaxllm.tokenizer import TokenizerError, get_chat_template, template_for_family


@dataclasses.dataclass(frozen=True)
class Limits:
    """max_tokens: new tokens per request at most (and chat's default); max_requests: running or waiting
    at once (one per choice of n); max_request_bytes: a body's size; request_timeout: seconds from
    arrival to the last token; api_key: required as `Authorization: Bearer KEY` when set."""
    max_tokens: int = 2048
    max_requests: int = 64
    max_request_bytes: int = 1 << 20
    request_timeout: float | None = 600.0
    api_key: str | None = None


class _ClientGone(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413 before the app reads any of it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._reject(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._reject(scope, receive, send)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _reject(self, scope, receive, send):
        error = APIError(413, f"the request body is larger than this server's limit of {self.limit} bytes")
        await JSONResponse(error.body(), status_code=413)(scope, receive, send)


class Service:
    """What the endpoints need of the model: the engine behind a batcher, the tokenizer, the family's
    chat template and generation defaults."""

    def __init__(self, engine: Engine, config, tok, *, model_name: str, limits: Limits):
        self.engine, self.config, self.tok, self.model_name, self.limits = engine, config, tok, model_name, limits
        self.template = get_chat_template(template_for_family(config.family))
        self.defaults = FAMILY_DEFAULTS.get(config.family, SamplingParams())
        self.batcher: Batcher | None = None
        self.created = int(time.time())

    # -- from a body to batcher requests ---------------------------------------------------------------

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{self.model_name}'",
                           param="model", code="model_not_found")

    def chat_prompt(self, body: ChatRequest) -> list[int]:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        try:
            return self.template.prompt(self.tok, messages)
        except TokenizerError as err:
            raise APIError(400, f"messages: {err}", param="messages") from None

    def completion_prompt(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tok.encode(prompt, bos=getattr(self.tok, "add_bos", self.config.family != "baichuan2"))
        limit = self.tok.vocab_size
        for i in prompt:
            if not 0 <= i < limit:
                raise APIError(400, f"prompt token {i} is outside the vocabulary [0, {limit})", param="prompt")
        return list(prompt)

    def requests(self, body, prompt: list[int], stop_ids, context=(), score_prompt: bool = False) -> list[Request]:
        """One batcher request per choice (n), with the body's settings or the family's defaults; the
        new tokens' log-probabilities when the body asks for them, the prompt's with `score_prompt`."""
        engine, limits = self.engine, self.limits
        if len(prompt) > engine.max_prompt:
            raise APIError(400, f"the prompt has {len(prompt)} tokens; this server takes at most "
                                f"{engine.max_prompt}", param="messages" if isinstance(body, ChatRequest) else "prompt")
        room = engine.max_len - len(prompt)
        wanted = body.new_tokens()
        if wanted is None:
            wanted = min(limits.max_tokens, room)
        elif wanted > limits.max_tokens:
            raise APIError(400, f"max_tokens is {wanted}; this server allows at most {limits.max_tokens}",
                           param="max_tokens")
        elif wanted > room:
            raise APIError(400, f"this model's context is {engine.max_len} tokens, but {len(prompt) + wanted} "
                                f"were requested ({len(prompt)} in the prompt, {wanted} to generate)",
                           param="max_tokens")
        d = self.defaults
        top_k = d.top_k if body.top_k is None else max(body.top_k, 0)
        seed = secrets.randbits(31) if body.seed is None else body.seed
        stop_ids = () if body.ignore_eos else tuple(dict.fromkeys(stop_ids))
        return [Request(prompt, wanted, SlotSampling(
            temperature=d.temperature if body.temperature is None else body.temperature, top_k=top_k,
            top_p=d.top_p if body.top_p is None else body.top_p,
            repetition_penalty=d.repetition_penalty if body.repetition_penalty is None else body.repetition_penalty,
            seed=seed, subseed=choice, stop_ids=stop_ids), tuple(body.stop or ()), context, limits.request_timeout,
            logprobs=body.top_n() is not None, score_prompt=score_prompt)
            for choice in range(body.n)]

    def submit(self, requests: list[Request]) -> list[Stream]:
        """All or none: 503 when the batcher has no room for every choice."""
        if self.batcher is None:
            raise APIError(503, "the server is starting", type_="server_error")
        if self.batcher.load() + len(requests) > self.batcher.max_requests and not self.batcher.closing:
            raise APIError(503, f"the server is at capacity ({self.batcher.max_requests} requests running or "
                                f"waiting); retry later", type_="server_error")
        streams = []
        try:
            for request in requests:
                streams.append(self.batcher.submit(request))
        except ServerFull as err:
            for stream in streams:
                stream.cancel()
            raise APIError(503, str(err), type_="server_error") from None
        except ValueError as err:
            for stream in streams:
                stream.cancel()
            raise APIError(400, str(err)) from None
        return streams


def _finish_error(event: Event) -> APIError | None:
    if event.finish_reason == "timeout":
        return APIError(504, event.error or "timed out", type_="timeout")
    if event.finish_reason == "error":
        return APIError(500, event.error or "generation failed", type_="server_error")
    return None


async def _collect(http: HTTPRequest, streams: list[Stream]) -> list[Event]:
    """Every stream's result; the streams are cancelled if the client goes away first."""
    task = asyncio.ensure_future(asyncio.gather(*(s.result() for s in streams)))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await http.is_disconnected():
                raise _ClientGone
    finally:
        for stream in streams:
            stream.cancel()
        if not task.done():
            task.cancel()


def _sse(data) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _merged(streams: list[Stream]):
    """(choice, event) from all streams as they come."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, stream):
        async for event in stream:
            await queue.put((i, event))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        finished = 0
        while finished < len(streams):
            i, event = await queue.get()
            yield i, event
            finished += event.finish_reason is not None
    finally:
        for task in tasks:
            task.cancel()


def create_app(service: Service) -> FastAPI:
    """The FastAPI app; its lifespan starts the batcher and, at shutdown, lets it finish what it took."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.batcher = Batcher(service.engine, service.tok.decode, max_requests=service.limits.max_requests)
        service.batcher.start()
        yield
        await service.batcher.shutdown()

    app = FastAPI(title="jaxllm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=service.limits.max_request_bytes)

    @app.exception_handler(APIError)
    async def api_error(request, err: APIError):
        return JSONResponse(err.body(), status_code=err.status,
                            headers={"Retry-After": "1"} if err.status == 503 else None)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, err: RequestValidationError):
        message, param = validation_message(err.errors())
        return JSONResponse(APIError(400, message, param=param).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request, err: HTTPException):
        return JSONResponse(APIError(err.status_code, str(err.detail)).body(), status_code=err.status_code)

    @app.exception_handler(_ClientGone)
    async def gone(request, err):
        return Response(status_code=499)

    def authorized(http: HTTPRequest) -> None:
        key = service.limits.api_key
        if key is None:
            return
        given = http.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise APIError(401, "missing or incorrect API key (send 'Authorization: Bearer KEY')",
                           code="invalid_api_key")

    @app.get("/health")
    async def health():
        batcher = service.batcher
        closing = batcher is None or batcher.closing
        stats = {} if batcher is None else batcher.stats()
        return JSONResponse({"status": "draining" if closing else "ok", **stats}, status_code=503 if closing else 200)

    def model_card():
        return {"id": service.model_name, "object": "model", "created": service.created, "owned_by": "jaxllm",
                "max_model_len": service.engine.max_len}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}", dependencies=[Depends(authorized)])
    async def model(name: str):
        service.check_model(name)
        return model_card()

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat(body: ChatRequest, http: HTTPRequest):
        service.check_model(body.model)
        body.refuse_unsupported()
        prompt = service.chat_prompt(body)
        streams = service.submit(service.requests(body, prompt, service.template.stop_ids(service.tok)))
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": service.model_name}
        usage = lambda events: {"prompt_tokens": len(prompt), "completion_tokens": sum(e.tokens for e in events),
                                "total_tokens": len(prompt) + sum(e.tokens for e in events)}
        top_n = body.top_n()
        texts = [TokenTexts(service.tok) for _ in streams]  # per choice: its tokens' strings so far
        logprobs = lambda i, e: None if top_n is None else {"content": chat_logprobs(texts[i], e.token_ids,
                                                                                     e.logprobs, top_n)}
        if body.stream:
            return _stream(streams, head, "chat.completion.chunk", usage,
                           body.stream_options is not None and body.stream_options.include_usage,
                           lambda i, e, first: [{"index": i, "delta": {"content": e.text}, "logprobs": logprobs(i, e),
                                                 "finish_reason": None}] if e.text or e.token_ids else [],
                           lambda i: {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                      "finish_reason": None},
                           lambda i, reason: {"index": i, "delta": {}, "logprobs": None, "finish_reason": reason})
        events = await _collect(http, streams)
        _raise_failure(events)
        return {**head, "object": "chat.completion", "usage": usage(events),
                "choices": [{"index": i, "message": {"role": "assistant", "content": e.text},
                             "logprobs": logprobs(i, e), "finish_reason": e.finish_reason}
                            for i, e in enumerate(events)]}

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest, http: HTTPRequest):
        service.check_model(body.model)
        body.refuse_unsupported()
        prompts = [service.completion_prompt(p) for p in body.prompts()]
        requests = [r for p in prompts for r in service.requests(body, p, [service.tok.eos_id], context=p[-8:],
                                                                 score_prompt=body.echo)]
        streams = service.submit(requests)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": service.model_name}
        prompt_tokens = sum(len(p) for p in prompts)
        usage = lambda events: {"prompt_tokens": prompt_tokens, "completion_tokens": sum(e.tokens for e in events),
                                "total_tokens": prompt_tokens + sum(e.tokens for e in events)}
        top_n = body.top_n()
        # per choice: its tokens' strings so far; offsets count from the echoed prompt, else the new text
        texts = [TokenTexts(service.tok, () if body.echo else r.context) for r in requests]

        def pieces(i, event: Event, first: bool) -> list[tuple[str, dict | None]]:
            """(text, logprobs) of the echoed prompt (with the first event) and of the event's tokens."""
            out = []
            if first and body.echo:
                prompt = requests[i].prompt
                if top_n is None:
                    for token in prompt:
                        texts[i].add(token)
                    out.append((texts[i].text, None))
                else:
                    part = completion_logprobs(texts[i], prompt, event.prompt, top_n, first=True)
                    out.append((texts[i].text, part))
            if top_n is not None and event.token_ids:
                out.append((event.text, completion_logprobs(texts[i], event.token_ids, event.logprobs, top_n)))
            elif event.text:
                out.append((event.text, None))
            return out

        if body.stream:
            return _stream(streams, head, "text_completion", usage,
                           body.stream_options is not None and body.stream_options.include_usage,
                           lambda i, e, first: [{"index": i, "text": text, "logprobs": lp, "finish_reason": None}
                                                for text, lp in pieces(i, e, first)],
                           None,
                           lambda i, reason: {"index": i, "text": "", "logprobs": None, "finish_reason": reason})
        events = await _collect(http, streams)
        _raise_failure(events)
        choices = []
        for i, e in enumerate(events):
            parts = pieces(i, e, first=True)
            logprobs = None if top_n is None else merge_logprobs([lp for _, lp in parts if lp is not None])
            choices.append({"index": i, "text": "".join(text for text, _ in parts), "logprobs": logprobs,
                            "finish_reason": e.finish_reason})
        return {**head, "object": "text_completion", "usage": usage(events), "choices": choices}

    return app


def _raise_failure(events: list[Event]) -> None:
    for event in events:
        error = _finish_error(event)
        if error is not None:
            raise error


def _stream(streams, head, kind, usage, include_usage, event_choices, first_choice, finish_choice):
    """Server-sent events: a chunk per choice `event_choices(i, event, first)` gives for an event (a piece
    of text, its tokens' log-probabilities), one per finished choice, the usage when asked for, then
    [DONE]. The client going away cancels every choice (Starlette cancels this generator)."""

    async def events():
        chunk = lambda choices, **extra: _sse({**head, "object": kind, "choices": choices, **extra,
                                               **({"usage": None} if include_usage and "usage" not in extra else {})})
        finished: list[Event] = [None] * len(streams)
        started = [False] * len(streams)
        try:
            if first_choice is not None:
                yield chunk([first_choice(i) for i in range(len(streams))])
            async for i, event in _merged(streams):
                error = _finish_error(event)
                if error is not None:
                    yield _sse(error.body())
                    return
                for choice in event_choices(i, event, not started[i]):
                    yield chunk([choice])
                started[i] = True
                if event.finish_reason is not None:
                    finished[i] = event
                    yield chunk([finish_choice(i, event.finish_reason)])
            if include_usage:
                yield chunk([], usage=usage(finished))
            yield "data: [DONE]\n\n"
        finally:
            for stream in streams:
                stream.cancel()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
