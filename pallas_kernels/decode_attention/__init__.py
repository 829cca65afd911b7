"""Decode attention over a KV cache with per-sequence lengths."""
