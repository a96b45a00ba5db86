"""The OpenAI request bodies `jaxllm serve` accepts, validated by pydantic, and its error shape.

Unknown fields are refused (as OpenAI does), and so are OpenAI features this server does not implement
(tools, penalties other than repetition_penalty…), each with a message naming it. Extensions shared with
vLLM: `top_k`, `repetition_penalty`, `ignore_eos`.

Log-probabilities are shaped here: the legacy completions object (`tokens`, `token_logprobs`,
`top_logprobs`, `text_offset`) and chat's `logprobs.content` (`token`, `logprob`, `bytes`, `top_logprobs`).
"""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

from jaxllm.inference.detokenize import TokenTexts
from jaxllm.inference.engine import TOP_LOGPROBS, Scores

# OpenAI parameters that are understood but not implemented: refused when set to anything but off.
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "parallel_tool_calls", "logit_bias",
               "suffix")
TopN = Annotated[int, Field(ge=0, le=TOP_LOGPROBS)]  # alternatives per position


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class _Sampling(BaseModel):
    """Fields common to both endpoints."""
    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    n: Annotated[int, Field(ge=1, le=128)] = 1
    stop: Union[str, Annotated[list[str], Field(max_length=16)], None] = None
    seed: StrictInt | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    user: str | None = None
    tools: list | None = None
    tool_choice: Union[str, dict, None] = None
    functions: list | None = None
    function_call: Union[str, dict, None] = None
    parallel_tool_calls: bool | None = None
    logit_bias: dict | None = None
    suffix: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return stops

    def refuse_unsupported(self) -> None:
        """APIError 400 for a set OpenAI option this server does not implement."""
        for name in UNSUPPORTED:
            if getattr(self, name) not in (None, [], {}, False):
                raise APIError(400, f"'{name}' is not supported by this server", param=name)
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise APIError(400, f"'{name}' is not supported by this server (repetition_penalty is)", param=name)
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "'stream_options' is only allowed with stream=true", param="stream_options")


class ChatRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: TopN | None = None
    response_format: dict | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        if self.response_format not in (None, {"type": "text"}):
            raise APIError(400, "only response_format {\"type\": \"text\"} is supported", param="response_format")

    def new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def top_n(self) -> int | None:
        """Alternatives per token, or None without logprobs."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    prompt: Union[str, Annotated[list[str], Field(min_length=1)], Annotated[list[StrictInt], Field(min_length=1)],
                  Annotated[list[Annotated[list[StrictInt], Field(min_length=1)]], Field(min_length=1)]]
    max_tokens: Annotated[int, Field(ge=0)] | None = None  # 0 with echo: score the prompt only
    echo: bool = False
    logprobs: TopN | None = None
    best_of: int | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.max_tokens == 0 and not self.echo:
            raise APIError(400, "max_tokens 0 is only allowed with echo (to score the prompt)", param="max_tokens")
        if self.best_of not in (None, self.n):
            raise APIError(400, "'best_of' other than n is not supported by this server", param="best_of")

    def new_tokens(self) -> int:
        return 16 if self.max_tokens is None else self.max_tokens  # OpenAI's default for completions

    def top_n(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list:
        """Each prompt: text, or a list of token ids."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(self.prompt)


def completion_logprobs(texts: TokenTexts, ids, scores: Scores, top_n: int, first: bool = False) -> dict:
    """The legacy completions `logprobs` of tokens `ids` with their Scores, appended to `texts` (whose
    offsets are into the returned text). `first`: ids[0] is the prompt's first token, which has no
    log-probability (null, as OpenAI's echo); `scores` then cover ids[1:]."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for k, token in enumerate(ids):
        j, top = k - first, None
        if j >= 0:  # the top_n most likely, and the token itself (so up to top_n + 1 entries, as OpenAI)
            top = {}
            for alt, lp in zip(scores.top_ids[j, :top_n], scores.top_logprobs[j, :top_n]):
                top.setdefault(texts.string(int(alt)), float(lp))
        string, _, offset = texts.add(token)
        if top is not None:
            top.setdefault(string, float(scores.logprob[j]))
        out["tokens"].append(string)
        out["token_logprobs"].append(None if j < 0 else float(scores.logprob[j]))
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
    return out


def chat_logprobs(texts: TokenTexts, ids, scores: Scores, top_n: int) -> list[dict]:
    """Chat's `logprobs.content` entries for tokens `ids` with their Scores, appended to `texts`."""
    content = []
    for j, token in enumerate(ids):
        top = []
        for alt, lp in zip(scores.top_ids[j, :top_n], scores.top_logprobs[j, :top_n]):
            string = texts.string(int(alt))
            top.append({"token": string, "logprob": float(lp), "bytes": texts.token_bytes(int(alt), string)})
        string, token_bytes, _ = texts.add(token)
        content.append({"token": string, "logprob": float(scores.logprob[j]), "bytes": token_bytes,
                        "top_logprobs": top})
    return content


def merge_logprobs(parts: list[dict]) -> dict:
    """One completions `logprobs` object from consecutive ones."""
    return {key: [x for part in parts for x in part[key]]
            for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}


def validation_message(errors) -> tuple[str, str | None]:
    """One line (and the parameter at fault) from pydantic's errors: the first one."""
    error = errors[0]
    loc = [str(x) for x in error.get("loc", ()) if x != "body"]
    # A union's failed branches add their type names to the location; the field is what the user wrote.
    param = ".".join(x for x in loc if not any(c in x for c in "[]()") and x not in ("str", "int", "list"))
    if error.get("type") == "json_invalid":
        return f"the request body is not valid JSON ({error.get('msg', '')})", None
    if error.get("type") == "extra_forbidden":
        return f"unrecognized request argument: {param}", param
    if error.get("type") == "missing":
        return f"'{param}' is required", param
    return f"'{param or 'body'}': {error.get('msg', 'invalid value')}", param or None
