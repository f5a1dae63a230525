"""Log-probs of given tokens under a model (the completions' per-token log-probs GRPO needs, the SFT targets' NLL),
in memory that does not grow with the vocabulary, and the micro-batches every training pass is split into.

Memory. The obvious computation, `log_softmax(logits.float()).gather(target)`, materialises a float32
[rows, tokens, vocabulary] tensor: 128 rows x 1,024 tokens x Qwen2.5's 151,936-token vocabulary is ~80 GB before
its gradient. Here the model's decoder gives the final hidden states [rows, tokens, hidden]; only the positions
whose next token is scored are kept, and the output head is applied to them `LOGIT_CHUNK_ELEMENTS / vocabulary`
tokens at a time: each chunk's logits give log p(target) = logit_target - logsumexp(logits) and are freed at once
(activation checkpointing recomputes them, one chunk at a time, in the backward pass). So the logits alive at any
moment are one chunk's, whatever the batch, and padding and prompt tokens never reach the head. The head's matmul
runs in the model's dtype, as the model's own forward would; each chunk is upcast to float32 for the log-sum-exp.
TRL's `selective_log_softmax` avoids the float32 log-softmax but keeps the whole logits; Liger-Kernel's fused linear
cross entropy chunks the head as done here.

Models whose logits are not `head(decoder(...))` (a final soft-cap or logit scale: checked once per model against
its own forward) and models sharded with FSDP (whose root unit gathers the head's weights in its own forward) run
the model's own forward instead; the log-sum-exp is still taken chunk by chunk, so there is no float32
[rows, tokens, vocabulary] tensor there either, only one micro-batch's logits in the model's dtype.

Micro-batches. A training pass over N rows runs as passes over `train.micro_batch_size` rows whose gradients
accumulate; every loss divides by the token count of the whole step (not of its micro-batch), so the accumulated
gradient equals the one-pass gradient to float rounding. Rows are sorted by length before they are split, so each
micro-batch is cut to its own longest row and padding stays small.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from bridgectl.core import distributed, flops
from bridgectl.core.rollout import Rollouts, positions

LOGIT_CHUNK_ELEMENTS = 2**25
"""Logits computed at once by the chunked head (128 MB in float32): 220 tokens of a 151,936-token vocabulary."""


def micro_batches(lengths: list[int], size: int) -> list[list[int]]:
    """Row indices in micro-batches of at most `size` rows, shortest rows first so that rows of similar length go
    together; one micro-batch of every row in its own order when `size` is 0 or covers the batch."""
    if size <= 0 or size >= len(lengths):
        return [list(range(len(lengths)))]
    order = sorted(range(len(lengths)), key=lambda row: lengths[row])
    return [order[start : start + size] for start in range(0, len(order), size)]


def rollout_rows(rollouts: Rollouts, rows: list[int]) -> Rollouts:
    """The rollouts of `rows`, cut to their own longest prompt (left-padded) and completion (right-padded)."""
    index = torch.tensor(rows, device=rollouts.prompt_ids.device)
    prompt_mask, completion_mask = rollouts.prompt_mask[index], rollouts.completion_mask[index]
    prompt_width = max(1, int(prompt_mask.sum(dim=1).max()))
    completion_width = max(1, int(completion_mask.sum(dim=1).max()))
    return Rollouts(
        rollouts.prompt_ids[index, -prompt_width:],
        prompt_mask[:, -prompt_width:],
        rollouts.completion_ids[index, :completion_width],
        completion_mask[:, :completion_width],
        rollouts.sampling_logprobs[index, :completion_width],
        [rollouts.completions[row] for row in rows] if rollouts.completions else [],
        None if rollouts.engine_logprobs is None else rollouts.engine_logprobs[index, :completion_width],
    )


def token_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    first_scored: int,
    scored: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
):
    """log pi(x_t | x_<t) at `temperature` for the tokens t >= `first_scored` where `scored` [B, T - first_scored]
    is true, as a float32 [B, T - first_scored] tensor with zeros elsewhere (with grad when grad is enabled).
    `with_entropy`: also the entropy of pi(. | x_<t) there, from the same logits (with grad likewise), as a pair."""
    scored = scored.bool()
    targets = input_ids[:, first_scored:][scored]
    position_ids = positions(attention_mask)
    rows, width = input_ids.shape
    if _head_is_separable(model):
        decoder, head = _decoder_and_head(model)
        hidden = decoder(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        # the hidden state at position t - 1 predicts token t
        values = chunked_head_logprobs(
            hidden[:, first_scored - 1 : -1][scored], targets, head, temperature, with_entropy
        )
        flops.count_pass(model, rows, width, targets.numel(), head_recomputed=True)
    else:
        kept = width - first_scored + 1
        logits = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            logits_to_keep=kept,
        ).logits[:, :-1]
        values = chunked_head_logprobs(logits[scored], targets, None, temperature, with_entropy)
        flops.count_pass(model, rows, width, rows * kept)

    def placed(part: torch.Tensor) -> torch.Tensor:
        return torch.zeros(scored.shape, dtype=torch.float32, device=input_ids.device).masked_scatter(scored, part)

    return (placed(values[0]), placed(values[1])) if with_entropy else placed(values)


def chunked_head_logprobs(
    features: torch.Tensor,
    targets: torch.Tensor,
    head: torch.nn.Module | None,
    temperature: float,
    with_entropy: bool = False,
):
    """log softmax(head(features) / temperature)[target] per row of `features` [M, H] (or of logits [M, V] when
    `head` is None), a chunk of rows at a time; under grad each chunk is checkpointed, so its logits are freed
    after the forward and recomputed in the backward. `with_entropy`: also each row's entropy, as a pair."""
    vocabulary = features.size(-1) if head is None else head.weight.size(0)
    chunk = max(1, LOGIT_CHUNK_ELEMENTS // max(1, vocabulary))
    if features.size(0) == 0:
        empty = features.new_zeros(0, dtype=torch.float32)
        return (empty, empty) if with_entropy else empty
    score = _target_logprobs_and_entropy if with_entropy else _target_logprobs
    parts = []
    for start in range(0, features.size(0), chunk):
        rows = slice(start, start + chunk)
        if torch.is_grad_enabled() and head is not None:
            parts.append(checkpoint(score, features[rows], targets[rows], head, temperature, use_reentrant=False))
        else:
            parts.append(score(features[rows], targets[rows], head, temperature))
    if with_entropy:
        return torch.cat([part[0] for part in parts]), torch.cat([part[1] for part in parts])
    return torch.cat(parts)


def _target_logprobs(features, targets, head, temperature):
    logits = (head(features) if head is not None else features).float() / temperature
    return logits.gather(1, targets.unsqueeze(1)).squeeze(1) - torch.logsumexp(logits, dim=-1)


def _target_logprobs_and_entropy(features, targets, head, temperature):
    """The target's log-prob, as _target_logprobs computes it, and the entropy -sum_v p_v log p_v of the same
    distribution (TRL's entropy_from_logits)."""
    logits = (head(features) if head is not None else features).float() / temperature
    normaliser = torch.logsumexp(logits, dim=-1)
    logprobs = logits - normaliser.unsqueeze(1)
    entropy = -(logprobs.exp() * logprobs).sum(dim=-1)
    return logits.gather(1, targets.unsqueeze(1)).squeeze(1) - normaliser, entropy


@torch.no_grad()
def token_entropies(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    first_scored: int,
    scored: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Entropy -sum_v p_v log p_v of pi(. | x_<t) at `temperature` at the positions t >= `first_scored` where
    `scored` [B, T - first_scored] is true, as a detached float32 [B, T - first_scored] tensor with zeros elsewhere
    (weights, never differentiated: SRFT's entropy weights). One no-grad forward pass; as in token_logprobs, only
    the scored positions reach the head, `LOGIT_CHUNK_ELEMENTS / vocabulary` tokens at a time, so the full
    distributions alive at once are one chunk's, never [rows, tokens, vocabulary]."""
    scored = scored.bool()
    position_ids = positions(attention_mask)
    rows, width = input_ids.shape
    if _head_is_separable(model):
        decoder, head = _decoder_and_head(model)
        hidden = decoder(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        features = hidden[:, first_scored - 1 : -1][scored]
        flops.count_pass(model, rows, width, features.size(0))
    else:
        head = None
        features = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            logits_to_keep=width - first_scored + 1,
        ).logits[:, :-1][scored]
        flops.count_pass(model, rows, width, rows * (width - first_scored + 1))
    vocabulary = features.size(-1) if head is None else head.weight.size(0)
    chunk = max(1, LOGIT_CHUNK_ELEMENTS // max(1, vocabulary))
    parts = [
        _entropy(features[start : start + chunk], head, temperature) for start in range(0, features.size(0), chunk)
    ]
    values = torch.cat(parts) if parts else features.new_zeros(0, dtype=torch.float32)
    return torch.zeros(scored.shape, dtype=torch.float32, device=input_ids.device).masked_scatter(scored, values)


def _entropy(features, head, temperature):
    logprobs = torch.log_softmax((head(features) if head is not None else features).float() / temperature, dim=-1)
    return -(logprobs.exp() * logprobs).sum(dim=-1)


def _decoder_and_head(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def _head_is_separable(model) -> bool:
    """Whether the model's logits are exactly head(decoder(x)), so the head can be applied chunk by chunk: checked
    once per model on a short input against its own forward (models with a final logit soft-cap or scale differ);
    never for FSDP-sharded models (their root unit gathers the head's weights in its own forward only)."""
    if not isinstance(model, torch.nn.Module) or distributed.is_sharded_model(model):
        return False
    cached = getattr(model, "_bridgectl_separable_head", None)
    if cached is not None:
        return cached
    try:
        decoder, head = _decoder_and_head(model)
    except (AttributeError, NotImplementedError):
        decoder, head = None, None
    separable = False
    if decoder is not None and head is not None and decoder is not model:
        was_training = model.training
        model.eval()  # no dropout in either pass
        try:
            with torch.no_grad():
                device = next(model.parameters()).device
                ids = torch.tensor([[1, 2, 3]], device=device)
                mask = torch.ones_like(ids)
                own = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
                hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
                separable = bool(torch.allclose(head(hidden).float(), own, rtol=1e-3, atol=1e-3))
        finally:
            model.train(was_training)
    object.__setattr__(model, "_bridgectl_separable_head", separable)
    return separable


def completion_logprobs(model, rollouts: Rollouts, temperature: float = 1.0, with_entropy: bool = False):
    """Per-token log-probs [N, C] of the completions under `model` (with grad), masked to the completion;
    `with_entropy`: and the per-token entropies [N, C], as a pair (token_logprobs)."""
    input_ids = torch.cat([rollouts.prompt_ids, rollouts.completion_ids], dim=1)
    mask = torch.cat([rollouts.prompt_mask, rollouts.completion_mask], dim=1)
    return token_logprobs(
        model, input_ids, mask, rollouts.prompt_ids.size(1), rollouts.completion_mask, temperature, with_entropy
    )


@torch.no_grad()
def score_sampled(model, rollouts: Rollouts, temperature: float, rows_per_pass: int) -> Rollouts:
    """`rollouts` with `sampling_logprobs` computed by `model` (no grad), `rows_per_pass` rows at a time: the
    log-probs of the policy that sampled, as the trained model computes them, so the GRPO ratio of the first
    update is exactly 1 whichever engine sampled (an engine's own log-probs differ by its kernels' rounding)."""
    scores = torch.zeros(rollouts.completion_ids.shape, dtype=torch.float32, device=rollouts.completion_ids.device)
    lengths = (rollouts.prompt_mask.sum(dim=1) + rollouts.completion_mask.sum(dim=1)).tolist()
    for rows in micro_batches(lengths, rows_per_pass):
        part = rollout_rows(rollouts, rows)
        scores[rows, : part.completion_ids.size(1)] = completion_logprobs(model, part, temperature)
    rollouts.sampling_logprobs = scores
    return rollouts
