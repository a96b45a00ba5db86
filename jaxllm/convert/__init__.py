"""HF / PyTorch / Meta ⇄ jaxllm conversion, streaming tensor by tensor."""
from jaxllm.convert.core import apply_delta, hf_to_jaxllm, jaxllm_to_hf
from jaxllm.convert.hf_config import detect_family, hf_config_from_model, model_config_from_hf
from jaxllm.convert.readers import ConversionError, open_hf, open_source

__all__ = ["hf_to_jaxllm", "jaxllm_to_hf", "apply_delta", "detect_family", "model_config_from_hf",
           "hf_config_from_model", "ConversionError", "open_hf", "open_source"]
