"""Serving-side inference: a paged-KV engine with continuous batching (see `jaxturbo.inference.engine`)."""
