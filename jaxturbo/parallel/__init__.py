"""Meshes and parallel modes (tensor parallel + Ladder-Residual, Ulysses, ring attention)."""
