"""Training core: losses, optimizer, sharded train step, checkpoints, the training loop shared
by SFT and RL (trainer), the SFT run (sft)."""
