"""bridgectl's GRPO loss against TRL 1.16's on one identical batch: the same model, prompts, completions, masks,
advantages, sampling-policy and reference log-probs go through TRL's own `GRPOTrainer._compute_loss` and through
`core.policy_losses.grpo_loss`, and the losses and every parameter's gradient must agree to float32 rounding.

TRL is not a dependency of bridgectl, so this runs where TRL is installed (`make test-trl` builds a scratch venv
with TRL 1.16 beside the project's packages) and is skipped elsewhere. The batch is built so that every term acts:
the sampling policy's log-probs are the current ones moved by up to +-0.4 nats, so some ratios leave
[1 - epsilon, 1 + epsilon_high] and are clipped; the reference's differ again, so the KL term and its gradient
are not zero; completions have different lengths (the mask has zeros), and advantages of both signs.
"""

from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl")

from hf_fixtures import build_hf_model  # noqa: E402

from bridgectl.core.policy_losses import grpo_loss  # noqa: E402

PROMPT_LEN, COMPLETION_LEN, ROWS = 5, 7, 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_hf_model(tmp_path_factory.mktemp("trl-parity-model"))


def make_trainer(model_dir, tmp_path, **options):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    args = GRPOConfig(
        output_dir=str(tmp_path / "trl"),
        report_to="none",
        use_cpu=True,
        per_device_train_batch_size=ROWS,
        num_generations=2,
        max_completion_length=COMPLETION_LEN,
        temperature=1.0,
        epsilon=0.2,
        logging_steps=1,
        save_strategy="no",
        bf16=False,
        **options,
    )  # float32, as bridgectl on a CPU
    dataset = Dataset.from_list([{"prompt": "1 + 1 ="}] * ROWS)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=lambda completions, **kw: [0.0] * len(completions),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.current_gradient_accumulation_steps = 1  # one micro-batch is the whole update, as below
    return trainer


def identical_batch(model, vocab_size: int) -> dict:
    generator = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(3, vocab_size, (ROWS, PROMPT_LEN), generator=generator)
    completion_ids = torch.randint(3, vocab_size, (ROWS, COMPLETION_LEN), generator=generator)
    lengths = torch.tensor([7, 5, 3, 6])
    completion_mask = (torch.arange(COMPLETION_LEN)[None, :] < lengths[:, None]).long()
    with torch.no_grad():
        current = completion_logprobs(model, prompt_ids, completion_ids, completion_mask)
    shift = (torch.rand(ROWS, COMPLETION_LEN, generator=generator) - 0.5) * 0.8
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": torch.ones_like(prompt_ids),
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": torch.tensor([1.2, -0.7, 0.4, -1.5]),
        "old_per_token_logps": current + shift,
        "ref_per_token_logps": current - 0.5 * shift + 0.1,
        "num_items_in_batch": completion_mask.sum(),
    }


def completion_logprobs(model, prompt_ids, completion_ids, completion_mask) -> torch.Tensor:
    """log pi(token | prefix) of each completion token: the model's own computation, independent of both tools."""
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention = torch.cat([torch.ones_like(prompt_ids), completion_mask], dim=1)
    logits = model(input_ids=input_ids, attention_mask=attention).logits[:, PROMPT_LEN - 1 : -1]
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)


def gradients(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def through_trl(trainer):
    """The model, the identical batch, TRL's loss on it and every parameter's gradient of that loss."""
    model = trainer.model
    model.train()
    batch = identical_batch(model, model.config.vocab_size)
    model.zero_grad()
    loss = trainer._compute_loss(model, batch)
    loss.backward()
    return model, batch, loss, gradients(model)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
@pytest.mark.parametrize("bias_correction_kl", [True, False])
def test_kl_regularised_loss_and_gradient_equal_trl(model_dir, tmp_path, loss_type, bias_correction_kl):
    trainer = make_trainer(
        model_dir,
        tmp_path,
        beta=0.04,
        loss_type=loss_type,
        epsilon_high=0.28,
        use_bias_correction_kl=bias_correction_kl,
    )
    model, batch, trl_loss, trl_grads = through_trl(trainer)

    model.zero_grad()
    mask = batch["completion_mask"]
    logprobs = completion_logprobs(model, batch["prompt_ids"], batch["completion_ids"], mask)
    ours, stats = grpo_loss(
        logprobs,
        batch["old_per_token_logps"],
        batch["advantages"],
        mask,
        epsilon=0.2,
        epsilon_high=0.28,
        beta=0.04,
        ref_logprobs=batch["ref_per_token_logps"],
        loss_type=loss_type,
        max_completion_length=COMPLETION_LEN,
        bias_correction_kl=bias_correction_kl,
    )
    ours.backward()
    our_grads = gradients(model)

    # the check can fail: the other KL form, on the same batch, is outside the tolerance below
    model.zero_grad()
    logprobs = completion_logprobs(model, batch["prompt_ids"], batch["completion_ids"], mask)
    other, _ = grpo_loss(
        logprobs,
        batch["old_per_token_logps"],
        batch["advantages"],
        mask,
        epsilon=0.2,
        epsilon_high=0.28,
        beta=0.04,
        ref_logprobs=batch["ref_per_token_logps"],
        loss_type=loss_type,
        max_completion_length=COMPLETION_LEN,
        bias_correction_kl=not bias_correction_kl,
    )
    other.backward()
    assert not all(torch.allclose(g, trl_grads[name], rtol=1e-4, atol=1e-7) for name, g in gradients(model).items())

    assert stats.clip_fraction > 0 and stats.kl > 0  # the batch exercises clipping and the KL term
    assert ours.item() == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-7)
    assert set(our_grads) == set(trl_grads)
    for name, grad in trl_grads.items():
        assert torch.allclose(our_grads[name], grad, rtol=1e-4, atol=1e-7), name
    logged_kl = trainer._metrics["train"]["kl"][-1]
    assert stats.kl == pytest.approx(logged_kl, rel=1e-5)  # the KL that both log


VARIANTS = {  # TRL 1.16 GRPOConfig options -> the same batch through both tools
    "gspo": {"importance_sampling_level": "sequence", "loss_type": "grpo"},
    "gspo-dapo-kl": {"importance_sampling_level": "sequence", "loss_type": "dapo", "beta": 0.04},
    "cispo": {"loss_type": "cispo", "epsilon_high": 1.2},
    "sapo": {"loss_type": "sapo", "sapo_temperature_pos": 1.0, "sapo_temperature_neg": 1.05},
    "delta": {"loss_type": "dapo", "epsilon_high": 0.28, "delta": 1.3},
    "entropy": {"loss_type": "dapo", "top_entropy_quantile": 0.3, "entropy_coef": 0.01},
    "done-when": {
        "importance_sampling_level": "sequence",
        "loss_type": "cispo",
        "epsilon_high": 1.05,
        "top_entropy_quantile": 0.2,
        "entropy_coef": 0.001,
    },
    "bnpo": {"loss_type": "bnpo", "epsilon_high": 0.28},
    "luspo": {"importance_sampling_level": "sequence", "loss_type": "luspo"},
    "vespo": {
        "loss_type": "vespo",
        "vespo_k_pos": 2.0,
        "vespo_lambda_pos": 3.0,
        "vespo_k_neg": 3.0,
        "vespo_lambda_neg": 2.0,
    },
    "vespo-kl": {"loss_type": "vespo", "beta": 0.04, "vespo_k_pos": 1.5, "vespo_lambda_neg": 2.5},
    "off-policy-mask": {"loss_type": "dapo", "off_policy_mask_threshold": 0.05},
}


def loss_options(options: dict):
    """bridgectl's PolicyLossOptions for TRL GRPOConfig `options` (TRL's defaults where unset)."""
    from bridgectl.core.policy_losses import PolicyLossOptions

    return PolicyLossOptions(
        importance_sampling_level=options.get("importance_sampling_level", "token"),
        delta=options.get("delta"),
        entropy_coef=options.get("entropy_coef", 0.0),
        sapo_temperature_pos=options.get("sapo_temperature_pos", 1.0),
        sapo_temperature_neg=options.get("sapo_temperature_neg", 1.05),
        vespo_k_pos=options.get("vespo_k_pos", 2.0),
        vespo_lambda_pos=options.get("vespo_lambda_pos", 3.0),
        vespo_k_neg=options.get("vespo_k_neg", 3.0),
        vespo_lambda_neg=options.get("vespo_lambda_neg", 2.0),
        off_policy_mask_threshold=options.get("off_policy_mask_threshold"),
    )


def logprobs_and_entropies(model, batch):
    """Each completion token's log-prob and the entropy of its distribution, from the model's own logits."""
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention = torch.cat([torch.ones_like(batch["prompt_ids"]), batch["completion_mask"]], dim=1)
    logits = model(input_ids=input_ids, attention_mask=attention).logits[:, PROMPT_LEN - 1 : -1].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen = logprobs.gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)
    return chosen, -(logprobs.exp() * logprobs).sum(-1)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_grpo_variants_loss_and_gradient_equal_trl(model_dir, tmp_path, name):
    """GSPO's sequence-level ratio, CISPO, SAPO, BNPO, LUSPO, VESPO, two-sided clipping (delta), the off-policy
    sequence mask, the top-entropy token mask and the entropy bonus: loss and every gradient as TRL's _compute_loss
    gives them on one batch."""
    options = dict(VARIANTS[name])
    beta = options.pop("beta", 0.0)
    epsilon_high = options.pop("epsilon_high", None)
    trainer = make_trainer(
        model_dir,
        tmp_path,
        beta=beta,
        use_bias_correction_kl=True,
        **({"epsilon_high": epsilon_high} if epsilon_high is not None else {}),
        **options,
    )
    model, batch, trl_loss, trl_grads = through_trl(trainer)

    model.zero_grad()
    mask = batch["completion_mask"]
    logprobs, entropies = logprobs_and_entropies(model, batch)
    quantile = options.get("top_entropy_quantile", 1.0)
    entropy_mask = None
    if quantile < 1.0:  # the batch's (1 - q) quantile of its tokens' entropies, as TRL's get_high_entropy_mask
        threshold = torch.quantile(entropies.detach()[mask.bool()], 1 - quantile)
        entropy_mask = (entropies.detach() >= threshold) & mask.bool()
    variant = loss_options(options)
    ours, stats = grpo_loss(
        logprobs,
        batch["old_per_token_logps"],
        batch["advantages"],
        mask,
        epsilon=0.2,
        epsilon_high=epsilon_high,
        beta=beta,
        ref_logprobs=batch["ref_per_token_logps"],
        loss_type=options["loss_type"],
        max_completion_length=COMPLETION_LEN,
        bias_correction_kl=True,
        options=variant,
        entropies=entropies if variant.entropy_coef else entropies.detach(),
        entropy_mask=entropy_mask,
    )
    ours.backward()
    our_grads = gradients(model)

    # the check can fail: the plain clipped surrogate (dapo, token ratios, no cap, mask or bonus) is outside it
    # (for bnpo, which is dapo in one process, the per-completion mean grpo is)
    model.zero_grad()
    logprobs, _ = logprobs_and_entropies(model, batch)
    plain, _ = grpo_loss(
        logprobs,
        batch["old_per_token_logps"],
        batch["advantages"],
        mask,
        epsilon=0.2,
        epsilon_high=0.28 if "delta" in options else epsilon_high,
        beta=beta,
        ref_logprobs=batch["ref_per_token_logps"],
        loss_type="grpo" if name == "bnpo" else "dapo",
        bias_correction_kl=True,
    )
    plain.backward()
    assert not all(torch.allclose(g, trl_grads[n], rtol=1e-4, atol=1e-7) for n, g in gradients(model).items())

    assert ours.item() == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-7)
    assert set(our_grads) == set(trl_grads)
    for parameter, grad in trl_grads.items():
        assert torch.allclose(our_grads[parameter], grad, rtol=1e-4, atol=1e-7), parameter
    if "entropy" in trainer._metrics["train"]:  # the mean entropy both log
        assert stats.entropy == pytest.approx(trainer._metrics["train"]["entropy"][-1], rel=1e-4)


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "vespo"])
def test_vllm_rollout_correction_equals_trl(model_dir, tmp_path, mode, loss_type):
    """rl.vllm_importance_sampling_correction: with engine log-probs beside the batch, bridgectl's ratio
    (core/policy_losses.rollout_correction) and TRL's loss with it (TRL 1.16 multiplies the token losses by the ratio it
    computed while sampling; VESPO folds it into its weight; the off-policy mask reads the engine's log-probs):
    loss and gradients equal."""
    if loss_type == "vespo" and mode.startswith("sequence"):
        pytest.skip("TRL refuses vespo with sequence-level correction, as bridgectl's config check does")
    from bridgectl.core.policy_losses import rollout_correction

    low, high = (0.9, 1.1) if mode.startswith("token") else (0.6, 1.5)  # a completion's ratio spreads more
    options = {
        "loss_type": loss_type,
        "vllm_importance_sampling_mode": mode,
        "vllm_importance_sampling_clip_min": low,
        "vllm_importance_sampling_clip_max": high,
        "off_policy_mask_threshold": 0.05,
    }
    trainer = make_trainer(model_dir, tmp_path, **options)
    trainer.use_vllm = True  # what GRPOConfig(use_vllm=True) sets, without starting an engine (none is needed here)
    model = trainer.model
    model.train()
    batch = identical_batch(model, model.config.vocab_size)
    mask = batch["completion_mask"]
    noise = (torch.rand(batch["old_per_token_logps"].shape, generator=torch.Generator().manual_seed(3)) - 0.5) * 0.3
    engine = batch["old_per_token_logps"] + noise
    engine[0, 2] = float("nan")  # a token the engine did not score
    ratio, acted = rollout_correction(batch["old_per_token_logps"], engine, mask, mode, low, high)
    assert 0 < acted.float().mean() < 1  # the bounds act on some tokens or completions, not all
    batch = dict(batch, importance_sampling_ratio=ratio, sampling_per_token_logps=engine)
    model.zero_grad()
    trl_loss = trainer._compute_loss(model, batch)
    trl_loss.backward()
    trl_grads = gradients(model)

    model.zero_grad()
    logprobs, _ = logprobs_and_entropies(model, batch)
    ours, _ = grpo_loss(
        logprobs,
        batch["old_per_token_logps"],
        batch["advantages"],
        mask,
        epsilon=0.2,
        loss_type=loss_type,
        options=loss_options(options),
        rollout_ratio=ratio,
        behaviour_logprobs=engine,
    )
    ours.backward()
    assert ours.item() == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-7)
    for parameter, grad in trl_grads.items():
        assert torch.allclose(gradients(model)[parameter], grad, rtol=1e-4, atol=1e-7), parameter


def test_trl_computes_the_rollout_correction_as_bridgectl():
    """TRL 1.16 computes its vLLM importance ratio inline in _generate_and_score_completions; its lines, read from
    the installed source, are the formula core/policy_losses.rollout_correction implements: the masked log-prob
    difference (NaN to 0), summed per sequence for sequence_* modes, exponentiated, clamped or masked to the
    bounds."""
    import inspect

    from trl import GRPOTrainer

    source = " ".join(inspect.getsource(GRPOTrainer._generate_and_score_completions).split())
    for line in [
        "per_token_logps_diff = (old_per_token_logps - sampling_per_token_logps) * mask",
        "per_token_logps_diff = torch.nan_to_num(per_token_logps_diff, nan=0.0)",
        "per_sequence_logps_diff = per_token_logps_diff.sum(dim=-1, keepdim=True)",
        "vllm_importance_sampling_ratio = torch.exp(logps_diff)",
        "invalid_mis_mask, value=0.0",
    ]:
        assert line in source, line
