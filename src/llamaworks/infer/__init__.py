"""Inference: the LLM engine, sampling, weight-only quantization, speculative decoding."""

from llamaworks.infer.engine import LLM, CompletionOutput, RequestOutput
from llamaworks.infer.sampling import SamplingParams

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams"]
