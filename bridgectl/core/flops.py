"""Compute accounting: the matmul FLOPs of every forward and backward pass a training step makes, estimated from
the model's shape and the shapes of the batches that actually run, with the tokens each pass processes.

Every stage's passes go through three places (core/logprobs.token_logprobs and token_entropies for scoring and
training, core/rollout's decoding loop for sampling), which report each pass here; a stage counts nothing
itself, so BRIDGE's three forward+backward passes, luffy's demonstrations, relift's SFT rounds, rl.num_iterations,
the reference model's pass, dynamic sampling's extra rounds and the entropy pass of rl.top_entropy_quantile are all
counted because they run. Only the passes inside `counting()` are counted: the runner wraps each training step in
it, so evaluation (a measurement, not training) is not.

The accounting is the standard one (Kaplan et al. 2020, arXiv 2001.08361, Sec. 2.1: 2N per token forward, twice
that backward), applied layer by layer so that what is frozen is counted as frozen:

  forward, per token through a linear layer of d_in x d_out:        2 d_in d_out
  backward, the gradient to its input (always; the layers below need it): 2 d_in d_out
  backward, the gradient to its weight, only when the weight trains:      2 d_in d_out
  a LoRA adapter of rank r on it (peft's unmerged forward): forward 2 r (d_in + d_out), backward twice that when
      the adapter trains; merged (core/lora_forward.py, small models): the layer runs as one linear whose weight
      W + s B A trains, so its backward includes the weight gradient, and each pass adds 2 r d_in d_out for the
      merge B A and, under grad, twice that for its backward (the adapters' gradients from the weight's)
  attention, per layer: 4 B T_q T_k d_q forward (Q K^T and the weighted sum of V, d_q = heads x head_dim, over
      the full padded T_q x T_k, as eager and SDPA compute it), twice that backward
  the output head (d x vocabulary): only at the positions scored (the chunked head of core/logprobs), forward
      2 d V per position, backward 2 d V (+ 2 d V when it trains); under grad its forward runs twice (the chunk is
      recomputed in the backward: torch.utils.checkpoint)
  model.gradient_checkpointing: the layers' forward runs once more in the backward

So full fine-tuning costs ~6N per trained token and LoRA over a frozen base ~4N (its forward and its backward to
the activations), plus attention's quadratic term. Sampling costs a forward per prompt token (prefill, the head
at the last position only) and one per generated token with attention over the cache (its length T_k). Padded
positions count: they are computed. Elementwise work (norms, activations, softmax) is not counted, as torch's own
FLOP counter (torch.utils.flop_counter) does not count it; tests/test_flops.py checks the estimate against that
counter on one step of every stage.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from peft.tuners.lora.layer import Linear as LoraLinear


@dataclass
class Ledger:
    """What one step's passes cost: FLOPs and tokens, sampling and training apart."""

    gen_flops: float = 0.0
    """FLOPs of sampling rollouts (prefill and decoding)."""
    train_flops: float = 0.0
    """FLOPs of the scoring and training passes (forward, and backward where grad is on)."""
    pass_tokens: int = 0
    """Tokens that received a gradient, counted once per forward+backward pass they went through (BRIDGE's RL rows
    twice: theta's pass and the shadow's)."""

    @property
    def flops(self) -> float:
        return self.gen_flops + self.train_flops


_active: list[Ledger] = []


@contextlib.contextmanager
def counting():
    """Counts every pass made inside into the Ledger it yields."""
    ledger = Ledger()
    _active.append(ledger)
    try:
        yield ledger
    finally:
        _active.remove(ledger)


def _ledger() -> Ledger | None:
    return _active[-1] if _active else None


@dataclass(frozen=True)
class ModelCost:
    """The per-token and per-pass matmul FLOPs of one model as its parameters train now (model_cost)."""

    forward: float
    """Forward FLOPs per token through the layers (not the head, not attention)."""
    backward: float
    """Backward FLOPs per token through them, as their parameters train now."""
    per_pass_forward: float
    """FLOPs each forward pass adds whatever its size (merged LoRA's B A products)."""
    per_pass_backward: float
    """And its backward (the adapters' gradients from the merged weight's)."""
    attention_layers: int
    attention_width: int
    """d_q: heads x head_dim."""
    head_forward: float
    """Forward FLOPs per position through the output head: 2 d V."""
    head_trains: bool
    checkpointed: bool
    """model.gradient_checkpointing: the layers' forward runs again in the backward."""


def _config(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, "config", None), base


def model_cost(model) -> ModelCost:
    """The model's ModelCost, read from its modules (which linear layers, adapters and head it has, and whether
    their weights require grad now) and its config (layers, heads)."""
    config, base = _config(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    forward = backward = per_pass_forward = per_pass_backward = 0.0
    adapter_parts = set()  # the linears a LoRA layer owns
    for module in model.modules():
        if isinstance(module, LoraLinear) and isinstance(module.base_layer, torch.nn.Linear):
            weight = module.base_layer.weight
            size = weight.shape[0] * weight.shape[1]
            active = (
                []
                if module.disable_adapters or module.merged
                else [name for name in module.active_adapters if name in module.lora_A]
            )
            adapter_parts.add(module.base_layer)  # counted here, not again as a plain linear
            for name in module.lora_A:
                adapter_parts.update((module.lora_A[name], module.lora_B[name]))
            merged = (
                "forward" in module.__dict__
                and active
                and not (  # core/lora_forward's merged forward
                    module.training and any(not isinstance(module.lora_dropout[n], torch.nn.Identity) for n in active)
                )
            )
            trains = weight.requires_grad or any(module.lora_A[n].weight.requires_grad for n in active)
            forward += 2 * size
            backward += 2 * size + (2 * size if weight.requires_grad or (merged and trains) else 0)
            for name in active:
                rank = module.lora_A[name].weight.shape[0]
                adapter_trains = module.lora_A[name].weight.requires_grad
                if merged:
                    per_pass_forward += 2 * rank * size
                    per_pass_backward += 4 * rank * size if adapter_trains else 0
                else:
                    low = 2 * rank * (weight.shape[0] + weight.shape[1])
                    forward += low
                    backward += low + (low if adapter_trains else 0)
        elif isinstance(module, torch.nn.Linear) and module is not head and module not in adapter_parts:
            size = module.weight.shape[0] * module.weight.shape[1]
            forward += 2 * size
            backward += 2 * size + (2 * size if module.weight.requires_grad else 0)
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    head_dim = getattr(config, "head_dim", None) or (getattr(config, "hidden_size", 0) // max(1, heads))
    head_forward = 2.0 * head.weight.shape[0] * head.weight.shape[1] if head is not None else 0.0
    return ModelCost(
        forward=forward,
        backward=backward,
        per_pass_forward=per_pass_forward,
        per_pass_backward=per_pass_backward,
        attention_layers=layers,
        attention_width=heads * int(head_dim),
        head_forward=head_forward,
        head_trains=head is not None and head.weight.requires_grad,
        checkpointed=bool(getattr(base, "is_gradient_checkpointing", False)),
    )


def pass_flops(
    cost: ModelCost,
    rows: int,
    width: int,
    head_positions: int,
    grad: bool,
    context: int | None = None,
    head_recomputed: bool = False,
) -> float:
    """FLOPs of one forward pass (and its backward when `grad`) of `rows` x `width` tokens, attending over
    `context` positions (default `width`: no cache), with the head at `head_positions` positions (its forward run
    again in the backward when `head_recomputed`: core/logprobs' checkpointed chunks)."""
    tokens = rows * width
    context = width if context is None else context
    attention = 4.0 * cost.attention_layers * rows * width * context * cost.attention_width
    body = cost.forward * tokens + attention + cost.per_pass_forward
    head = cost.head_forward * head_positions
    total = body + head
    if grad:
        total += cost.backward * tokens + 2 * attention + cost.per_pass_backward
        total += head * (1 + (1 if cost.head_trains else 0)) + (head if head_recomputed else 0)
        if cost.checkpointed:
            total += body
    return total


def count_pass(model, rows: int, width: int, head_positions: int, head_recomputed: bool = False) -> None:
    """Reports one scoring or training pass (core/logprobs): grad is taken from torch's mode, and a pass under
    grad counts its `head_positions` (the positions its loss scores) in the ledger's pass_tokens."""
    ledger = _ledger()
    if ledger is None:
        return
    grad = torch.is_grad_enabled()
    ledger.train_flops += pass_flops(
        model_cost(model), rows, width, head_positions, grad, head_recomputed=grad and head_recomputed
    )
    if grad:
        ledger.pass_tokens += head_positions


@dataclass
class DecodeCounter:
    """Counts one decoding loop's passes (core/rollout): the model's cost read once."""

    model: object
    cost: ModelCost | None = field(default=None)

    def __post_init__(self) -> None:
        self.cost = model_cost(self.model) if _ledger() is not None else None

    def prefill(self, rows: int, width: int) -> None:
        if self.cost is not None:
            _ledger().gen_flops += pass_flops(self.cost, rows, width, rows, grad=False)

    def step(self, rows: int, context: int) -> None:
        """One decoding step of `rows` rows attending over `context` cached positions (the new one included)."""
        if self.cost is not None:
            _ledger().gen_flops += pass_flops(self.cost, rows, 1, rows, grad=False, context=context)


def count_engine_sampling(model, prompt_lengths: list[int], completion_lengths: list[int]) -> None:
    """An inference engine's sampling (rollout.backend=vllm), from the lengths: each prompt's prefill and each
    generated token's step over its cache, without padding (the engine packs rows)."""
    ledger = _ledger()
    if ledger is None:
        return
    cost = model_cost(model)
    for prompt, completion in zip(prompt_lengths, completion_lengths):
        ledger.gen_flops += pass_flops(cost, 1, prompt, 1, grad=False)
        steps = max(0, completion - 1)  # the last token's logits are not needed
        if steps:  # steps 1..steps attend over prompt + 1 .. prompt + steps positions: their sum in closed form
            one = pass_flops(cost, 1, 1, 1, grad=False, context=0)
            per_context = pass_flops(cost, 1, 1, 1, grad=False, context=1) - one
            ledger.gen_flops += steps * one + per_context * (steps * prompt + steps * (steps + 1) / 2)
