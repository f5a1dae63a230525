"""Batched KV-cache generation against the log-prob pass and a plain full-recompute reference."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_MODEL_CFG

from bridgectl.core.logprobs import completion_logprobs
from bridgectl.core.rollout import Rollouts, completion_mask_from, generate, positions
from bridgectl.models.tiny import SHIPPED_DIR, build_model

# different lengths, so the batch is left-padded
PROMPTS = ["4+9*3-5*3=", "1+2=", "7*8-6+5*2=", "3-4="]


@pytest.fixture(scope="module")
def sharp_model(tokenizer):
    """A tiny random model whose attention and MLP outputs are scaled up: with tied embeddings a freshly
    initialised model just repeats its last input token under greedy decoding, this one does not."""
    torch.set_num_threads(1)
    model = build_model(TINY_MODEL_CFG, len(tokenizer), seed=1).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "q_proj.weight", "k_proj.weight")):
                parameter.mul_(8.0)
    return model


@pytest.fixture(scope="module")
def shipped_model():
    """The shipped pretrained base (loaded, never trained here): it writes answers and traces and stops at EOS."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(SHIPPED_DIR, dtype=torch.float32).eval()


@pytest.fixture(params=["tiny_model", "sharp_model", "shipped_model"])
def any_model(request):
    return request.getfixturevalue(request.param)


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text)["input_ids"]


def first_eos(row: list[int], eos: int) -> int | None:
    return row.index(eos) if eos in row else None


def test_positions_skip_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert positions(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_completion_mask_from_by_hand():
    eos = 2
    ids = torch.tensor([[5, 2, 7, 2], [2, 2, 3, 4], [5, 6, 7, 8], [5, 6, 7, 2]])
    assert completion_mask_from(ids, eos).tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_sampling_logprobs_match_completion_logprobs(any_model, tokenizer, temperature):
    prompts = PROMPTS * 3
    generator = torch.Generator().manual_seed(11)
    rollouts = generate(any_model, tokenizer, prompts, max_new_tokens=24, temperature=temperature, generator=generator)
    assert rollouts.prompt_mask[:, 0].tolist().count(0) > 0  # some rows really are left-padded
    scored = completion_logprobs(any_model, rollouts, temperature=temperature)
    mask = rollouts.completion_mask.bool()
    assert scored.shape == rollouts.sampling_logprobs.shape
    assert torch.allclose(scored[mask], rollouts.sampling_logprobs[mask], atol=1e-5, rtol=0)
    assert (scored[~mask] == 0).all() and (rollouts.sampling_logprobs[~mask] == 0).all()
    assert (rollouts.sampling_logprobs[mask] < 0).all()
    # the temperature matters: scoring at another temperature gives different numbers
    other = completion_logprobs(any_model, rollouts, temperature=temperature + 0.5)
    assert not torch.allclose(other[mask], rollouts.sampling_logprobs[mask], atol=1e-3)


def test_completion_logprobs_has_grad(tiny_model, tokenizer):
    rollouts = generate(tiny_model, tokenizer, PROMPTS, max_new_tokens=8, generator=torch.Generator().manual_seed(0))
    scored = completion_logprobs(tiny_model, rollouts)
    assert scored.requires_grad
    tiny_model.zero_grad(set_to_none=True)
    scored.sum().backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in tiny_model.parameters())
    tiny_model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("model_name", ["tiny_model", "shipped_model"])
def test_completion_mask_and_padding_after_eos(request, tokenizer, model_name):
    model = request.getfixturevalue(model_name)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompts = PROMPTS * 8
    rollouts = generate(
        model, tokenizer, prompts, max_new_tokens=30, temperature=1.0, generator=torch.Generator().manual_seed(5)
    )
    width = rollouts.completion_ids.size(1)
    ended_early = 0
    for ids, mask, text in zip(
        rollouts.completion_ids.tolist(), rollouts.completion_mask.tolist(), rollouts.completions
    ):
        k = first_eos(ids, eos)
        if k is None:
            assert mask == [1] * width
        else:
            assert mask == [1] * (k + 1) + [0] * (width - k - 1)
            assert ids[k + 1 :] == [pad] * (width - k - 1)
            ended_early += k < width - 1
        # the decoded text is the generated tokens up to EOS, special tokens removed
        kept = ids[: (k if k is not None else width)]
        assert text == tokenizer.decode(kept, skip_special_tokens=True)
    assert ended_early > 0  # the check above was exercised on rows that stopped before the end
    assert rollouts.lengths.tolist() == [sum(m) for m in rollouts.completion_mask.tolist()]


def test_generation_stops_when_every_row_has_ended(tiny_model, tokenizer):
    eos = tokenizer.eos_token_id
    rollouts = generate(
        tiny_model,
        tokenizer,
        PROMPTS * 4,
        max_new_tokens=70,
        temperature=1.0,
        generator=torch.Generator().manual_seed(3),
    )
    width = rollouts.completion_ids.size(1)
    rows = rollouts.completion_ids.tolist()
    assert width < 70  # stopped early (this seed's rows all end well before 70 tokens) ...
    assert all(eos in row for row in rows)  # ... because every row has an EOS
    assert any(first_eos(row, eos) == width - 1 for row in rows)  # and the last column holds the last one


def reference_greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> tuple[list[int], list[float]]:
    """Plain greedy decoding of one unpadded prompt: full forward pass every step, no KV cache."""
    ids = ids_of(tokenizer, prompt)
    tokens, logprobs = [], []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([ids + tokens]), use_cache=False).logits[0, -1]
            scores = torch.log_softmax(logits.float(), dim=-1)
            token = int(scores.argmax())
            tokens.append(token)
            logprobs.append(float(scores[token]))
            if token == tokenizer.eos_token_id:
                break
    return tokens, logprobs


@pytest.mark.parametrize("model_name", ["sharp_model", "shipped_model"])
def test_greedy_matches_full_recompute_reference(request, tokenizer, model_name):
    model = request.getfixturevalue(model_name)
    max_new = 30
    rollouts = generate(model, tokenizer, PROMPTS, max_new_tokens=max_new, greedy=True)
    again = generate(model, tokenizer, PROMPTS, max_new_tokens=max_new, greedy=True)
    assert torch.equal(rollouts.completion_ids, again.completion_ids)
    assert len(set(rollouts.completions)) > 1  # the prompts matter: not one repeated token for every row
    for row, prompt in enumerate(PROMPTS):
        expected_tokens, expected_logprobs = reference_greedy(model, tokenizer, prompt, max_new)
        n = int(rollouts.completion_mask[row].sum())
        assert rollouts.completion_ids[row, :n].tolist() == expected_tokens
        assert torch.allclose(rollouts.sampling_logprobs[row, :n], torch.tensor(expected_logprobs), atol=1e-5)


def test_seeded_generator_reproduces_samples(tiny_model, tokenizer):
    def sample(seed: int) -> Rollouts:
        return generate(
            tiny_model,
            tokenizer,
            PROMPTS * 2,
            max_new_tokens=16,
            temperature=1.0,
            generator=torch.Generator().manual_seed(seed),
        )

    first, second, other = sample(42), sample(42), sample(43)
    assert torch.equal(first.completion_ids, second.completion_ids)
    assert torch.equal(first.sampling_logprobs, second.sampling_logprobs)
    assert first.completions == second.completions
    assert first.completion_ids.shape != other.completion_ids.shape or not torch.equal(
        first.completion_ids, other.completion_ids
    )


@pytest.mark.parametrize("sampling", ["greedy", "groups"])
def test_reading_ended_rows_every_few_tokens_changes_nothing(sharp_model, tokenizer, sampling):
    """What an accelerator does (core/rollout.END_CHECK_EVERY: which rows have ended is read back every few
    tokens, not every token): the same tokens, log-probs and width as reading every token, with rows that end at
    different steps (a completion ends at any of a few common tokens) and leave the batch at different times."""
    prompts = [p for p in PROMPTS for _ in range(4)]  # 4 groups of 4

    def decoded(check_every: int):
        groups = [torch.Generator().manual_seed(seed) for seed in range(4)] if sampling == "groups" else None
        return generate(
            sharp_model,
            tokenizer,
            prompts,
            max_new_tokens=48,
            temperature=1.0,
            greedy=sampling == "greedy",
            group_generators=groups,
            check_every=check_every,
            end_ids=ids_of(tokenizer, "0123"),
        )

    every, sparse = decoded(1), decoded(5)
    lengths = every.lengths.tolist()
    assert len(set(lengths)) > 1 and min(lengths) < 48  # rows did end, at different steps
    assert torch.equal(every.completion_ids, sparse.completion_ids)
    assert torch.equal(every.completion_mask, sparse.completion_mask)
    torch.testing.assert_close(sparse.sampling_logprobs, every.sampling_logprobs, rtol=0, atol=1e-5)
