"""The inference engine's ragged paged attention vs the contiguous-cache kernels (RESULTS.md)."""
