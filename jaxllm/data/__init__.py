"""Data pipelines: files (text, jsonl, jsonl.gz, parquet) → tokens → packed rows → batches (grain).

Batches are dicts of [batch, seq_len] arrays: `tokens`, `targets`, `segment_ids`, `positions` (int32) and
`loss_mask` (float32); see `jaxllm.data.packing` for their exact meaning.
"""
from jaxllm.data.config import DataConfig, SourceConfig
from jaxllm.data.files import DamagedFile, DataError, expand_paths, read_json_lines, resolve_path
from jaxllm.data.packing import ROW_KEYS, Packer, PackedRows, pack
from jaxllm.data.pipeline import DataIterator, build_dataset, pretraining_batches
from jaxllm.data.sources import DocumentSource, SourceStats, parse_document
from jaxllm.data.tokenize import Tokenize, load_tokenizer

__all__ = ["DataConfig", "SourceConfig", "DataError", "DamagedFile", "expand_paths", "read_json_lines",
           "resolve_path", "ROW_KEYS", "Packer", "PackedRows", "pack", "DataIterator", "build_dataset",
           "pretraining_batches", "DocumentSource", "SourceStats", "parse_document", "Tokenize", "load_tokenizer"]
