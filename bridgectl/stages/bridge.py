"""Stage `bridge`: BRIDGE, bilevel cooperative SFT + RL (Chen et al., arXiv 2509.06948, ICML 2026).

Parameters (paper §2): the lower level theta (RL, with SFT supervision), an upper-level LoRA adapter w (SFT), and
an RL-only shadow theta_hat that starts at theta_0 and is always run with the same w. One meta-step per optimizer
step, Algorithm 2 of the paper:

    rollouts  <- sample pi(theta, w)                      shared by both branches (v3)
    L_sft     =  -log pi(trace | x; theta, w)             Eq. 1, token-averaged
    L_rl      =  grpo(pi(theta, w), rollouts)             Eq. 2 (+ beta KL)
    L_rl_hat  =  grpo(pi(theta_hat, w), rollouts)         off-policy ratio against the sampling policy
    theta     -= alpha * grad_theta[(1-lam) L_sft + lam L_rl]                 Eq. 8
    theta_hat -= alpha * grad_theta_hat[L_rl_hat]                             Algorithm 2 (persistent shadow)
    w         -= beta  * grad_w[(1-lam) L_sft + lam (L_rl - L_rl_hat)]        Eqs. 11-12: the cooperative gain
    log bridge/coop_gain = L_rl_hat - L_rl  (> 0: the jointly trained model scores better than RL alone)

Cost: one generation and three forward+backward passes (SFT and RL on (theta, w), RL on (theta_hat, w)), run one
after another, each in micro-batches of `train.micro_batch_size` rows, so that only one micro-batch's activations
are alive at a time. The joint gradient is accumulated from the RL and SFT passes for theta and w together (its w
part is exactly the first two terms of Eq. 11), and L_rl_hat is differentiated once for theta_hat and w. theta's
step depends on the joint gradient alone, so it is taken before the shadow branch runs and its gradient freed (with
model.finetune=full, one weight-sized gradient less at the peak); the updates are those of the block above.

At lam = 1 the SFT terms vanish and w is frozen: theta and theta_hat start equal and take the same RL updates on the
same rollouts, so L_rl = L_rl_hat at every step, the cooperative gain is 0 and w's gradient lam (grad_w L_rl -
grad_w L_rl_hat) is 0; BRIDGE at lam = 1 is RL with an idle adapter.

Ablations (the paper's Table of ablations, as settings): `bridge.upper=joint` trains w on the joint loss only
(w -= beta grad_w[(1-lam) L_sft + lam L_rl]; the paper's "w/o J_meta", 49.9 -> 40.3 there), with no shadow and no
third pass; `bridge.upper=none` has no adapter w at all (theta -= alpha grad[(1-lam) L_sft + lam L_rl]). Both are
shipped as recipes (bridge_no_meta, bridge_no_upper).

What theta is, model.finetune decides, as in every recipe (bridge.lower follows it or is refused).
`model.finetune=full` is the paper: theta are the model's full weights and theta_hat a second full copy.
`model.finetune=lora` makes theta a LoRA adapter over one frozen base, of the `lora.rank` and `lora.target_modules`
every recipe's trained adapter has (so `rl` and `bridge` train theta at equal capacity unless the user sets them; w,
the extra adapter, has `bridge.w_rank`), and theta_hat a copy of that adapter, so there is no second full copy
(memory close to the `rl` recipe). The shadow is not a second module: its passes are the live model's with
theta_hat's values swapped into theta's parameters for the duration (and w's joint gradient set aside), sharing w
and everything else; so the shadow runs wherever the model does, sharded over processes (train.fsdp) included.

Choices the paper leaves open, with the value chosen here (all configurable):
  - RL algorithm: GRPO as in `rl` (group-normalised advantages, clip `rl.epsilon`=0.2, token-level averaging);
  - KL coefficient: `rl.beta`=0 (no reference model, TRL's default);
  - beta (w's learning rate): `bridge.beta`=1e-3; alpha: `bridge.alpha`; optimizer: AdamW (SGD selectable);
  - LoRA targets: every attention and MLP projection; w's alpha 16;
  - shadow: the persistent copy of Algorithm 2 (the ICML text); Eq. 10's one-step look-ahead
    theta_hat = theta - alpha grad L_rl(theta, w), recomputed each step, is `bridge.shadow=lookahead` (ablation).
Deviations from the paper, each off by default where possible and reachable by config:
  - the paper uses one learning rate (5e-7) everywhere; at the tiny scale SFT wants ~1e-3 and RL diverges above
    ~1e-4 (measured on the tiny model: docs/quickstart.md's "The built-in task and model"), so alpha and beta are separate
    and `bridge.sft_scale` (default 1 = paper) multiplies the SFT term of both levels;
  - w's rank `bridge.w_rank` is 8 by default where the paper states 16 (with alpha 16; its LoRA ablation table's
    first row reads 32/16): set bridge.w_rank=16 for the paper's;
  - gradient-norm clipping is on by default (`optim.max_grad_norm`=1.0; the paper does not state any) and applies to
    theta, w and theta_hat separately; optim.max_grad_norm=0 turns it off;
  - lam may ramp linearly from `bridge.lam_start` to `bridge.lam_end` (the paper's text mentions a ramp; its
    experiments use a constant 0.5).
"""

from __future__ import annotations

import contextlib

import torch

from bridgectl.core import distributed
from bridgectl.core.context import StepOutput, TrainContext, next_sft_batch
from bridgectl.core.grpo import (
    completion_rows,
    rl_backward,
    rollout_metrics,
    sample_and_score,
    sample_groups,
    trained_tokens,
)
from bridgectl.core.losses import sft_backward
from bridgectl.core.model import adapter_of, add_upper_adapter
from bridgectl.core.optim import clip_gradients, make_optimizer
from bridgectl.stages.base import Optimizing, Stage

UPPER = "w"  # adapter name of the upper level


def swap_values(a: torch.Tensor, b: torch.Tensor) -> None:
    """Exchanges the values of two tensors of one shape (under no_grad): by their storage when plain, by copies of
    this rank's shards when sharded (FSDP gathers from the shard's own buffer, which must stay in place)."""
    if distributed.is_sharded(a) or distributed.is_sharded(b):
        saved = a.detach().clone()
        a.copy_(b)
        b.copy_(saved)
    else:
        a.data, b.data = b.data, a.data


def ensure_upper_adapter(policy, cfg) -> None:
    """Adds the upper-level adapter w over whatever trains theta, unless it is there already (a model to be
    sharded gets it before sharding, train.fsdp) or the ablation bridge.upper=none runs without one."""
    if cfg.bridge.upper == "none" or (policy.has_adapters and UPPER in policy.model.peft_config):
        return
    add_upper_adapter(
        policy, UPPER, cfg.bridge.w_rank, cfg.bridge.w_alpha, cfg.lora, train_base=cfg.model.finetune == "full"
    )


def lam_at(settings, update: int, total_updates: int) -> float:
    """Constant `bridge.lam`, or a linear ramp from `lam_start` to `lam_end` over the stage (`settings`: the bridge
    section of the config)."""
    if settings.lam_start is None or settings.lam_end is None:
        return settings.lam
    fraction = update / max(1, total_updates - 1)
    return settings.lam_start + (settings.lam_end - settings.lam_start) * fraction


def _optimizer(params, lr, settings, optim_cfg, total_updates):
    """bridge.optimizer over `params` at `lr`, with its scheduler (`settings`: the bridge section of the config)."""
    if settings.optimizer == "sgd":  # exact updates theta -= lr * grad: what the gradient tests check
        optimizer = torch.optim.SGD(params, lr=lr)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return make_optimizer(params, lr, optim_cfg, total_updates)


class BridgeStage(Stage):
    """BRIDGE's meta-step (module docstring): one optimizer per level (theta, w, theta_hat); its state is the step
    counter and the persistent shadow theta_hat."""

    name = "bridge"
    before_sharding = staticmethod(ensure_upper_adapter)  # bridgectl/training/setup.build_context, train.fsdp

    def __init__(self, ctx: TrainContext, total_updates: int) -> None:
        self.ctx, self.settings, self.total_updates = ctx, ctx.cfg.bridge, total_updates
        ensure_upper_adapter(ctx.policy, ctx.cfg)
        model = ctx.policy.model
        self.lower = {n: p for n, p in model.named_parameters() if p.requires_grad and adapter_of(n) != UPPER}
        self.upper = {n: p for n, p in model.named_parameters() if adapter_of(n) == UPPER}
        # theta_hat_0 = theta_0 (Algorithm 2); it never receives SFT gradients. Only the cooperative upper level
        # has a shadow: the ablations (bridge.upper=joint|none) need no RL-only branch.
        settings, optim = self.settings, ctx.cfg.optim
        self.cooperative = settings.upper == "cooperative"
        persistent = self.cooperative and settings.shadow == "persistent"
        self.shadow = {n: p.detach().clone().requires_grad_(True) for n, p in self.lower.items()} if persistent else {}
        # one optimizer and scheduler per level, named as the level: theta (lower), w (upper), theta_hat (shadow)
        self.lower_optimizer, self.lower_scheduler = _optimizer(
            list(self.lower.values()), settings.alpha, settings, optim, total_updates
        )
        self.upper_optimizer = self.upper_scheduler = self.shadow_optimizer = self.shadow_scheduler = None
        if self.upper:
            self.upper_optimizer, self.upper_scheduler = _optimizer(
                list(self.upper.values()), settings.beta, settings, optim, total_updates
            )
        if self.shadow:
            self.shadow_optimizer, self.shadow_scheduler = _optimizer(
                list(self.shadow.values()), settings.alpha, settings, optim, total_updates
            )
        self.updates = 0

    def optimizers(self) -> dict[str, Optimizing]:
        """Each level's optimizer and scheduler, `lower_`, `upper_` and `shadow_optimizer` / `_scheduler`, those of
        the levels this configuration has (no w with bridge.upper=none, no shadow but the cooperative persistent
        one's)."""
        levels = {
            "lower_optimizer": self.lower_optimizer,
            "lower_scheduler": self.lower_scheduler,
            "upper_optimizer": self.upper_optimizer,
            "upper_scheduler": self.upper_scheduler,
            "shadow_optimizer": self.shadow_optimizer,
            "shadow_scheduler": self.shadow_scheduler,
        }
        return {name: item for name, item in levels.items() if item is not None}

    def state_dict(self) -> dict:
        """The training state core/checkpoint.py saves besides the optimizers and schedulers: the step counter and
        the persistent shadow theta_hat (a dict of tensors, saved in weights.safetensors as `stage/shadow/<name>`);
        theta and w are the model's parameters, saved with it."""
        return {"updates": self.updates, "shadow": {name: tensor.detach() for name, tensor in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restores what state_dict returned (core/checkpoint.restore); the shadow in place, since its optimizer
        holds these very tensors (each process keeps its own shard of them under train.fsdp)."""
        self.updates = state["updates"]
        saved = state.get("shadow", {})  # none in a checkpoint of the look-ahead shadow, which keeps no weights
        with torch.no_grad():
            for name, tensor in self.shadow.items():
                if name in saved:
                    tensor.copy_(distributed.shard_like(saved[name], tensor))

    # ---- the meta-step -----------------------------------------------------------------------------------
    def step(self) -> StepOutput:
        ctx, settings, rl = self.ctx, self.settings, self.ctx.cfg.rl
        model = ctx.policy.model
        lam = lam_at(settings, self.updates, self.total_updates)
        scored = sample_groups(ctx)  # shared rollouts from pi(theta, w)
        # measured before any forward pass: sampling swaps theta_hat into the live weights, which must not
        # happen while an autograd graph holds them
        shadow_reward = self._shadow_reward(scored) if settings.shadow_rollouts else None
        batch = next_sft_batch(ctx)

        # Joint branch: the gradient of (1-lam) L_sft + lam L_rl gives theta's Eq. 8 step and w's first two terms
        # of Eq. 11. It is accumulated over micro-batches (train.micro_batch_size) of the RL rows, then of the SFT
        # rows, each pass freeing its graph before the next forward, so peak memory is one micro-batch's
        # activations (as in an `rl` step), never the SFT and RL graphs together.
        lookahead = settings.shadow == "lookahead"
        loss_rl, stats = rl_backward(model, scored, ctx, scale=1.0 if lookahead else lam)
        shadow_weights = self._lookahead_weights(lam) if lookahead else self.shadow
        loss_sft = sft_backward(model, batch, ctx.cfg.train.micro_batch_size, scale=(1 - lam) * settings.sft_scale)

        # theta's step (Eq. 8) needs the joint gradient only, so it is taken now and theta's gradient freed before
        # the shadow's backward makes theta_hat's: with model.finetune=full, one weight-sized gradient less at the peak.
        max_norm = ctx.cfg.optim.max_grad_norm
        lower_params = list(self.lower.values())
        norms = {"bridge/grad_norm_theta": clip_gradients(lower_params, max_norm, "gradients of theta")}
        self.lower_optimizer.step()
        self.lower_scheduler.step()
        for param in lower_params:
            param.grad = None

        # Shadow branch: L_rl(theta_hat, w) on the same rollouts, with theta_hat's values in theta's parameters and
        # w's joint gradient set aside; theta_hat takes its gradient, w takes minus lam times it (the cooperative
        # gain's second term). The ablation bridge.upper=joint ("w/o J_meta") skips it: w steps on the joint
        # gradient alone.
        upper_params = list(self.upper.values())
        metrics = {"train/sft_loss": loss_sft, "train/rl_loss": loss_rl, "bridge/lambda": lam}
        if self.cooperative:
            joint = {param: param.grad for param in upper_params}
            for param in upper_params:
                param.grad = None
            with self._in_place(shadow_weights):
                loss_rl_shadow, shadow_stats = rl_backward(model, scored, ctx)
            for name, param in self.lower.items():
                if self.shadow:
                    self.shadow[name].grad = param.grad
                param.grad = None
            for param in upper_params:
                shadow_grad, param.grad = param.grad, joint[param]
                if shadow_grad is not None:
                    param.grad = -lam * shadow_grad if param.grad is None else param.grad - lam * shadow_grad
            metrics.update({"train/rl_loss_shadow": loss_rl_shadow, "bridge/coop_gain": loss_rl_shadow - loss_rl})
            if not shadow_stats.skipped:  # a skipped pass (no advantage, core/grpo.skips_backward) measured nothing
                # the shadow scores rollouts of (theta, w): as theta and theta_hat drift apart its ratio leaves
                # [1 - eps, 1 + eps] and clipping can silently stall its updates
                metrics["bridge/shadow_clip_frac"] = shadow_stats.clip_fraction

        steps = []
        if upper_params:
            norms["bridge/grad_norm_w"] = clip_gradients(upper_params, max_norm, "gradients of w")
            steps.append((self.upper_optimizer, self.upper_scheduler))
        if self.shadow:
            norms["bridge/grad_norm_theta_hat"] = clip_gradients(
                list(self.shadow.values()), max_norm, "gradients of theta_hat"
            )
            steps.append((self.shadow_optimizer, self.shadow_scheduler))
        for optimizer, scheduler in steps:
            optimizer.step()
            scheduler.step()
        for optimizer in (self.lower_optimizer, self.upper_optimizer, self.shadow_optimizer):
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)  # no gradient stays alive into the next step
        self.updates += 1
        metrics.update({**norms, **rollout_metrics(scored, stats, rl.num_generations, ctx)})
        if shadow_reward is not None:
            metrics["bridge/reward_gap"] = scored.rewards.mean().item() - shadow_reward
        return StepOutput(
            metrics=metrics,
            train_tokens=trained_tokens(scored, ctx) + batch.n_tokens,
            gen_tokens=scored.gen_tokens,
            completions=completion_rows(scored, ctx, self.updates),
        )

    def _lookahead_weights(self, lam: float) -> dict[str, torch.Tensor]:
        """Eq. 10: theta_hat = theta - alpha grad L_rl(theta, w), one RL step from the current theta, a constant
        for w's gradient. The joint branch's RL pass ran unscaled for this, so theta's gradient is exactly
        grad L_rl here: the look-ahead is read off it, then every gradient so far is scaled by lam, which is
        what the scaled pass of the persistent shadow gives."""
        weights = {
            n: (p - self.settings.alpha * p.grad).detach() if p.grad is not None else p.detach()
            for n, p in self.lower.items()
        }
        for param in [*self.lower.values(), *self.upper.values()]:
            if param.grad is not None:
                param.grad.mul_(lam)
        return weights

    @contextlib.contextmanager
    def _in_place(self, weights: dict[str, torch.Tensor]):
        """`weights` (theta_hat) in theta's parameters for the duration; each swapped back after."""
        with torch.no_grad():
            for name, param in self.lower.items():
                swap_values(param, weights[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in self.lower.items():
                    swap_values(param, weights[name])

    def _shadow_reward(self, scored) -> float:
        """Mean reward of the persistent shadow's own rollouts on the same prompts (the measured reward gap,
        optional). theta_hat's values are swapped into the live model while sampling, so generation keeps its
        KV cache and merged LoRA."""
        with self._in_place(self.shadow):
            shadow_scored = sample_and_score(self.ctx, scored.problems)
        return shadow_scored.rewards.mean().item()
