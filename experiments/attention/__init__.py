"""Attention kernels against cuDNN, XLA and JAX's shipped kernels (RESULTS.md)."""
