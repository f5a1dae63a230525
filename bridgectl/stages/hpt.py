"""Stage `hpt`: HPT, Hybrid Post-Training, a per-prompt switch between RL and SFT by the rollouts' performance (Lv
et al., "Towards a Unified View of Large Language Model Post-Training", arXiv 2509.04419; reference code:
TsinghuaC3I/Unify-Post-Training, hpt/verl/verl/mix_src/mix_trainer.py and mix_actor.py, run by
exp_scripts/train.sh with UNIFY_STRATEGY=switch, SWITCH_GATE=0, OFFLINE_LOSS_TYPE=sft, SFT_LOSS_COEF=1.0).

The paper weighs L = alpha L_RL + beta L_SFT per question, (alpha, beta) = (1, 0) or (0, 1) by the question's
rollout performance against a gate (equation numbers not checked here; the reference code above was, line by line).
One optimizer, one update per step on shared weights:

    rollouts  <- `rl.prompts_per_step` prompts x `rl.num_generations` samples, scored as in `rl`
    switched  =  prompts with at most `hpt.gate` correct rollouts (reward > 0)  mix_trainer: on_solve_num <= switch_gate
    L_grpo    =  GRPO on the rollouts of the other prompts only, divided by their own token count
    L_sft     =  -log pi(demonstration | question) of each switched prompt's own demonstration (one per prompt,
                 core/context.demonstration_batch), divided by the demonstrations' token count
    L         =  L_grpo + hpt.sft_coef * L_sft                                  mix_actor: pg_loss + sft_loss * coef
    log hpt/sft_prompts (switched prompts this step) and hpt/rl_prompts

Faithful to the reference: the switched prompts' rollouts are removed from the batch (mix_trainer's keep_mask), not
kept with zero weight, so they do not count in the GRPO denominator; each switched prompt adds exactly one
demonstration row (off_add_num = 1, its own target); both terms are token means over their own rows
(mix_actor, offline_loss_type=sft: compute_sft_pure_loss = masked_mean over demonstration tokens, plus the policy
loss over on-policy rows), added with SFT_LOSS_COEF = 1 and no convex weighting; the kept groups' advantages are
those of their own group, unchanged by the switch (GRPO normalises within a group).
Open choices, with the value chosen here: gate 0 of `rl.num_generations` (the reference's default; hpt.gate=-1
switches nothing and is exactly the `rl` stage); the learning rate is the RL one (`hpt.lr` = 1e-4 at the tiny scale,
where RL diverges above it; the reference uses one learning rate, 5e-6, for both terms).
Deviations from the reference script: its GRPO flavour is not reproduced, the GRPO half is the shared one of every
stage (rl.*): the script sets loss_remove_token_mean (a sum over tokens divided by the padded response width),
loss_remove_clip, grpo_use_std=False (reachable here as rl.scale_rewards=none) and a 0.001 entropy bonus; and verl
takes each term's mean per micro-batch, while here each term is divided by its whole step's token count, so that
micro-batches (train.micro_batch_size) do not change the update.
"""

from __future__ import annotations

import torch

from bridgectl.core import distributed
from bridgectl.core.context import StepOutput, TrainContext, demonstration_batch
from bridgectl.core.grpo import completion_rows, rl_backward, rollout_metrics, sample_groups, trained_tokens
from bridgectl.core.losses import sft_backward
from bridgectl.core.optim import take_step
from bridgectl.stages.base import CountingStage


def switched_groups(correct: torch.Tensor, group_size: int, gate: int) -> list[bool]:
    """Per prompt group (consecutive rows of `group_size`): whether at most `gate` of its rollouts are correct
    (`correct`: rewards, right when > 0, or booleans)."""
    return ((correct.view(-1, group_size) > 0).sum(dim=1) <= gate).tolist()


class HPTStage(CountingStage):
    """HPT's per-prompt switch (module docstring): one optimizer (hpt.lr), its step counter as its state."""

    name = "hpt"

    def __init__(self, ctx: TrainContext, total_updates: int) -> None:
        super().__init__(ctx, ctx.cfg.hpt.lr, total_updates)

    def step(self) -> StepOutput:
        ctx, cfg, group_size = self.ctx, self.ctx.cfg.hpt, self.ctx.cfg.rl.num_generations
        model = ctx.policy.model
        scored = sample_groups(ctx)
        switched = switched_groups(scored.correct, group_size, cfg.gate)  # the verifier's verdicts
        rl_rows = [
            row
            for group, to_sft in enumerate(switched)
            if not to_sft
            for row in range(group * group_size, (group + 1) * group_size)
        ]
        demonstrated = [scored.problems[group * group_size] for group, to_sft in enumerate(switched) if to_sft]

        # the gradient of L_grpo(kept prompts) + sft_coef * L_sft(demonstrations), accumulated in micro-batches
        loss_rl, stats = rl_backward(model, scored, ctx, rows=rl_rows)
        metrics = {
            "train/rl_loss": loss_rl,
            "hpt/sft_prompts": len(demonstrated),
            "hpt/rl_prompts": len(switched) - len(demonstrated),
        }
        train_tokens = trained_tokens(scored, ctx, torch.tensor(rl_rows, dtype=torch.long, device=ctx.device))
        if demonstrated:
            batch = demonstration_batch(ctx, demonstrated)
            metrics["train/sft_loss"] = sft_backward(model, batch, ctx.cfg.train.micro_batch_size, scale=cfg.sft_coef)
            train_tokens += batch.n_tokens
        else:  # the collective sft_backward's denominator would have run, so that processes stay in step
            distributed.mean_denominator(torch.zeros((), dtype=torch.long, device=ctx.device))
        grad_norm = take_step(self.params, self.optimizer, self.scheduler, ctx.cfg.optim.max_grad_norm)
        self.updates += 1
        # prompts switched to demonstrations are learned from whatever their advantages: a signal of the step
        metrics.update(
            {
                **rollout_metrics(scored, stats, group_size, ctx, other_signal=bool(demonstrated)),
                "train/grad_norm": grad_norm,
                "train/lr": self.scheduler.get_last_lr()[0],
            }
        )
        return StepOutput(
            metrics=metrics,
            train_tokens=train_tokens,
            gen_tokens=scored.gen_tokens,
            completions=completion_rows(scored, ctx, self.updates),
        )
