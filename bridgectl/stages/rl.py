"""Stage `rl`: reinforcement learning from verifiable rewards, GRPO-style.

Paper Eq. 2: maximise J_RL = E[R(y_hat, y)] - KL(pi || pi_ref), R = 1 for a correct final answer, else 0 (Eq. 3,
no format reward). One update per step, in the order:

    prompts   <- `rl.prompts_per_step` problems, each repeated `rl.num_generations` times (a group)
    rollouts  <- sample pi at `rl.temperature` (LoRA merged while sampling), stop at EOS
    rewards   <- verifier(completion, gold)
    A         <- (R - mean_group) / std_group                      (`rl.scale_rewards=group`)
    loss      <- clipped surrogate with pi / pi_sampling, + beta KL, token-averaged (core/losses.py)

With one update per batch the ratio is 1 at the update (TRL's num_iterations=1), so clipping only acts when the
sampling policy differs from the trained one; it is kept so stages that reuse rollouts (BRIDGE's shadow) share it.
"""

from __future__ import annotations

import time

import torch

from bridgectl.core.context import StepOutput, TrainContext
from bridgectl.core.losses import group_advantages, grpo_loss
from bridgectl.core.optim import apply_update, make_optimizer
from bridgectl.core.rollout import completion_logprobs, generate


class RLStage:
    name = "rl"

    def __init__(self, ctx: TrainContext, total_updates: int) -> None:
        self.ctx = ctx
        self.params = ctx.policy.trainable_parameters()
        self.optimizer, self.scheduler = make_optimizer(self.params, ctx.cfg.rl.lr, ctx.cfg.optim, total_updates)
        self.updates = 0

    def step(self) -> StepOutput:
        ctx, rl = self.ctx, self.ctx.cfg.rl
        policy = ctx.policy
        problems = [next(ctx.rl_problems) for _ in range(rl.prompts_per_step)]
        grouped = [p for p in problems for _ in range(rl.num_generations)]

        # ---- rollouts from the current policy ----------------------------------------------------------------
        started = time.perf_counter()
        policy.model.eval()
        with policy.merged_for_generation() as sampler:
            rollouts = generate(sampler, policy.tokenizer, [p.question for p in grouped], rl.max_completion_length,
                                temperature=rl.temperature, generator=ctx.sampling_generator)
        policy.model.train()
        gen_seconds = time.perf_counter() - started
        rewards = torch.tensor([ctx.task.reward(c, p.answer) for c, p in zip(rollouts.completions, grouped)],
                               device=ctx.device)
        advantages = group_advantages(rewards, rl.num_generations, rl.scale_rewards)

        # ---- policy update ---------------------------------------------------------------------------------
        logprobs = completion_logprobs(policy.model, rollouts, rl.temperature)
        ref_logprobs = None
        if rl.beta > 0:
            with torch.no_grad(), policy.reference() as reference:
                ref_logprobs = completion_logprobs(reference, rollouts, rl.temperature)
        loss, stats = grpo_loss(logprobs, rollouts.sampling_logprobs, advantages, rollouts.completion_mask,
                                rl.epsilon, rl.beta, ref_logprobs)
        grad_norm = apply_update(loss, self.params, self.optimizer, self.scheduler, ctx.cfg.optim.max_grad_norm)
        self.updates += 1

        gen_tokens = int(rollouts.lengths.sum())
        zero_std_groups = int((rewards.view(-1, rl.num_generations).std(dim=1) == 0).sum())
        sample_every = ctx.cfg.train.log_completions_every
        completions = []
        if sample_every > 0 and (self.updates - 1) % sample_every == 0:
            completions = [{"prompt": p.question, "completion": c, "reward": r, "gold": p.answer, "split": "train"}
                           for p, c, r in zip(grouped[:rl.num_generations], rollouts.completions, rewards.tolist())]
        return StepOutput(
            metrics={
                "train/rl_loss": loss.item(), "train/reward_mean": rewards.mean().item(),
                "train/reward_std": rewards.std().item(), "train/response_len": rollouts.lengths.float().mean().item(),
                "train/kl": stats.kl, "train/clip_fraction": stats.clip_fraction,
                "train/zero_std_groups": zero_std_groups, "train/grad_norm": grad_norm,
                "train/lr": self.scheduler.get_last_lr()[0],
                "perf/gen_tokens_per_s": gen_tokens / max(gen_seconds, 1e-9),
            },
            train_tokens=gen_tokens, gen_tokens=gen_tokens, completions=completions,
        )
