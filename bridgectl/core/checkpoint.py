"""Checkpoints for exact resume: `checkpoints/step-NNNNNN/` in the run directory.

    weights.safetensors   every trainable parameter of the model, by name, and any tensor a stage keeps outside
                          the model (BRIDGE's shadow theta_hat), prefixed `stage/<attribute path>/`
    trainer.pt            optimizer and scheduler states, step counters, RNG states (python, numpy, torch, the
                          sampling generator); tensors and plain values only, read with torch.load(weights_only=True)
    meta.json             the step, the stage index and its step, token and wall-clock counters, how many items of
                          each data stream were consumed (the stream is rebuilt from its seed and fast-forwarded)

A checkpoint is written into a temporary directory, every file fsynced, then renamed into place (and the parent
fsynced): a kill at any instant leaves the previous checkpoints and possibly a `.tmp` directory, never a partial
`step-*` directory. `train.keep_checkpoints` newest are kept.

A stage's state is found by walking its attributes, whatever the recipe: integer counters, optimizers and schedulers
(alone or as (optimizer, scheduler) pairs), dicts of tensors that are not model parameters (the shadow), and
sub-stages (interleaved's rules). Everything else (config, context, derived schedules) is rebuilt from the config.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from bridgectl.core import distributed

PREFIX = "step-"


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


# ---- stage state, found generically ---------------------------------------------------------------------------
def _is_stage(value) -> bool:
    return hasattr(value, "step") and hasattr(value, "ctx")


def stage_state(stage, model_tensors: set[int], prefix: str = "") -> tuple[dict, dict[str, torch.Tensor]]:
    """(plain state, tensors) of a stage: see the module docstring for what counts."""
    state, tensors = {}, {}
    for name, value in vars(stage).items():
        key = f"{prefix}{name}"
        if isinstance(value, bool):
            continue
        if isinstance(value, int):
            state[key] = value
        elif isinstance(value, (torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler)):
            state[key] = value.state_dict()
        elif isinstance(value, tuple) and value and all(
                isinstance(v, (torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler)) for v in value):
            state[key] = [v.state_dict() for v in value]
        elif isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
            if not any(id(v) in model_tensors for v in value.values()):  # model parameters are saved as the model
                tensors.update({f"stage/{key}/{n}": v.detach() for n, v in value.items()})
        elif isinstance(value, dict) and value and all(_is_stage(v) for v in value.values()):
            for sub_name, sub in value.items():
                sub_state, sub_tensors = stage_state(sub, model_tensors, f"{key}.{sub_name}.")
                state.update(sub_state)
                tensors.update(sub_tensors)
    return state, tensors


def _load_state_dict(item, saved: dict) -> None:
    item.load_state_dict(saved)
    if isinstance(item, torch.optim.Optimizer):
        _shard_optimizer_state(item)


def load_stage_state(stage, state: dict, tensors: dict[str, torch.Tensor], prefix: str = "") -> None:
    for name, value in vars(stage).items():
        key = f"{prefix}{name}"
        if isinstance(value, bool):
            continue
        if isinstance(value, int) and key in state:
            setattr(stage, name, state[key])
        elif isinstance(value, (torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler)) and key in state:
            _load_state_dict(value, state[key])
        elif isinstance(value, tuple) and key in state:
            for item, saved in zip(value, state[key]):
                _load_state_dict(item, saved)
        elif isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
            with torch.no_grad():
                for n, tensor in value.items():
                    saved = tensors.get(f"stage/{key}/{n}")
                    if saved is not None:  # in place: the stage's optimizer holds these very tensors
                        tensor.copy_(distributed.shard_like(saved, tensor))
        elif isinstance(value, dict) and value and all(_is_stage(v) for v in value.values()):
            for sub_name, sub in value.items():
                load_stage_state(sub, state, tensors, f"{key}.{sub_name}.")


# ---- RNG -----------------------------------------------------------------------------------------------------
def rng_state(sampling_generator: torch.Generator) -> dict:
    version, keys, gauss = random.getstate()
    numpy_state = np.random.get_state()
    state = {"python": [version, list(keys), gauss], "torch": torch.get_rng_state(),
             "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
             "sampling": sampling_generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, sampling_generator: torch.Generator) -> None:
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    sampling_generator.set_state(state["sampling"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- writing and reading -------------------------------------------------------------------------------------
def save_checkpoint(directory: Path, step: int, model, stage, sampling_generator: torch.Generator, meta: dict,
                    keep: int) -> Path:
    """Writes checkpoints/step-<step>/ atomically and keeps the `keep` newest; returns its path (None on ranks
    other than 0). Called on every rank under data parallelism: sharded tensors (train.fsdp) are gathered whole
    first, which takes every rank; rank 0 alone writes."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    plain, stage_tensors = stage_state(stage, {id(p) for p in model.parameters()})
    tensors = {f"model/{n}": distributed.full_tensor(p.detach()).contiguous().cpu() for n, p in params.items()}
    tensors.update({n: distributed.full_tensor(t).contiguous().cpu() for n, t in stage_tensors.items()})
    plain = _whole(plain)
    if not distributed.is_main():
        return None
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{PREFIX}{step:06d}"
    tmp = directory / f".{PREFIX}{step:06d}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(tensors, str(tmp / "weights.safetensors"))
    torch.save({"stage": plain, "rng": rng_state(sampling_generator)}, tmp / "trainer.pt")
    (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=2))
    for file in tmp.iterdir():
        _fsync_file(file)
    _fsync_dir(tmp)
    if final.exists():  # the same step written again after a resume: replace it
        _remove(final)
    os.rename(tmp, final)
    _fsync_dir(directory)
    for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        _remove(old)
    return final


def _whole(value):
    """`value` (optimizer state dicts and the like) with every sharded tensor gathered whole, in a fixed order."""
    if isinstance(value, dict):
        return {key: _whole(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_whole(item) for item in value)
    return distributed.full_tensor(value) if isinstance(value, torch.Tensor) else value


def _shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After load_state_dict from whole tensors: each per-parameter state tensor of a sharded parameter's shape
    (AdamW's moments) is cut back to this rank's shard, laid out as the parameter."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            if distributed.is_sharded(param):
                state = optimizer.state.get(param, {})
                for key, value in state.items():
                    if isinstance(value, torch.Tensor) and value.shape == param.shape:
                        state[key] = distributed.shard_like(value, param)


def _remove(checkpoint: Path) -> None:
    """Renamed out of the `step-*` names first (atomic), then deleted: a kill during the deletion leaves a
    temporary directory, never a `step-*` directory with files missing."""
    doomed = checkpoint.with_name(f".{checkpoint.name}.tmp-removed{os.getpid()}")
    os.rename(checkpoint, doomed)
    _fsync_dir(checkpoint.parent)
    shutil.rmtree(doomed, ignore_errors=True)


def list_checkpoints(directory: Path, remove_partial: bool = False) -> list[Path]:
    """Complete checkpoints, oldest first. Temporary directories of interrupted writes are ignored, and deleted
    with `remove_partial` (when resuming: no writer is alive then)."""
    if not directory.is_dir():
        return []
    if remove_partial:
        for partial in directory.glob(f".{PREFIX}*.tmp*"):
            shutil.rmtree(partial, ignore_errors=True)
    found = [p for p in directory.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
             and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def read_checkpoint(path: Path) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """(meta, trainer state, tensors) of one checkpoint. Nothing is unpickled beyond tensors and plain values."""
    meta = json.loads((path / "meta.json").read_text())
    trainer = torch.load(path / "trainer.pt", weights_only=True)
    tensors = load_file(str(path / "weights.safetensors"))
    return meta, trainer, tensors


def load_model_tensors(model, tensors: dict[str, torch.Tensor]) -> None:
    """Copies a checkpoint's trainable weights into the model's parameters of the same names."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            if name.startswith("model/"):
                param = params[name[len("model/"):]]
                param.copy_(distributed.shard_like(value, param))


def restore(model, stage, sampling_generator: torch.Generator, trainer: dict, tensors: dict) -> None:
    """Model parameters, the stage's optimizers, counters and extra tensors, and every RNG, as saved."""
    load_model_tensors(model, tensors)
    load_stage_state(stage, trainer["stage"], tensors)
    set_rng_state(trainer["rng"], sampling_generator)
