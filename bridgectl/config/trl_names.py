"""TRL's names for bridgectl's config keys, so an override written for TRL (`learning_rate=1e-5`) gets a hint naming
bridgectl's key instead of a bare "unknown key".

Names are those of TRL's GRPOConfig and SFTConfig (trl/trainer/grpo_config.py, sft_config.py), their base class
transformers.TrainingArguments, and TRL's ModelConfig (trl/trainer/model_config.py; the `lora_*` names), checked
against TRL 1.16. `max_prompt_length` is GRPOConfig's in earlier TRL releases. Each entry is (bridgectl keys, note):
the keys are `section.key` or `section.key=value` and are checked against the schema by
tests/test_config_schema.py; no keys means bridgectl has no such setting and the note says why. `markdown_table()`
renders the table for docs/guides/coming-from-trl.md.
"""

from __future__ import annotations

TRL_NAMES: dict[str, tuple[tuple[str, ...], str]] = {
    # ---- GRPOConfig -----------------------------------------------------------------------------------------
    "learning_rate": (
        ("rl.lr", "sft.lr"),
        "of RL and of SFT updates; stages with an optimizer of their own: mix.lr, "
        "chord.lr, hpt.lr, luffy.lr, srft.lr, uft.lr, relift.sft_lr, bridge.alpha, bridge.beta",
    ),
    "per_device_train_batch_size": (
        ("rl.prompts_per_step", "sft.batch_size"),
        "TRL counts completions per device and step; bridgectl counts the whole update: "
        "rl.prompts_per_step prompts x rl.num_generations completions, or sft.batch_size "
        "examples, shared out over --nproc processes",
    ),
    "gradient_accumulation_steps": (
        (),
        "one update always takes the whole batch (rl.prompts_per_step, "
        "sft.batch_size); train.micro_batch_size sets the rows per forward/backward "
        "pass, the update unchanged",
    ),
    "max_prompt_length": ((), "prompts are not truncated"),
    "max_completion_length": (("rl.max_completion_length",), "eval.max_new_tokens for evaluation answers"),
    "num_generations": (("rl.num_generations",), "the GRPO group size"),
    "use_vllm": (("rollout.backend=vllm",), "vLLM in this process (TRL's colocate mode); there is no server mode"),
    "vllm_mode": (("rollout.backend=vllm",), "colocate only: the engine runs in each training process"),
    "vllm_gpu_memory_utilization": (("rollout.gpu_memory_utilization",), ""),
    "vllm_max_model_length": (("rollout.max_model_len",), ""),
    "beta": (("rl.beta",), "the KL coefficient (bridge.beta is the learning rate of BRIDGE's adapter w)"),
    "use_bias_correction_kl": (
        ("rl.use_bias_correction_kl",),
        "the k3 KL weighted by the importance ratio, on by default as in TRL",
    ),
    "epsilon": (("rl.epsilon",), "the PPO clip range"),
    "epsilon_high": (("rl.epsilon_high",), "the upper clip range"),
    "temperature": (("rl.temperature",), "eval.temperature for sampled evaluation"),
    "top_p": (("rl.top_p",), ""),
    "top_k": (("rl.top_k",), ""),
    "min_p": (("rl.min_p",), ""),
    "loss_type": (
        ("rl.loss_type",),
        "all of TRL 1.16's: dapo, bnpo, grpo, dr_grpo, luspo, cispo, sapo, vespo; "
        "bnpo divides by each process's tokens of the whole step, TRL's by each micro-batch's "
        "(train.micro_batch_size never changes an update here)",
    ),
    "num_iterations": (("rl.num_iterations",), ""),
    "mask_truncated_completions": (("rl.mask_truncated_completions",), ""),
    "scale_rewards": (("rl.scale_rewards",), ""),
    "importance_sampling_level": (("rl.importance_sampling_level",), "token or sequence (GSPO)"),
    "delta": (("rl.delta",), "two-sided clipping"),
    "top_entropy_quantile": (
        ("rl.top_entropy_quantile",),
        "the quantile is the whole step's, not each micro-batch's (the same with one micro-batch)",
    ),
    "entropy_coef": (("rl.entropy_coef",), "a constant bonus; TRL's adaptive entropy control is not offered"),
    "multi_objective_aggregation": (
        ("rl.multi_objective_aggregation",),
        "sum_then_normalize or normalize_then_sum, with several task.reward_funcs",
    ),
    "sapo_temperature_pos": (("rl.sapo_temperature_pos",), "with rl.loss_type=sapo"),
    "sapo_temperature_neg": (("rl.sapo_temperature_neg",), "with rl.loss_type=sapo"),
    "vespo_k_pos": (("rl.vespo_k_pos",), "with rl.loss_type=vespo"),
    "vespo_lambda_pos": (("rl.vespo_lambda_pos",), "with rl.loss_type=vespo"),
    "vespo_k_neg": (("rl.vespo_k_neg",), "with rl.loss_type=vespo"),
    "vespo_lambda_neg": (("rl.vespo_lambda_neg",), "with rl.loss_type=vespo"),
    "off_policy_mask_threshold": (
        ("rl.off_policy_mask_threshold",),
        "from the engine's log-probs with rollout.backend=vllm, else the sampling policy's (as TRL)",
    ),
    "vllm_importance_sampling_correction": (
        ("rl.vllm_importance_sampling_correction",),
        "on by default as in TRL; acts with rollout.backend=vllm only",
    ),
    "vllm_importance_sampling_mode": (("rl.vllm_importance_sampling_mode",), "TRL's four modes and default"),
    "vllm_importance_sampling_clip_min": (("rl.vllm_importance_sampling_clip_min",), ""),
    "vllm_importance_sampling_clip_max": (("rl.vllm_importance_sampling_clip_max",), ""),
    "vllm_importance_sampling_cap": (("rl.vllm_importance_sampling_clip_max",), "TRL's deprecated name"),
    "reward_funcs": (
        ("task.reward_funcs",),
        "functions as path.py:function or pkg.module:function, and reward "
        "models as a directory (TRL: a model id); a GRPOTrainer argument, not a GRPOConfig field",
    ),
    "reward_weights": (("task.reward_weights",), ""),
    # ---- SFTConfig ------------------------------------------------------------------------------------------
    "max_length": ((), "SFT examples are not truncated (train.micro_batch_size bounds the memory)"),
    "packing": ((), "examples are padded, never packed"),
    # ---- TrainingArguments (both) ---------------------------------------------------------------------------
    "max_steps": (("train.max_steps",), "the total over all stages of the recipe"),
    "num_train_epochs": ((), "budgets are in steps (train.max_steps, recipe.steps)"),
    "seed": (("seed",), "a top-level key"),
    "gradient_checkpointing": (("model.gradient_checkpointing",), ""),
    "logging_steps": (
        (),
        "every step is written to metrics.jsonl (train.log_completions_every for sampled completions)",
    ),
    "save_steps": (("train.checkpoint_every",), ""),
    "save_total_limit": (("train.keep_checkpoints",), ""),
    "eval_steps": (("train.eval_every",), ""),
    "per_device_eval_batch_size": (("eval.batch_size",), ""),
    "warmup_steps": (("optim.warmup_steps",), ""),
    "lr_scheduler_type": (("optim.schedule",), "constant or cosine"),
    "weight_decay": (("optim.weight_decay",), ""),
    "adam_beta1": (("optim.adam_beta1",), ""),
    "adam_beta2": (("optim.adam_beta2",), ""),
    "max_grad_norm": (("optim.max_grad_norm",), ""),
    "bf16": (("model.dtype=bfloat16",), "the weights' dtype (auto: bfloat16 on CUDA); there is no autocast"),
    "fp16": (("model.dtype=float16",), "the weights' dtype; there is no autocast"),
    "report_to": (("tracker.wandb.mode",), "online or offline logs to W&B"),
    "use_cpu": (("train.device=cpu",), ""),
    # ---- ModelConfig --------------------------------------------------------------------------------------
    "model_name_or_path": (("model.name_or_path",), "with model=hf"),
    "dtype": (("model.dtype",), ""),
    "torch_dtype": (("model.dtype",), ""),
    "attn_implementation": (("model.attn_implementation",), ""),
    "trust_remote_code": (("model.trust_remote_code",), ""),
    "use_peft": (("model.finetune=lora",), ""),
    "lora_r": (("lora.rank",), ""),
    "lora_alpha": (("lora.alpha",), ""),
    "lora_dropout": (("lora.dropout",), ""),
    "lora_target_modules": (("lora.target_modules",), ""),
}


def trl_hint(name: str) -> str | None:
    """The hint for an unknown key whose last part is a TRL name (`learning_rate`, `rl.learning_rate`), else None."""
    if name not in TRL_NAMES:
        return None
    keys, note = TRL_NAMES[name]
    if not keys:
        return f"'{name}' is TRL's name; bridgectl has no such setting: {note}"
    said = " or ".join(keys)
    return f"'{name}' is TRL's name; bridgectl's is {said}" + (f" ({note})" if note else "")


def markdown_table() -> str:
    """The table of docs/guides/coming-from-trl.md."""
    rows = ["| TRL | bridgectl | note |", "|---|---|---|"]
    for name, (keys, note) in TRL_NAMES.items():
        rows.append(f"| `{name}` | {', '.join(f'`{key}`' for key in keys) or '-'} | {note} |")
    return "\n".join(rows) + "\n"
