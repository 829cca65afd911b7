"""Training-step throughput and MFU (RESULTS.md)."""
