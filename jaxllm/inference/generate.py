"""Batched KV-cached generation: one jitted prefill + `lax.while_loop` decode per shape bucket.

Prompts of different lengths are left-padded (segment id 0, so nothing attends to the padding) and
each row's positions start at 0 at its first real token, so a batched row equals generating it alone.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.inference.sampling import SamplingParams, sample
from jaxllm.models import KV_CACHE_AXES, forward, init_kv_cache


@dataclasses.dataclass
class Generation:
    """tokens: new ids per prompt, ending with the stop token when one was produced;
    logprobs: log p of each new token under the model (temperature 1, no filters) when asked for."""
    tokens: list[list[int]]
    stopped: list[bool]
    logprobs: list[list[float]] | None = None


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


def _cache_constraint(cache, mesh):
    if mesh is None:
        return cache
    from jaxllm.sharding import tree_shardings
    from jax.sharding import PartitionSpec as P

    specs = {k: P(*v) for k, v in KV_CACHE_AXES.items()}
    return jax.lax.with_sharding_constraint(cache, tree_shardings(specs, cache, mesh))


@functools.partial(jax.jit, static_argnames=("config", "sampling", "stop_ids", "cache_len", "mesh"))
def _generate(params, tokens, positions, segments, rng, *, config, sampling, stop_ids, cache_len, mesh=None):
    batch, prompt_len = tokens.shape
    steps = sampling.max_new_tokens
    cache = _cache_constraint(init_kv_cache(config, batch, cache_len), mesh)
    logits, cache = forward(config, params, tokens, positions, segments, cache)
    vocab = logits.shape[-1]
    seen = jnp.zeros((batch, vocab), bool).at[jnp.arange(batch)[:, None], tokens].max(segments > 0)
    stops = jnp.asarray(stop_ids, jnp.int32)
    out = jnp.zeros((batch, steps), jnp.int32)
    out_logp = jnp.zeros((batch, steps), jnp.float32)
    next_pos = positions[:, -1] + 1

    def cond(state):
        i, _, _, _, _, done, _, _, _ = state
        return (i < steps) & ~jnp.all(done)

    def body(state):
        i, last_logits, cache, seen, pos, done, out, out_logp, rng = state
        rng, key = jax.random.split(rng)
        token = sample(last_logits, key, sampling, seen)
        token = jnp.where(done, 0, token)
        logp = jnp.take_along_axis(jax.nn.log_softmax(last_logits), token[:, None], axis=-1)[:, 0]
        out = out.at[:, i].set(token)
        out_logp = out_logp.at[:, i].set(jnp.where(done, 0.0, logp))
        seen = seen.at[jnp.arange(batch), token].set(seen[jnp.arange(batch), token] | ~done)
        finished = done | jnp.any(token[:, None] == stops[None, :], axis=-1)
        logits, cache = forward(config, params, token[:, None], pos[:, None], jnp.ones((batch, 1), jnp.int32),
                                cache)
        return i + 1, logits[:, -1], cache, seen, pos + 1, finished, out, out_logp, rng

    state = (jnp.int32(0), logits[:, -1], cache, seen, next_pos, jnp.zeros((batch,), bool), out, out_logp, rng)
    i, _, _, _, _, done, out, out_logp, _ = jax.lax.while_loop(cond, body, state)
    return out, out_logp, i


def generate(config: ModelConfig, params, prompts: Sequence[Sequence[int]], sampling: SamplingParams,
             rng: jax.Array | None = None, *, stop_ids: Sequence[int] = (), pad_id: int = 0, mesh=None,
             return_logprobs: bool = False) -> Generation:
    """Generate up to `sampling.max_new_tokens` after each prompt (lists of ids), stopping a row at
    any of `stop_ids`. With `mesh`, params should already be sharded on it; the cache is too."""
    rng = jax.random.key(0) if rng is None else rng
    length = bucket(max(len(p) for p in prompts))
    cache_len = bucket(length + sampling.max_new_tokens)
    if cache_len > config.max_position_embeddings and config.position == "rope":
        cache_len = length + sampling.max_new_tokens
    tokens, positions, segments = left_pad(prompts, length, pad_id)
    kwargs = dict(config=config, sampling=sampling, stop_ids=tuple(int(s) for s in stop_ids),
                  cache_len=cache_len, mesh=mesh)
    if mesh is not None:
        from jaxllm.sharding import axis_rules, batch_sharding
        with jax.set_mesh(mesh), axis_rules():
            sh = batch_sharding(mesh)
            args = [jax.device_put(x, sh) for x in (tokens, positions, segments)]
            out, logp, steps = _generate(params, *args, rng, **kwargs)
    else:
        out, logp, steps = _generate(params, tokens, positions, segments, rng, **kwargs)
    out, logp, steps = np.asarray(out), np.asarray(logp), int(steps)
    stop_set = set(kwargs["stop_ids"])
    result, stopped, logps = [], [], []
    for row, row_logp in zip(out[:, :steps], logp[:, :steps]):
        ids = row.tolist()
        end = next((k + 1 for k, t in enumerate(ids) if t in stop_set), None)
        stopped.append(end is not None)
        result.append(ids[:end] if end else ids)
        logps.append(row_logp[: len(result[-1])].tolist())
    return Generation(result, stopped, logps if return_logprobs else None)


def stream(config: ModelConfig, params, prompt: Sequence[int], sampling: SamplingParams,
           rng: jax.Array | None = None, *, stop_ids: Sequence[int] = ()) -> Iterator[int]:
    """Yield new token ids one by one (for chat): a jitted prefill, then one jitted step per token."""
    rng = jax.random.key(0) if rng is None else rng
    length = bucket(len(prompt))
    cache_len = bucket(length + sampling.max_new_tokens)
    tokens, positions, segments = left_pad([prompt], length)
    step = _stream_step(config, sampling)
    cache = init_kv_cache(config, 1, cache_len)
    logits, cache = _prefill(config)(params, tokens, positions, segments, cache)
    seen = np.zeros((1, logits.shape[-1]), bool)
    seen[0, list(prompt)] = True
    pos = len(prompt)
    for _ in range(sampling.max_new_tokens):
        rng, key = jax.random.split(rng)
        token, logits, cache = step(params, logits[:, -1], cache, jnp.asarray(seen), jnp.int32(pos), key)
        token = int(token[0])
        yield token
        if token in stop_ids:
            return
        seen[0, token] = True
        pos += 1


@functools.lru_cache(maxsize=8)
def _prefill(config):
    return jax.jit(lambda p, t, pos, seg, c: forward(config, p, t, pos, seg, c))


@functools.lru_cache(maxsize=8)
def _stream_step(config, sampling):
    def step(params, last_logits, cache, seen, pos, key):
        token = sample(last_logits, key, sampling, seen)
        logits, cache = forward(config, params, token[:, None], jnp.full((1, 1), pos), jnp.ones((1, 1), jnp.int32),
                                cache)
        return token, logits, cache
    return jax.jit(step)
