"""Training core: losses, optimizer, sharded train step, checkpoints, the SFT loop."""
