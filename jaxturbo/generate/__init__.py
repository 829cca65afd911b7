"""KV-cache generation: prefill, on-device decode loop, sampling."""

from jaxturbo.generate.decode import GenerationResult, generate
from jaxturbo.generate.sampling import SamplingParams, sample

__all__ = ["GenerationResult", "SamplingParams", "generate", "sample"]
