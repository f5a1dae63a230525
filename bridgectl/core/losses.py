"""Losses shared by every stage: the SFT negative log-likelihood (and CHORD's phi-weighted form), and the backward
pass that accumulates a loss's gradient.

The RL losses live beside it: core/policy_losses.py (the GRPO policy loss, one function per rl.loss_type, and
grpo_loss) and core/advantages.py (one function per rl.adv_estimator, and group_advantages).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bridgectl.core import distributed
from bridgectl.core.logprobs import micro_batches, token_logprobs


@dataclass
class SFTBatch:
    input_ids: torch.Tensor  # [B, T] right-padded `<s>question=completion</s>`
    attention_mask: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T] completion tokens, -100 on the prompt and padding

    @property
    def n_tokens(self) -> int:
        return int((self.labels[:, 1:] != -100).sum())

    def rows(self, rows: list[int]) -> SFTBatch:
        """The examples of `rows`, cut to their own longest row."""
        index = torch.tensor(rows, device=self.input_ids.device)
        width = int(self.attention_mask[index].sum(dim=1).max())
        return SFTBatch(self.input_ids[index, :width], self.attention_mask[index, :width], self.labels[index, :width])


def make_sft_batch(
    tokenizer, prompts: list[str], completions: list[str], device, end_id: int | None = None
) -> SFTBatch:
    """Tokenises (prompt, completion) pairs; the loss will see only the completion and its end token: `end_id`
    (the policy's `end_tokens.target`: the chat template's turn end when prompts use it, so the model learns to
    close its turn as the template does and sampling stops there), by default the tokenizer's EOS."""
    end_id = tokenizer.eos_token_id if end_id is None else end_id
    rows, labels = [], []
    for prompt, completion in zip(prompts, completions):
        prompt_ids = tokenizer(prompt)["input_ids"]
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [end_id]
        rows.append(prompt_ids + completion_ids)
        labels.append([-100] * len(prompt_ids) + completion_ids)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
    attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    label_ids = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels], device=device)
    return SFTBatch(input_ids, attention_mask, label_ids)


def sft_loss(model, batch: SFTBatch, n_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Negative log-likelihood of the completion tokens, -log pi(trace, answer | question), summed and divided by
    `n_tokens`: by default the batch's own labelled tokens (under data parallelism the global batch's over the
    number of ranks, distributed.mean_denominator, so averaged gradients equal the full-batch gradient); a
    micro-batch passes its whole step's count."""
    scored = batch.labels[:, 1:] != -100
    if n_tokens is None:
        n_tokens = distributed.mean_denominator(scored.sum())
    logprobs = token_logprobs(model, batch.input_ids, batch.attention_mask, 1, scored)
    return -logprobs.sum() / n_tokens.clamp(min=1)


def phi_sft_loss(model, batch: SFTBatch, n_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """CHORD-phi's token-weighted NLL (arXiv 2508.11408): -sum_t phi_t log p_t over the completion tokens, divided by
    `n_tokens` as in sft_loss, with phi_t = p_t (1 - p_t) and p_t the model's probability of the target token. phi is
    detached (a weight, not differentiated) and the divisor stays the token count, not the sum of the weights, as
    in the authors' Trinity-RFT (SFTPhiLossFn: masked_mean(-logprob * phi.detach()))."""
    scored = batch.labels[:, 1:] != -100
    if n_tokens is None:
        n_tokens = distributed.mean_denominator(scored.sum())
    logprobs = token_logprobs(model, batch.input_ids, batch.attention_mask, 1, scored)
    probs = logprobs.detach().exp()
    phi = probs * (1 - probs) * scored  # unscored positions hold log p = 0 (p = 1, phi = 0) and are masked anyway
    return -(phi * logprobs).sum() / n_tokens.clamp(min=1)


def sft_backward(model, batch: SFTBatch, micro_batch_size: int, scale: float = 1.0, loss_fn=sft_loss) -> float:
    """Accumulates the gradient of `scale * loss_fn(model, batch)` (sft_loss, or phi_sft_loss) into the parameters'
    `.grad`, in micro-batches of `micro_batch_size` rows (0: one pass); returns the loss. Equal to one pass to float
    rounding."""
    n_tokens = distributed.mean_denominator((batch.labels[:, 1:] != -100).sum())
    total = torch.zeros((), device=batch.input_ids.device)
    for rows in micro_batches(batch.attention_mask.sum(dim=1).tolist(), micro_batch_size):
        loss = loss_fn(model, batch.rows(rows), n_tokens)
        backward(scale * loss)
        total += loss.detach()
    return float(total)


def backward(loss: torch.Tensor) -> None:
    """loss.backward(), skipped for a loss no parameter contributed to (a micro-batch without scored tokens)."""
    if loss.requires_grad:
        loss.backward()
