"""PPO/GRPO post-training: advantage estimators, policy/value losses, KL estimators, loss
aggregation, rollout batches and rollout engines (see each module's docstring)."""
