"""Evaluation: sliding-window perplexity."""

from jaxturbo.evaluate.perplexity import PerplexityResult, perplexity, window_plan

__all__ = ["PerplexityResult", "perplexity", "window_plan"]
