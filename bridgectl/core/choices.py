"""Choices of config keys that the core implements, written once: the core branches on them, config validation
refuses anything else. Torch-free (config composition imports it)."""

LOSS_TYPES = ("dapo", "bnpo", "grpo", "dr_grpo", "luspo", "cispo", "sapo", "vespo")
"""rl.loss_type: the clipped surrogate reduced five ways (core/policy_losses.loss_token_weights), or another policy loss
(core/policy_losses.grpo_loss)."""
AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
"""rl.multi_objective_aggregation: how several reward functions make one advantage (core/grpo.sample_and_score)."""
ADV_ESTIMATORS = ("grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline")
"""rl.adv_estimator: the baseline and scaling of the rewards (core/advantages.group_advantages)."""
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
"""rl.importance_sampling_level: one ratio per token (GRPO) or per completion (GSPO)."""
SCALE_REWARDS = ("group", "batch", "none")
"""rl.scale_rewards: what the group-centred rewards are divided by (core/grpo.py)."""
ROLLOUT_CORRECTION_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
"""rl.vllm_importance_sampling_mode: per token or per completion, truncated or masked
(core/policy_losses.rollout_correction)."""
