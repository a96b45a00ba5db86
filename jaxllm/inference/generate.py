"""Batched KV-cached generation: one jitted prefill, then a jitted `lax.while_loop` decode that can be
resumed, so the host can end rows at stop strings between chunks of steps (and `stream` can yield
each token) while every step runs the same compiled program.

Prompts of different lengths are left-padded (segment id 0, so nothing attends to the padding) and
each row's positions start at 0 at its first real token, so a batched row equals generating it alone.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.inference.sampling import SamplingParams, sample
from jaxllm.inference.stops import check_stop_strings, find_stop, stop_length
from jaxllm.models import decoding_layout, forward, init_kv_cache, is_unrolled, kv_cache_axes


@dataclasses.dataclass
class Generation:
    """tokens: new ids per prompt, ending with the stop token (or the token that completed a stop string)
    when one was produced; logprobs: log p of each new token under the model (temperature 1, no filters,
    all vocabulary rows) when asked for; steps: decode steps run (fewer than max_new_tokens when every
    row stopped early)."""
    tokens: list[list[int]]
    stopped: list[bool]
    logprobs: list[list[float]] | None = None
    steps: int = 0


def bucket(n: int, minimum: int = 16) -> int:
    """Next power of two ≥ n, so prompt lengths share compiled programs."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int = 0):
    """tokens, positions, segment_ids: int32[batch, length]."""
    batch = len(prompts)
    tokens = np.full((batch, length), pad_id, np.int32)
    positions = np.zeros((batch, length), np.int32)
    segments = np.zeros((batch, length), np.int32)
    for i, p in enumerate(prompts):
        if not len(p):
            raise ValueError(f"prompt {i} is empty")
        if len(p) > length:
            raise ValueError(f"prompt {i} has {len(p)} tokens, more than {length}")
        tokens[i, length - len(p):] = p
        positions[i, length - len(p):] = np.arange(len(p))
        segments[i, length - len(p):] = 1
    return tokens, positions, segments


def effective_vocab_limit(config: ModelConfig, vocab_limit: int | None = None) -> int | None:
    """Ids at or past this are never sampled: the fewer of `vocab_limit` (a tokenizer's piece count) and
    the config's `tokenizer_vocab_size`; None when every embedding row is a piece."""
    limit = min((n for n in (vocab_limit, config.tokenizer_vocab_size) if n is not None),
                default=config.vocab_size)
    if limit < 1:
        raise ValueError(f"vocab_limit must be >= 1, got {limit}")
    return None if limit >= config.vocab_size else int(limit)


def _cache_constraint(cache, mesh):
    if mesh is None:
        return cache
    from jaxllm.sharding import tree_shardings
    from jax.sharding import PartitionSpec as P

    specs = jax.tree.map(lambda v: P(*v), kv_cache_axes(cache), is_leaf=lambda v: isinstance(v, tuple) and all(
        isinstance(a, (str, type(None))) for a in v))
    return jax.lax.with_sharding_constraint(cache, tree_shardings(specs, cache, mesh))


def batch_shards(mesh) -> int:
    """How many ways the batch dimension is split on `mesh` (its data and fsdp axes)."""
    from jaxllm.sharding import batch_sharding

    axes = batch_sharding(mesh).spec[0] or ()
    return int(np.prod([mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes)]))


def on_mesh(mesh):
    """The mesh and logical-axis rules the model's sharding constraints resolve through."""
    if mesh is None:
        return contextlib.nullcontext()
    from jaxllm.sharding import axis_rules

    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(axis_rules())
    return stack


def _choose(s, logits, *, sampling, stop_ids, vocab_limit, logprobs):
    """Sample the next token of every row not done from logits float32[batch, vocab]; record it as new
    token s["i"]. A row ends at a stop id; finished rows get 0 and log p 0. The state carries `seen`
    (bool[batch, vocab]) only under a repetition penalty and `logp` only when asked for: each is a pass
    over [batch, vocab] per step that batch-8 decoding paid for nothing."""
    i, done = s["i"], s["done"]
    rows = jnp.arange(done.shape[0])
    rng, key = jax.random.split(s["rng"])
    token = jnp.where(done, 0, sample(logits, key, sampling, s.get("seen"), vocab_limit))
    s = {**s, "i": i + 1, "token": token, "rng": rng, "out": s["out"].at[:, i].set(token),
         "done": done | jnp.any(token[:, None] == jnp.asarray(stop_ids, jnp.int32)[None, :], axis=-1)}
    if "seen" in s:
        s["seen"] = s["seen"].at[rows, token].set(s["seen"][rows, token] | ~done)
    if logprobs:
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], axis=-1)[:, 0]
        s["logp"] = s["logp"].at[:, i].set(jnp.where(done, 0.0, logp))
    return s


_SAMPLING = ("config", "sampling", "stop_ids", "vocab_limit", "mesh", "logprobs")


@functools.partial(jax.jit, static_argnames=(*_SAMPLING, "cache_len"))
def prefill_program(params, tokens, positions, segments, rng, *, config, sampling, stop_ids, vocab_limit, mesh,
             logprobs, cache_len):
    """Read the prompts and sample the first new token (so it is out after one forward: time to first
    token is the prefill). `out`/`logp` have room for max_new_tokens."""
    batch, steps = tokens.shape[0], sampling.max_new_tokens
    cache = _cache_constraint(init_kv_cache(config, batch, cache_len, per_layer=is_unrolled(params)), mesh)
    logits, cache = forward(config, params, tokens, positions, segments, cache, last_only=True)
    state = dict(i=jnp.int32(0), token=jnp.zeros((batch,), jnp.int32), cache=cache, pos=positions[:, -1] + 1,
                 done=jnp.zeros((batch,), bool), out=jnp.zeros((batch, steps), jnp.int32), rng=rng)
    if sampling.repetition_penalty != 1.0:
        rows = jnp.arange(batch)[:, None]
        state["seen"] = jnp.zeros((batch, logits.shape[-1]), bool).at[rows, tokens].max(segments > 0)
    if logprobs:
        state["logp"] = jnp.zeros((batch, steps), jnp.float32)
    return _choose(state, logits[:, -1], sampling=sampling, stop_ids=stop_ids, vocab_limit=vocab_limit,
                   logprobs=logprobs)


@functools.partial(jax.jit, static_argnames=_SAMPLING, donate_argnames=("state",))
def decode_program(params, state, until, ended, *, config, sampling, stop_ids, vocab_limit, mesh, logprobs):
    """Feed each row's last token and sample the next, for new tokens state["i"] .. until-1 or until every
    row is done; `ended` bool[batch] marks rows the host has ended (a stop string)."""
    ones = jnp.ones((ended.shape[0], 1), jnp.int32)

    def body(s):
        logits, cache = forward(config, params, s["token"][:, None], s["pos"][:, None], ones, s["cache"])
        s = {**s, "cache": _cache_constraint(cache, mesh), "pos": s["pos"] + 1}
        return _choose(s, logits[:, -1], sampling=sampling, stop_ids=stop_ids, vocab_limit=vocab_limit,
                       logprobs=logprobs)

    state = {**state, "done": state["done"] | ended}
    return jax.lax.while_loop(lambda s: (s["i"] < until) & ~jnp.all(s["done"]), body, state)


def buffer_lengths(config: ModelConfig, prompt_len: int, max_new_tokens: int) -> tuple[int, int]:
    """(prompt length the batch is padded to, KV-cache length): powers of two, so runs share programs (the
    cache has room for a bucket of new tokens: max_new_tokens 40 and 60 share them; the loop stops at
    max_new_tokens); a RoPE cache past the model's context is cut to what is needed."""
    length, room = bucket(prompt_len), bucket(max_new_tokens)
    cache_len = bucket(length + room)
    if cache_len > config.max_position_embeddings and config.position == "rope":
        cache_len = length + room
    return length, cache_len


class _Run:
    """One batch being decoded: the device state, advanced chunk by chunk, and the host's copy of it
    (`i` new tokens so far, `out`, `done`)."""

    def __init__(self, config, params, prompts, sampling, rng, *, stop_ids, pad_id, mesh, vocab_limit,
                 logprobs=False):
        self.steps, self.mesh = sampling.max_new_tokens, mesh
        length, cache_len = buffer_lengths(config, max(len(p) for p in prompts), self.steps)
        room = bucket(self.steps)  # the programs' max_new_tokens: runs of 40 and 60 new tokens share them
        self.rows = len(prompts)
        if mesh is not None:  # the batch must split evenly over the data axes: pad it with copies
            prompts = list(prompts) + [prompts[0]] * (-len(prompts) % batch_shards(mesh))
        tokens, positions, segments = left_pad(prompts, length, pad_id)
        self.static = dict(config=config, sampling=dataclasses.replace(sampling, max_new_tokens=room),
                           stop_ids=tuple(int(s) for s in stop_ids),
                           vocab_limit=effective_vocab_limit(config, vocab_limit), mesh=mesh, logprobs=logprobs)
        with on_mesh(mesh):
            self.params = decoding_layout(params)  # on CPU a per-layer copy, dropped with this run
            if mesh is not None:
                from jaxllm.sharding import batch_sharding

                sh = batch_sharding(mesh)
                tokens, positions, segments = (jax.device_put(x, sh) for x in (tokens, positions, segments))
            self.state = prefill_program(self.params, tokens, positions, segments, rng, cache_len=cache_len, **self.static)
        self._refresh()

    def advance(self, until: int, ended=None) -> None:
        """Decode up to `until` new tokens in all (not `ended`, not stopped) rows."""
        ended_rows = np.ones(self.state["done"].shape, bool)  # rows added for the mesh count as ended
        ended_rows[:self.rows] = False if ended is None else ended
        with on_mesh(self.mesh):
            self.state = decode_program(self.params, self.state, jnp.int32(until), ended_rows, **self.static)
        self._refresh()

    def _refresh(self) -> None:
        from jaxllm.distributed import to_host  # every process reads every row (several hosts: gathered)
        self.i = int(self.state["i"])
        self.out = to_host(self.state["out"])[:self.rows]
        self.done = to_host(self.state["done"])[:self.rows]


def generate(config: ModelConfig, params, prompts: Sequence[Sequence[int]], sampling: SamplingParams,
             rng: jax.Array | None = None, *, stop_ids: Sequence[int] = (), pad_id: int = 0, mesh=None,
             return_logprobs: bool = False, stop_strings: Sequence[str] = (),
             decode: Callable[[list[int]], str] | None = None, vocab_limit: int | None = None,
             check_every: int = 16) -> Generation:
    """Generate up to `sampling.max_new_tokens` after each prompt (lists of ids), stopping a row at
    any of `stop_ids`, or, given `decode` (ids → text), once its text contains one of `stop_strings`
    (checked every `check_every` steps, then cut back to the token that completed it).
    `vocab_limit`: the tokenizer's piece count; ids at or past it (padded rows) are never sampled.
    With `mesh`, params should already be sharded on it; the cache is too."""
    if not prompts:
        raise ValueError("no prompts to generate from")
    stop_strings = check_stop_strings(stop_strings)
    if stop_strings and decode is None:
        raise ValueError("stop_strings need decode= (a function from ids to text, e.g. tokenizer.decode)")
    if check_every < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every}")
    rng = jax.random.key(0) if rng is None else rng
    run = _Run(config, params, prompts, sampling, rng, stop_ids=stop_ids, pad_id=pad_id, mesh=mesh,
               vocab_limit=vocab_limit, logprobs=return_logprobs)
    ended = np.zeros(len(prompts), bool)
    # A stop string ends within the last few tokens: its characters, up to 4 byte pieces each.
    margin = 4 * max((len(s) for s in stop_strings), default=0) + 4
    checked = 0
    while True:
        if stop_strings:
            for r in np.flatnonzero(~(run.done | ended)):
                tail = run.out[r, max(checked - margin, 0):run.i].tolist()
                ended[r] = find_stop(decode(tail), stop_strings) is not None
            checked = run.i
        if run.i >= run.steps or (run.done | ended).all():
            break
        run.advance(min(run.i + (check_every if stop_strings else run.steps), run.steps), ended)
    stop_set = set(run.static["stop_ids"])
    result, stopped = [], []
    for row in run.out[:, :run.i]:
        ids = row.tolist()
        end = next((k + 1 for k, t in enumerate(ids) if t in stop_set), None)
        ids = ids[:end] if end else ids
        cut = stop_length(ids[:-1] if end else ids, decode, stop_strings) if stop_strings else None
        ids = ids[:cut] if cut else ids
        result.append(ids)
        stopped.append(end is not None or cut is not None)
    logps = None
    if return_logprobs:
        from jaxllm.distributed import to_host
        logps = [row[:len(ids)].tolist() for row, ids in zip(to_host(run.state["logp"])[:run.rows], result)]
    return Generation(result, stopped, logps, run.i)


def stream(config: ModelConfig, params, prompt: Sequence[int], sampling: SamplingParams,
           rng: jax.Array | None = None, *, stop_ids: Sequence[int] = (), mesh=None,
           vocab_limit: int | None = None) -> Iterator[int]:
    """Yield new token ids one by one (for chat), the last being a stop id when one is sampled; the same
    tokens as `generate` for this prompt alone. Stop consuming it to end early (e.g. at a stop string)."""
    rng = jax.random.key(0) if rng is None else rng
    run = _Run(config, params, [prompt], sampling, rng, stop_ids=stop_ids, pad_id=0, mesh=mesh,
               vocab_limit=vocab_limit)
    while True:
        yield int(run.out[0, run.i - 1])
        if run.done[0] or run.i >= run.steps:
            return
        run.advance(run.i + 1)
