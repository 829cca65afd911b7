"""jaxturbo: LLM-efficiency techniques on JAX meshes."""

__version__ = "0.1.0"
