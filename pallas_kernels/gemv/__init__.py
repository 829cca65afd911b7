"""Matrix-vector products for decode (a few rows of activations against a weight matrix)."""
