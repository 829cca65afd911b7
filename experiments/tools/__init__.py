"""Plumbing for GPU work: deviceless compilation (aot_gpu), the lent machine's scripts."""
