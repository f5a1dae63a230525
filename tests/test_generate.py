"""The sampler's batching: rows that have ended leave the decoding batch (compaction), `rows_per_batch` decodes in
chunks of whole groups, and neither changes what is sampled (up to float rounding of the log-probs, which a row's
batch size moves in the last bits) nor, with group generators, which tokens a group gets."""

from __future__ import annotations

import math
from contextlib import contextmanager

import pytest
import torch

from bridgectl.core import distributed, rollout
from bridgectl.core.logprobs import completion_logprobs
from bridgectl.core.rollout import KV_CACHE, Rollouts, generate

# one prompt per group, of different lengths (so the batch is left-padded)
PROMPTS = ["4+9*3-5*3=", "1+2=", "7*8-6+5*2=", "3-4=", "9*9-1=", "6+7*2="]
GROUP = 4


def grouped(prompts: list[str]) -> list[str]:
    return [p for p in prompts for _ in range(GROUP)]


def group_generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def no_compaction(monkeypatch):
    monkeypatch.setattr(rollout, "_COMPACT_FRACTION", math.inf)


def assert_same(a: Rollouts, b: Rollouts):
    """Same tokens, masks and texts; log-probs equal up to the float rounding a different batch size gives."""
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.completion_mask, b.completion_mask)
    assert a.completions == b.completions
    torch.testing.assert_close(a.sampling_logprobs, b.sampling_logprobs, atol=1e-5, rtol=0)


def rows_of(rollouts: Rollouts, start: int, end: int, width: int | None = None) -> tuple:
    """Rows [start, end) of a batch's rollouts, cut to `width` columns, after checking that the columns cut hold
    nothing (the batch is as wide as its longest row, maybe in another group)."""
    width = width or rollouts.completion_ids.size(1)
    assert (rollouts.completion_mask[start:end, width:] == 0).all()
    return (
        rollouts.completion_ids[start:end, :width],
        rollouts.completion_mask[start:end, :width],
        rollouts.sampling_logprobs[start:end, :width],
        rollouts.completions[start:end],
    )


def assert_rows_same(part: Rollouts, whole: Rollouts, start: int):
    ids, mask, logprobs, texts = rows_of(whole, start, start + part.completion_ids.size(0), part.completion_ids.size(1))
    assert torch.equal(part.completion_ids, ids) and torch.equal(part.completion_mask, mask)
    assert part.completions == texts
    torch.testing.assert_close(part.sampling_logprobs, logprobs, atol=1e-5, rtol=0)


@contextmanager
def controlled(model, eos: int, length_of=None):
    """A forward hook on `model` that records the rows of every forward pass (prefill and decoding steps) and, given
    `length_of` (prompt length in tokens -> completion length), makes each row's completion exactly that long:
    EOS is forbidden before its last token and forced there. The rule reads a row's prompt length and step off its
    attention mask (the sampler's mask is the chunk's prompt width plus one column per step), so it follows a row
    whatever rows around it have left the batch."""
    seen = {"prefill": [], "decode": []}
    state = {}

    def hook(module, args, kwargs, output):
        mask = kwargs["attention_mask"]
        if kwargs.get(KV_CACHE) is None:  # the prefill of a chunk
            state["prompt_width"] = mask.size(1)
            seen["prefill"].append(mask.size(0))
        else:
            seen["decode"].append(mask.size(0))
        if length_of is not None:
            step = mask.size(1) - state["prompt_width"]
            target = length_of(mask.sum(dim=1) - step)
            logits = output.logits[:, -1]
            logits[:, eos] = torch.where(
                step >= target - 1, torch.full_like(logits[:, eos], 30.0), torch.full_like(logits[:, eos], -math.inf)
            )
        return output

    handle = model.register_forward_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def long_tail(prompt_length: torch.Tensor) -> torch.Tensor:
    """5-token prompts ("1+2=", "3-4=") never end; the others end after 2 to 5 tokens."""
    return torch.where(prompt_length == 5, torch.full_like(prompt_length, 10**6), prompt_length % 4 + 2)


@pytest.mark.parametrize("fraction", [0.0, 0.125, 0.5])
def test_compaction_samples_the_same_group_tokens(tiny_model, tokenizer, monkeypatch, fraction):
    """The random tiny model's rows end at scattered steps (a long tail up to the limit): with rows leaving the
    batch (every step at fraction 0), every group still gets the same tokens, masks, log-probs."""
    prompts = grouped(PROMPTS[:4])

    def sample() -> Rollouts:
        return generate(
            tiny_model, tokenizer, prompts, 60, temperature=1.0, group_generators=group_generators([7, 8, 9, 10])
        )

    monkeypatch.setattr(rollout, "_COMPACT_FRACTION", fraction)
    with controlled(tiny_model, tokenizer.eos_token_id) as seen:
        compacted = sample()
    no_compaction(monkeypatch)
    full = sample()
    assert_same(compacted, full)
    lengths = full.lengths.tolist()
    assert min(lengths) < 20 and max(lengths) == 60  # really long-tailed: rows left early, one ran to the end
    assert seen["decode"][-1] < len(prompts)  # and the batch did shrink


def test_compaction_greedy_is_unchanged(tiny_model, tokenizer, monkeypatch):
    prompts = grouped(PROMPTS)
    with controlled(tiny_model, tokenizer.eos_token_id, long_tail):
        compacted = generate(tiny_model, tokenizer, prompts, 40, greedy=True)
        no_compaction(monkeypatch)
        full = generate(tiny_model, tokenizer, prompts, 40, greedy=True)
    assert_same(compacted, full)
    assert (
        compacted.lengths.tolist()
        == long_tail(torch.tensor([len(tokenizer(p)["input_ids"]) for p in prompts])).clamp(max=40).tolist()
    )


@pytest.mark.parametrize("sampler", ["single", "groups"])
def test_sampled_logprobs_match_scoring_after_compaction_and_in_chunks(tiny_model, tokenizer, monkeypatch, sampler):
    """Compacting every step and decoding in chunks keeps each row on its own KV cache rows: the sampling
    log-probs equal the log-prob pass over the finished completions. A seeded single generator reproduces."""
    monkeypatch.setattr(rollout, "_COMPACT_FRACTION", 0.0)
    prompts = grouped(PROMPTS[:4])

    def sample() -> Rollouts:
        randomness = (
            {"generator": torch.Generator().manual_seed(3)}
            if sampler == "single"
            else {"group_generators": group_generators([1, 2, 3, 4])}
        )
        return generate(tiny_model, tokenizer, prompts, 50, temperature=0.8, rows_per_batch=6, **randomness)

    first, again = sample(), sample()
    assert torch.equal(first.completion_ids, again.completion_ids)
    assert torch.equal(first.sampling_logprobs, again.sampling_logprobs)
    assert len(set(first.lengths.tolist())) > 3
    scored = completion_logprobs(tiny_model, first, temperature=0.8)
    mask = first.completion_mask.bool()
    torch.testing.assert_close(scored[mask], first.sampling_logprobs[mask], atol=1e-5, rtol=0)


def test_a_groups_completions_do_not_depend_on_its_batch_or_chunk(tiny_model, tokenizer):
    seeds = [11, 12, 13, 14, 15, 16]
    whole = generate(tiny_model, tokenizer, grouped(PROMPTS), 50, group_generators=group_generators(seeds))
    assert len(set(whole.lengths.tolist())) > 6  # rows of a group end at different steps
    for group in (1, 4):
        alone = generate(
            tiny_model, tokenizer, grouped([PROMPTS[group]]), 50, group_generators=group_generators([seeds[group]])
        )
        assert_rows_same(alone, whole, group * GROUP)
    order = [5, 2, 0]
    others = generate(
        tiny_model,
        tokenizer,
        grouped([PROMPTS[g] for g in order]),
        50,
        rows_per_batch=GROUP,
        group_generators=group_generators([seeds[g] for g in order]),
    )
    for position, group in enumerate(order):
        ids, mask, logprobs, texts = rows_of(others, position * GROUP, (position + 1) * GROUP)
        assert_rows_same(Rollouts(None, None, ids, mask, logprobs, texts), whole, group * GROUP)
    # rows_per_batch is cut to whole groups: 1 and 6 give chunks of one group, 9 of two
    for rows_per_batch in (1, 6, 9, 12, 100):
        chunked = generate(
            tiny_model,
            tokenizer,
            grouped(PROMPTS),
            50,
            rows_per_batch=rows_per_batch,
            group_generators=group_generators(seeds),
        )
        assert_same(chunked, whole)


def test_chunks_give_one_batchs_rollouts(tiny_model, tokenizer):
    """Greedy, lengths forced by prompt: the longest rows ("1+2=", "3-4=", cut at 30 tokens) sit in the middle
    chunks; the chunks' completions are padded to the longest chunk's width."""
    prompts = ["9*9-1=", "6+7*2=", "1+2=", "3-4=", "4+9*3-5*3=", "7*8-6+5*2=", "12+3=", "4="]
    with controlled(tiny_model, tokenizer.eos_token_id, long_tail) as seen:
        whole = generate(tiny_model, tokenizer, prompts, 30, greedy=True)
        chunked = generate(tiny_model, tokenizer, prompts, 30, greedy=True, rows_per_batch=3)
    assert_same(chunked, whole)
    assert torch.equal(chunked.prompt_ids, whole.prompt_ids) and torch.equal(chunked.prompt_mask, whole.prompt_mask)
    assert seen["prefill"] == [8, 3, 3, 2]
    assert whole.completion_ids.size(1) == 30 and whole.lengths.tolist()[2:4] == [30, 30]


def test_forward_rows_fall_when_rows_end_early(tiny_model, tokenizer, monkeypatch):
    """A long-tailed batch: 2 of 16 rows run to the 48-token limit, the others end after 2 to 5 tokens. Without
    compaction every decoding step runs all 16 rows; with it the steps run the rows still going (plus at most an
    eighth of the batch that has ended since the last compaction)."""
    prompts = [
        "1+2=",
        "4+9*3-5*3=",
        "7*8-6=",
        "12*3-45=",
        "9-8+7=",
        "6+7*2=",
        "3*3-3=",
        "8-1*2=",
        "3-4=",
        "5*5-5=",
        "2+2+2=",
        "7*7-1=",
        "6-6*6=",
        "1+1+1+1=",
        "9*8+2=",
        "4-2*3=",
    ]
    randomness = dict(temperature=1.0, group_generators=group_generators([0, 1, 2, 3]))
    with controlled(tiny_model, tokenizer.eos_token_id, long_tail) as compacted_rows:
        compacted = generate(tiny_model, tokenizer, prompts, 48, **randomness)
    no_compaction(monkeypatch)
    randomness["group_generators"] = group_generators([0, 1, 2, 3])
    with controlled(tiny_model, tokenizer.eos_token_id, long_tail) as full_rows:
        full = generate(tiny_model, tokenizer, prompts, 48, **randomness)
    assert_same(compacted, full)
    assert sorted(full.lengths.tolist())[-3:] == [5, 48, 48]
    assert full_rows["decode"] == [16] * 47
    assert len(compacted_rows["decode"]) == 47
    assert sum(compacted_rows["decode"]) < 0.25 * 16 * 47
    assert compacted_rows["decode"][-1] == 2


class FakePeer:
    """Another data-parallel rank, for distributed.any_rank: it decodes `chunks` chunks, each of `steps` steps.
    The sampler asks any_rank once before each chunk (does any rank have one?) and once per step (does any rank
    still have a row decoding?); a chunk's steps end when the answer is no."""

    def __init__(self, chunks: int, steps: int):
        self.chunks, self.steps, self.in_chunk, self.step = chunks, steps, False, 0

    def any_rank(self, flag: bool) -> bool:
        if not self.in_chunk:
            answer = flag or self.chunks > 0
            self.chunks -= 1
            self.in_chunk, self.step = answer, 0
            return answer
        answer = flag or self.step < self.steps - 1
        self.step += 1
        self.in_chunk = answer
        return answer


def test_a_sharded_rank_makes_as_many_forward_passes_as_its_peer(tiny_model, tokenizer, monkeypatch):
    """Under a sharded model every rank must make the same forward passes. This rank's rows end within 5 tokens,
    its peer's run 20 tokens and it has one chunk more: this rank keeps decoding (compacted to one row once its
    rows have ended) and decodes a stand-in chunk, and its completions are those of an unsharded run."""
    prompts = grouped(["4+9*3-5*3=", "7*8-6=", "12*3-45=", "9-8+7="])
    with controlled(tiny_model, tokenizer.eos_token_id, long_tail):
        alone = generate(
            tiny_model, tokenizer, prompts, 40, group_generators=group_generators([5, 6, 7, 8]), rows_per_batch=8
        )
    peer = FakePeer(chunks=3, steps=20)
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "is_sharded_model", lambda model: True)
    monkeypatch.setattr(distributed, "any_rank", peer.any_rank)
    with controlled(tiny_model, tokenizer.eos_token_id, long_tail) as seen:
        sharded = generate(
            tiny_model, tokenizer, prompts, 40, group_generators=group_generators([5, 6, 7, 8]), rows_per_batch=8
        )
    assert seen["prefill"] == [8, 8, 1]  # two chunks of its own, one stand-in
    assert len(seen["decode"]) == 3 * 19  # the peer's passes: 20 steps a chunk, no pass after the last one
    assert seen["decode"][18] == 1 and seen["decode"][-1] == 1
    assert sharded.completion_ids.size(1) == 20  # as wide as the steps taken, as before
    assert_rows_same(alone, sharded, 0)


def test_bad_arguments_are_refused(tiny_model, tokenizer):
    with pytest.raises(ValueError, match="rows_per_batch"):
        generate(tiny_model, tokenizer, PROMPTS[:2], 4, rows_per_batch=-1)
    with pytest.raises(ValueError, match="equal groups"):
        generate(tiny_model, tokenizer, PROMPTS[:3], 4, group_generators=group_generators([1, 2]))


def test_rollout_batch_size_bounds_the_rows_decoded_at_once_and_keeps_the_samples():
    """`rollout.batch_size` reaches the sampler of every RL stage (core/grpo.sample_groups)."""
    from bridgectl.config.compose import compose
    from bridgectl.core.grpo import sample_groups
    from bridgectl.training.setup import build_context

    sampled, widest = {}, {}
    for rows in (0, 8):
        ctx = build_context(
            compose(
                [
                    "recipe=rl",
                    "rl.prompts_per_step=4",
                    "rl.num_generations=4",
                    "rl.max_completion_length=12",
                    "train.threads=1",
                    f"rollout.batch_size={rows}",
                ]
            ),
            show_progress=False,
        )
        seen = []
        handle = ctx.policy.model.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append(kwargs["input_ids"].size(0)), with_kwargs=True
        )
        sampled[rows] = sample_groups(ctx).rollouts
        handle.remove()
        widest[rows] = max(seen)
    assert widest[0] == 16 and widest[8] <= 8
    assert sampled[8].completions == sampled[0].completions
