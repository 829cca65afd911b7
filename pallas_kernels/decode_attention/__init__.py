"""Decode attention over a KV cache with per-sequence lengths, and MLA latent decode."""
