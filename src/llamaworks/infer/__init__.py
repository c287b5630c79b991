"""Inference: the LLM engine, sampling, weight-only quantization, speculative decoding."""

from llamaworks.infer.llm import LLM, CompletionOutput, RequestOutput
from llamaworks.infer.sampling import SamplingParams

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams"]
