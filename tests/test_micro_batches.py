"""Memory-bounded training passes: the chunked log-probs and SFT loss equal the full float32 log-softmax in value and
gradient; a step split into micro-batches (with gradient accumulation) gives the gradients of the one-pass step for
every stage; gradient checkpointing gives the same gradients."""

from __future__ import annotations

import pytest
import torch
from gradient_checks import ScaledLogits
from transformers import LlamaConfig, LlamaForCausalLM

import bridgectl.core.logprobs as logprobs_module
import bridgectl.core.optim as optim_module
import bridgectl.stages.bridge as bridge_module
from bridgectl.config.compose import compose
from bridgectl.core.logprobs import micro_batches, token_logprobs
from bridgectl.core.losses import SFTBatch, sft_loss
from bridgectl.core.rollout import positions
from bridgectl.stages import build_stage
from bridgectl.training.setup import build_context


# ---- chunked log-probs ------------------------------------------------------------------------------------------
def llama(vocab_size: int = 300, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).train()


def batch(vocab_size: int, seed: int = 1):
    """4 rows of width 12: left padding of 0-3 tokens, and a scored region over the last 7 positions with holes."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, vocab_size, (4, 12), generator=generator)
    mask = torch.ones(4, 12, dtype=torch.long)
    for row, pad in enumerate([0, 1, 3, 2]):
        mask[row, :pad] = 0
    scored = torch.rand(4, 7, generator=generator) > 0.3
    return input_ids, mask, scored


def reference_logprobs(model, input_ids, mask, first_scored, scored, temperature):
    """The plain computation: a float32 log-softmax over every position and the whole vocabulary."""
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions(mask)).logits
    logprobs = torch.log_softmax(logits[:, first_scored - 1 : -1].float() / temperature, dim=-1)
    return logprobs.gather(2, input_ids[:, first_scored:].unsqueeze(2)).squeeze(2) * scored


@pytest.mark.parametrize("wrapped", [False, True], ids=["chunked-head", "own-forward"])
def test_chunked_logprobs_equal_the_full_log_softmax_in_value_and_gradient(monkeypatch, wrapped):
    monkeypatch.setattr(logprobs_module, "LOGIT_CHUNK_ELEMENTS", 300 * 5)  # 5 tokens per chunk: several chunks
    model = llama()
    if wrapped:
        model = ScaledLogits(model)
    assert logprobs_module._head_is_separable(model) is (not wrapped)
    input_ids, mask, scored = batch(300)
    weights = torch.randn(4, 7, generator=torch.Generator().manual_seed(2))

    def value_and_grads(compute):
        model.zero_grad(set_to_none=True)
        values = compute(model, input_ids, mask, 5, scored, 0.7)
        (values * weights).sum().backward()
        return values.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    chunked, chunked_grads = value_and_grads(token_logprobs)
    full, full_grads = value_and_grads(reference_logprobs)
    assert scored.sum() > 10 and (chunked[scored] < 0).all()
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=1e-5)
    assert set(chunked_grads) == set(full_grads)
    for name, grad in full_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_sft_loss_equals_cross_entropy_in_value_and_gradient(monkeypatch):
    monkeypatch.setattr(logprobs_module, "LOGIT_CHUNK_ELEMENTS", 300 * 3)
    model = llama(seed=3)
    input_ids, mask, _ = batch(300, seed=4)
    mask = mask.flip(1)  # SFT rows are right-padded
    labels = input_ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100  # the prompt is not scored
    sft_batch = SFTBatch(input_ids, mask, labels)

    loss = sft_loss(model, sft_batch)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions(mask)).logits
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 300).float(), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    expected_grads = torch.autograd.grad(expected, list(model.parameters()))
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-5)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, atol=1e-7, rtol=1e-4)


def test_micro_batches_group_rows_of_similar_length():
    lengths = [50, 3, 48, 5, 49, 4, 6]
    assert micro_batches(lengths, 0) == [list(range(7))]
    assert micro_batches(lengths, 7) == [list(range(7))]
    assert micro_batches(lengths, 3) == [[1, 5, 3], [6, 2, 4], [0]]
    assert sorted(row for part in micro_batches(lengths, 2) for row in part) == list(range(7))


# ---- a step in micro-batches equals the one-pass step ----------------------------------------------------------
SMALL = [
    "rl.prompts_per_step=4",
    "rl.num_generations=4",
    "rl.max_completion_length=16",
    "sft.batch_size=5",
    "train.threads=1",
    "lora.rank=4",
    "bridge.w_rank=2",
    "optim.max_grad_norm=0",
]


def step_gradients(recipe_overrides: list[str], stage_kind: str, extra: list[str], monkeypatch, steps: int = 1):
    """Every gradient an update rule clips in `steps` steps of a fresh `stage_kind` stage (cloned before the
    optimizer uses them), in call order: what the update is made of."""
    captured = []

    def spy(real):
        def clip(params, *args, **kwargs):
            captured.append([p.grad.detach().clone() if p.grad is not None else None for p in params])
            return real(params, *args, **kwargs)

        return clip

    monkeypatch.setattr(optim_module, "clip_gradients", spy(optim_module.clip_gradients))
    monkeypatch.setattr(bridge_module, "clip_gradients", spy(bridge_module.clip_gradients))
    cfg = compose([*recipe_overrides, *SMALL, *extra])
    ctx = build_context(cfg, show_progress=False)
    stage = build_stage(stage_kind, ctx, 3)
    for _ in range(steps):
        stage.step()
    monkeypatch.undo()
    return captured


def assert_same_gradients(got, expected):
    assert len(got) == len(expected) and len(expected) > 0
    nonzero = 0
    for got_group, expected_group in zip(got, expected):
        for got_grad, expected_grad in zip(got_group, expected_group):
            if expected_grad is None:
                assert got_grad is None or not got_grad.any()
                continue
            torch.testing.assert_close(got_grad, expected_grad, atol=1e-6, rtol=1e-4)
            nonzero += int(expected_grad.abs().max() > 0)
    assert nonzero > 0


CASES = {
    "rl": (["recipe=rl"], "rl", 1),
    "rl-lora-kl": (["recipe=rl", "model.finetune=lora", "rl.beta=0.1"], "rl", 1),
    "sft": (["recipe=sft"], "sft", 1),
    "mix": (["recipe=mix"], "mix", 1),
    "interleaved": (["recipe=interleaved"], "interleaved", 2),  # one RL update, then one SFT update
    "bridge-full": (["recipe=bridge", "bridge.lower=full"], "bridge", 1),
    "bridge-lora": (["recipe=bridge", "model.finetune=lora"], "bridge", 1),
    "bridge-lookahead": (["recipe=bridge", "model.finetune=lora", "bridge.shadow=lookahead"], "bridge", 1),
    # GSPO's sequence ratio, CISPO, the step's top-entropy tokens and the entropy bonus (core/policy_losses.grpo_loss)
    "rl-variants": (
        [
            "recipe=rl",
            "rl.importance_sampling_level=sequence",
            "rl.loss_type=cispo",
            "rl.epsilon_high=1.1",
            "rl.top_entropy_quantile=0.3",
            "rl.entropy_coef=0.01",
        ],
        "rl",
        1,
    ),
    "rl-sapo": (["recipe=rl", "rl.loss_type=sapo"], "rl", 1),
    "rl-vespo-mask": (
        [
            "recipe=rl",
            "rl.loss_type=vespo",
            "rl.off_policy_mask_threshold=0.01",
            "rl.adv_estimator=reinforce_plus_plus",
            "rl.scale_rewards=batch",
        ],
        "rl",
        1,
    ),
    "rl-luspo": (["recipe=rl", "rl.loss_type=luspo", "rl.importance_sampling_level=sequence"], "rl", 1),
    "rl-bnpo": (["recipe=rl", "rl.loss_type=bnpo"], "rl", 1),
    "bridge-variants": (
        [
            "recipe=bridge",
            "model.finetune=lora",
            "rl.importance_sampling_level=sequence",
            "rl.top_entropy_quantile=0.3",
            "rl.entropy_coef=0.01",
            "rl.delta=1.5",
        ],
        "bridge",
        1,
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_micro_batches_give_the_one_pass_gradients(case, monkeypatch):
    overrides, kind, steps = CASES[case]
    whole = step_gradients(overrides, kind, ["train.micro_batch_size=0"], monkeypatch, steps)
    for size in (1, 3):
        split = step_gradients(overrides, kind, [f"train.micro_batch_size={size}"], monkeypatch, steps)
        assert_same_gradients(split, whole)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["rl-lora-kl", "sft", "bridge-full", "bridge-lora"])
def test_gradient_checkpointing_gives_the_same_gradients(case, monkeypatch):
    overrides, kind, steps = CASES[case]
    plain = step_gradients(overrides, kind, ["train.micro_batch_size=3"], monkeypatch, steps)
    checkpointed = step_gradients(
        overrides, kind, ["train.micro_batch_size=3", "model.gradient_checkpointing=true"], monkeypatch, steps
    )
    assert_same_gradients(checkpointed, plain)


def test_gradient_checkpointing_keeps_fewer_activations():
    """The setting is in effect in a training pass: far fewer bytes are saved for backward."""
    from bridgectl.core.context import next_sft_batch

    saved_bytes = {}
    for checkpointing in ("false", "true"):
        ctx = build_context(
            compose(
                ["recipe=sft", "sft.batch_size=8", "train.threads=1", f"model.gradient_checkpointing={checkpointing}"]
            ),
            show_progress=False,
        )
        batch = next_sft_batch(ctx)
        sft_loss(ctx.policy.model, batch)  # the first pass also checks the head once (logprobs._head_is_separable)
        total = {"bytes": 0}

        def pack(tensor):
            total["bytes"] += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            sft_loss(ctx.policy.model, batch)
        saved_bytes[checkpointing] = total["bytes"]
    assert saved_bytes["true"] < 0.5 * saved_bytes["false"]
