"""Sub-commands of the `jaxturbo` CLI, one module each (see jaxturbo/cli.py)."""
