"""Paged-KV inference engine.

Host side (this package's plain-Python modules, no JAX): `EngineConfig`, `Request`, `PagePool`,
`KVCacheManager`, `SchedulingPolicy` / `PriorityFCFS` and `Scheduler`, which turns requests into
per-step `SchedulerOutput`s that the model runner executes on device.
"""
