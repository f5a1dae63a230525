"""Log-probs of given tokens under a model: the completions' per-token log-probs that GRPO needs and the SFT
targets' negative log-likelihood."""

from __future__ import annotations

import torch

from bridgectl.core.rollout import Rollouts, positions


def completion_logprobs(model, rollouts: Rollouts, temperature: float = 1.0) -> torch.Tensor:
    """Per-token log-probs [N, C] of the completions under `model` (with grad), masked to the completion."""
    input_ids = torch.cat([rollouts.prompt_ids, rollouts.completion_ids], dim=1)
    mask = torch.cat([rollouts.prompt_mask, rollouts.completion_mask], dim=1)
    n_completion = rollouts.completion_ids.size(1)
    # logits at position t predict token t+1: keep the last C+1 positions, drop the final one
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions(mask),
                   logits_to_keep=n_completion + 1).logits[:, :-1]
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
    token_logprobs = logprobs.gather(2, rollouts.completion_ids.unsqueeze(2)).squeeze(2)
    return token_logprobs * rollouts.completion_mask


def sft_loss_and_completion_logprobs(model, batch, rollouts: Rollouts, temperature: float = 1.0
                                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The SFT loss of `batch` and the completion log-probs of `rollouts` from ONE forward pass over both sets of
    rows (right-padded to a common length; padding is masked and positions come from the mask, so each row sees
    exactly what it would alone). One large call instead of two halves the per-call overhead that dominates small
    models; the values equal `sft_loss(model, batch)` and `completion_logprobs(model, rollouts)`."""
    rl_ids = torch.cat([rollouts.prompt_ids, rollouts.completion_ids], dim=1)
    rl_mask = torch.cat([rollouts.prompt_mask, rollouts.completion_mask], dim=1)
    width = max(batch.input_ids.size(1), rl_ids.size(1))

    def pad_right(tensor: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(tensor, (0, width - tensor.size(1)), value=value)

    n_sft = batch.input_ids.size(0)
    input_ids = torch.cat([pad_right(batch.input_ids, 0), pad_right(rl_ids, 0)])
    mask = torch.cat([pad_right(batch.attention_mask, 0), pad_right(rl_mask, 0)])
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions(mask)).logits

    from bridgectl.core.losses import token_mean_cross_entropy  # losses imports this module

    sft_length = batch.input_ids.size(1)
    sft = token_mean_cross_entropy(logits[:n_sft, :sft_length - 1], batch.labels[:, 1:])
    n_prompt, n_completion = rollouts.prompt_ids.size(1), rollouts.completion_ids.size(1)
    rl_logits = logits[n_sft:, n_prompt - 1:n_prompt + n_completion - 1]
    logprobs = torch.log_softmax(rl_logits.float() / temperature, dim=-1)
    token_logprobs = logprobs.gather(2, rollouts.completion_ids.unsqueeze(2)).squeeze(2)
    return sft, token_logprobs * rollouts.completion_mask


@torch.no_grad()
def score_sampled(model, rollouts: Rollouts, temperature: float, rows_per_pass: int) -> Rollouts:
    """`rollouts` with `sampling_logprobs` computed by `model` (no grad), `rows_per_pass` rows at a time: the
    log-probs of the policy that sampled, as the trained model computes them, so the GRPO ratio of the first
    update is exactly 1 whichever engine sampled (an engine's own log-probs differ by its kernels' rounding)."""
    parts = []
    for start in range(0, rollouts.completion_ids.size(0), rows_per_pass):
        rows = slice(start, start + rows_per_pass)
        part = Rollouts(rollouts.prompt_ids[rows], rollouts.prompt_mask[rows], rollouts.completion_ids[rows],
                        rollouts.completion_mask[rows], rollouts.sampling_logprobs[rows], [])
        parts.append(completion_logprobs(model, part, temperature))
    rollouts.sampling_logprobs = torch.cat(parts)
    return rollouts
