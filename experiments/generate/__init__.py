"""Single-GPU decode throughput of the on-device generation loop (RESULTS.md)."""
