"""Stage `srft`: SRFT, supervised and reinforcement fine-tuning in one stage (arXiv 2506.19767).

One loss over demonstrations and the policy's own rollouts, with entropy-aware weights. Each prompt's group holds
G - 1 rollouts of pi_theta and the prompt's demonstration (trace and answer) as an off-policy member, as in LUFFY
(stages/luffy.py), on which SRFT builds. One update per step, in the order:

    rollouts  <- `rl.prompts_per_step` problems x (G - 1) samples of pi at rl.temperature     (G = rl.num_generations)
    demos     <- each problem's demonstration, scored by the verifier like any completion
    A_j       <- the demonstration's group-normalised advantage in its mixed group            (rl.scale_rewards)
    H         <- pi_theta's mean token entropy over one sequence (teacher-forced), detached
    L_sft^demo  = sum_j w_sft(j) sum_t -log pi(y_t)            / demonstration tokens   w_sft = 0.5 exp(-H_j)
    L_rl^demo   = sum_j sum_t -A_j pi(y_t)                      / all tokens             ratio pi / pi_beta, pi_beta = 1
    L_rl^self   = [sum_{i: R_i>0} w_rl(i) sum_t -log pi(y_t) + sum_{i: R_i=0} sum_t log pi(y_t)] / all tokens
                                                                                         w_rl = 0.1 exp(H_i)
    loss        = L_sft^demo + L_rl^demo + L_rl^self   (+ rl.beta k3 KL on every token)

These are the paper's three terms and their weights w_SFT = 0.5 sg(exp(-H(pi_theta))) and w_RL = 0.1
sg(exp(H(pi_theta))) (srft.sft_coef, srft.rl_coef): the SFT pull fades where the policy is uncertain, and correct
rollouts are reinforced harder while entropy is high, which keeps the entropy from collapsing fast. The paper
defines the self-rollout term by the correct (y+) and incorrect (y-) rollouts, with no advantage: that is what is
implemented, not GRPO advantages.

Checked against HPT's re-implementation (TsinghuaC3I/Unify-Post-Training, hpt/verl/verl/mix_src/mix_actor.py,
offline_loss_type="srft", and compute_token_on_off_policy_srft_loss; the authors' own code was not found):
  faithful
  - H per sequence: the mean over a row's response tokens of the per-token entropy, detached
    (masked_mean(entropy, response_mask, axis=-1).detach()); so w_sft is one weight per demonstration and w_rl one
    per rollout, not per token and not per batch;
  - SFT term: masked_mean(-log_prob * w_sft) over the demonstrations' tokens, added to the RL loss unscaled;
  - rollouts: coefficient w_rl for a correct rollout, -1 for an incorrect one, times log pi (srft_type="paper",
    the default), unclipped; correct means reward > 0 (the code tests score == 1: the same on binary rewards).
    The code's clip branch (loss_remove_clip=False) clamps log pi itself to [1 - eps, 1 + eps], a constant 1 - eps,
    which would silently drop the incorrect rollouts' gradient; the paper's equation has that term, so no clip;
  - demonstrations as RL samples: -A pi_theta, unclipped, as the paper has it: with the behaviour policy pi_beta = 1
    the ratio r is pi_theta itself, and the text after Eq. 10 drops the clip of the surrogate min(r A, clip(r,
    1-eps, 1+eps) A) (for A < 0 it would zero the gradient wherever pi < 1 - eps); so does the code (off_ratio =
    exp(log_prob), no reshaping, no clip); A is the mixed group's advantage (the LUFFY trainer it runs in);
  - the RL terms share one token mean over rollout and demonstration tokens (masked_mean(pg_losses, eos_mask));
    entropy and log-probs at rl.temperature (verl divides the logits by it for both).
  open choices / deviations
  - one demonstration per group and G - 1 rollouts (the LUFFY layout, n_prefix=1); the paper's group layout is not
    stated;
  - KL: rl.beta's k3 term on every token (verl's kl loss covers the response mask); off by default;
  - no entropy bonus (no stage here has one);
  - the entropy is a separate no-grad forward pass per micro-batch (core/logprobs.token_entropies, chunked over
    the vocabulary), since the weights are detached; verl takes it from the training forward's logits.

Cost per step: P (G - 1) sampled rows, and for rollouts and demonstrations alike one no-grad entropy pass plus one
forward/backward, in micro-batches of train.micro_batch_size rows whose losses keep the step's whole token counts
as divisors (so the update equals the one-pass update).
"""

from __future__ import annotations

import torch

from bridgectl.core import distributed
from bridgectl.core.context import StepOutput, TrainContext
from bridgectl.core.grpo import completion_rows, loss_mask, trained_tokens
from bridgectl.core.logprobs import completion_logprobs, micro_batches, rollout_rows, token_entropies, token_logprobs
from bridgectl.core.losses import backward
from bridgectl.core.optim import take_step
from bridgectl.core.policy_losses import GRPOStats, kl_k3
from bridgectl.stages.base import CountingStage
from bridgectl.stages.luffy import MixedGroups, mixed_metrics, sample_mixed_groups

ZERO_STATS = GRPOStats(clip_fraction=0.0, kl=0.0)
"""SRFT's train/clip_fraction and train/kl for rollout_metrics: its losses clip nothing, and its KL (rl.beta) is a
term of the loss, not measured apart."""


def mean_entropy(entropies: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] each row's mean token entropy over its scored tokens (H of the paper's weights)."""
    mask = mask.float()
    return (entropies * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def sft_weights(entropy: torch.Tensor, coef: float) -> torch.Tensor:
    """w_sft = coef exp(-H) per demonstration (detached)."""
    return coef * torch.exp(-entropy.detach())


def rollout_coefficients(entropy: torch.Tensor, rewards: torch.Tensor, coef: float) -> torch.Tensor:
    """Per rollout, the factor c of its loss term -c sum_t log pi: w_rl = coef exp(H) when correct (reward > 0),
    -1 when not (detached)."""
    return torch.where(rewards > 0, coef * torch.exp(entropy.detach()), torch.full_like(entropy, -1.0))


class SRFTStage(CountingStage):
    """SRFT's single-stage loss (module docstring): one optimizer (srft.lr), its step counter as its state."""

    name = "srft"

    def __init__(self, ctx: TrainContext, total_updates: int) -> None:
        super().__init__(ctx, ctx.cfg.srft.lr, total_updates)
        self.cfg = ctx.cfg.srft

    def step(self) -> StepOutput:
        ctx, rl = self.ctx, self.ctx.cfg.rl
        mixed = sample_mixed_groups(ctx, 1, rl.scale_rewards == "group")
        # rollouts cut off at rl.max_completion_length drop out with rl.mask_truncated_completions
        n_all = distributed.mean_denominator(mixed.n_tokens(loss_mask(mixed.scored.rollouts, ctx)))
        n_demo = distributed.mean_denominator((mixed.demos.labels[:, 1:] != -100).sum())
        self_loss, rl_weight = self._rollouts_backward(mixed, n_all)
        sft_loss, demo_loss, sft_weight = self._demos_backward(mixed, n_all, n_demo)
        grad_norm = take_step(self.params, self.optimizer, self.scheduler, ctx.cfg.optim.max_grad_norm)
        self.updates += 1

        metrics = {
            "train/sft_loss": sft_loss,
            "train/rl_loss": self_loss + demo_loss,
            "srft/rl_loss_demo": demo_loss,
            "srft/rl_loss_self": self_loss,
            "srft/sft_weight": sft_weight,
            "srft/rl_weight": rl_weight,
            "srft/demo_reward": mixed.demo_rewards.mean().item(),
            # every rollout and demonstration has a loss term of its own, advantage or not: never no signal
            **mixed_metrics(mixed, ZERO_STATS, rl.num_generations, ctx, other_signal=True),
            "train/grad_norm": grad_norm,
            "train/lr": self.scheduler.get_last_lr()[0],
        }
        return StepOutput(
            metrics=metrics,
            train_tokens=trained_tokens(mixed.scored, ctx) + mixed.demos.n_tokens,
            gen_tokens=mixed.scored.gen_tokens,
            completions=completion_rows(mixed.scored, ctx, self.updates),
        )

    def _rollouts_backward(self, mixed: MixedGroups, n_all: torch.Tensor) -> tuple[float, float]:
        """L_rl^self, micro-batched; returns its value and the mean w_rl of the correct rollouts (nan if none)."""
        ctx, rl = self.ctx, self.ctx.cfg.rl
        # right or wrong by the verifier's verdict (a format reward in task.reward_funcs does not make a rollout right)
        model, rollouts, rewards = ctx.policy.model, mixed.scored.rollouts, mixed.scored.correct.float()
        lengths = (rollouts.prompt_mask.sum(dim=1) + rollouts.completion_mask.sum(dim=1)).tolist()
        total = torch.zeros((), device=rewards.device)
        weights = []
        for rows in micro_batches(lengths, ctx.cfg.train.micro_batch_size):
            part = rollout_rows(rollouts, rows)
            mask = part.completion_mask
            input_ids = torch.cat([part.prompt_ids, part.completion_ids], dim=1)
            attention = torch.cat([part.prompt_mask, part.completion_mask], dim=1)
            entropy = mean_entropy(
                token_entropies(model, input_ids, attention, part.prompt_ids.size(1), mask, rl.temperature), mask
            )
            coef = rollout_coefficients(entropy, rewards[rows], self.cfg.rl_coef)
            weights.append(coef[rewards[rows] > 0])
            logprobs = completion_logprobs(model, part, rl.temperature)
            per_token = -coef.unsqueeze(1) * logprobs
            per_token = per_token + self._kl(input_ids, attention, part.prompt_ids.size(1), mask, logprobs)
            loss = (per_token * loss_mask(part, ctx)).sum() / n_all.clamp(min=1)
            backward(loss)
            total += loss.detach()
        correct = torch.cat(weights)
        return float(total), correct.mean().item() if correct.numel() else float("nan")

    def _demos_backward(
        self, mixed: MixedGroups, n_all: torch.Tensor, n_demo: torch.Tensor
    ) -> tuple[float, float, float]:
        """L_sft^demo and L_rl^demo, from one forward pass per micro-batch of demonstrations; returns both values
        and the mean w_sft."""
        ctx, rl, demos = self.ctx, self.ctx.cfg.rl, mixed.demos
        model = ctx.policy.model
        sft_total = torch.zeros((), device=demos.input_ids.device)
        rl_total = torch.zeros((), device=demos.input_ids.device)
        weights = []
        for rows in micro_batches(demos.attention_mask.sum(dim=1).tolist(), ctx.cfg.train.micro_batch_size):
            part = demos.rows(rows)
            mask = part.labels[:, 1:] != -100
            entropy = mean_entropy(
                token_entropies(model, part.input_ids, part.attention_mask, 1, mask, rl.temperature), mask
            )
            weight = sft_weights(entropy, self.cfg.sft_coef)
            weights.append(weight)
            logprobs = token_logprobs(model, part.input_ids, part.attention_mask, 1, mask, rl.temperature)
            sft = (weight.unsqueeze(1) * -logprobs * mask).sum() / n_demo.clamp(min=1)
            per_token = -mixed.demo_advantages[rows].unsqueeze(1) * logprobs.exp()
            per_token = per_token + self._kl(part.input_ids, part.attention_mask, 1, mask, logprobs)
            off = (per_token * mask).sum() / n_all.clamp(min=1)
            backward(sft + off)
            sft_total += sft.detach()
            rl_total += off.detach()
        return float(sft_total), float(rl_total), torch.cat(weights).mean().item()

    def _kl(self, input_ids, attention_mask, first_scored, mask, logprobs) -> torch.Tensor | float:
        """rl.beta times the k3 KL to the reference per token (0 when rl.beta is 0)."""
        rl = self.ctx.cfg.rl
        if rl.beta <= 0:
            return 0.0
        with torch.no_grad(), self.ctx.policy.reference() as reference:
            ref_logprobs = token_logprobs(reference, input_ids, attention_mask, first_scored, mask, rl.temperature)
        return rl.beta * kl_k3(ref_logprobs, logprobs)
