"""Choices of config keys that the core implements, written once: the core branches on them, config validation
refuses anything else. Torch-free (config composition imports it)."""

LOSS_TYPES = ("dapo", "grpo", "dr_grpo")
"""rl.loss_type: how token losses are reduced (core/losses.loss_token_weights)."""
SCALE_REWARDS = ("group", "batch", "none")
"""rl.scale_rewards: what the group-centred rewards are divided by (core/grpo.py)."""
