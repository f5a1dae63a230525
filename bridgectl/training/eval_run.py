"""`bridgectl eval RUN_DIR|MODEL [OVERRIDES]`: greedy pass@1 and, with `eval.k`, sampled pass@k, maj@k and mean@n of
a trained run (its `checkpoints/final`) or of any model, on every evaluation split of the task; with
`task.reward_funcs`, also the training reward and each function's mean on the greedy answers (accuracy stays the
verifier's verdict).

A run directory is evaluated with its own resolved config (config.yaml) plus the overrides, so a run trained on one
set can be scored on others (`task.eval_sets={math500: ..., gsm8k: ...}`, `eval.n=500`, `eval.k=8`). A model path
or Hub id is evaluated as `model=hf model.name_or_path=MODEL` with the overrides. Results are printed and written
as JSON: `<run>/eval-<time>.json`, or `--output FILE`. With `rollout.backend=vllm` (a run trained with it keeps
it; override with rollout.backend=hf) a vLLM engine decodes, given the evaluated weights.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import torch
from omegaconf import DictConfig

from bridgectl.config.compose import apply_overrides, compose, validate
from bridgectl.config.saved import load_run_config
from bridgectl.core.end_tokens import EndTokens, end_tokens_of
from bridgectl.core.evaluate import Decode, model_decoder
from bridgectl.errors import UserError
from bridgectl.rundir.redaction import redact


def config_for(target: str, overrides: list[str], need_final: bool = True) -> tuple[DictConfig, Path | None]:
    """(config, final checkpoint directory, or None for a model) for a run directory or a model."""
    run_dir = Path(target)
    if (run_dir / "config.yaml").is_file():
        checkpoint = run_dir / "checkpoints" / "final"
        if need_final and not checkpoint.is_dir():
            raise UserError(f"run {run_dir} has no checkpoints/final", "only completed runs can be evaluated")
        if need_final:
            from bridgectl.core.checkpoint import check_final

            check_final(checkpoint)
        cfg = load_run_config(run_dir / "config.yaml")
        apply_overrides(cfg, overrides)
        validate(cfg)
        return cfg, checkpoint
    if run_dir.exists() and not (run_dir / "config.json").is_file():
        raise UserError(
            f"{target} is neither a run directory (config.yaml) nor a model directory (config.json)",
            "give a run directory made by bridgectl run, or a model directory / Hub id",
        )
    return compose(["model=hf", f"model.name_or_path={target}", *overrides]), None


def load_for_eval(cfg: DictConfig, checkpoint: Path | None, device: torch.device):
    """(model, tokenizer) in eval mode: a run's final weights (adapters merged into their base) or the plain model."""
    from bridgectl.core.model import causal_lm_from, load_policy, merge_saved_adapters, tokenizer_from
    from bridgectl.models.sources import base_model_path

    if checkpoint is None:
        policy = load_policy(
            cfg.model, cfg.lora, base_model_path(cfg.model, cfg.task), device, keep_reference=False, finetune="full"
        )
        return policy.model.eval(), policy.tokenizer
    tokenizer = tokenizer_from(checkpoint, cfg.model)
    if (checkpoint / "config.json").is_file():  # full weights (adapters already merged when there were any)
        model = causal_lm_from(checkpoint, cfg.model, device)
    else:  # adapters over the unchanged base: every saved adapter (BRIDGE's w sits in a subdirectory), merged
        base = causal_lm_from(base_model_path(cfg.model, cfg.task, show_progress=False), cfg.model, device)
        model = merge_saved_adapters(base, checkpoint)
    return model.to(device).eval(), tokenizer


def end_tokens_for(cfg: DictConfig, model, tokenizer) -> EndTokens:
    """The end tokens of a loaded model as training finds them (core/model.load_policy): the tokenizer's EOS, the
    model's generation config's, and the chat template's turn end when the task's prompts use the template."""
    from bridgectl.tasks.prompts import prompts_use_chat_template

    return end_tokens_of(tokenizer, getattr(model, "generation_config", None), prompts_use_chat_template(cfg.task))


def decoder_for(cfg: DictConfig, model, tokenizer) -> Decode:
    """What decodes the evaluation: the model itself, or with rollout.backend=vllm the process's vLLM engine given
    the model's weights; either stops a row at any of the model's end tokens (end_tokens_for)."""
    end_tokens = end_tokens_for(cfg, model, tokenizer)
    if cfg.rollout.backend != "vllm":
        return model_decoder(model, tokenizer, end_tokens.ids, cfg.rollout.cpu_packed_weights)
    from bridgectl.core.model import Policy
    from bridgectl.core.vllm_rollout import engine_for
    from bridgectl.models.sources import base_model_path

    policy = Policy(model=model, tokenizer=tokenizer, end_tokens=end_tokens)
    return engine_for(base_model_path(cfg.model, cfg.task, show_progress=False), cfg, policy).decoder(policy)


def evaluate(cfg: DictConfig, decode: Decode, task, device: torch.device, show_progress: bool = True) -> dict:
    """{split: {n, greedy_pass@1, mean_length, and with eval.k: pass@j, maj@j, mean@n, k, samples, temperature;
    per_problem: which problems were answered right (core/evaluate.problem_records)}} for every evaluation split.
    The samples are drawn from a generator seeded by `seed`, so the same command gives the same numbers."""
    from bridgectl.core.evaluate import evaluate_problems, problem_records
    from bridgectl.core.ui import progress_bar

    results = {}
    splits = task.eval_splits
    with progress_bar(enabled=show_progress) as progress:
        bar = progress.add_task("evaluating", total=len(splits), info="")
        for split in splits:
            problems = task.eval_problems(split, cfg.eval.n)
            greedy = evaluate_problems(decode, problems, task, cfg.eval, device, sample_seed=cfg.seed)
            row = {"n": greedy.n, "greedy_pass@1": greedy.accuracy, "mean_length": greedy.mean_length}
            if cfg.task.reward_funcs:  # the training reward's parts on the greedy answers
                total, means, _ = task.step_reward(problems, greedy.completions)
                row.update({"reward_mean": sum(total) / len(total), **{f"rewards/{k}": v for k, v in means.items()}})
            if greedy.sampled is not None:
                row.update(greedy.sampled.metrics())
                row.update(k=cfg.eval.k, samples=greedy.sampled.n_samples, temperature=cfg.eval.temperature)
            row["per_problem"] = {
                key: value for key, value in problem_records({split: greedy})[0].items() if key != "split"
            }
            results[split] = row
            progress.update(bar, advance=1, info=split)
    return results


def evaluate_training_checkpoint(cfg: DictConfig, path: Path, show_progress: bool = True) -> dict:
    """Evaluates a resumable checkpoint (checkpoints/step-NNNNNN) of a run: the policy is rebuilt as the run built
    it (stages up to the checkpoint's, since stages may add adapters such as BRIDGE's w) and the checkpoint's
    trainable weights are loaded into it."""
    from bridgectl.config.compose import stage_budgets
    from bridgectl.core.checkpoint import load_model_tensors, read_named_checkpoint
    from bridgectl.core.evaluate import decoding
    from bridgectl.stages import build_stage
    from bridgectl.training.setup import build_context

    meta, _, tensors = read_named_checkpoint(path)
    ctx = build_context(cfg, show_progress=show_progress)
    for index, (kind, budget) in enumerate(zip(cfg.recipe.stages, stage_budgets(cfg))):
        if index <= meta["stage_index"]:
            build_stage(kind, ctx, budget)
    load_model_tensors(ctx.policy.model, tensors)
    with decoding(ctx) as decode:
        return evaluate(cfg, decode, ctx.task, ctx.device, show_progress=show_progress)


def check_output(output: Path | None, default_directory: Path) -> None:
    """Raises UserError unless the results can be written: to `output` (a file name, its directory writable) or,
    without it, into `default_directory` (the run's directory, or the current one for a model)."""
    from bridgectl.rundir.paths import writable_directory

    if output is not None and output.is_dir():
        raise UserError(f"--output {output} is a directory", "give --output a file name, e.g. --output eval.json")
    writable_directory(output.parent if output is not None else default_directory, "--output")


def run_eval(
    target: str,
    overrides: list[str],
    output: Path | None,
    show_progress: bool = True,
    checkpoint_name: str | None = None,
) -> tuple[dict, Path]:
    """Evaluates and writes the JSON; returns (results, where they were written). `checkpoint_name`: a resumable
    checkpoint of the run (e.g. step-000050) instead of its final weights."""
    from bridgectl.core.checkpoint import list_checkpoints
    from bridgectl.core.context import pick_device, seed_everything
    from bridgectl.models.sources import load_task

    cfg, checkpoint = config_for(target, overrides, need_final=checkpoint_name is None)
    check_output(output, Path(target) if checkpoint is not None else Path.cwd())  # before minutes of decoding
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.seed)
    device = pick_device(cfg.train.device)
    if cfg.rollout.backend == "vllm":
        from bridgectl.core.vllm_rollout import check_usable

        check_usable(device)  # before any weights load
    if checkpoint_name is not None:
        found = {p.name: p for p in list_checkpoints(Path(target) / "checkpoints")}
        if checkpoint is None or checkpoint_name not in found:
            raise UserError(
                f"{target} has no checkpoint {checkpoint_name}",
                f"its checkpoints: {', '.join(found) or 'none'} (give a run directory and one of them)",
            )
        results = evaluate_training_checkpoint(cfg, found[checkpoint_name], show_progress)
    else:
        task = load_task(cfg, show_progress=show_progress)
        model, tokenizer = load_for_eval(cfg, checkpoint, device)
        results = evaluate(cfg, decoder_for(cfg, model, tokenizer), task, device, show_progress=show_progress)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = output or (Path(target) / f"eval-{stamp}.json" if checkpoint is not None else Path(f"eval-{stamp}.json"))
    record = {
        "target": str(target),
        "checkpoint": checkpoint_name or "final",
        "overrides": overrides,
        "task": cfg.task.name,
        "model": cfg.model.name,
        "eval": {
            "n": cfg.eval.n,
            "k": cfg.eval.k,
            "samples": cfg.eval.samples or cfg.eval.k,
            "temperature": cfg.eval.temperature,
            "max_new_tokens": cfg.eval.max_new_tokens,
        },
        "results": results,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(redact(record), indent=2) + "\n")  # the overrides may hold a secret
    return results, path
