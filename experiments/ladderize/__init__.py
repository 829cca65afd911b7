"""Perplexity of pretrained models converted to Ladder-Residual without retraining (RESULTS.md)."""
