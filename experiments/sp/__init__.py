"""Sequence-parallel attention throughput and the longest trainable sequence (RESULTS.md)."""
