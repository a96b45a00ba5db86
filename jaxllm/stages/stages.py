"""SFT, DPO and reward-model stages for the one train loop (`jaxllm.train.loop.train`).

Each is a `Stage`: a loss plus a data pipeline over the chat-formatted jsonl files named in
`data.sources`, rendered with the family's chat template (or `stage.template`). Several sources are mixed
by their weights (`jaxllm.stages.mixture`).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxllm.config import ConfigError
from jaxllm.models import forward
from jaxllm.models import param_shardings
from jaxllm.sharding import axis_rules
from jaxllm.stages import mixture, reward
from jaxllm.stages.data import Stats, encode_preferences, encode_sft, pack_examples
from jaxllm.stages.losses import LLAMA2_MARGINS, dpo_loss, ranking_loss, sequence_logprobs
from jaxllm.stages.rows import MIX_UNITS
from jaxllm.train.loss import lm_loss
from jaxllm.train.stage import Stage, lm_rows, shapes_like


@dataclasses.dataclass
class StageOptions:
    """The `stage:` section of an SFT / DPO / RM recipe."""
    template: str | None = None        # chat template; default: the model family's
    truncation: str = "truncate"       # over-long examples: truncate (at the end) or drop; counted
    beta: float = 0.1                  # DPO temperature
    label_smoothing: float = 0.0       # conservative DPO
    margin: str = "large"              # RM: Llama 2 margin column (large | small | none)
    eval_fraction: float = 0.1         # RM: pairs held out for accuracy (from each source)
    mix_by: str = "tokens"             # several data.sources: their weights are shares of tokens | examples
    weights: str | dict | None = None  # "zh:4,en:1": data.sources weights by name; 0 leaves a source out

    def validate(self) -> None:
        if self.truncation not in ("truncate", "drop"):
            raise ConfigError(f"stage.truncation must be 'truncate' or 'drop', got {self.truncation!r}")
        if self.margin not in ("large", "small", "none"):
            raise ConfigError(f"stage.margin must be large, small or none, got {self.margin!r}")
        if self.beta <= 0:
            raise ConfigError(f"stage.beta must be > 0, got {self.beta}")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"stage.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.mix_by not in MIX_UNITS:
            raise ConfigError(f"stage.mix_by must be one of {', '.join(MIX_UNITS)}, got {self.mix_by!r}")
        self.weights = mixture.parse_weights(self.weights)


def load_stage_recipe(recipe: str, overrides=()):
    """(RunConfig, StageOptions) from a recipe (a YAML path or a shipped recipe's name) plus `key=value`
    overrides; `stage.*` keys go to StageOptions, the rest to the run config."""
    from jaxllm.config import closest
    from jaxllm.train.config import find_recipe, load_config, read_yaml

    data = read_yaml(find_recipe(recipe))
    section = dict(data.pop("stage", None) or {})
    for item in [o for o in overrides if o.startswith("stage.")]:
        key, value = item[len("stage."):].split("=", 1)
        section[key] = value
    fields = {f.name: f for f in dataclasses.fields(StageOptions)}
    for key, value in list(section.items()):
        if key not in fields:
            raise ConfigError(f"unknown key 'stage.{key}'" + closest(key, fields))
        if "float" in str(fields[key].type) and isinstance(value, str):
            try:
                section[key] = float(value)
            except ValueError:
                raise ConfigError(f"stage.{key} must be a number, got {value!r}") from None
    options = StageOptions(**section)
    options.validate()
    config = load_config(None, [o for o in overrides if not o.startswith("stage.")], base=data)
    config.stage = dataclasses.asdict(options)  # in RUN/config.yaml: a resume cannot change β, margin, ...
    return config, options


def _inputs(config, options):
    """([(source name, files, weight)], tokenizer, tokenizer path)."""
    from jaxllm.data import load_tokenizer, resolve_path

    sources = mixture.stage_sources(config, mixture.parse_weights(options.weights))
    if not config.data.tokenizer:
        raise ConfigError("data.tokenizer is required (the starting model's tokenizer.model)")
    tokenizer = load_tokenizer(config.data.tokenizer)
    return sources, tokenizer, resolve_path(config.data.tokenizer)


def _files(sources) -> str:
    return ", ".join(str(f) for _, files, _ in sources for f in files)


def _where(sources, name: str) -> str:
    """' of source NAME' when there are several sources, for messages."""
    return f" of source '{name}'" if len(sources) > 1 else ""


def _data_maker(sources, options, stats, log, what):
    """make_data over the stage's (weighted) sources; the mixture's realised shares go to the log at the end."""
    if len(sources) > 1:
        log(mixture.describe(sources, options.mix_by, what))

    def make_data(batch_rows, seed, shard_index, shard_count):
        return mixture.batches(sources, options.mix_by, batch_rows, seed, shard_index, shard_count,
                               _stat_dict(stats), log, what)
    return make_data


def _template(config, options):
    from jaxllm.tokenizer import get_chat_template, template_for_family
    return get_chat_template(options.template or template_for_family(config.model.family))


def sft_objective(config, options: StageOptions | None = None) -> Stage:
    """SFT's loss and batch layout, without its data (see `objective`)."""
    return Stage(loss_fn=lm_loss(config.model), make_data=None, name="sft", tokens_per_row=config.data.seq_len,
                 batch_shapes=shapes_like(lm_rows(config.data.seq_len)))


def sft_stage(config, options: StageOptions, log=print) -> Stage:
    """Masked next-token loss on packed conversations (assistant tokens only). Each source is packed on
    its own, so a row holds one source's examples, and the sources are mixed by weight."""
    sources, tokenizer, tok_path = _inputs(config, options)
    template, stats, packed = _template(config, options), Stats(), []
    for name, files, weight in sources:
        examples, _ = encode_sft(files, tokenizer, template, config.data.seq_len, truncation=options.truncation,
                                 on_error=config.data.on_error, stats=stats)
        if not examples:
            raise ConfigError(f"no usable SFT examples{_where(sources, name)} in {', '.join(map(str, files))}")
        rows = pack_examples(examples, config.data.seq_len, tokenizer.pad_id)
        packed.append(mixture.packed_source(name, rows, weight))
    log(f"sft data: {stats.summary()}")
    return dataclasses.replace(sft_objective(config), tokenizer_path=tok_path, num_rows=sum(len(s) for s in packed),
                               make_data=_data_maker(packed, options, stats, log, "sft"))


def _stat_dict(stats: Stats) -> dict:
    return {"examples": stats.examples, "skipped": stats.skipped, "truncated": stats.truncated,
            "dropped_too_long": stats.dropped_too_long}


def _flat(batch):
    """[pairs, 2, seq] → [2·pairs, seq] (chosen rows first within each pair)."""
    return {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items() if v.ndim >= 3}


@functools.lru_cache(maxsize=4)
def _reply_logprobs(model_config, mesh):
    """Jitted per model and mesh, so stages built again (a resumed run) reuse the compilation."""
    @functools.partial(jax.jit, out_shardings=NamedSharding(mesh, P()))
    def score(p, tokens, positions, segments, targets, mask):
        logits = forward(model_config, p, tokens, positions, segments)
        return sequence_logprobs(logits, targets, mask)
    return score


def sequence_scores(model_config, params, rows: dict, mesh, batch: int = 16) -> np.ndarray:
    """float32[n]: the summed log-probs of each row's masked targets under `params` (laid out on `mesh`),
    for rows of tokens/positions/segment_ids/targets/loss_mask [n, seq]; batches are split over the
    mesh's data × fsdp devices, the last one padded by repeating its final row."""
    from jaxllm.sharding import batch_sharding

    score = _reply_logprobs(model_config, mesh)
    rows_sharding = batch_sharding(mesh)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    while batch % shards:
        batch += 1
    n = len(rows["tokens"])
    out = np.zeros(n, np.float32)
    for start in range(0, n, batch):
        idx = np.arange(start, min(start + batch, n))
        idx = np.pad(idx, (0, batch - len(idx)), mode="edge")
        b = {k: rows[k][idx] for k in ("tokens", "positions", "segment_ids", "targets", "loss_mask")}
        # Every host holds every row: each builds its own shards of the global batch from the same numpy
        b = {k: jax.make_array_from_callback(v.shape, rows_sharding, lambda index, v=v: v[index])
             for k, v in b.items()}
        with jax.set_mesh(mesh), axis_rules():
            logps = score(params, b["tokens"], b["positions"], b["segment_ids"], b["targets"], b["loss_mask"])
        out[start:start + batch] = np.asarray(logps.addressable_data(0))[: min(batch, n - start)]
    return out


def _reference_logprobs(model_config, params, pairs, mesh) -> np.ndarray:
    """float32[pairs, 2] log-probs of chosen/rejected replies under the frozen starting model (`params`,
    laid out on `mesh`), computed once."""
    return sequence_scores(model_config, params, _flat(pairs), mesh).reshape(-1, 2)


def _load_start(config, what: str, shardings):
    from jaxllm.checkpoint import load_params
    if not config.init_from:
        raise ConfigError(f"{what} starts from a trained model: set init_from (or --init-from DIR)")
    params, _ = load_params(config.init_from, config.model, shardings=shardings, dtype=config.model.param_dtype)
    return params


def _pair_sources(config, options, what: str, log, margins=None):
    """([(name, pairs, weight)], stats, tokenizer path): each source's preference pairs (see
    `encode_preferences`); the counts go to `log`."""
    sources, tokenizer, tok_path = _inputs(config, options)
    template, stats, out = _template(config, options), Stats(), []
    for name, files, weight in sources:
        pairs, _ = encode_preferences(files, tokenizer, template, config.data.seq_len, margins=margins,
                                      on_error=config.data.on_error, stats=stats)
        if not len(pairs["tokens"]) and len(sources) > 1:
            raise ConfigError(f"no usable preference pairs{_where(sources, name)} in {', '.join(map(str, files))}")
        out.append((name, pairs, weight))
    log(f"{what} data: {stats.summary()}")
    if not stats.examples:
        raise ConfigError(f"no usable preference pairs in {_files(sources)}")
    return out, stats, tok_path


def _pair_rows(seq_len: int) -> dict:
    """No preference pairs, in `encode_preferences`' layout."""
    return encode_preferences([], None, None, seq_len)[0]


def dpo_objective(config, options: StageOptions) -> Stage:
    """DPO's loss and batch layout (pairs plus the reference log-probs `prepare` adds), without its data."""
    model_config, beta, smoothing = config.model, options.beta, options.label_smoothing

    def loss_fn(params, batch, rng):
        b = _flat(batch)
        logits = forward(model_config, params, b["tokens"], b["positions"], b["segment_ids"], rng=rng)
        logps = sequence_logprobs(logits, b["targets"], b["loss_mask"]).reshape(-1, 2)
        ref = batch["ref_logps"]
        loss, metrics = dpo_loss(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], beta, smoothing)
        return loss, {"loss": loss, **metrics, "weight": jnp.float32(logps.shape[0])}

    rows = {k: v for k, v in _pair_rows(config.data.seq_len).items() if k not in ("margin", "last")}
    rows["ref_logps"] = np.zeros((0, 2), np.float32)
    return Stage(loss_fn=loss_fn, make_data=None, name="dpo", tokens_per_row=2 * config.data.seq_len,
                 batch_shapes=shapes_like(rows))


def dpo_stage(config, options: StageOptions, log=print) -> Stage:
    """DPO against the frozen starting checkpoint (`init_from`), whose log-probs are computed once."""
    if not config.init_from:
        raise ConfigError("dpo starts from a trained model, its frozen reference: set init_from (or --init-from DIR)")
    parts, stats, tok_path = _pair_sources(config, options, "dpo", log)
    for _, pairs, _ in parts:
        del pairs["margin"], pairs["last"]
    sources = [mixture.pair_source(name, pairs, weight) for name, pairs, weight in parts]
    model_config = config.model

    def prepare(mesh, start):  # the frozen reference on the run's mesh (`train.split.StartingModel`: with
        # LoRA the split's frozen base under the adapters as they start, no second copy; else `init_from`)
        # scores every pair once, so the step reads only the log-probs it left in the rows
        reference = start.params()
        for source in sources:
            source.rows["ref_logps"] = _reference_logprobs(model_config, reference, source.rows, mesh)

    return dataclasses.replace(dpo_objective(config, options), tokenizer_path=tok_path, prepare=prepare,
                               make_data=_data_maker(sources, options, stats, log, "dpo"),
                               num_rows=sum(len(s) for s in sources))


def rm_objective(config, options: StageOptions) -> Stage:
    """The reward model's loss, parameters (backbone + scalar head, randomly initialised) and batch
    layout, without its data or starting checkpoint."""
    model_config = config.model

    def init_params(rng):
        return reward.from_lm_params(_random_lm(model_config, rng), model_config, jax.random.fold_in(rng, 1))

    def loss_fn(params, batch, rng):
        b = _flat(batch)
        scores = reward.scores(model_config, params, b["tokens"], b["positions"], b["segment_ids"],
                               batch["last"].reshape(-1), rng=rng).reshape(-1, 2)
        loss, metrics = ranking_loss(scores[:, 0], scores[:, 1], batch["margin"])
        return loss, {"loss": loss, **metrics, "weight": jnp.float32(scores.shape[0])}

    return Stage(loss_fn=loss_fn, make_data=None, name="rm", init_params=init_params,
                 param_axes=reward.logical_axes(model_config), tokens_per_row=2 * config.data.seq_len,
                 lm_path=("backbone",), batch_shapes=shapes_like(_pair_rows(config.data.seq_len)))


def rm_stage(config, options: StageOptions, log=print):
    """Reward model (Llama 2): backbone + scalar head, margin ranking loss; (stage, held-out pairs).
    `stage.eval_fraction` of each source's pairs is held out; eval rows carry `source` (its index)."""
    margins = None if options.margin == "none" else LLAMA2_MARGINS[options.margin]
    parts, stats, tok_path = _pair_sources(config, options, "rm", log, margins)
    if stats.examples < 2:
        raise ConfigError(f"the reward model needs at least 2 preference pairs, found {stats.examples}")
    sources, held_out = [], []
    for index, (name, pairs, weight) in enumerate(parts):
        n = len(pairs["tokens"])
        # Source 0 draws from the run's seed alone, as a single-source run always has.
        order = np.random.default_rng(config.seed if index == 0 else [config.seed, index]).permutation(n)
        held = max(1, int(round(n * options.eval_fraction))) if options.eval_fraction else 0
        if held >= n:
            raise ConfigError(f"stage.eval_fraction={options.eval_fraction} holds out {held} of the {n} preference "
                              f"pairs{_where(parts, name)}, leaving none to train on: lower it or add pairs")
        sources.append(mixture.pair_source(name, {k: v[order[held:]] for k, v in pairs.items()}, weight))
        held_out.append({**{k: v[order[:held]] for k, v in pairs.items()},
                         "source": np.full(held, index, np.int32)})
    eval_rows = {k: np.concatenate([h[k] for h in held_out]) for k in held_out[0]}
    model_config = config.model
    # The stage makes its own (backbone + head) parameters, so the loop leaves `init_from` to it; the
    # run's config.yaml still records where the backbone came from.
    def load_params(rng, shardings):  # the LM read onto the mesh, then passed (not closed over) to a jit
        mesh = jax.tree.leaves(shardings)[0].mesh
        lm = _load_start(config, "rm", param_shardings(model_config, mesh))
        attach_head = jax.jit(lambda lm, rng: reward.from_lm_params(lm, model_config, jax.random.fold_in(rng, 1)),
                              out_shardings=shardings, donate_argnums=0)
        return attach_head(lm, rng)

    stage = dataclasses.replace(rm_objective(config, options), load_params=load_params if config.init_from else None,
                                make_data=_data_maker(sources, options, stats, log, "rm"),
                                num_rows=sum(len(s) for s in sources), tokenizer_path=tok_path)
    return stage, eval_rows


def objective(kind: str, config, options: StageOptions) -> Stage:
    """The `kind` (sft | dpo | rm) stage's loss, parameter structure and batch layout, built without
    reading its data, tokenizer or starting checkpoint: what a compile-only pre-flight needs."""
    return {"sft": sft_objective, "dpo": dpo_objective, "rm": rm_objective}[kind](config, options)


def _random_lm(model_config, rng):
    from jaxllm.models import init_params
    return init_params(model_config, rng)


def reward_accuracy(model_config, params, rows, batch: int = 8) -> float:
    """Fraction of held-out pairs whose chosen reply scores above the rejected one (every process of a
    multi-host run passes the same rows and gets the same fraction)."""
    from jaxllm.distributed import to_host
    score = jax.jit(functools.partial(reward.scores, model_config))
    right, n = 0, len(rows["tokens"])
    for start in range(0, n, batch):
        b = _flat({k: v[start:start + batch] for k, v in rows.items() if k in
                   ("tokens", "positions", "segment_ids")})
        s = to_host(score(params, b["tokens"], b["positions"], b["segment_ids"],
                          rows["last"][start:start + batch].reshape(-1))).reshape(-1, 2)
        right += int((s[:, 0] > s[:, 1]).sum())
    return right / n
