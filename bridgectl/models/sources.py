"""Where a config's base weights come from: the built-in tiny model (built and cached on first use), a Hub id or
local directory (model=hf), or with `model.init_from` another run's final weights, a model directory or a peft
adapter merged into its base. The core (core/model.py) is given the resulting path; it does not choose it."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from bridgectl.core.model import merge_saved_adapters
from bridgectl.core.ui import console
from bridgectl.errors import UserError
from bridgectl.models import tiny


def load_task(cfg, show_progress: bool = True):
    """The task of `cfg` (tasks.make_task), its prompts formatted with the base model's tokenizer where it has any
    (dataset tasks: the chat template); the built-in arith task needs none, so no model is touched for it."""
    from bridgectl.core.model import tokenizer_from
    from bridgectl.tasks import make_task

    if cfg.task.name == "arith":
        return make_task(cfg)
    return make_task(cfg, tokenizer_from(base_model_path(cfg.model, cfg.task, show_progress=show_progress), cfg.model))


def base_model_path(model_cfg, task_cfg, show_progress: bool = True) -> Path | str:
    """The directory (or Hub id) the base model and tokenizer load from: with `model.init_from`, the weights it
    names (init_model_dir), else the model itself."""
    if model_cfg.get("init_from"):
        return init_model_dir(str(model_cfg.init_from), show_progress=show_progress)
    if model_cfg.name == "tiny":
        return tiny.base_model_dir(model_cfg, task_cfg, show_progress=show_progress)
    if model_cfg.name == "hf":
        source = str(model_cfg.name_or_path)
        looks_local = source.startswith((".", "/", "~")) or Path(source).expanduser().exists()
        if looks_local and not (Path(source).expanduser() / "config.json").exists():
            raise UserError(
                f"model directory {source} does not exist or has no config.json",
                "give a directory written by save_pretrained, or a Hub id such as Qwen/Qwen2.5-0.5B",
            )
        return Path(source).expanduser() if looks_local else source
    raise ValueError(f"unknown model '{model_cfg.name}'")


def init_model_dir(source: str, show_progress: bool = True) -> Path:
    """A full model directory with the weights `model.init_from` names, so a run can start where another ended
    (SFT in one run, RL in the next). `source` is a bridgectl run directory (its checkpoints/final), a model
    directory (config.json) or a peft adapter directory (adapter_config.json, over its base_model_name_or_path).
    Full weights are used where they lie; adapters are merged into their base once, into
    `$BRIDGECTL_CACHE/init-<hash>` (keyed by the adapter files' paths, sizes and times), in the base's own dtype."""
    path = Path(source).expanduser()
    if (path / "config.yaml").is_file():  # a bridgectl run
        from bridgectl.config.saved import load_run_config  # Hydra loads only when a run is given

        final = path / "checkpoints" / "final"
        if not final.is_dir():
            raise UserError(
                f"model.init_from: run {path} has no checkpoints/final",
                "give a completed run (or one of its model or adapter directories)",
            )
        from bridgectl.core.checkpoint import check_final

        try:
            check_final(final)  # the weights the new run starts from, against their manifest
        except UserError as error:
            raise UserError(f"model.init_from: {error.message}", error.hint) from None
        if (final / "config.json").is_file():
            return final
        run_cfg = load_run_config(path / "config.yaml")
        return _merged_into_cache(final, base_model_path(run_cfg.model, run_cfg.task, show_progress), show_progress)
    if (path / "config.json").is_file():
        return path
    if (path / "adapter_config.json").is_file():
        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise UserError(
                f"model.init_from: adapter {path} does not name its base model",
                "its adapter_config.json needs base_model_name_or_path",
            )
        return _merged_into_cache(path, base, show_progress)
    raise UserError(
        f"model.init_from: {source} is not a run, model or adapter directory",
        "give a run directory (config.yaml), a model directory (config.json) or a peft adapter "
        "directory (adapter_config.json)",
    )


def _merged_into_cache(adapter_dir: Path, base: Path | str, show_progress: bool) -> Path:
    adapter_dir = adapter_dir.resolve()
    stamp = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(adapter_dir.rglob("*")) if p.is_file()]
    key = hashlib.sha256(repr((str(base), stamp)).encode()).hexdigest()[:16]
    cached = tiny.cache_root() / f"init-{key}"
    if (cached / "config.json").is_file():
        return cached
    if show_progress:
        console.print(f"model.init_from: merging the adapters of {adapter_dir} into {base}, once, into {cached}")
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype="auto", use_safetensors=True)
    except (OSError, ValueError) as error:
        raise UserError(
            f"model.init_from: could not load the base model {base} of {adapter_dir}: {error}",
            "the base must be a local directory or a model already in the Hugging Face cache",
        ) from None
    merged = merge_saved_adapters(model, adapter_dir)
    tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
    merged.save_pretrained(tmp, safe_serialization=True)
    tokenizer_source = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base
    AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(tmp)
    tmp.rename(cached)  # atomic: a killed merge never leaves a half-written entry
    return cached
