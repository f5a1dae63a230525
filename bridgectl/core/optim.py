"""One optimizer per update rule: AdamW with linear warm-up and a constant or cosine schedule."""

from __future__ import annotations

import math

import torch

from bridgectl.core import distributed
from bridgectl.errors import NonFiniteError


def make_optimizer(params, lr: float, optim_cfg, total_updates: int):
    """AdamW over `params` and its LambdaLR scheduler for `total_updates` updates."""
    optimizer = torch.optim.AdamW(
        params, lr=lr, weight_decay=optim_cfg.weight_decay, betas=(optim_cfg.adam_beta1, optim_cfg.adam_beta2)
    )
    warmup, schedule = optim_cfg.warmup_steps, optim_cfg.schedule

    def factor(update: int) -> float:
        if update < warmup:
            return (update + 1) / warmup
        if schedule == "cosine":
            progress = (update - warmup) / max(1, total_updates - warmup)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def clip_gradients(params, max_grad_norm: float, what: str = "gradients") -> float:
    """Clips the gradients of `params` to `max_grad_norm` (0: no clipping); returns their norm before clipping.
    A NaN or infinite norm (a NaN loss gives one) raises NonFiniteError before any optimizer step, so the weights
    and the last checkpoint stay good."""
    distributed.average_gradients(params)  # data parallelism: the full batch's gradient on every rank
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if max_grad_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    else:
        norm = torch.nn.utils.get_total_norm(grads)
    norm = float(distributed.full_tensor(norm))  # sharded gradients (train.fsdp): the norm of the whole gradient
    if not math.isfinite(norm):
        raise NonFiniteError(f"the norm of the {what} is {norm}")
    return norm


def take_step(params, optimizer, scheduler, max_grad_norm: float) -> float:
    """Clips the gradients the step's backward passes accumulated in `params`, steps the optimizer and scheduler,
    and frees the gradients (no weight-sized gradient stays alive into the next step's sampling and forward
    passes); returns the gradient norm before clipping."""
    grad_norm = clip_gradients(params, max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm
