"""PPO/GRPO post-training: advantage estimators, policy/value losses, KL estimators, loss
aggregation, rollout batches and rollout engines, and the whole run on the shared training loop
(run; see each module's docstring)."""
