"""How LoRA layers compute their output during training: unmerged (peft's own forward) or merged-weight.

peft's LoRA layer computes base(x) + B(A(x)) * s for each active adapter: five extra small operations per layer
and adapter. On a small model that per-call overhead dominates: one forward+backward of the 1M-parameter tiny model
took 0.49 s with BRIDGE's upper adapter w over trainable base weights against 0.34 s without it (measured, 2 CPU
threads, benchmarks/results.md). The merged-weight forward computes the same function as one linear,
x @ (W + sum_i s_i B_i A_i)^T, so autograd differentiates through the merge: the adapters' gradients are
s B^T dL/dW_eff and s dL/dW_eff A^T. Measured there: 0.34 s (merged) against 0.49 s (peft) with w over a trained
base; 0.32 s against 0.43 s for a rank-32 adapter over a frozen base.

It is not free on large models: with a frozen base it adds the weight-sized gradient dL/dW_eff (one more
tokens x d_in x d_out matmul per layer) and keeps W_eff alive for backward. On a 100M-parameter model with a frozen
base it was 3.0 s against 2.0 s per pass. So `lora.forward=auto` merges only models under
`MERGED_FORWARD_MAX_PARAMETERS`; `merged` and `unmerged` force either.

Same function, different rounding: outputs agree to float32 precision, not bit for bit. Sampling is unaffected
(generation merges the adapters into the weights anyway, Policy.merged_for_generation).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as LoraLinear

MERGED_FORWARD_MAX_PARAMETERS = 20_000_000
"""`auto` merges below this many base parameters (1M: merged 25-30% faster; 100M: 50% slower, measured)."""


def wants_merged_forward(mode: str, base_parameters: int) -> bool:
    if mode == "auto":
        return base_parameters < MERGED_FORWARD_MAX_PARAMETERS
    return mode == "merged"


def _merged_weight_forward(self: LoraLinear, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft's forward whenever merging would change the function (disabled or merged adapters, dropout in
    training, DoRA-like variants, per-row adapter names); otherwise one linear with the adapters folded in."""
    active = [name for name in self.active_adapters if name in self.lora_A]
    dropout_active = self.training and any(
        not isinstance(self.lora_dropout[name], torch.nn.Identity) for name in active
    )
    if (
        self.disable_adapters
        or self.merged
        or kwargs.get("adapter_names") is not None
        or dropout_active
        or any(name in self.lora_variant for name in active)
        or not isinstance(self.base_layer, torch.nn.Linear)
    ):
        return LoraLinear.forward(self, x, *args, **kwargs)
    weight = self.base_layer.weight
    for name in active:
        weight = weight + self.get_delta_weight(name)
    return F.linear(x.to(weight.dtype), weight, self.base_layer.bias)


def set_lora_forward(model: torch.nn.Module, merged: bool) -> int:
    """Makes every LoRA linear layer of `model` use the merged-weight forward (`merged`) or peft's own. Returns
    how many layers it set. Call again after adding adapters that create new layers."""
    layers = [module for module in model.modules() if isinstance(module, LoraLinear)]
    for layer in layers:
        if merged:
            layer.forward = types.MethodType(_merged_weight_forward, layer)
        else:
            layer.__dict__.pop("forward", None)
    return len(layers)
