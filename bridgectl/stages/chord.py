"""Stage `chord`: CHORD, SFT as a dynamically weighted auxiliary objective inside on-policy RL (Zhang et al., arXiv
2508.11408; reference code: the authors' Trinity-RFT, algorithm `mix_chord`, and ms-swift's GRPO `chord_*` options).

One optimizer, one update per step on shared weights (rl.num_iterations updates on the step's rollouts and expert
batch, mu fixed for the step, when above 1), of the paper's hybrid loss L_Hybrid (its CHORD-mu and CHORD-phi
variants; equation numbers not given here, the reference code below was checked line by line)

    L_hybrid = (1 - mu) L_grpo + mu L_sft

    rollouts  <- `rl.prompts_per_step` x `rl.num_generations` samples of the current policy, scored as in `rl`
    expert    <- `sft.batch_size` fresh SFT examples (the task's traces: core/context.next_sft_batch)
    L_grpo    =  the `rl` stage's GRPO loss on the rollouts, token-averaged over the rollout tokens
    L_sft     =  -log pi(expert tokens), token-averaged over the expert tokens                    (CHORD-mu)
              or -sum_t phi_t log p_t / n_tokens, phi_t = p_t (1 - p_t) detached       (CHORD-phi, chord.phi)

mu follows CHORD-mu's schedule, `mu_schedule_function` in both reference implementations (Trinity-RFT's
policy_loss_fn/chord_policy_loss.py and ms-swift's rlhf_trainer/utils.py are the same code), at the update index t
counted from 0 (ms-swift passes the Trainer's global_step, 0 during the first update):

    t <  W            mu = mu_peak * t / W                                  warm-up from 0 (mu = 0 at t = 0)
    W <= t < W + D    mu = mu_valley + (mu_peak - mu_valley) * (1 + cos(pi (t - W) / D)) / 2
    t >= W + D        mu = mu_valley                                        kept to the end of the stage

with W = `chord.mu_warmup_steps`, D = `chord.mu_decay_steps`. An update with mu = 0 draws no expert batch and runs
no SFT pass (as ms-swift skips it); its gradient is exactly the `rl` stage's.

Faithful: the (1 - mu, mu) convex weighting, the schedule above, both terms token-level means over their own tokens
(Trinity-RFT: masked_mean per term, `use_token_level_loss_in_sft: true`); CHORD-phi's phi = p (1 - p) on the expert
tokens, detached, with the NLL still divided by the token count (Trinity-RFT's SFTPhiLossFn; core/losses.phi_sft_loss).
ms-swift instead multiplies the per-token loss by a phi it does not detach, so its gradient also flows through phi;
the authors' code is followed here.
Open choices, with the value chosen here: the default schedule is Trinity-RFT's mix_chord.yaml (mu_peak 0.5,
mu_valley 0.02) with its 200 warm-up and 400 decay updates scaled by 1/4 to the 150-update chord recipe, so mu
reaches the valley as the stage ends; phi off by default (that file's comments give the paper's variants: CHORD-mu
= warm-up 0, decay 200, peak 0.9, valley 0.05, phi off; CHORD-phi = phi on with a constant mu of 0.1, here
chord.phi=true chord.mu_warmup_steps=0 chord.mu_decay_steps=0 chord.mu_peak=0.1 chord.mu_valley=0.1); the expert data
are the task's SFT examples, a batch of their own each update (Trinity-RFT mixes a share of expert samples into
each batch, `expert_data_ratio`); the GRPO half is the shared one of every stage (rl.*).
Deviation: none intended beyond the tiny-scale learning rate (`chord.lr`). train/sft_loss logs the SFT term as
optimised (phi-weighted with chord.phi); an update with mu = 0 logs none.
"""

from __future__ import annotations

import math

from bridgectl.core.context import StepOutput, TrainContext, next_sft_batch
from bridgectl.core.grpo import (
    Update,
    completion_rows,
    iterate_updates,
    rl_backward,
    rollout_metrics,
    sample_groups,
    trained_tokens,
)
from bridgectl.core.losses import phi_sft_loss, sft_backward, sft_loss
from bridgectl.core.optim import take_step
from bridgectl.stages.base import CountingStage


def chord_mu(cfg, update: int) -> float:
    """CHORD-mu's weight of the SFT term at update `update` (from 0): linear warm-up from 0 to mu_peak, half-cosine
    decay to mu_valley, then mu_valley."""
    warmup, decay = cfg.mu_warmup_steps, cfg.mu_decay_steps
    if update < warmup:
        return cfg.mu_peak * update / warmup
    if update >= warmup + decay:
        return cfg.mu_valley
    cosine = 0.5 * (1 + math.cos(math.pi * (update - warmup) / decay))
    return cfg.mu_valley + (cfg.mu_peak - cfg.mu_valley) * cosine


class ChordStage(CountingStage):
    """CHORD's hybrid loss (module docstring): one optimizer (chord.lr), its step counter as its state."""

    name = "chord"

    def __init__(self, ctx: TrainContext, total_updates: int) -> None:
        # `total_updates` counts steps; the optimizer takes rl.num_iterations updates in each (mu keeps per step)
        super().__init__(ctx, ctx.cfg.chord.lr, total_updates * ctx.cfg.rl.num_iterations)

    def step(self) -> StepOutput:
        ctx, cfg, rl = self.ctx, self.ctx.cfg.chord, self.ctx.cfg.rl
        mu = chord_mu(cfg, self.updates)
        scored = sample_groups(ctx)
        batch = next_sft_batch(ctx) if mu > 0 else None

        def one_update() -> Update:
            # the gradient of (1 - mu) L_grpo + mu L_sft, accumulated from the micro-batches of each term
            # (train.micro_batch_size), each divided by its own whole token count
            loss_rl, stats = rl_backward(ctx.policy.model, scored, ctx, scale=1 - mu)
            loss_sft = (
                None
                if batch is None
                else sft_backward(
                    ctx.policy.model,
                    batch,
                    ctx.cfg.train.micro_batch_size,
                    scale=mu,
                    loss_fn=phi_sft_loss if cfg.phi else sft_loss,
                )
            )
            grad_norm = take_step(self.params, self.optimizer, self.scheduler, ctx.cfg.optim.max_grad_norm)
            return Update(rl_loss=loss_rl, stats=stats, sft_loss=loss_sft, grad_norm=grad_norm)

        metrics, stats = iterate_updates(rl.num_iterations, one_update)
        self.updates += 1
        metrics.update(
            {
                "chord/mu": mu,
                **rollout_metrics(scored, stats, rl.num_generations, ctx),
                "train/lr": self.scheduler.get_last_lr()[0],
            }
        )
        train_tokens = trained_tokens(scored, ctx) + (batch.n_tokens if batch is not None else 0)
        return StepOutput(
            metrics=metrics,
            train_tokens=rl.num_iterations * train_tokens,
            gen_tokens=scored.gen_tokens,
            completions=completion_rows(scored, ctx, self.updates),
        )
