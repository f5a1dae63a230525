"""Batched generation with a KV cache, and the log-prob pass that scores completions for training.

Both sides must agree to ~1e-6 for the importance ratio to mean anything (measured on the prototype; ~5e-5 where the
CPU sampler packs the weights for oneDNN, core/packed_linear.py, which still leaves the ratio 1 to 1e-4): prompts
are left-padded and every forward pass gets explicit `position_ids = cumsum(mask) - 1`, and completions are masked
after their first end token (any of the policy's end ids, core/end_tokens: EOS, the generation config's, the chat
template's turn end). Log-probs are taken at the sampling temperature on both sides (as TRL does). Truncated
sampling (top-k, top-p, min-p) only narrows which tokens can be drawn: the recorded log-probs stay those of the
whole tempered distribution, which is what the trained model recomputes, so the on-policy ratio stays 1 (as in TRL).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Collection
from dataclasses import dataclass, fields

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from bridgectl.core import distributed, flops, packed_linear

# the KV cache argument and output field: `cache` in recent transformers (5.24), `past_key_values` in the releases
# vLLM pins (5.19)
KV_CACHE = "cache" if "cache" in {f.name for f in fields(CausalLMOutputWithPast)} else "past_key_values"


@dataclass
class Rollouts:
    prompt_ids: torch.Tensor  # [N, P] left-padded
    prompt_mask: torch.Tensor  # [N, P]
    completion_ids: torch.Tensor  # [N, C] right-padded with pad after the end token
    completion_mask: torch.Tensor  # [N, C] 1 on generated tokens up to and including the first end token
    sampling_logprobs: torch.Tensor  # [N, C] log-prob of each generated token under the sampling policy
    completions: list[str]  # decoded completion text, special tokens removed
    # [N, C] rollout.backend=vllm: the engine's own log-prob of each sampled token (NaN where it gave none), for
    # the rollout correction (core/policy_losses.rollout_correction); None from the built-in sampler, which is the policy
    engine_logprobs: torch.Tensor | None = None

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(dim=1)


def encode_prompts(tokenizer, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    encoded = tokenizer(prompts, padding=True, return_tensors="pt")
    return encoded["input_ids"].to(device), encoded["attention_mask"].to(device)


def end_id_tuple(end_ids: int | Collection[int]) -> tuple[int, ...]:
    """`end_ids` (one id or several: a policy's `end_tokens.ids`) as a tuple."""
    return (int(end_ids),) if isinstance(end_ids, int) else tuple(int(i) for i in end_ids)


def is_end(token_ids: torch.Tensor, end_ids: int | Collection[int]) -> torch.Tensor:
    """Bool tensor of `token_ids`' shape: where a token is any of `end_ids`."""
    ends = torch.tensor(end_id_tuple(end_ids), dtype=token_ids.dtype, device=token_ids.device)
    return torch.isin(token_ids, ends)


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(dim=1) - 1).clamp(min=0)


# Dropping ended rows from the decoding batch ("compaction") copies the KV cache of the rows kept, which costs about
# what one decoding step costs in copies anyway (DynamicCache concatenates every layer's cache at every step), so it
# is done once at least this share of the rows still in the batch have ended: at most an eighth of a step's rows
# are then dead weight, and a batch of B rows is compacted at most log(B) / log(8/7) times (31 for 64 rows;
# compacting whenever a row ends could take 63). Measured (benchmarks/decode_compaction.py, CPU, 1 thread, 64 rows,
# 4 layers x 256, CPU seconds; "never" 38.1 and 39.8): long tail (60 rows end after 40-60 tokens, 4 run to 512)
# 5.80 / 5.90 / 6.22 / 6.19 s at 0 / 1/8 / 1/4 / 1/2; rows ending evenly through 1-512 tokens 13.8 / 13.8 / 14.4 /
# 16.3 s. 1/8 does as well as compacting whenever a row ends, with a third of the compactions (20 against 63).
_COMPACT_FRACTION = 0.125

END_CHECK_EVERY = 8
"""On an accelerator, whether rows have ended is read back to the host every this many tokens, not every token
(each read waits for the device to finish its queued work). In between, rows that ended keep decoding as pad and
leave the batch at the next check: the tokens and log-probs are the same (greedy, or with per-group generators,
which are fresh for each call; a single shared generator's stream depends on which rows are in the batch, so that
path reads every token)."""


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    group_generators: list[torch.Generator] | None = None,
    rows_per_batch: int = 0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    end_ids: Collection[int] | None = None,
    check_every: int | None = None,
    pack_weights: bool = True,
) -> Rollouts:
    """Samples one completion per prompt (repeat prompts for groups), decoding until every row has emitted an end
    token (any of `end_ids`, the policy's `end_tokens.ids`; default the tokenizer's EOS) or `max_new_tokens`.
    Rows that have ended leave the decoding batch (with their KV cache rows), so a batch costs the tokens its rows
    generate, not its longest row times its row count. `rows_per_batch` > 0 decodes at most that many rows at a
    time (rounded down to whole groups with `group_generators`, at least one group), to bound the KV cache's
    memory. The result is the same in either case: completions right-padded to the longest one, in the order of
    `prompts`.

    Randomness: `generator` for the whole batch, or `group_generators`, one per consecutive group of equal size
    (len(prompts) / len(group_generators) rows): each group's tokens then come from its own generator by
    Gumbel-max (argmax of log p + Gumbel noise, an exact sample of softmax). While any of its rows is still
    decoding, a group draws noise for all its rows every step, and each row takes its own row of the draw, so a
    group's t-th draw always makes its rows' t-th tokens: a group's completions do not depend on the other rows in
    the batch, on which rows have left it, or on `rows_per_batch`; data-parallel ranks sampling their share of the
    groups get exactly the completions one process would (core/distributed.py). Greedy decoding does not depend on
    them either. With one `generator` a seeded call is reproducible (same prompts, lengths and `rows_per_batch`
    give the same samples), but the samples change with `rows_per_batch` and with which rows have left the batch,
    as the generator's stream is spent on the rows still decoding. ("Do not depend" is up to float rounding: the
    model's numbers for a row may differ in the last bits with the batch around it.)

    `top_k`, `top_p`, `min_p` (off at 0, 1.0, 0.0) sample from the truncated distribution (`truncate`); the
    returned `sampling_logprobs` are still the untruncated tempered log-probs of the sampled tokens.

    `check_every`: tokens between reads of which rows have ended (default: every token on the CPU,
    END_CHECK_EVERY on an accelerator, where each read is a host sync); the result does not depend on it.

    `pack_weights` (rollout.cpu_packed_weights): on the CPU, decode with the linear layers' weights packed for
    oneDNN for the duration of the call (core/packed_linear.py), for models where that pays
    (packed_linear.worth_packing); the same tokens up to float rounding.

    Under a sharded model (train.fsdp) every rank makes the same forward passes, as each gathers the weights: a
    chunk decodes until the rows of every rank have ended (a rank whose rows have ended keeps one row in its batch
    to make them with), the completions are then as wide as the steps taken, and a rank with fewer chunks decodes
    stand-in chunks."""
    device = next(model.parameters()).device
    # a sharded model (train.fsdp) gathers weights in every forward pass, so every rank must make as many passes:
    # decoding stops when the rows of every rank have ended, and every rank decodes as many chunks
    sharded = distributed.active() and distributed.is_sharded_model(model)
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, device)
    n_rows = prompt_ids.size(0)
    group_size = 1
    if group_generators is not None:
        if n_rows % len(group_generators):
            raise ValueError(f"{n_rows} prompts do not split into {len(group_generators)} equal groups")
        group_size = n_rows // len(group_generators)
    if rows_per_batch < 0:
        raise ValueError(f"rows_per_batch must be >= 0 (0: all rows together), got {rows_per_batch}")
    chunks = _row_chunks(n_rows, rows_per_batch, group_size)
    ends = end_id_tuple(end_ids if end_ids is not None else tokenizer.eos_token_id)
    pad = tokenizer.pad_token_id
    pack = pack_weights and device.type == "cpu" and not sharded and packed_linear.worth_packing(model)
    rows = max((end - start for start, end in chunks), default=1)
    with packed_linear.packed_linears(model, rows) if pack else contextlib.nullcontext():
        decoded = _decode_chunks(
            model,
            prompt_ids,
            prompt_mask,
            chunks,
            max_new_tokens,
            temperature,
            greedy,
            generator,
            group_generators,
            group_size,
            ends,
            pad,
            sharded,
            (top_k, top_p, min_p),
            check_every,
        )
    width = max(tokens.size(1) for tokens, _ in decoded)
    completion_ids = torch.cat(
        [torch.nn.functional.pad(tokens, (0, width - tokens.size(1)), value=pad) for tokens, _ in decoded]
    )
    logprobs = torch.cat([torch.nn.functional.pad(lp, (0, width - lp.size(1))) for _, lp in decoded])
    completion_mask = completion_mask_from(completion_ids, ends)
    completion_ids = completion_ids.masked_fill(completion_mask == 0, pad)
    sampling_logprobs = logprobs * completion_mask
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return Rollouts(prompt_ids, prompt_mask, completion_ids, completion_mask, sampling_logprobs, texts)


def _decode_chunks(
    model,
    prompt_ids,
    prompt_mask,
    chunks,
    max_new_tokens,
    temperature,
    greedy,
    generator,
    group_generators,
    group_size,
    ends,
    pad,
    sharded,
    truncation,
    check_every,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(tokens, log-probs) of each chunk of rows (`chunks`, _row_chunks'), decoded one after another by
    _decode_rows."""
    decoded = []
    for index in itertools.count():
        mine = index < len(chunks)
        if not (distributed.any_rank(mine) if sharded else mine):
            break
        if mine:
            start, end = chunks[index]
            groups = group_generators[start // group_size : end // group_size] if group_generators is not None else None
            decoded.append(
                _decode_rows(
                    model,
                    prompt_ids[start:end],
                    prompt_mask[start:end],
                    max_new_tokens,
                    temperature,
                    greedy,
                    generator,
                    groups,
                    group_size,
                    ends,
                    pad,
                    sharded,
                    truncation=truncation,
                    check_every=check_every,
                )
            )
        else:
            # a rank out of chunks while another still has one decodes its first row as already ended (greedily:
            # no generator is touched), and drops it: its forward passes pair with the other rank's
            _decode_rows(
                model,
                prompt_ids[:1],
                prompt_mask[:1],
                max_new_tokens,
                temperature,
                True,
                None,
                None,
                group_size,
                ends,
                pad,
                sharded,
                ended=True,
            )
    return decoded


def _row_chunks(n_rows: int, rows_per_batch: int, group_size: int) -> list[tuple[int, int]]:
    """[start, end) row ranges of at most `rows_per_batch` rows (0: one range), cut between groups."""
    if rows_per_batch == 0:
        return [(0, n_rows)]
    size = max(group_size, rows_per_batch // group_size * group_size)
    return [(start, min(start + size, n_rows)) for start in range(0, n_rows, size)]


def _decode_rows(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    greedy: bool,
    generator: torch.Generator | None,
    group_generators: list[torch.Generator] | None,
    group_size: int,
    ends: tuple[int, ...],
    pad: int,
    sharded: bool,
    ended: bool = False,
    truncation: tuple[int, float, float] = (0, 1.0, 0.0),
    check_every: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decodes one chunk of rows (whole groups with `group_generators`): returns its tokens [n, T] (pad from the
    step after a row's end token, any of `ends`) and their untruncated log-probs [n, T], T the steps taken.
    `ended` starts every row as already ended (a sharded rank's stand-in chunk). `truncation`: (top_k, top_p,
    min_p) of `truncate`. `check_every`: tokens between reads of which rows have ended (END_CHECK_EVERY on an
    accelerator, 1 on the CPU, where a read costs nothing; always 1 with one shared generator or sharded)."""
    device = prompt_ids.device
    if check_every is None:
        check_every = 1 if device.type == "cpu" else END_CHECK_EVERY
    if sharded or (not greedy and group_generators is None):
        check_every = 1
    # padding columns no row of this chunk uses (another chunk's longer prompt) are dropped: positions come from
    # the mask, so a row's numbers do not change
    used = prompt_mask.bool().any(dim=0)
    mask, ids = (prompt_mask, prompt_ids) if bool(used.all()) else (prompt_mask[:, used], prompt_ids[:, used])
    n = ids.size(0)
    counter = flops.DecodeCounter(model)  # core/flops: what sampling costs, counted inside a training step
    counter.prefill(n, ids.size(1))
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=True, logits_to_keep=1)
    cache, next_logits = out[KV_CACHE], out.logits[:, -1]
    position = positions(mask)[:, -1:]
    end_ids = torch.tensor(ends, dtype=torch.long, device=device)
    tokens = torch.full((n, max_new_tokens), pad, dtype=torch.long, device=device)
    logprobs = torch.zeros((n, max_new_tokens), device=device)
    rows = torch.arange(n, device=device)  # the chunk row of each batch row; ascending, rows only ever leave
    finished = torch.full((n,), ended, dtype=torch.bool, device=device)
    segments = _group_segments(rows, group_size) if group_generators is not None else None
    known_ended = finished.tolist()  # as of the last check: rows that ended since then still draw (as pad)
    decoding = torch.zeros(max_new_tokens, dtype=torch.bool, device=device)  # a row was live at this step
    for step in range(max_new_tokens):
        if check_every > 1:
            decoding[step] = (~finished).any()
        scaled = torch.log_softmax(next_logits.float() / temperature, dim=-1)
        if greedy:
            token = scaled.argmax(dim=-1)
        else:
            allowed = truncate(scaled, *truncation)  # `scaled` itself when nothing is truncated
            if group_generators is not None:
                token = _gumbel_max_by_group(allowed, known_ended, segments, group_generators, group_size)
            else:
                token = torch.multinomial(allowed.exp(), 1, generator=generator).squeeze(1)
        token = torch.where(finished, torch.full_like(token, pad), token)
        tokens[rows, step] = token
        logprobs[rows, step] = scaled.gather(1, token.unsqueeze(1)).squeeze(1)
        finished |= torch.isin(token, end_ids)
        if step % check_every == check_every - 1 or step == max_new_tokens - 1:  # read back which rows ended
            known_ended = finished.tolist()
            live = ~finished
            n_live, n_batch = len(known_ended) - sum(known_ended), rows.numel()
            done = n_live == 0
            if sharded:
                done = not distributed.any_rank(not done)
            if done or step == max_new_tokens - 1:  # no forward pass for logits nobody samples
                break
            if n_batch - n_live >= _COMPACT_FRACTION * n_batch and n_live < n_batch:
                # only a sharded rank whose rows have all ended gets here with none live: it keeps one row to make
                # its remaining forward passes with
                keep = live.nonzero().squeeze(1) if n_live else torch.zeros(1, dtype=torch.long, device=device)
                if keep.numel() < n_batch:
                    # reorder_cache (index_select on the batch dimension) is what every cache layer type
                    # implements (dynamic, sliding-window, quantized, linear-attention states);
                    # batch_select_indices is only on the dynamic layers and leaves a quantized layer's quantized
                    # states unselected
                    cache.reorder_cache(keep)
                    rows, finished, mask, position, token = (t[keep] for t in (rows, finished, mask, position, token))
                    known_ended = [known_ended[i] for i in keep.tolist()]
                    if segments is not None:
                        segments = _group_segments(rows, group_size)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        position = position + 1
        counter.step(token.size(0), mask.size(1))
        out = model(
            input_ids=token.unsqueeze(1),
            attention_mask=mask,
            position_ids=position,
            use_cache=True,
            **{KV_CACHE: cache},
        )
        cache, next_logits = out[KV_CACHE], out.logits[:, -1]
    width = step + 1  # the steps taken (a sharded rank's: as many as its peers')
    if check_every > 1:  # steps decoded past the end of every row, before the next check, are dropped
        width = max(1, int(decoding.nonzero().max()) + 1) if bool(decoding.any()) else 1
    return tokens[:, :width], logprobs[:, :width]


def truncate(logprobs: torch.Tensor, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """`logprobs` [B, V] (log-softmax at the sampling temperature) with the tokens truncated sampling excludes set to
    -inf, in transformers' order of warpers (TopK, TopP, MinP; vLLM's and TRL's meaning of each): top_k > 0 keeps
    the k most likely tokens; top_p < 1 then keeps the fewest most likely tokens whose probability, renormalised
    over what top_k kept, reaches top_p (a token is kept when the tokens more likely than it hold less than top_p;
    the most likely always is); min_p > 0 then drops tokens less likely than min_p x the most likely one (a ratio,
    so renormalising does not change it). Not renormalised: Gumbel-max and multinomial draw from the renormalised
    distribution anyway. The input itself when every setting is off."""
    if 0 < top_k < logprobs.size(-1):
        kth = logprobs.topk(top_k, dim=-1).values[:, -1:]
        logprobs = logprobs.masked_fill(logprobs < kth, -math.inf)
    if top_p < 1.0:
        ordered, order = logprobs.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        outside = (probs.cumsum(dim=-1) - probs) >= top_p  # in sorted order: the mass of the more likely tokens
        outside = torch.zeros_like(outside).scatter(1, order, outside)  # back to vocabulary order
        logprobs = logprobs.masked_fill(outside, -math.inf)
    if min_p > 0.0:
        threshold = logprobs.max(dim=-1, keepdim=True).values + math.log(min_p)
        logprobs = logprobs.masked_fill(logprobs < threshold, -math.inf)
    return logprobs


def concat_rollouts(parts: list[Rollouts], pad_id: int) -> Rollouts:
    """The rows of `parts` as one Rollouts, in order: prompts left-padded and completions right-padded with
    `pad_id` to the widest (the masks say which tokens are real)."""
    prompt_width = max(part.prompt_ids.size(1) for part in parts)
    completion_width = max(part.completion_ids.size(1) for part in parts)

    def padded(tensor: torch.Tensor, width: int, fill, left: bool) -> torch.Tensor:
        extra = tensor.new_full((tensor.size(0), width - tensor.size(1)), fill)
        return torch.cat([extra, tensor] if left else [tensor, extra], dim=1)

    return Rollouts(
        torch.cat([padded(p.prompt_ids, prompt_width, pad_id, True) for p in parts]),
        torch.cat([padded(p.prompt_mask, prompt_width, 0, True) for p in parts]),
        torch.cat([padded(p.completion_ids, completion_width, pad_id, False) for p in parts]),
        torch.cat([padded(p.completion_mask, completion_width, 0, False) for p in parts]),
        torch.cat([padded(p.sampling_logprobs, completion_width, 0.0, False) for p in parts]),
        [text for p in parts for text in p.completions],
        None
        if all(p.engine_logprobs is None for p in parts)
        else torch.cat(
            [
                padded(
                    torch.full_like(p.sampling_logprobs, math.nan) if p.engine_logprobs is None else p.engine_logprobs,
                    completion_width,
                    math.nan,
                    False,
                )
                for p in parts
            ]
        ),
    )


def truncated_rows(rollouts: Rollouts, end_ids: int | Collection[int]) -> torch.Tensor:
    """[N] bool: the completions cut off by the length limit, i.e. without an end token of any kind (`end_ids`,
    the policy's `end_tokens.ids`) among their tokens (TRL's is_truncated; a completion whose end token is its last
    allowed token is not truncated)."""
    return ~(is_end(rollouts.completion_ids, end_ids) & rollouts.completion_mask.bool()).any(dim=1)


def _group_segments(rows: torch.Tensor, group_size: int) -> list[tuple[int, int, int, torch.Tensor | None]]:
    """(first batch row, end, group, the group members' indices within the group or None for all) for each group
    with rows in the batch; a group's rows are consecutive as the batch keeps the chunk's order."""
    groups = (rows // group_size).tolist()
    segments, start = [], 0
    while start < len(groups):
        end = start
        while end < len(groups) and groups[end] == groups[start]:
            end += 1
        members = None if end - start == group_size else rows[start:end] - groups[start] * group_size
        segments.append((start, end, groups[start], members))
        start = end
    return segments


def _gumbel_max_by_group(
    scaled: torch.Tensor, ended: list[bool], segments: list, group_generators: list, group_size: int
) -> torch.Tensor:
    """One token per batch row by Gumbel-max with each group's own generator. A group with a row still decoding
    draws [group_size, vocab] uniforms, whichever of its rows are left, and each row takes its own: the draw
    sequence of a group is fixed by the group alone. A group whose rows have all ended (by `ended`, per batch row,
    as last read from the device) draws nothing (its rows' tokens are replaced by pad); one that ended since draws
    on, which changes no token of its (a group's generator serves this call alone)."""
    draws, drawn = [], []
    for start, end, group, members in segments:
        if all(ended[start:end]):
            continue
        uniform = torch.rand(
            group_size, scaled.size(1), generator=group_generators[group], device=scaled.device, dtype=torch.float64
        )
        draws.append(uniform if members is None else uniform[members])
        drawn.append((start, end))
    token = torch.zeros(scaled.size(0), dtype=torch.long, device=scaled.device)  # ended groups' rows become pad
    if not draws:
        return token
    gumbel = -torch.log(-torch.log(torch.cat(draws).clamp(min=1e-300)))
    if len(drawn) == len(segments) and all(members is None for *_, members in segments):
        return (scaled.double() + gumbel).argmax(dim=-1)  # the usual case: every row of every group drew
    index = torch.cat([torch.arange(start, end, device=scaled.device) for start, end in drawn])
    token[index] = (scaled[index].double() + gumbel).argmax(dim=-1)
    return token


def completion_mask_from(completion_ids: torch.Tensor, end_ids: int | Collection[int]) -> torch.Tensor:
    """1 on every token up to and including the first end token of any kind (`end_ids`), 0 after it."""
    ended = is_end(completion_ids, end_ids).long()
    after_end = (ended.cumsum(dim=1) - ended) > 0
    return (~after_end).long()


def rollouts_from_token_ids(
    tokenizer, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_token_ids: list[list[int]]
) -> Rollouts:
    """Completions sampled elsewhere (an inference engine, rollout.backend=vllm) for the left-padded prompts of
    `encode_prompts`, in the form the trained model scores: right-padded, and masked to exactly the tokens the
    engine returned (its stop token included), whichever token it stopped on. `sampling_logprobs` are zero
    until `score_sampled` fills them."""
    device = prompt_ids.device
    width = max(1, max((len(ids) for ids in completion_token_ids), default=0))
    completion_ids = torch.full(
        (len(completion_token_ids), width), tokenizer.pad_token_id, dtype=torch.long, device=device
    )
    completion_mask = torch.zeros_like(completion_ids)
    for row, ids in enumerate(completion_token_ids):
        completion_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long, device=device)
        completion_mask[row, : len(ids)] = 1
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return Rollouts(
        prompt_ids,
        prompt_mask,
        completion_ids,
        completion_mask,
        torch.zeros(completion_ids.shape, device=device),
        texts,
    )


def prompt_token_lists(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> list[list[int]]:
    """Each left-padded prompt's own tokens, padding dropped (what an inference engine is given)."""
    return [ids[mask.bool()].tolist() for ids, mask in zip(prompt_ids, prompt_mask)]
