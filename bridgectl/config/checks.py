"""Values that type-check but no run could use, refused before anything loads (`validate`, run on every compose).

Where a check goes: a rule about one shared section's keys is in that section's function below (`_recipe`,
`_task`, ...), a stage's own section is checked by that stage (`check` in stages/<stage>_config.py, run for every
config whatever its recipe, so a bad value never waits for the recipe that reads it), and a rule that ties a stage
to the shared settings it cannot honour is a named capability of its registry entry (stages/__init__.py), read by
`_stage_capabilities`. What remains ties shared sections to each other (`_across_sections`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from bridgectl.config.keys import check_keys
from bridgectl.config.schema import example, group_options
from bridgectl.core.choices import (
    ADV_ESTIMATORS,
    AGGREGATIONS,
    IMPORTANCE_SAMPLING_LEVELS,
    LOSS_TYPES,
    ROLLOUT_CORRECTION_MODES,
    SCALE_REWARDS,
)
from bridgectl.errors import UserError, require
from bridgectl.stages import STAGES

ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
"""transformers' attention kernels (model.attn_implementation; a Hub kernel repository is also accepted)."""


def validate(cfg: DictConfig) -> None:
    """Raises UserError (message and hint) for the first value of `cfg` that no run could use."""
    check_keys(cfg)
    for key in ("seed", "model.pretrain.seed"):  # numpy seeds its generator with 32-bit unsigned integers
        value = OmegaConf.select(cfg, key)
        require(0 <= value < 2**32, f"{key} must be in [0, 2^32), got {value}", f"e.g. {key}=0")
    for section in (_train, _group_names, _model, _lora, _optim, _rollout, _eval, _recipe, _sft, _rl, _task, _tracker):
        section(cfg)
    for info in STAGES.values():
        if info.check is not None:
            info.check(cfg)
    _stage_capabilities(cfg)
    _across_sections(cfg)


def _positive(cfg: DictConfig, *keys: str) -> None:
    for key in keys:
        value = OmegaConf.select(cfg, key)
        require(value > 0, f"{key} must be positive, got {value}", f"e.g. {key}={example(key)}")


def _require_cuda() -> None:
    import torch  # here only: validation otherwise needs no torch

    if not torch.cuda.is_available():
        raise UserError(
            "train.device=cuda, but torch finds no CUDA device on this machine "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'})",
            "use train.device=auto (cuda when there is one) or train.device=cpu",
        )


def _installed(module: str) -> bool:
    """Whether `module` can be imported, without importing it (validate() runs on every compose)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules (how tests hide one), a broken parent
        return False


# ---- one shared section each -----------------------------------------------------------------------------------
def _train(cfg: DictConfig) -> None:
    train = cfg.train
    require(
        train.threads >= 0,
        f"train.threads must be >= 0, got {train.threads}",
        "torch CPU threads: e.g. train.threads=2 (0: torch's default)",
    )
    require(
        train.eval_every >= 0 and train.log_completions_every >= 0,
        "train.eval_every and train.log_completions_every must be >= 0 (0: never)",
        "e.g. train.eval_every=50 train.log_completions_every=25",
    )
    require(
        train.no_signal_warn_after >= 0,
        f"train.no_signal_warn_after must be >= 0 (0: never warn), got {train.no_signal_warn_after}",
        "e.g. train.no_signal_warn_after=3",
    )
    if train.device == "cuda":
        _require_cuda()
    require(train.max_steps > 0, f"train.max_steps must be positive, got {train.max_steps}", "e.g. train.max_steps=200")
    require(
        train.device in ("auto", "cpu", "cuda"), f"unknown train.device '{train.device}'", "choose auto, cpu or cuda"
    )
    require(
        train.micro_batch_size >= 0,
        "train.micro_batch_size and rollout.batch_size must be >= 0 (0: the whole batch at once)",
        "e.g. train.micro_batch_size=4 rollout.batch_size=64",
    )
    require(
        train.checkpoint_every >= 0 and train.keep_checkpoints >= 1,
        "train.checkpoint_every must be >= 0 and train.keep_checkpoints >= 1",
        "e.g. train.checkpoint_every=50 train.keep_checkpoints=2",
    )
    require(
        train.budget_flops is None or train.budget_tokens is None,
        "train.budget_flops and train.budget_tokens are two units of one budget: set one",
        "drop one of them",
    )
    for key in ("budget_flops", "budget_tokens", "eval_every_compute"):
        require(
            train[key] is None or train[key] > 0,
            f"train.{key} must be positive, got {train[key]}",
            f"e.g. train.{key}=1e12, or null (off)",
        )
    require(
        train.eval_every_compute is None or train.budget_flops is not None or train.budget_tokens is not None,
        "train.eval_every_compute is counted in the compute budget's unit, and no budget is set",
        "add train.budget_flops (or train.budget_tokens), or use train.eval_every (steps)",
    )


def _group_names(cfg: DictConfig) -> None:
    for group in ("task", "model"):
        require(
            cfg[group].name in group_options(group),
            f"unknown {group}.name '{cfg[group].name}'",
            f"choose one with {group}=NAME: {', '.join(group_options(group))}",
        )


def _model(cfg: DictConfig) -> None:
    model = cfg.model
    require(
        min(model.hidden_size, model.num_layers, model.num_heads, model.max_positions) > 0,
        "model.hidden_size, model.num_layers, model.num_heads and model.max_positions must be positive",
        "e.g. model.hidden_size=128 model.num_layers=4 model.num_heads=4 model.max_positions=96",
    )
    require(
        model.hidden_size % (2 * model.num_heads) == 0,
        f"model.hidden_size={model.hidden_size} does not split into model.num_heads={model.num_heads} heads of "
        "an even width",
        "rotary position embeddings turn pairs of each head's dimensions: e.g. model.hidden_size=128 model.num_heads=4",
    )
    require(
        model.attn_implementation in ATTENTION or "/" in model.attn_implementation,  # or a Hub kernel repo
        f"unknown model.attn_implementation '{model.attn_implementation}'",
        f"choose {', '.join(ATTENTION)}, or a kernel repository on the Hub (kernels-community/...)",
    )
    pretrain = model.pretrain
    require(
        pretrain.batch_size > 0 and pretrain.lr > 0 and 0 <= pretrain.trace_fraction <= 1,
        "model.pretrain.batch_size and model.pretrain.lr must be positive, model.pretrain.trace_fraction in [0, 1]",
        "e.g. model.pretrain.batch_size=128 model.pretrain.lr=1e-3 model.pretrain.trace_fraction=0.3",
    )
    require(
        model.pretrain.steps >= 0,
        f"model.pretrain.steps must be >= 0, got {model.pretrain.steps}",
        "e.g. model.pretrain.steps=800 (0 keeps the random initialisation)",
    )
    require(model.finetune in ("full", "lora"), f"unknown model.finetune '{model.finetune}'", "choose full or lora")
    require(
        model.dtype in ("auto", "float32", "bfloat16", "float16"),
        f"unknown model.dtype '{model.dtype}'",
        "choose auto, float32, bfloat16 or float16",
    )
    require(
        model.name != "hf" or bool(model.name_or_path),
        "model=hf needs model.name_or_path",
        "e.g. model=hf model.name_or_path=Qwen/Qwen2.5-0.5B-Instruct (or a local directory)",
    )
    if model.init_from:
        source = Path(str(model.init_from)).expanduser()
        require(
            any((source / name).is_file() for name in ("config.yaml", "config.json", "adapter_config.json")),
            f"model.init_from={model.init_from} is not a run, model or adapter directory",
            "give a bridgectl run directory, a model directory (config.json) or a peft adapter directory "
            "(adapter_config.json), on this machine",
        )


def _lora(cfg: DictConfig) -> None:
    lora = cfg.lora
    require(
        lora.alpha > 0 and 0 <= lora.dropout < 1 and len(lora.target_modules) > 0,
        "lora.alpha must be positive, lora.dropout in [0, 1) and lora.target_modules not empty",
        "e.g. lora.alpha=16 lora.dropout=0.05 lora.target_modules=[all-linear]",
    )
    require(lora.rank > 0, f"lora.rank must be positive, got {lora.rank}", "e.g. lora.rank=8")
    require(
        lora.forward in ("auto", "merged", "unmerged"),
        f"unknown lora.forward '{lora.forward}'",
        "choose auto, merged or unmerged",
    )
    require(
        lora.sampling in ("auto", "merged", "unmerged"),
        f"unknown lora.sampling '{lora.sampling}'",
        "choose auto, merged or unmerged",
    )


def _optim(cfg: DictConfig) -> None:
    optim = cfg.optim
    require(
        optim.weight_decay >= 0 and optim.max_grad_norm >= 0 and optim.warmup_steps >= 0,
        "optim.weight_decay, optim.max_grad_norm and optim.warmup_steps must be >= 0",
        "e.g. optim.weight_decay=0.0 optim.max_grad_norm=1.0 (0: no clipping) optim.warmup_steps=10",
    )
    require(
        0 <= optim.adam_beta1 < 1 and 0 <= optim.adam_beta2 < 1,
        f"optim.adam_beta1 and optim.adam_beta2 must be in [0, 1), got {optim.adam_beta1} and {optim.adam_beta2}",
        "they are AdamW's moment decay rates: e.g. optim.adam_beta1=0.9 optim.adam_beta2=0.999",
    )
    require(
        optim.schedule in ("constant", "cosine"),
        f"unknown optim.schedule '{optim.schedule}'",
        "choose constant or cosine",
    )


def _rollout(cfg: DictConfig) -> None:
    rollout = cfg.rollout
    require(
        rollout.max_model_len is None or rollout.max_model_len > 0,
        f"rollout.max_model_len must be positive, got {rollout.max_model_len}",
        "e.g. rollout.max_model_len=4096, or null for the model's own limit",
    )
    require(
        rollout.backend in ("hf", "vllm"), f"unknown rollout.backend '{rollout.backend}'", "choose hf (default) or vllm"
    )
    require(
        0 < rollout.gpu_memory_utilization < 1,
        f"rollout.gpu_memory_utilization must be in (0, 1), got {rollout.gpu_memory_utilization}",
        "it is the share of GPU memory vLLM may take, e.g. rollout.gpu_memory_utilization=0.3",
    )
    require(
        rollout.batch_size >= 0,
        "train.micro_batch_size and rollout.batch_size must be >= 0 (0: the whole batch at once)",
        "e.g. train.micro_batch_size=4 rollout.batch_size=64",
    )


def _eval(cfg: DictConfig) -> None:
    evaluation = cfg.eval
    require(
        evaluation.samples >= 0,
        f"eval.samples must be >= 0, got {evaluation.samples}",
        "e.g. eval.samples=16 (0: eval.k)",
    )
    _positive(cfg, "eval.n", "eval.batch_size", "eval.max_new_tokens")
    require(
        evaluation.k >= 0 and evaluation.temperature > 0,
        "eval.k must be >= 0 and eval.temperature positive",
        "e.g. eval.k=8 eval.temperature=1.0",
    )
    require(
        evaluation.samples == 0 or evaluation.samples >= max(evaluation.k, 1),
        f"eval.samples={evaluation.samples} is fewer than eval.k={evaluation.k}",
        "pass@k needs at least k answers per problem: eval.samples=0 (= k) or a value >= eval.k",
    )


def _recipe(cfg: DictConfig) -> None:
    recipe = cfg.recipe
    require(len(recipe.stages) > 0, "recipe.stages is empty", "give at least one stage, e.g. recipe.stages=[sft,rl]")
    for stage in recipe.stages:
        require(stage in STAGES, f"unknown stage '{stage}' in recipe.stages", f"stages are: {', '.join(STAGES)}")
    for name, values in (("recipe.fractions", recipe.fractions), ("recipe.steps", recipe.steps)):
        if values is not None:
            require(
                len(values) == len(recipe.stages),
                f"{name} has {len(values)} entries for {len(recipe.stages)} stages",
                f"give one value per stage of {list(recipe.stages)}",
            )
            require(
                all(v > 0 for v in values),
                f"{name} must be positive, got {list(values)}",
                "every stage needs a positive budget",
            )
    require(
        recipe.steps is not None or cfg.train.max_steps >= len(recipe.stages),
        f"train.max_steps={cfg.train.max_steps} is fewer than the {len(recipe.stages)} stages",
        "every stage needs at least one step: raise train.max_steps or set recipe.steps",
    )


def _sft(cfg: DictConfig) -> None:
    _positive(cfg, "sft.lr", "sft.batch_size")


def _rl(cfg: DictConfig) -> None:
    """rl.*, the TRL-named GRPO options included (loss_type, epsilon_high, scale_rewards, top_p, top_k, min_p,
    num_iterations)."""
    rl = cfg.rl
    _positive(cfg, "rl.lr", "rl.prompts_per_step", "rl.max_completion_length")
    require(
        rl.num_generations >= 2,
        f"rl.num_generations must be at least 2, got {rl.num_generations}",
        "GRPO compares completions within a group: use rl.num_generations=8",
    )
    require(
        rl.temperature > 0,
        f"rl.temperature must be positive, got {rl.temperature}",
        "sampling needs a positive temperature, e.g. rl.temperature=1.0",
    )
    require(
        rl.beta >= 0 and rl.epsilon > 0, "rl.beta must be >= 0 and rl.epsilon > 0", "e.g. rl.beta=0.0 rl.epsilon=0.2"
    )
    require(
        rl.scale_rewards in SCALE_REWARDS,
        f"unknown rl.scale_rewards '{rl.scale_rewards}'",
        "choose group, batch or none",
    )
    require(
        rl.loss_type in LOSS_TYPES,
        f"unknown rl.loss_type '{rl.loss_type}'",
        "choose dapo (token mean over the step, the default), bnpo (over each process's tokens), grpo (mean per "
        "completion), dr_grpo (sum / (completions x rl.max_completion_length)), luspo (mean of per-completion "
        "sums), cispo, sapo or vespo",
    )
    require(
        rl.loss_type != "vespo" or rl.importance_sampling_level == "token",
        "rl.loss_type=vespo weights whole completions by their own importance ratio, so "
        "rl.importance_sampling_level=sequence does not apply",
        "drop rl.importance_sampling_level with vespo",
    )
    require(
        rl.vespo_k_pos >= 0 and rl.vespo_k_neg >= 0 and rl.vespo_lambda_pos > 0 and rl.vespo_lambda_neg > 0,
        "rl.vespo_k_pos and rl.vespo_k_neg must be >= 0, rl.vespo_lambda_pos and rl.vespo_lambda_neg > 0",
        "e.g. rl.vespo_k_pos=2.0 rl.vespo_lambda_pos=3.0 rl.vespo_k_neg=3.0 rl.vespo_lambda_neg=2.0 (TRL's)",
    )
    require(
        rl.off_policy_mask_threshold is None or rl.off_policy_mask_threshold > 0,
        f"rl.off_policy_mask_threshold must be positive, got {rl.off_policy_mask_threshold}",
        "e.g. rl.off_policy_mask_threshold=0.5, or null (off)",
    )
    require(
        rl.vllm_importance_sampling_mode in ROLLOUT_CORRECTION_MODES,
        f"unknown rl.vllm_importance_sampling_mode '{rl.vllm_importance_sampling_mode}'",
        f"choose {', '.join(ROLLOUT_CORRECTION_MODES)}",
    )
    low, high = rl.vllm_importance_sampling_clip_min, rl.vllm_importance_sampling_clip_max
    require(
        (low is None or low >= 0) and (high is None or high > 0) and (low is None or high is None or low < high),
        f"rl.vllm_importance_sampling_clip_min and rl.vllm_importance_sampling_clip_max must be 0 <= min < max "
        f"(null: unbounded), got {low} and {high}",
        "e.g. rl.vllm_importance_sampling_clip_max=3.0 (TRL's) and no clip_min",
    )
    require(
        rl.loss_type != "vespo"
        or cfg.rollout.backend != "vllm"
        or not rl.vllm_importance_sampling_correction
        or rl.vllm_importance_sampling_mode.startswith("token"),
        "rl.loss_type=vespo folds the rollout correction's token ratios into its weight, so with "
        "rollout.backend=vllm it needs a token_* rl.vllm_importance_sampling_mode (as TRL)",
        "add rl.vllm_importance_sampling_mode=token_mask",
    )
    require(
        rl.importance_sampling_level in IMPORTANCE_SAMPLING_LEVELS,
        f"unknown rl.importance_sampling_level '{rl.importance_sampling_level}'",
        "choose token (GRPO) or sequence (GSPO)",
    )
    high = rl.epsilon if rl.epsilon_high is None else rl.epsilon_high
    require(
        rl.delta is None or rl.delta > 1 + high,
        f"rl.delta must exceed 1 + rl.epsilon_high ({1 + high:g}), got {rl.delta}",
        "the cap acts above the clip range: e.g. rl.delta=1.5 (arXiv 2505.22617 uses 1 + 2 epsilon), or null",
    )
    require(
        0 < rl.top_entropy_quantile <= 1,
        f"rl.top_entropy_quantile must be in (0, 1], got {rl.top_entropy_quantile}",
        "e.g. rl.top_entropy_quantile=0.2 (the top 20% entropy tokens; 1.0: all)",
    )
    require(
        rl.entropy_coef >= 0,
        f"rl.entropy_coef must be >= 0, got {rl.entropy_coef}",
        "e.g. rl.entropy_coef=0.001 (0: no bonus)",
    )
    require(
        rl.multi_objective_aggregation in AGGREGATIONS,
        f"unknown rl.multi_objective_aggregation '{rl.multi_objective_aggregation}'",
        "choose sum_then_normalize (the default) or normalize_then_sum",
    )
    require(
        rl.multi_objective_aggregation == "sum_then_normalize"
        or (rl.scale_rewards == "group" and rl.adv_estimator == "grpo" and not rl.filter_groups),
        "rl.multi_objective_aggregation=normalize_then_sum makes the advantage itself, so rl.scale_rewards, "
        "rl.adv_estimator and rl.filter_groups do not apply",
        "leave rl.scale_rewards=group and rl.adv_estimator=grpo, and drop rl.filter_groups",
    )
    require(
        rl.adv_estimator in ADV_ESTIMATORS,
        f"unknown rl.adv_estimator '{rl.adv_estimator}'",
        f"choose {', '.join(ADV_ESTIMATORS)} (grpo is the default)",
    )
    require(
        not rl.adv_estimator.startswith("reinforce_plus_plus") or rl.scale_rewards == "batch",
        f"rl.adv_estimator={rl.adv_estimator} whitens the rewards over the step's tokens itself, so "
        f"rl.scale_rewards={rl.scale_rewards} does not apply",
        "add rl.scale_rewards=batch",
    )
    require(
        rl.adv_estimator != "rloo" or rl.scale_rewards != "group",
        "rl.adv_estimator=rloo takes rl.scale_rewards none or batch (the leave-one-out advantage is not divided "
        "by its group's std)",
        "add rl.scale_rewards=none (TRL's RLOOTrainer) or rl.scale_rewards=batch (its normalize_advantages)",
    )
    require(
        rl.max_num_gen_batches >= 1,
        f"rl.max_num_gen_batches must be >= 1, got {rl.max_num_gen_batches}",
        "e.g. rl.max_num_gen_batches=10 (sampling rounds per step with rl.filter_groups)",
    )
    require(
        0 <= rl.overlong_buffer_len < rl.max_completion_length and rl.overlong_penalty_factor >= 0,
        f"rl.overlong_buffer_len must be in [0, rl.max_completion_length) and rl.overlong_penalty_factor >= 0, "
        f"got {rl.overlong_buffer_len} and {rl.overlong_penalty_factor}",
        f"e.g. rl.overlong_buffer_len={rl.max_completion_length // 4} rl.overlong_penalty_factor=1.0 (0: off)",
    )
    require(
        rl.sapo_temperature_pos > 0 and rl.sapo_temperature_neg > 0,
        "rl.sapo_temperature_pos and rl.sapo_temperature_neg must be positive",
        "e.g. rl.sapo_temperature_pos=1.0 rl.sapo_temperature_neg=1.05",
    )
    require(
        rl.epsilon_high is None or rl.epsilon_high > 0,
        f"rl.epsilon_high must be positive, got {rl.epsilon_high}",
        "e.g. rl.epsilon_high=0.28 (DAPO), or null for rl.epsilon",
    )
    require(
        0 < rl.top_p <= 1 and rl.top_k >= 0 and 0 <= rl.min_p < 1,
        f"rl.top_p must be in (0, 1], rl.top_k >= 0 and rl.min_p in [0, 1), got {rl.top_p}, {rl.top_k} and {rl.min_p}",
        "e.g. rl.top_p=0.95 rl.top_k=50 rl.min_p=0.05 (1.0, 0 and 0.0 turn each off)",
    )
    require(
        rl.num_iterations >= 1,
        f"rl.num_iterations must be >= 1, got {rl.num_iterations}",
        "e.g. rl.num_iterations=1 (one update per batch of rollouts)",
    )


def _task(cfg: DictConfig) -> None:
    task = cfg.task
    for key in ("train_ops", "test_ops", "ood_ops", "pretrain_ops"):
        low_high = list(task[key])
        require(
            len(low_high) == 2 and 1 <= low_high[0] <= low_high[1],
            f"task.{key} must be [min, max] with 1 <= min <= max, got {low_high}",
            f"e.g. task.{key}=[2,4]",
        )
    require(
        task.modulus >= 2 and task.max_operand >= 1,
        "task.modulus must be >= 2, task.max_operand >= 1",
        "e.g. task.modulus=10 task.max_operand=9",
    )
    require(
        "{question}" in task.prompt_template,
        "task.prompt_template has no {question} placeholder",
        "e.g. task.prompt_template='Question: {question}\\nAnswer:'",
    )
    try:  # the template is filled with str.format: any other field, or a lone brace, fails on the first prompt
        task.prompt_template.format(question="")
    except (KeyError, IndexError, ValueError) as error:
        require(
            False,
            f"task.prompt_template cannot be filled in: {type(error).__name__}: {error}",
            "only {question} is filled in; write other braces doubled, {{ and }}",
        )
    require(
        task.verify_timeout_s > 0,
        f"task.verify_timeout_s must be positive, got {task.verify_timeout_s}",
        "e.g. task.verify_timeout_s=5",
    )
    funcs, weights = list(task.reward_funcs), task.reward_weights
    for spec in funcs:  # whether each one imports is checked before the run starts (tasks/rewards.py)
        module, colon, name = spec.rpartition(":")
        require(
            spec == "verifier" or not colon or (module and name),
            f"task.reward_funcs: '{spec}' names no function",
            "give verifier, pkg.module:function, path/to/file.py:function or a reward model's directory",
        )
    require(
        weights is None or len(weights) == len(funcs),
        f"task.reward_weights has {len(weights or [])} entries for {len(funcs)} task.reward_funcs",
        f"give one weight per function of {funcs or '[verifier]'}, or none (1.0 each)",
    )
    require(
        task.reward_timeout_s > 0,
        f"task.reward_timeout_s must be positive, got {task.reward_timeout_s}",
        "e.g. task.reward_timeout_s=60",
    )
    require(
        task.system_prompt is None or task.name != "arith",
        "task.system_prompt applies to dataset tasks (the built-in arith task has no chat template)",
        "drop task.system_prompt, or use task=gsm8k, math or jsonl with model=hf",
    )


def _tracker(cfg: DictConfig) -> None:
    tracker = cfg.tracker
    require(
        tracker.wandb.mode in ("online", "offline", "disabled"),
        f"unknown tracker.wandb.mode '{tracker.wandb.mode}'",
        "choose online, offline or disabled",
    )
    require(
        not tracker.tensorboard or _installed("tensorboard"),
        "tracker.tensorboard=true needs the tensorboard package, which is not installed",
        "pip install 'bridgectl[tensorboard]' (or pip install 'tensorboard>=2.14'), or drop tracker.tensorboard",
    )


# ---- the recipe's stages against the shared settings they cannot honour (their registry capabilities) -----------
def _stage_capabilities(cfg: DictConfig) -> None:
    rl = cfg.rl
    iterating = [kind for kind, info in STAGES.items() if info.num_iterations]
    for stage in cfg.recipe.stages:
        info = STAGES[stage]
        require(
            not cfg.train.fsdp or info.fsdp,
            f"the {stage} stage does not run with train.fsdp ({info.no_fsdp_reason})",
            f"run {stage} without train.fsdp (plain data parallelism: --nproc N)",
        )
        if not info.samples_rollouts:
            continue
        require(
            rl.num_iterations == 1 or info.num_iterations,
            f"rl.num_iterations={rl.num_iterations} is not implemented for the {stage} stage",
            f"use rl.num_iterations=1 with {stage}; the {' and '.join(iterating)} stages take several "
            "updates per batch of rollouts",
        )
        require(
            rl.loss_type == "dapo" or not info.own_token_mean,
            f"rl.loss_type={rl.loss_type} does not apply to the {stage} stage (its loss is a token mean over its "
            "own rows)",
            f"use rl.loss_type=dapo with {stage}",
        )
        variants = [
            f"{key}={value}"
            for key, value, default in (
                ("rl.importance_sampling_level", rl.importance_sampling_level, "token"),
                ("rl.delta", rl.delta, None),
                ("rl.top_entropy_quantile", rl.top_entropy_quantile, 1.0),
                ("rl.entropy_coef", rl.entropy_coef, 0.0),
                ("rl.adv_estimator", rl.adv_estimator, "grpo"),
                ("rl.off_policy_mask_threshold", rl.off_policy_mask_threshold, None),
                ("rl.multi_objective_aggregation", rl.multi_objective_aggregation, "sum_then_normalize"),
            )
            if value != default
        ]
        require(
            not rl.filter_groups or info.dynamic_sampling,
            f"rl.filter_groups does not apply to the {stage} stage (it samples its groups its own way)",
            "dynamic sampling runs in the rl, interleaved, mix, chord and bridge stages: drop rl.filter_groups",
        )
        require(
            not variants or not info.own_token_mean,
            f"{', '.join(variants)} does not apply to the {stage} stage (its policy loss over rollouts and "
            "demonstrations is its own, not core/policy_losses.grpo_loss)",
            f"drop {', '.join(v.split('=')[0] for v in variants)} with {stage}",
        )
        require(
            not (info.own_token_mean and cfg.rollout.backend == "vllm" and rl.vllm_importance_sampling_correction),
            f"rl.vllm_importance_sampling_correction does not apply to the {stage} stage (its policy loss over "
            "rollouts and demonstrations is its own, not core/policy_losses.grpo_loss)",
            f"add rl.vllm_importance_sampling_correction=false with {stage} and rollout.backend=vllm",
        )
        require(
            rl.scale_rewards in info.scale_rewards,
            f"rl.scale_rewards={rl.scale_rewards} does not apply to the {stage} stage ({info.scale_rewards_reason})",
            f"use rl.scale_rewards={' or '.join(info.scale_rewards)} with {stage}",
        )


def _across_sections(cfg: DictConfig) -> None:
    require(
        not (cfg.rl.filter_groups and cfg.train.fsdp),
        "rl.filter_groups does not run with train.fsdp (when the sampling rounds run out the processes hold "
        "different numbers of groups, so they would run different numbers of sharded passes)",
        "run dynamic sampling without train.fsdp (plain data parallelism: --nproc N)",
    )
    require(
        cfg.rollout.backend != "vllm" or not cfg.train.fsdp,
        "rollout.backend=vllm does not run with train.fsdp (each process would need a whole copy for vLLM, "
        "which is what sharding avoids)",
        "use rollout.backend=hf with train.fsdp",
    )
