"""Files that travel with a model besides its weights: the tokenizer's HF files and the HF remote code.

A Baichuan checkpoint ships its own modeling / configuration / tokenization code and names it in
config.json's `auto_map`; users load it with `trust_remote_code=True`. That code is part of the model's
identity: import keeps it in `DIR/remote_code/` (the `*.py` files and `auto_map.json`), training runs
copy it from their starting checkpoint, and export writes it back beside the weights. The files are
copied and read as text, never imported or run.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from jaxllm import storage
from jaxllm.config import ModelConfig

REMOTE_DIR = "remote_code"
AUTO_MAP = "auto_map.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
# The HF files that belong to a `tokenizer.model` and travel with it (import, training runs, export).
COMPANION_FILES = (TOKENIZER_CONFIG, "special_tokens_map.json", "added_tokens.json")

# Where each Baichuan variant's own code lives on the Hub, for exports that carry none:
# (family, position) → (repository, class-name prefix; Baichuan-7B spells it "BaiChuan").
_HUB_CODE = {("baichuan", "rope"): ("baichuan-inc/Baichuan-7B", "BaiChuan"),
             ("baichuan", "alibi"): ("baichuan-inc/Baichuan-13B-Base", "Baichuan"),
             ("baichuan2", "rope"): ("baichuan-inc/Baichuan2-7B-Base", "Baichuan"),
             ("baichuan2", "alibi"): ("baichuan-inc/Baichuan2-13B-Base", "Baichuan")}


def carry_tokenizer(tokenizer: Path, dst: Path) -> list[str]:
    """Copy `tokenizer` to `dst/tokenizer.model`, with the HF files beside it when it is a
    `tokenizer.model` (added tokens, add_bos_token; those belong to that name). Returns the names written."""
    written = []
    if not storage.same(tokenizer, dst / "tokenizer.model"):
        storage.copy(tokenizer, dst / "tokenizer.model")
        written.append("tokenizer.model")
    if tokenizer.name == "tokenizer.model" and not storage.same(tokenizer.parent, dst):
        for name in COMPANION_FILES:
            if storage.is_file(tokenizer.parent / name):
                storage.copy(tokenizer.parent / name, dst / name)
                written.append(name)
    return written


def carry_remote_code(src: Path, hf_config: dict, dst: Path) -> list[str]:
    """Keep `src`'s `*.py` files and config.json's `auto_map` in `dst/remote_code/`. Returns the names
    kept (nothing when the checkpoint ships no code)."""
    files = sorted(p for p in src.glob("*.py") if p.is_file())
    auto_map = hf_config.get("auto_map")
    if not files and not auto_map:
        return []
    out = dst / REMOTE_DIR
    storage.makedirs(out)
    for path in files:
        storage.copy(path, out / path.name)
    if auto_map:
        (out / AUTO_MAP).write_text(json.dumps(auto_map, indent=2) + "\n")
    return [p.name for p in files] + (["auto_map"] if auto_map else [])


def find_remote_code(checkpoint: Path) -> Path | None:
    """`remote_code/` kept with a checkpoint: in its directory or the run directory above it."""
    for candidate in (checkpoint / REMOTE_DIR, checkpoint.parent / REMOTE_DIR):
        if candidate.is_dir():
            return candidate
    return None


def copy_model_files(run_dir: str | Path, tokenizer_path: str | Path | None, init_from: str | Path | None) -> None:
    """A training run keeps what its starting model carries besides weights: the tokenizer's HF files
    (beside `tokenizer_path`) and the remote code of `init_from`, so that exporting the run gives back the
    model users loaded (same `auto_map`, same code, same added tokens)."""
    from jaxllm.checkpoint import resolve
    run_dir = storage.path(run_dir)
    tokenizer = storage.path(tokenizer_path) if tokenizer_path else None
    if tokenizer is not None and tokenizer.name == "tokenizer.model" and not storage.same(tokenizer.parent, run_dir):
        for name in COMPANION_FILES:
            if storage.is_file(tokenizer.parent / name):
                storage.copy(tokenizer.parent / name, run_dir / name)
    if init_from and storage.exists(init_from):
        code = find_remote_code(resolve(init_from))
        if code is not None and not storage.same(code, run_dir / REMOTE_DIR):
            storage.copytree(code, run_dir / REMOTE_DIR)


def read_auto_map(code: Path | None) -> dict | None:
    if code is None or not (code / AUTO_MAP).is_file():
        return None
    return json.loads((code / AUTO_MAP).read_text())


def hub_code(config: ModelConfig) -> tuple[str, str]:
    """(repository, class prefix) of the upstream code for a Baichuan model."""
    return _HUB_CODE[(config.family, config.position)]


def hub_auto_map(config: ModelConfig) -> dict:
    """`auto_map` naming the upstream Hub repository's code (`repo--module.Class`): transformers downloads
    it with `trust_remote_code=True`; for a Baichuan checkpoint that carries no code of its own."""
    repo, prefix = hub_code(config)
    return {"AutoConfig": f"{repo}--configuration_baichuan.{prefix}Config",
            "AutoModelForCausalLM": f"{repo}--modeling_baichuan.{prefix}ForCausalLM"}


_INV_FREQ_BUFFER = re.compile(r"register_buffer\(\s*[\"']inv_freq[\"']")


def _call_text(text: str, start: int) -> str:
    """The call beginning at `start` (at its name), up to its balanced closing parenthesis."""
    depth, i = 0, text.index("(", start)
    for j in range(i, len(text)):
        depth += {"(": 1, ")": -1}.get(text[j], 0)
        if depth == 0:
            return text[start:j + 1]
    return text[start:]


def persistent_inv_freq(config: ModelConfig, code: Path | None, auto_map: dict | None) -> bool:
    """Whether the modeling code that will load the export keeps RoPE's `inv_freq` as a persistent buffer
    (Baichuan-7B's `register_buffer("inv_freq", ...)`), so its loader expects `rotary_emb.inv_freq` in the
    weights (transformers leaves a missing one uninitialised); read from the carried modeling file, else
    Baichuan-7B's own code is the one that does."""
    if config.position != "rope":
        return False
    ref = (auto_map or {}).get("AutoModelForCausalLM", "")
    module = ref.split("--")[-1].rsplit(".", 1)[0] if "." in ref else "modeling_baichuan"
    if code is not None and (code / f"{module}.py").is_file():
        text = (code / f"{module}.py").read_text("utf-8", errors="replace")
        calls = [_call_text(text, m.start()) for m in _INV_FREQ_BUFFER.finditer(text)]
        return any("persistent=False" not in re.sub(r"\s", "", call) for call in calls)
    return config.family == "baichuan"


def tokenizer_config(config: ModelConfig, tok, code: Path | None) -> dict:
    """tokenizer_config.json for an export whose tokenizer came without one: the tokenizer class users
    load and the BOS rule jaxllm used (`add_bos_token`). A Baichuan model keeps Baichuan's own tokenizer
    (through `auto_map`) even as `--hf-arch llama`: transformers' LlamaTokenizer would add a dummy-prefix
    space that Baichuan 2's tokenizer does not."""
    out = {"add_bos_token": tok.add_bos, "add_eos_token": False, "bos_token": tok.id_to_piece(tok.bos_id),
           "eos_token": tok.id_to_piece(tok.eos_id), "unk_token": tok.id_to_piece(tok.unk_id),
           "model_max_length": config.max_position_embeddings, "clean_up_tokenization_spaces": False,
           "tokenizer_class": "LlamaTokenizer"}
    if config.family in ("baichuan", "baichuan2"):
        repo, prefix = hub_code(config)
        module = "tokenization_baichuan"
        ref = f"{module}.{prefix}Tokenizer" if code is not None and (code / f"{module}.py").is_file() \
            else f"{repo}--{module}.{prefix}Tokenizer"
        out.update(tokenizer_class=f"{prefix}Tokenizer", auto_map={"AutoTokenizer": [ref, None]})
    return out
