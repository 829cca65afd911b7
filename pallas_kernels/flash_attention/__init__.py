"""Flash attention: reference and kernels for [batch, seq, heads, head_dim] inputs."""
