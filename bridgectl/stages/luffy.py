"""Stage `luffy`: LUFFY, learning to reason under off-policy guidance (Yan et al., arXiv 2504.14945).

Mixed-policy GRPO with policy shaping. Each prompt's group holds G - k rollouts sampled from pi_theta and k =
`luffy.off_policy` off-policy members: the prompt's own demonstration (trace and answer; the reference's n_prefix=1
with prefix ratio 1, i.e. the whole demonstration as the response). One update per step, in the order:

    rollouts  <- `rl.prompts_per_step` problems x (G - k) samples of pi at rl.temperature     (G = rl.num_generations)
    demos     <- each problem's demonstration: k members of its group, scored by the verifier like any completion
    A         <- (R - mean(G_on u G_off)) / std(G_on u G_off)    one mixed group per prompt (luffy.std_normalize)
    on-policy  token of rollout i:       -min(r A_i, clip(r, 1-eps, 1+eps) A_i),  r = pi_theta / pi_sampling
    off-policy token y_t of demo j:      -A_j f(pi_theta(y_t | x, y_<t)),  f(p) = p / (p + gamma)   (luffy.gamma)
    loss      <- sum over every on- and off-policy token / their number  (+ rl.beta k3 KL, every token)

The paper's mixed-policy GRPO objective takes the off-policy tokens' importance ratio pi_theta / pi_phi with the
demonstrator's pi_phi = 1, and its "policy shaping via regularized importance sampling" replaces that ratio by
f(pi_theta) (equation numbers differ between the arXiv versions, so none are given here). The gradient of a
demonstration token is -A gamma p / (p + gamma)^2 grad log p: low-probability tokens (p < gamma) are weighted up
relative to the plain ratio p, confident ones down.

Checked against the reference code (ElliottYan/LUFFY, luffy/verl/verl/mix_src) and the authors' answers:
  faithful
  - the advantage is over the mixed group, on- and off-policy rewards together, mean and std (issue #44: "the
    code's computation is exactly GRPO's; we mix off-policy and on-policy samples when building the group";
    mix_trainer.compute_advantage, adv_estimator=grpo over the prompt's uid);
  - the off-policy term is -A f(exp(log_prob)) with log_prob the current policy's, nothing detached and no
    division by a behaviour probability (mix_core_alg.compute_token_on_off_policy_loss, off_policy_reshape=
    "p_div_p_0.1"); its gradient is the policy-gradient form sg(f'(p) p) A grad log p (issue #46);
  - no clipping of off-policy tokens (off_max_clip / off_min_clip unset); one token mean over on- and off-policy
    tokens together (masked_mean(pg_losses, eos_mask));
  - demonstration log-probs at rl.temperature (verl's actor divides every response token's logits by it).
  open choices / deviations (the paper's equations are GRPO's; its runs, §4, drop two of GRPO's normalisations)
  - std: luffy.std_normalize=true (the default) keeps the GRPO form of the paper's equations, (R - mean) / std
    over the mixed group; the paper's runs (§4) drop the std and the length normalisation, as Dr. GRPO does (the
    released exp_scripts/train.sh: algorithm.grpo_use_std=False): set luffy.std_normalize=false for them;
  - length normalisation: the token mean of every stage here; the paper's runs drop it (Dr. GRPO: the script's
    loss_remove_token_mean=True divides by the padded response length instead), not offered;
  - on-policy clipping: kept (rl.epsilon); the script's loss_remove_clip=True removes it. With one update per batch
    the ratio is exactly 1 at the update, so the clip never binds and the gradient is the same either way;
  - entropy bonus: none (no stage here has one); the paper's runs (§4) use an entropy coefficient of 0.01;
  - KL: rl.beta's k3 term on every token, demonstrations included, as verl's kl loss over the response mask (the
    script has it off, as rl.beta=0 does);
  - k > 1: the k members of a group are copies of its one demonstration, so they are one forward pass weighted by
    k (the same gradient as k identical rows); the group std counts k members;
  - demonstrations are tokenised as SFT examples (trace, answer, EOS) and not truncated to rl.max_completion_length
    (the reference truncates them to max_prefix_len); the rollouts' advantage eps is group_advantages' 1e-4 (verl:
    1e-6).
With luffy.off_policy=0 every group is G rollouts and the update is exactly the rl stage's (same samples from the
same seed, same loss).

Cost per step: P (G - k) sampled rows instead of P G, and one more forward/backward over the P demonstrations, in
micro-batches of train.micro_batch_size rows, each divided by the step's whole token count (rollout tokens plus k
times the demonstration tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from bridgectl.core import distributed
from bridgectl.core.advantages import group_advantages
from bridgectl.core.context import StepOutput, TrainContext, demonstration_batch
from bridgectl.core.grpo import (
    ScoredRollouts,
    completion_rows,
    loss_mask,
    rl_backward,
    rollout_metrics,
    sample_groups,
    trained_tokens,
)
from bridgectl.core.logprobs import micro_batches, token_logprobs
from bridgectl.core.losses import SFTBatch, backward
from bridgectl.core.optim import take_step
from bridgectl.core.policy_losses import kl_k3
from bridgectl.stages.base import CountingStage


def shaping(probs: torch.Tensor, gamma: float) -> torch.Tensor:
    """LUFFY's policy shaping f(p) = p / (p + gamma), in place of the importance ratio p / 1 of a demonstration
    token."""
    return probs / (probs + gamma)


def mixed_advantages(
    on_rewards: torch.Tensor, demo_rewards: torch.Tensor, copies: int, std_normalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-normalised advantages over mixed groups. Group g is the rollouts' rewards on_rewards[g m:(g+1) m]
    (m = rollouts per group, consecutive) and `copies` members scoring demo_rewards[g]; mean and (with
    `std_normalize`) std are over all m + copies members. Returns the rollouts' advantages [len(on_rewards)] and
    each demonstration's [len(demo_rewards)] (zeros when `copies` is 0)."""
    groups = demo_rewards.numel()
    on = on_rewards.view(groups, -1)
    mixed = torch.cat([on, demo_rewards.view(-1, 1).to(on.dtype).expand(-1, copies)], dim=1)
    advantages = group_advantages(mixed.reshape(-1), mixed.size(1), "group" if std_normalize else "none")
    advantages = advantages.view(groups, -1)
    demo = advantages[:, on.size(1)] if copies > 0 else torch.zeros_like(demo_rewards, dtype=on.dtype)
    return advantages[:, : on.size(1)].reshape(-1), demo


@dataclass
class MixedGroups:
    scored: ScoredRollouts
    """The on-policy rollouts, G - k per prompt, consecutive; their advantages are the mixed groups'."""
    demos: SFTBatch | None
    """One demonstration per prompt, in group order (None when there are no off-policy members)."""
    demo_rewards: torch.Tensor
    """[P] the reward of each demonstration (the rollouts' reward: verifier or task.reward_funcs)."""
    demo_advantages: torch.Tensor
    """[P] each demonstration's advantage in its mixed group."""
    copies: int
    """Off-policy members per group (each a copy of the prompt's demonstration)."""

    def group_rewards(self) -> torch.Tensor:
        """[P, G] every member's reward, rollouts first."""
        on = self.scored.rewards.view(self.demo_rewards.numel(), -1)
        return torch.cat([on, self.demo_rewards.view(-1, 1).expand(-1, self.copies)], dim=1)

    def n_tokens(self, rollout_mask: torch.Tensor | None = None) -> torch.Tensor:
        """This rank's tokens in the step's token mean: the rollouts' (those of `rollout_mask`, core/grpo.loss_mask;
        default every completion token) and `copies` times the demonstrations'."""
        count = (self.scored.rollouts.completion_mask if rollout_mask is None else rollout_mask).sum()
        if self.demos is not None and self.copies > 0:
            count = count + self.copies * (self.demos.labels[:, 1:] != -100).sum()
        return count


def sample_mixed_groups(ctx: TrainContext, copies: int, std_normalize: bool) -> MixedGroups:
    """`rl.prompts_per_step` fresh problems (this rank's share), each with rl.num_generations - `copies` rollouts
    and its demonstration as `copies` off-policy members, scored by the task's reward, with the mixed groups'
    advantages."""
    on = ctx.cfg.rl.num_generations - copies
    scored = sample_groups(ctx, group_size=on)
    problems = scored.problems[::on]
    demos, demo_rewards = None, torch.zeros(len(problems), device=ctx.device)
    if copies > 0:
        demos = demonstration_batch(ctx, problems)
        # the same reward as the rollouts they share a group with (task.reward_funcs too)
        demo_rewards = torch.tensor(
            ctx.task.step_reward(problems, [p.trace_completion for p in problems])[0], device=ctx.device
        )
    on_advantages, demo_advantages = mixed_advantages(scored.rewards, demo_rewards, copies, std_normalize)
    return MixedGroups(replace(scored, advantages=on_advantages), demos, demo_rewards, demo_advantages, copies)


def demo_backward(
    model, mixed: MixedGroups, ctx: TrainContext, gamma: float, n_tokens: torch.Tensor
) -> tuple[float, float]:
    """Accumulates the gradient of the off-policy term, copies * sum_t -A_j f(pi_theta(y_t)) (+ rl.beta k3 KL) over
    the demonstrations' tokens divided by `n_tokens`, in micro-batches of train.micro_batch_size rows; returns the
    term's value and the mean probability pi_theta gives a demonstration token."""
    rl, demos = ctx.cfg.rl, mixed.demos
    total = torch.zeros((), device=demos.input_ids.device)
    prob_sum = torch.zeros((), device=demos.input_ids.device)
    for rows in micro_batches(demos.attention_mask.sum(dim=1).tolist(), ctx.cfg.train.micro_batch_size):
        part = demos.rows(rows)
        scored = part.labels[:, 1:] != -100
        logprobs = token_logprobs(model, part.input_ids, part.attention_mask, 1, scored, rl.temperature)
        per_token = -mixed.demo_advantages[rows].unsqueeze(1) * shaping(logprobs.exp(), gamma)
        if rl.beta > 0:
            with torch.no_grad(), ctx.policy.reference() as reference:
                ref_logprobs = token_logprobs(reference, part.input_ids, part.attention_mask, 1, scored, rl.temperature)
            per_token = per_token + rl.beta * kl_k3(ref_logprobs, logprobs)
        loss = mixed.copies * (per_token * scored).sum() / n_tokens.clamp(min=1)
        backward(loss)
        total += loss.detach()
        prob_sum += (logprobs.detach().exp() * scored).sum()
    return float(total), float(prob_sum / max(1, int((demos.labels[:, 1:] != -100).sum())))


def mixed_metrics(mixed: MixedGroups, stats, group_size: int, ctx: TrainContext, other_signal: bool = False) -> dict:
    """rollout_metrics of the on-policy rollouts, with zero_std_groups and frac_reward_zero_std counted over the
    mixed groups, and a signal wherever a rollout or a demonstration has an advantage in its mixed group (or with
    `other_signal`: srft's losses need none)."""
    rewards = mixed.scored.rewards
    other_signal = other_signal or bool((mixed.demo_advantages != 0).any())
    metrics = rollout_metrics(
        replace(mixed.scored, rewards=mixed.group_rewards().reshape(-1)), stats, group_size, ctx, other_signal
    )
    metrics["train/reward_mean"] = rewards.mean().item()
    metrics["train/reward_std"] = rewards.std().item() if rewards.numel() > 1 else 0.0
    return metrics


class LuffyStage(CountingStage):
    """LUFFY's mixed-policy GRPO (module docstring): one optimizer (luffy.lr), its step counter as its state."""

    name = "luffy"

    def __init__(self, ctx: TrainContext, total_updates: int) -> None:
        super().__init__(ctx, ctx.cfg.luffy.lr, total_updates)
        self.cfg = ctx.cfg.luffy

    def step(self) -> StepOutput:
        ctx, cfg, rl = self.ctx, self.cfg, self.ctx.cfg.rl
        model = ctx.policy.model
        mixed = sample_mixed_groups(ctx, cfg.off_policy, cfg.std_normalize)
        # rollouts cut off at rl.max_completion_length drop out with rl.mask_truncated_completions
        n_tokens = distributed.mean_denominator(mixed.n_tokens(loss_mask(mixed.scored.rollouts, ctx)))
        # on-policy tokens: the GRPO surrogate with the mixed groups' advantages; off-policy tokens: shaped, unclipped;
        # both divided by the step's whole token count, micro-batched (train.micro_batch_size)
        loss_on, stats = rl_backward(model, mixed.scored, ctx, n_tokens=n_tokens)
        loss_off, demo_prob = demo_backward(model, mixed, ctx, cfg.gamma, n_tokens) if mixed.copies else (0.0, 0.0)
        grad_norm = take_step(self.params, self.optimizer, self.scheduler, ctx.cfg.optim.max_grad_norm)
        self.updates += 1

        # each of a demonstration's k copies is a member of its group, weighted as k identical rows (demo_backward)
        demo_tokens = mixed.copies * mixed.demos.n_tokens if mixed.demos is not None else 0
        metrics = {
            "train/rl_loss": loss_on + loss_off,
            "luffy/on_policy_loss": loss_on,
            "luffy/off_policy_loss": loss_off,
            **mixed_metrics(mixed, stats, rl.num_generations, ctx),
            "train/grad_norm": grad_norm,
            "train/lr": self.scheduler.get_last_lr()[0],
        }
        if mixed.copies:
            metrics.update(
                {
                    "luffy/demo_reward": mixed.demo_rewards.mean().item(),
                    "luffy/demo_advantage": mixed.demo_advantages.mean().item(),
                    "luffy/demo_prob": demo_prob,
                }
            )
        return StepOutput(
            metrics=metrics,
            train_tokens=trained_tokens(mixed.scored, ctx) + demo_tokens,
            gen_tokens=mixed.scored.gen_tokens,
            completions=completion_rows(mixed.scored, ctx, self.updates),
        )
