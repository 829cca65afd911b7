"""Mixture-of-experts grouped GEMM against ragged_dot and dense matmul (RESULTS.md)."""
