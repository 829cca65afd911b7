"""`jaxturbo serve` over HTTP against the same engine offline (bench.py)."""
