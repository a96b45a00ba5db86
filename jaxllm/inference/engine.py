"""Continuous batching: a fixed number of decode slots over one KV cache, each slot holding one request
at its own length (the cache's per-row `index`). A request joins at the next step: its prompt is
prefilled alone in a length bucket and copied into a free slot's rows. It leaves when it is done,
without waiting for the others, and the slot's next request overwrites what it needs: its prompt
fills columns [0, length) and decoding writes each later column before any query can attend to it
(attention is causal by column), so nothing of an earlier request is ever seen.

Every program is compiled when the engine is built (one prefill per prompt-length bucket, one decode
step), ahead of time: serving never compiles, and a call that would need a new program fails instead.
Sampling settings, seeds and stop ids are per slot, so each request's tokens depend only on its own
prompt, settings and seed: greedy requests get exactly the tokens they would get alone.

Log-probabilities (`Scores`) come from the programs that serve the request: a prefill asked for them
scores every prompt token from the same forward that fills the cache, and every token sampled comes with
its log-probability and the `TOP_LOGPROBS` most likely ids at that position. They are the raw model's
(log-softmax of the logits, padded vocabulary rows excluded), before repetition penalty, temperature,
top-k and top-p, as vLLM returns by default; a request's scores depend only on its own tokens.

The engine knows nothing of HTTP or asyncio; `jaxllm.inference.batcher` drives it.
"""
from __future__ import annotations

import contextlib

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.inference.generate import bucket, effective_vocab_limit
from jaxllm.inference.sampling import mask_vocab, sample_rows
from jaxllm.models import Decoder, decoding_layout, forward, init_kv_cache, is_unrolled, kv_cache_axes
from jaxllm.models.attention import target_platform

TOP_LOGPROBS = 20  # alternatives computed per position (OpenAI's largest top_logprobs)


@dataclasses.dataclass(frozen=True)
class SlotSampling:
    """One request's sampling: temperature 0 is greedy; top_k 0 and top_p 1 are off; `seed` (any int) and
    `subseed` (e.g. the choice among n) make a sampled request reproducible; stop_ids end it (the stop
    id is its last token)."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0
    subseed: int = 0
    stop_ids: tuple[int, ...] = ()

    def seed_words(self) -> np.ndarray:
        """uint32[3]: the seed's low and high words and the subseed (the admit program makes the key)."""
        return np.asarray([self.seed & 0xFFFFFFFF, (self.seed >> 32) & 0xFFFFFFFF, self.subseed & 0xFFFFFFFF],
                          np.uint32)


@dataclasses.dataclass(frozen=True)
class Scores:
    """Log-probabilities of tokens at consecutive positions: logprob float32[n] of each token, top_ids
    int32[n, TOP_LOGPROBS] and top_logprobs float32[n, TOP_LOGPROBS] the most likely ids there, best first."""
    logprob: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray

    def __len__(self) -> int:
        return len(self.logprob)

    def __getitem__(self, index) -> "Scores":
        return Scores(self.logprob[index], self.top_ids[index], self.top_logprobs[index])

    @staticmethod
    def concat(parts: Sequence["Scores"]) -> "Scores":
        if not parts:
            return Scores(np.zeros(0, np.float32), np.zeros((0, TOP_LOGPROBS), np.int32),
                          np.zeros((0, TOP_LOGPROBS), np.float32))
        return Scores(*(np.concatenate(x) for x in zip(*((p.logprob, p.top_ids, p.top_logprobs) for p in parts))))


def score_logits(logits, tokens, vocab_limit: int | None):
    """(logprob of `tokens`, top ids, their logprobs) from logits float32[..., vocab], tokens int32[...]."""
    logprobs = jax.nn.log_softmax(mask_vocab(logits.astype(jnp.float32), vocab_limit), axis=-1)
    top_logprobs, top_ids = jax.lax.top_k(logprobs, TOP_LOGPROBS)
    return jnp.take_along_axis(logprobs, tokens[..., None], axis=-1)[..., 0], top_ids.astype(jnp.int32), top_logprobs


def _no_scores(shape):
    return (jnp.zeros(shape, jnp.float32), jnp.zeros((*shape, TOP_LOGPROBS), jnp.int32),
            jnp.zeros((*shape, TOP_LOGPROBS), jnp.float32))


def lm_head(config: ModelConfig, params, hidden):
    """logits float32[batch, len, vocab] from the final-normed hidden states [batch, len, embed], as
    `forward` computes them (on CPU one 2-D matmul, as the decoder does)."""
    w = Decoder(config, unrolled=is_unrolled(params)).apply({"params": params}, method=Decoder.output_matrix)
    if target_platform() == "cpu":
        lead = hidden.shape[:-1]
        out = (hidden.reshape(-1, hidden.shape[-1]) @ w).reshape(*lead, w.shape[-1])
    else:
        out = jnp.einsum("bte,ev->btv", hidden, w)
    return out.astype(jnp.float32)


def request_key(seed_words):
    """The PRNG key of a request from its uint32[3] seed words; its token t is drawn with fold_in(key, t).
    (jax.random.key of an int past 32 bits would truncate it, hence the words.)"""
    key = jax.random.key(seed_words[0])
    return jax.random.fold_in(jax.random.fold_in(key, seed_words[1]), seed_words[2])


def prefill_buckets(max_prompt: int, smallest: int = 16) -> tuple[int, ...]:
    """Prompt lengths prefill is compiled for: powers of two from `smallest`, then `max_prompt` itself."""
    sizes = []
    size = min(bucket(1, smallest), max_prompt)
    while size < max_prompt:
        sizes.append(size)
        size *= 2
    return tuple(sizes) + (max_prompt,)


def _replicated_batch_rules():
    """The sharding table with the batch unsplit: a prefill holds one prompt, which no data axis divides."""
    from jaxllm.sharding import LOGICAL_RULES

    return tuple((name, None if name == "batch" else axes) for name, axes in LOGICAL_RULES)


class Engine:
    """Slots, prefill buckets and the decode step on one device or a mesh.

    `admit(slot, prompt, sampling)` prefills a prompt into a free slot and returns its first token;
    `step(active, remaining)` advances every active slot by `decode_steps` tokens. The host owns which
    slots are active; the device stops a slot inside a multi-step call at a stop id, at its token budget
    or at the end of its cache rows, and says which tokens are real (`valid`). `admit_scored` and
    `step_scored` do the same and return the tokens' `Scores` too (and the prompt's, when asked).
    """

    def __init__(self, config: ModelConfig, params, *, slots: int = 8, max_len: int | None = None, mesh=None,
                 vocab_limit: int | None = None, buckets: Sequence[int] | None = None, decode_steps: int = 1,
                 max_stop_ids: int = 4):
        max_len = max_len or config.max_position_embeddings
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        if decode_steps < 1:
            raise ValueError(f"decode_steps must be >= 1, got {decode_steps}")
        if not 2 <= max_len <= config.max_position_embeddings:
            raise ValueError(f"max_len must be in [2, {config.max_position_embeddings}] (the model's "
                             f"max_position_embeddings), got {max_len}")
        buckets = tuple(sorted(set(buckets))) if buckets else prefill_buckets(max_len - 1)
        if buckets[0] < 1 or buckets[-1] >= max_len:
            raise ValueError(f"prefill buckets must be in [1, {max_len - 1}] (max_len - 1), got {list(buckets)}")
        if mesh is not None:
            from jaxllm.inference.generate import batch_shards

            shards = batch_shards(mesh)
            if slots % shards:
                raise ValueError(f"slots ({slots}) must be a multiple of the mesh's data x fsdp size ({shards}): "
                                 f"the cache's slots are split over those axes")
        self.config, self.mesh = config, mesh
        with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):
            self.params = decoding_layout(params)  # per layer on CPU: drop the caller's stacked copy after
        self.slots, self.max_len, self.buckets, self.decode_steps = slots, max_len, buckets, decode_steps
        self.max_stop_ids = max_stop_ids
        self.vocab_limit = effective_vocab_limit(config, vocab_limit)
        self._key_shape = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape
        self.state = self._initial_state()
        self._admit = {size: self._compile_admit(size) for size in buckets}
        self._decode = self._compile_decode()
        self._warm_up()

    @property
    def max_prompt(self) -> int:
        return self.buckets[-1]

    # -- device state ----------------------------------------------------------------------------------

    def _initial_state(self) -> dict:
        """The cache ([layers, slots, kv_heads, max_len, head_dim], a per-slot index), each slot's last
        token, count of new tokens, PRNG key, sampling settings, stop ids and seen tokens. On a mesh each
        device makes only its shard."""
        n, vocab, key_shape = self.slots, self.config.vocab_size, self._key_shape

        def make():
            return {"cache": init_kv_cache(self.config, n, self.max_len, per_row=True,
                                           per_layer=is_unrolled(self.params)),
                    "token": jnp.zeros((n,), jnp.int32), "count": jnp.zeros((n,), jnp.int32),
                    "key": jnp.zeros((n, *key_shape), jnp.uint32),
                    "temperature": jnp.zeros((n,), jnp.float32), "top_k": jnp.zeros((n,), jnp.int32),
                    "top_p": jnp.ones((n,), jnp.float32), "penalty": jnp.ones((n,), jnp.float32),
                    "stop_ids": jnp.full((n, self.max_stop_ids), -1, jnp.int32), "seen": jnp.zeros((n, vocab), bool)}

        if self.mesh is None:
            return make()
        return jax.jit(make, out_shardings=self._state_shardings(jax.eval_shape(make)))()

    def _state_shardings(self, state):
        """The cache split like `generate`'s (slots over data x fsdp, KV heads over tensor); the small
        per-slot arrays replicated."""
        from jax.sharding import NamedSharding, PartitionSpec as P

        from jaxllm.sharding import tree_shardings

        cache = state["cache"]
        axes = {k: tuple(P(*a) for a in v) if isinstance(cache[k], tuple) else P(*v)
                for k, v in kv_cache_axes(cache).items()}
        axes["index"] = P()
        replicated = NamedSharding(self.mesh, P())
        return {**{k: replicated for k in state if k != "cache"}, "cache": tree_shardings(axes, cache, self.mesh)}

    def _replicated(self):
        from jax.sharding import NamedSharding, PartitionSpec as P

        return None if self.mesh is None else NamedSharding(self.mesh, P())

    def _compile(self, fn, args, rules=None):
        """jit(fn) lowered for these arguments (state donated, shardings kept) and compiled now."""
        state_sh = None if self.mesh is None else self._state_shardings(self.state)
        jitted = jax.jit(fn, donate_argnums=1,
                         out_shardings=None if self.mesh is None else (state_sh, self._replicated()))
        if self.mesh is None:
            return jitted.lower(self.params, self.state, *args).compile()
        from jaxllm.sharding import LOGICAL_RULES, axis_rules

        with jax.set_mesh(self.mesh), axis_rules(rules or LOGICAL_RULES):
            return jitted.lower(self.params, self.state, *args).compile()

    def _spec(self, shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=self._replicated())

    # -- programs --------------------------------------------------------------------------------------

    def _sample(self, state, logits, rows=None):
        """Next tokens for `rows` (default: every slot) from logits float32[len(rows), vocab]."""
        take = (lambda x: x) if rows is None else (lambda x: x[rows])
        keys = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(take(state["key"])), take(state["count"]))
        return sample_rows(logits, keys, take(state["temperature"]), take(state["top_k"]), take(state["top_p"]),
                           take(state["penalty"]), take(state["seen"]), self.vocab_limit)

    def _compile_admit(self, size: int):
        config, max_len = self.config, self.max_len

        vocab_limit = self.vocab_limit

        def admit(params, state, slot, tokens, length, settings, seed_words, stop_ids, score_prompt):
            """Prefill tokens int32[size] (the prompt at the end, `length` real tokens) into `slot`; with
            `score_prompt`, the prompt's Scores too (entry j for prompt token j; entry 0 is meaningless)."""
            shift = size - length
            columns = jnp.arange(size)
            segments = (columns >= shift).astype(jnp.int32)[None]
            positions = jnp.maximum(columns - shift, 0)[None]
            cache = init_kv_cache(config, 1, size, per_layer=is_unrolled(params))
            hidden, cache = forward(config, params, tokens[None], positions, segments, cache, return_hidden=True)
            logits = lm_head(config, params, hidden[:, -1:])

            def prompt_scores(hidden):  # column c's logits score the token at column c + 1
                scores = score_logits(lm_head(config, params, hidden)[0, :-1], tokens[1:], vocab_limit)
                return tuple(jnp.roll(jnp.concatenate([jnp.zeros_like(x[:1]), x]), -shift, axis=0) for x in scores)

            prompt = jax.lax.cond(score_prompt, prompt_scores, lambda hidden: _no_scores((size,)), hidden)
            big = state["cache"]

            def place(whole, prompt):  # the prompt moved to columns [0, length): the slot decodes from `length`
                lead = whole.ndim - 4  # the layer axis of a stacked cache
                prompt = jnp.roll(prompt, -shift, axis=lead + 2).astype(whole.dtype)
                return jax.lax.dynamic_update_slice(whole, prompt, (0,) * lead + (slot, 0, 0, 0))

            row = jnp.arange(max_len)
            big = {"k": jax.tree.map(place, big["k"], cache["k"]), "v": jax.tree.map(place, big["v"], cache["v"]),
                   "segment_ids": big["segment_ids"].at[slot].set((row < length).astype(jnp.int32)),
                   "positions": big["positions"].at[slot].set(row), "index": big["index"].at[slot].set(length)}
            seen = jnp.zeros((config.vocab_size,), bool).at[tokens].max(segments[0] > 0)
            temperature, top_k, top_p, penalty = settings
            key = jax.random.key_data(request_key(seed_words))
            row = {"key": key, "count": 0, "temperature": temperature, "top_k": top_k, "top_p": top_p,
                   "penalty": penalty, "stop_ids": stop_ids, "seen": seen}
            state = {**state, "cache": big, **{k: state[k].at[slot].set(v) for k, v in row.items()}}
            token = self._sample(state, logits[:, -1], rows=slot[None])[0]
            state = {**state, "token": state["token"].at[slot].set(token), "count": state["count"].at[slot].set(1),
                     "seen": state["seen"].at[slot, token].set(True)}
            return state, (token, score_logits(logits[0, -1], token, vocab_limit), prompt)

        i32, f32 = jnp.int32, jnp.float32
        args = (self._spec((), i32), self._spec((size,), i32), self._spec((), i32),
                (self._spec((), f32), self._spec((), i32), self._spec((), f32), self._spec((), f32)),
                self._spec((3,), jnp.uint32), self._spec((self.max_stop_ids,), i32), self._spec((), bool))
        return self._compile(admit, args, rules=_replicated_batch_rules())

    def _compile_decode(self):
        config, max_len, steps, vocab_limit = self.config, self.max_len, self.decode_steps, self.vocab_limit

        def decode(params, state, active, remaining, scored):
            """`steps` tokens for every active slot: tokens, valid int32/bool[steps, slots], and with
            `scored` their Scores ([steps, slots, ...])."""
            rows = jnp.arange(active.shape[0])

            def one(carry, _):
                state, active, remaining = carry
                cache = state["cache"]
                logits, new = forward(config, params, state["token"][:, None], cache["index"][:, None],
                                      active[:, None].astype(jnp.int32), cache)
                new["index"] = jnp.where(active, new["index"], cache["index"])  # idle slots stay put
                state = {**state, "cache": new}
                token = jnp.where(active, self._sample(state, logits[:, -1]), state["token"])
                remaining = remaining - active
                stopped = jnp.any(token[:, None] == state["stop_ids"], axis=-1)
                state = {**state, "token": token, "count": state["count"] + active,
                         "seen": state["seen"].at[rows, token].set(state["seen"][rows, token] | active)}
                still = active & ~stopped & (remaining > 0) & (new["index"] < max_len)
                scores = jax.lax.cond(scored, lambda: score_logits(logits[:, -1], token, vocab_limit),
                                      lambda: _no_scores(token.shape))
                return (state, still, remaining), (token, active, scores)

            (state, _, _), (tokens, valid, scores) = jax.lax.scan(one, (state, active, remaining), None, length=steps)
            return state, (tokens, valid, scores)

        return self._compile(decode, (self._spec((self.slots,), bool), self._spec((self.slots,), jnp.int32),
                                      self._spec((), bool)))

    def _warm_up(self) -> None:
        """Run every program once (slot 0, then left inactive): first runs pay one-off set-up costs that a
        first request should not."""
        for size in self.buckets:
            self.admit_scored(0, [0] * size, SlotSampling(), score_prompt=True)
        self.step_scored(np.zeros(self.slots, bool), np.zeros(self.slots, np.int32))

    # -- host API --------------------------------------------------------------------------------------

    def bucket_for(self, length: int) -> int:
        """The smallest prefill bucket holding `length` tokens (ValueError past the largest)."""
        for size in self.buckets:
            if length <= size:
                return size
        raise ValueError(f"prompt has {length} tokens; this engine takes at most {self.max_prompt}")

    def admit(self, slot: int, prompt: Sequence[int], sampling: SlotSampling) -> int:
        """Prefill `prompt` (ids) into `slot` (whatever it held before) and return the first new token."""
        return self.admit_scored(slot, prompt, sampling)[0]

    def admit_scored(self, slot: int, prompt: Sequence[int], sampling: SlotSampling, score_prompt: bool = False
                     ) -> tuple[int, Scores, Scores | None]:
        """`admit`, and the first token's Scores (length 1); with `score_prompt`, the prompt's too (length
        len(prompt) - 1: tokens 1 onwards, each given the ones before it)."""
        if not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} is not in [0, {self.slots})")
        if not len(prompt):
            raise ValueError("prompt is empty")
        if len(sampling.stop_ids) > self.max_stop_ids:
            raise ValueError(f"at most {self.max_stop_ids} stop ids, got {len(sampling.stop_ids)}")
        size = self.bucket_for(len(prompt))
        tokens = np.zeros(size, np.int32)
        tokens[size - len(prompt):] = prompt
        stop_ids = np.full(self.max_stop_ids, -1, np.int32)
        stop_ids[:len(sampling.stop_ids)] = sampling.stop_ids
        settings = (np.float32(sampling.temperature), np.int32(sampling.top_k), np.float32(sampling.top_p),
                    np.float32(sampling.repetition_penalty))
        self.state, (token, first, scores) = self._admit[size](
            self.params, self.state, np.int32(slot), tokens, np.int32(len(prompt)), settings, sampling.seed_words(),
            stop_ids, np.bool_(score_prompt))
        first = Scores(*(np.asarray(x)[None] for x in first))
        scores = Scores(*(np.asarray(x)[1:len(prompt)] for x in scores)) if score_prompt else None
        return int(token), first, scores

    def step(self, active: np.ndarray, remaining: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Advance the `active` slots (bool[slots]) by up to `decode_steps` tokens each, at most
        `remaining` (int[slots]) more. Returns tokens int32[decode_steps, slots] and valid
        bool[decode_steps, slots] (a slot's tokens after it stopped are not valid)."""
        tokens, valid, _ = self.step_scored(active, remaining, scored=False)
        return tokens, valid

    def step_scored(self, active: np.ndarray, remaining: np.ndarray, scored: bool = True
                    ) -> tuple[np.ndarray, np.ndarray, Scores]:
        """`step`, and with `scored` the tokens' Scores ([decode_steps, slots, ...]; zeros without)."""
        self.state, (tokens, valid, scores) = self._decode(self.params, self.state, np.asarray(active, bool),
                                                           np.asarray(remaining, np.int32), np.bool_(scored))
        return np.asarray(tokens), np.asarray(valid), Scores(*(np.asarray(x) for x in scores))

    def cache_bytes(self) -> int:
        """Bytes of the KV cache over all devices."""
        cache = self.state["cache"]
        return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves((cache["k"], cache["v"])))
