"""`bridgectl export RUN_DIR --out DIR`: a run's weights as a standalone Hugging Face model directory that plain
`transformers` loads (AutoModelForCausalLM / AutoTokenizer.from_pretrained(DIR), no bridgectl needed), or with
`--adapter-only` as one peft LoRA adapter over the run's base; optionally uploaded with `--push-to-hub REPO`.

What is written (safetensors only):
  merged (default)   config.json, model.safetensors with every adapter folded in (LoRA under model.finetune=lora,
                     BRIDGE's upper-level w, and theta itself under bridge.lower=lora), generation_config.json, the
                     tokenizer (chat template included when it has one; left padding), README.md (model card)
  --adapter-only     adapter_config.json, adapter_model.safetensors, the tokenizer, README.md
The weights are the run's `checkpoints/final`, or with `--checkpoint step-NNNNNN` one of its resumable checkpoints,
put together exactly as `bridgectl eval` (and `eval --checkpoint`) puts them together (evaluation.load_for_eval,
evaluation.rebuilt_policy), in the dtype it evaluates in on this machine (`model.dtype`; auto: float32 on the CPU,
bfloat16 on CUDA), so greedy decoding of the export gives the answers `bridgectl eval` scored. Runs whose adapters
are decoded unmerged (`lora.sampling`) match it to float rounding only.

--adapter-only needs weights that are adapters over the unchanged base: model.finetune=lora runs, and BRIDGE with
bridge.lower=lora, whose two adapters (theta, rank r1, and w, rank r2) become one adapter of rank r1 + r2 by
stacking: s1 B1 A1 + s2 B2 A2 = [s1 B1 | s2 B2] [A1; A2], written with lora_alpha = r (scale 1); exact, not an
approximation. Runs that trained the base weights (model.finetune=full, bridge.lower=full) have no such form and
exit 2. The adapter names its base by the path or Hub id the run trained from (models/sources.base_model_path): for the
built-in tiny model that is a directory of this installation, so only the merged export stands alone there.

The output directory is written under a temporary name and renamed into place: an interrupted export leaves no
half-written DIR. An existing non-empty DIR is never overwritten.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from bridgectl.errors import UserError


def export_run(
    run_dir: Path,
    out: Path,
    checkpoint_name: str | None = None,
    adapter_only: bool = False,
    push_to_hub: str | None = None,
) -> str:
    """Writes the export of `run_dir` into `out` (and uploads it with `push_to_hub`); returns what was written, in
    words. Every check that can fail runs before any weights load."""
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.yaml)", "give a directory made by bridgectl run")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(
            f"{out} already exists and is not empty", "give a new or empty --out directory; nothing is overwritten"
        )
    from bridgectl.rundir.paths import writable_directory

    writable_directory(out.parent, "--out")  # before the weights are merged, not after
    source = weights_source(run_dir, checkpoint_name)
    cfg = run_config(run_dir)
    if push_to_hub:
        check_hub(push_to_hub)
    from transformers.utils import logging as hf_logging

    from bridgectl.core.context import pick_device

    hf_logging.disable_progress_bar()  # our own messages are the only ones, as in training
    device = pick_device(cfg.train.device)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)  # left by an export of this process id that was killed
    staging.mkdir()
    try:
        if adapter_only:
            what = write_adapter(cfg, run_dir, source, checkpoint_name, device, staging)
        else:
            what = write_merged(cfg, source, checkpoint_name, device, staging)
        (staging / "README.md").write_text(model_card(cfg, run_dir, checkpoint_name, adapter_only, what))
        if out.exists():
            out.rmdir()  # empty (checked above); rename needs the name free
        os.rename(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if push_to_hub:
        upload(out, push_to_hub, run_dir)
        what += f"; uploaded to {push_to_hub}"
    return what


# ---- checks -----------------------------------------------------------------------------------------------------
def run_config(run_dir: Path):
    """The run's resolved config (config.yaml), checked."""
    from bridgectl.config.compose import validate
    from bridgectl.config.saved import load_run_config

    cfg = load_run_config(run_dir / "config.yaml")
    validate(cfg)
    return cfg


def weights_source(run_dir: Path, checkpoint_name: str | None) -> Path:
    """checkpoints/final, or the resumable checkpoint named `checkpoint_name`."""
    from bridgectl.core.checkpoint import check_final, list_checkpoints

    if checkpoint_name is None:
        final = run_dir / "checkpoints" / "final"
        if not final.is_dir():
            raise UserError(
                f"run {run_dir} has no checkpoints/final",
                "only completed runs have final weights; "
                "export one of its resumable checkpoints with --checkpoint step-NNNNNN",
            )
        check_final(final)  # against its manifest, before anything loads
        return final
    found = {p.name: p for p in list_checkpoints(run_dir / "checkpoints")}
    if checkpoint_name not in found:
        raise UserError(
            f"{run_dir} has no checkpoint {checkpoint_name}", f"its checkpoints: {', '.join(found) or 'none'}"
        )
    return found[checkpoint_name]


def check_hub(repo: str) -> None:
    """Before anything is written: a valid repo id, the Hub reachable in principle (not offline) and a token."""
    import huggingface_hub
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo)
    except ValueError as error:
        raise UserError(
            f"--push-to-hub: '{repo}' is not a Hub repo id: {error}", "e.g. --push-to-hub user/name"
        ) from None
    if huggingface_hub.is_offline_mode():
        raise UserError(
            "--push-to-hub needs the network, and HF_HUB_OFFLINE is set",
            "unset HF_HUB_OFFLINE, or export without --push-to-hub and upload later with `hf upload REPO DIR`",
        )
    if not huggingface_hub.get_token():
        raise UserError(
            "--push-to-hub needs a Hugging Face token, and none is set", "run `hf auth login` or set HF_TOKEN"
        )


# ---- merged model -----------------------------------------------------------------------------------------------
def write_merged(cfg, source: Path, checkpoint_name: str | None, device, staging: Path) -> str:
    """The run's weights with every adapter folded in, as one plain causal LM, plus tokenizer and generation
    config."""
    if checkpoint_name is None:
        from bridgectl.training.eval_run import end_tokens_for, load_for_eval

        model, tokenizer = load_for_eval(cfg, source, device)
        end_tokens, state_dict = end_tokens_for(cfg, model, tokenizer), None
    else:
        from bridgectl.core.model import merged_state_dict

        policy = rebuilt_policy(cfg, source)
        tokenizer, end_tokens = policy.tokenizer, policy.end_tokens
        if policy.has_adapters:  # active adapters folded in, as `decoding` merges them for eval --checkpoint
            state_dict = merged_state_dict(policy.model, policy.model.state_dict())
            model = policy.model.get_base_model()
        else:
            model, state_dict = policy.model, None
    config = model.generation_config
    # decoding the export with generate()'s defaults runs as long as `bridgectl eval` does and pads like it
    config.max_new_tokens = int(cfg.eval.max_new_tokens)
    config.pad_token_id = tokenizer.pad_token_id
    # and stops where training and `bridgectl eval` stop: at any of the end tokens (core/end_tokens), which for a
    # base model prompted through a chat template include a turn end its own config does not list
    config.eos_token_id = generation_eos(end_tokens.ids)
    given = {"state_dict": state_dict} if state_dict is not None else {}
    model.save_pretrained(staging, safe_serialization=True, **given)
    tokenizer.save_pretrained(staging)
    return f"merged model of {checkpoint_name or 'the final weights'}"


def generation_eos(end_ids: tuple[int, ...]) -> int | list[int] | None:
    """A generation config's eos_token_id for these end ids: the id itself when there is one (as configs write a
    single one), the list when there are several, None when there are none."""
    return (end_ids[0] if len(end_ids) == 1 else list(end_ids)) if end_ids else None


def rebuilt_policy(cfg, checkpoint: Path):
    """The policy as `bridgectl eval --checkpoint` rebuilds it: the run's stages up to the checkpoint's built (a
    stage may add adapters, such as BRIDGE's w), then the checkpoint's trainable weights loaded."""
    from bridgectl.config.compose import stage_budgets
    from bridgectl.core.checkpoint import load_model_tensors, read_named_checkpoint
    from bridgectl.stages import build_stage
    from bridgectl.training.setup import build_context

    meta, _, tensors = read_named_checkpoint(checkpoint)
    cfg = cfg.copy()
    cfg.rollout.backend = "hf"  # the weights do not depend on what decodes; no vLLM engine is started for them
    ctx = build_context(cfg, show_progress=False)
    for index, (kind, budget) in enumerate(zip(cfg.recipe.stages, stage_budgets(cfg))):
        if index <= meta["stage_index"]:
            build_stage(kind, ctx, budget)
    load_model_tensors(ctx.policy.model, tensors)
    return ctx.policy


# ---- one adapter ------------------------------------------------------------------------------------------------
def write_adapter(cfg, run_dir: Path, source: Path, checkpoint_name: str | None, device, staging: Path) -> str:
    """One peft LoRA adapter equal to all of the run's adapters together, over the base it trained from."""
    from bridgectl.core.model import adapter_of, tokenizer_from
    from bridgectl.models.sources import base_model_path

    refusal = UserError(
        f"run {run_dir} trained the base weights themselves (model.finetune=full or "
        "bridge.lower=full): they are no adapter over an unchanged base",
        "export the merged model (drop --adapter-only)",
    )
    if checkpoint_name is None:
        if (source / "config.json").is_file():  # save_policy writes full weights exactly when the base trained
            raise refusal
        adapter_dir, tokenizer = source, tokenizer_from(source, cfg.model)
    else:
        policy = rebuilt_policy(cfg, source)
        if not policy.has_adapters or any(
            p.requires_grad for n, p in policy.model.named_parameters() if adapter_of(n) is None
        ):
            raise refusal
        adapter_dir = staging / ".adapters"
        policy.model.save_pretrained(adapter_dir, safe_serialization=True)  # the default adapter, others in subdirs
        tokenizer = policy.tokenizer
    config, tensors = stacked_adapter(adapter_dir)
    shutil.rmtree(staging / ".adapters", ignore_errors=True)
    base = base_model_path(cfg.model, cfg.task, show_progress=False)
    config["base_model_name_or_path"] = str(Path(base).resolve()) if isinstance(base, Path) else base
    from safetensors.torch import save_file

    save_file(tensors, str(staging / "adapter_model.safetensors"), metadata={"format": "pt"})
    (staging / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save_pretrained(staging)
    return f"LoRA adapter (rank {config['r']}) of {checkpoint_name or 'the final weights'}"


def stacked_adapter(adapter_dir: Path) -> tuple[dict, dict]:
    """(adapter_config, tensors) of one LoRA adapter computing what every adapter saved at `adapter_dir` (there and
    in subdirectories) computes together. One adapter is returned as it is; several are stacked along the rank:
    A = [A1; A2; ...], B = [s1 B1 | s2 B2 | ...] with s_i = alpha_i / r_i, and lora_alpha = r so the scale is 1."""
    import torch
    from safetensors.torch import load_file

    dirs = [adapter_dir] + sorted(p for p in adapter_dir.iterdir() if (p / "adapter_config.json").is_file())
    configs = [json.loads((d / "adapter_config.json").read_text()) for d in dirs]
    tensors = [load_file(str(d / "adapter_model.safetensors")) for d in dirs]
    if len(dirs) == 1:
        return configs[0], tensors[0]
    for directory, config, weights in zip(dirs, configs, tensors):
        plain = (
            config.get("peft_type") == "LORA"
            and not config.get("use_dora")
            and not config.get("use_rslora")
            and not config.get("rank_pattern")
            and not config.get("alpha_pattern")
            and not config.get("modules_to_save")
            and config.get("bias", "none") == "none"
            and not config.get("lora_bias")
            and set(weights) == set(tensors[0])
        )
        if not plain:
            raise UserError(
                f"the adapters of {adapter_dir} cannot be written as one LoRA adapter ({directory.name} "
                "differs in kind, layers, or per-module ranks)",
                "export the merged model (drop --adapter-only)",
            )
    scales = [c["lora_alpha"] / c["r"] for c in configs]
    stacked = {}
    for key in tensors[0]:
        if ".lora_A." in key:
            stacked[key] = torch.cat([t[key] for t in tensors], dim=0)
        else:  # lora_B: [out, r_i] blocks side by side, each carrying its own scale
            stacked[key] = torch.cat([t[key] * scale for t, scale in zip(tensors, scales)], dim=1)
    rank = sum(c["r"] for c in configs)
    return {**configs[0], "r": rank, "lora_alpha": rank}, stacked


# ---- model card and upload --------------------------------------------------------------------------------------
def model_card(cfg, run_dir: Path, checkpoint_name: str | None, adapter_only: bool, what: str) -> str:
    """README.md: recipe, base model, steps and greedy accuracies (summary.json; for a checkpoint, the evaluation
    logged at its step in metrics.jsonl, if one was)."""
    from bridgectl.models.sources import base_model_path

    summary = _read_json(run_dir / "summary.json") or {}
    base = cfg.model.name_or_path if cfg.model.name == "hf" else "bridgectl's built-in tiny Llama (model=tiny)"
    hub_base = cfg.model.name == "hf" and not Path(str(cfg.model.name_or_path)).expanduser().exists()
    front = ["---", f"library_name: {'peft' if adapter_only else 'transformers'}"]
    if hub_base and not cfg.model.init_from:
        front.append(f"base_model: {cfg.model.name_or_path}")
    front += ["tags:", "- bridgectl", f"- {cfg.recipe.name}", "---", ""]
    lines = [
        f"# {run_dir.name}",
        "",
        f"Exported by `bridgectl export` from the run `{run_dir.name}`: {what}.",
        "",
        f"- recipe: `{cfg.recipe.name}` (stages {', '.join(cfg.recipe.stages)}), task `{cfg.task.name}`, "
        f"seed {cfg.seed}",
        f"- base model: {base}",
    ]
    if cfg.model.init_from:
        lines.append(f"- initialised from: {cfg.model.init_from}")
    if adapter_only:
        lines.append(f"- adapter over: `{base_model_path(cfg.model, cfg.task, show_progress=False)}`")
    if checkpoint_name is None:
        lines.append(
            f"- steps: {summary.get('steps', cfg.train.max_steps)} (final weights, status "
            f"{summary.get('status', 'unknown')})"
        )
        accuracy = {split: row["accuracy"] for split, row in summary.get("eval", {}).items()}
        initial = {split: row["accuracy"] for split, row in summary.get("eval_initial", {}).items()}
    else:
        step = int(checkpoint_name.split("-")[-1])
        lines.append(
            f"- steps: {step} (resumable checkpoint {checkpoint_name} of a run of "
            f"{summary.get('steps', cfg.train.max_steps)})"
        )
        logged = _metrics_at(run_dir / "metrics.jsonl", step)
        accuracy = {
            key.split("/")[1]: value
            for key, value in logged.items()
            if key.startswith("eval/") and key.endswith("/accuracy")
        }
        initial = {}
    if accuracy:
        lines += [
            "",
            f"Greedy pass@1 (`eval.n={cfg.eval.n}` problems per split, up to "
            f"{cfg.eval.max_new_tokens} new tokens), as the run evaluated it:",
            "",
            "| split | before training | these weights |",
            "|---|---|---|",
        ]
        lines += [
            f"| {split} | {_percent(initial.get(split))} | {_percent(value)} |" for split, value in accuracy.items()
        ]
    loader = (
        "from peft import AutoPeftModelForCausalLM\nmodel = AutoPeftModelForCausalLM.from_pretrained(DIR)"
        if adapter_only
        else "from transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained(DIR)"
    )
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoTokenizer",
        loader,
        "tokenizer = AutoTokenizer.from_pretrained(DIR)",
        "inputs = tokenizer([prompt], return_tensors='pt', padding=True)",
        f"output = model.generate(**inputs, do_sample=False, max_new_tokens={cfg.eval.max_new_tokens})"
        "  # greedy, as bridgectl eval decodes",
        "```",
        "",
        "Prompts are formatted as in training: the task's prompt template, inside the tokenizer's chat "
        "template when it has one.",
        "",
    ]
    return "\n".join(front + lines)


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _metrics_at(path: Path, step: int) -> dict:
    """The last metrics.jsonl row of `step` that has an evaluation, or {}."""
    found = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("step") == step and any(key.startswith("eval/") for key in row):
                found = row
    return found


def upload(out: Path, repo: str, run_dir: Path) -> None:
    """Creates the model repo `repo` if it does not exist and uploads `out` to it in one commit."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    failures: tuple = (HfHubHTTPError, OSError, ValueError)
    try:
        import httpx  # huggingface_hub's HTTP client: its connection errors are not OSErrors

        failures += (httpx.HTTPError,)
    except ImportError:
        pass
    api = HfApi()
    try:
        api.create_repo(repo, repo_type="model", exist_ok=True)
        api.upload_folder(
            repo_id=repo, folder_path=str(out), repo_type="model", commit_message=f"bridgectl export of {run_dir.name}"
        )
    except failures as error:
        raise UserError(
            f"upload of {out} to {repo} failed: {type(error).__name__}: {error}",
            f"the export in {out} is complete; check the network and token, then upload it with "
            f"`hf upload {repo} {out}`",
        ) from None
