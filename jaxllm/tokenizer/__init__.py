"""Tokenizers: sentencepiece wrapper, Baichuan 2-recipe BPE training, Ziya-style extension, chat templates."""
from jaxllm.tokenizer.extend import extend_tokenizer, padded_rows, pieces_of, resize_checkpoint, resize_params
from jaxllm.checkpoint.companions import COMPANION_FILES
from jaxllm.tokenizer.hf_files import FAMILY_ADD_BOS, read_tokenizer_files
from jaxllm.tokenizer.errors import TokenizerError
from jaxllm.tokenizer.sp import Tokenizer
from jaxllm.tokenizer.stats import tokenizer_stats
from jaxllm.tokenizer.templates import CHAT_TEMPLATES, ChatTemplate, get_chat_template, template_for_family
from jaxllm.tokenizer.train import BAICHUAN2_RECIPE, iter_texts, reserved_symbols, train_tokenizer

__all__ = ["Tokenizer", "TokenizerError", "ChatTemplate", "CHAT_TEMPLATES", "get_chat_template",
           "template_for_family", "train_tokenizer", "iter_texts", "BAICHUAN2_RECIPE", "reserved_symbols",
           "extend_tokenizer", "pieces_of", "resize_checkpoint", "resize_params", "padded_rows", "tokenizer_stats",
           "COMPANION_FILES", "FAMILY_ADD_BOS", "read_tokenizer_files"]
