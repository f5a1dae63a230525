"""Batched generation with a KV cache, and the log-prob pass that scores completions for training.

Both sides must agree to ~1e-6 for the importance ratio to mean anything (measured on the prototype): prompts are
left-padded and every forward pass gets explicit `position_ids = cumsum(mask) - 1`, and completions are masked
after their first EOS. Log-probs are taken at the sampling temperature on both sides (as TRL does).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from bridgectl.core import distributed

# the KV cache argument and output field: `cache` in recent transformers (5.24), `past_key_values` in the releases
# vLLM pins (5.19)
KV_CACHE = "cache" if "cache" in {f.name for f in fields(CausalLMOutputWithPast)} else "past_key_values"


@dataclass
class Rollouts:
    prompt_ids: torch.Tensor  # [N, P] left-padded
    prompt_mask: torch.Tensor  # [N, P]
    completion_ids: torch.Tensor  # [N, C] right-padded with pad after EOS
    completion_mask: torch.Tensor  # [N, C] 1 on generated tokens up to and including EOS
    sampling_logprobs: torch.Tensor  # [N, C] log-prob of each generated token under the sampling policy
    completions: list[str]  # decoded completion text, special tokens removed

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(dim=1)


def encode_prompts(tokenizer, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    encoded = tokenizer(prompts, padding=True, return_tensors="pt")
    return encoded["input_ids"].to(device), encoded["attention_mask"].to(device)


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(dim=1) - 1).clamp(min=0)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float = 1.0,
             greedy: bool = False, generator: torch.Generator | None = None,
             group_generators: list[torch.Generator] | None = None) -> Rollouts:
    """Samples one completion per prompt (repeat prompts for groups). Stops when every row has hit EOS.

    Randomness: `generator` for the whole batch, or `group_generators`, one per consecutive group of equal size
    (len(prompts) / len(group_generators) rows): each group's tokens then come from its own generator by
    Gumbel-max (argmax of log p + Gumbel noise, an exact sample of softmax), so a group's completions do not
    depend on the other rows in the batch; data-parallel ranks sampling their share of the groups get exactly the
    completions one process would (core/distributed.py)."""
    device = next(model.parameters()).device
    # a sharded model (train.fsdp) gathers weights in every forward pass, so every rank must make as many passes:
    # decoding stops when the rows of every rank have ended
    sharded = distributed.active() and distributed.is_sharded_model(model)
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, device)
    n_rows = prompt_ids.size(0)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    mask = prompt_mask
    out = model(input_ids=prompt_ids, attention_mask=mask, position_ids=positions(mask), use_cache=True,
                logits_to_keep=1)
    cache, next_logits = out[KV_CACHE], out.logits[:, -1]
    position = positions(mask)[:, -1:]
    tokens, logprobs = [], []
    finished = torch.zeros(n_rows, dtype=torch.bool, device=device)
    for index in range(max_new_tokens):
        scaled = torch.log_softmax(next_logits.float() / temperature, dim=-1)
        if greedy:
            token = scaled.argmax(dim=-1)
        elif group_generators is not None:
            rows_per_group = n_rows // len(group_generators)
            uniform = torch.cat([torch.rand(rows_per_group, scaled.size(1), generator=g, device=device,
                                            dtype=torch.float64) for g in group_generators])
            gumbel = -torch.log(-torch.log(uniform.clamp(min=1e-300)))
            token = (scaled.double() + gumbel).argmax(dim=-1)
        else:
            token = torch.multinomial(scaled.exp(), 1, generator=generator).squeeze(1)
        token = torch.where(finished, torch.full_like(token, pad), token)
        tokens.append(token)
        logprobs.append(scaled.gather(1, token.unsqueeze(1)).squeeze(1))
        finished |= token == eos
        done = bool(finished.all())
        if sharded:
            done = not distributed.any_rank(not done)
        if done or index == max_new_tokens - 1:  # no forward pass for logits nobody samples
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        position = position + 1
        out = model(input_ids=token.unsqueeze(1), attention_mask=mask, position_ids=position, use_cache=True,
                    **{KV_CACHE: cache})
        cache, next_logits = out[KV_CACHE], out.logits[:, -1]
    completion_ids = torch.stack(tokens, dim=1)
    completion_mask = completion_mask_from(completion_ids, eos)
    completion_ids = completion_ids.masked_fill(completion_mask == 0, pad)
    sampling_logprobs = torch.stack(logprobs, dim=1) * completion_mask
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return Rollouts(prompt_ids, prompt_mask, completion_ids, completion_mask, sampling_logprobs, texts)


def completion_mask_from(completion_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 on every token up to and including the first EOS, 0 after it."""
    is_eos = (completion_ids == eos_id).long()
    after_eos = (is_eos.cumsum(dim=1) - is_eos) > 0
    return (~after_eos).long()


def rollouts_from_token_ids(tokenizer, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                            completion_token_ids: list[list[int]]) -> Rollouts:
    """Completions sampled elsewhere (an inference engine, rollout.backend=vllm) for the left-padded prompts of
    `encode_prompts`, in the form the trained model scores: right-padded, and masked to exactly the tokens the
    engine returned (its stop token included), whichever token it stopped on. `sampling_logprobs` are zero
    until `score_sampled` fills them."""
    device = prompt_ids.device
    width = max(1, max((len(ids) for ids in completion_token_ids), default=0))
    completion_ids = torch.full((len(completion_token_ids), width), tokenizer.pad_token_id, dtype=torch.long,
                                device=device)
    completion_mask = torch.zeros_like(completion_ids)
    for row, ids in enumerate(completion_token_ids):
        completion_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long, device=device)
        completion_mask[row, :len(ids)] = 1
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return Rollouts(prompt_ids, prompt_mask, completion_ids, completion_mask,
                    torch.zeros(completion_ids.shape, device=device), texts)


def prompt_token_lists(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> list[list[int]]:
    """Each left-padded prompt's own tokens, padding dropped (what an inference engine is given)."""
    return [ids[mask.bool()].tolist() for ids, mask in zip(prompt_ids, prompt_mask)]
