"""Paged-KV inference engine.

Host side (plain Python, no JAX): `EngineConfig`, `Request`, `PagePool`, `KVCacheManager`,
`SchedulingPolicy` / `PriorityFCFS` and `Scheduler`, which turns requests into per-step
`SchedulerOutput`s; `params.RequestParams` (per-request settings) and
`detokenizer.IncrementalDetokenizer` (text deltas, stop strings).

Device side (JAX): `model_runner.ModelRunner` executes a `SchedulerOutput` as one padded,
bucketed, compiled step over the paged KV cache; `engine.Engine` ties it all together
(`add_request`, `step`, `abort`, `generate`, `update_weights`, `stats`).
"""
