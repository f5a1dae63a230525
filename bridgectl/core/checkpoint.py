"""Checkpoints for exact resume: `checkpoints/step-NNNNNN/` in the run directory.

    weights.safetensors   every trainable parameter of the model, by name (`model/<name>`), and the tensors of the
                          stage's own state (BRIDGE's shadow theta_hat) as `stage/<key>/<name>` (see below)
    trainer.pt            the stage's optimizer and scheduler states and the rest of its state (step counters,
                          relift's buffer), RNG states (python, numpy, torch, the sampling generator); tensors and
                          plain values only, read with torch.load(weights_only=True)
    meta.json             the step, the stage index and its step, token and wall-clock counters, how many items of
                          each data stream were consumed (the stream is rebuilt from its seed and fast-forwarded),
                          the size of each log of the run directory then (what a resumed run cuts them back to)
    manifest.json         the size and sha256 of each file above, written last (checkpoints/final, the weights
                          written once a run completes, carries one too: check_final)

A checkpoint is written into a temporary directory, every file fsynced, then renamed into place (and the parent
fsynced): a kill at any instant leaves the previous checkpoints and possibly a `.tmp` directory, never a partial
`step-*` directory. A write that fails (a full disk) removes its temporary directory and raises, the previous
checkpoints untouched. `train.keep_checkpoints` newest are kept (the one of a run's last step, written before its
final evaluation, does not count and goes once the run completes).

read_checkpoint checks every file against the manifest before loading any, and raises CheckpointError naming what is
wrong (a file missing, of another size, with another checksum, or that does not load); a resumed run then falls
back to the previous checkpoint (runner.py). A checkpoint written before manifests existed (its meta.json has no
"format") is loaded unchecked, as before; one whose meta.json says it has a manifest and lacks it is damaged.

A stage's state is what it declares through the Checkpointable protocol (below; bridgectl/stages/base.py states the
whole contract of a stage and implements it), in two parts:
  - its optimizers and schedulers: what its `optimizers()` returns, each by the name its state is saved under
    (`optimizer`, `sft_scheduler`, a sub-stage's `rules.rl.optimizer`: the names the stages' attributes had when
    checkpoints found them by type, kept as the format). Each is restored sharded like its parameters under
    train.fsdp; anything else declared is refused (TypeError). A stage without optimizers() owns none;
  - everything else it keeps from one step to the next: what its `state_dict()` returns (plain Python values and
    tensors: step counters, relift's buffer, BRIDGE's shadow theta_hat), handed back to its
    `load_state_dict(state)`. A stage without state_dict() keeps none; a checkpoint holding state for a stage
    without load_state_dict is refused (TypeError).
Everything else (the config, the context, the parameters, schedules derived from the config, the stage's budget)
is rebuilt from the config when the stage is built. tests/test_stage_state.py builds every registered stage, takes
steps, restores a fresh stage from a checkpoint of it and compares every attribute of the two, so state kept outside
state_dict fails there instead of being dropped (and tests/test_stage_contract.py that every optimizer a stage
holds is declared).

trainer.pt holds the stage as {"optimizers": {name: state_dict}, "state": the stage's state_dict}, except that each
value of the state_dict that is a dict of tensors (the shadow) goes to weights.safetensors as
`stage/<key>/<name>` and is put back in the state before load_state_dict. A checkpoint written before stage state
was declared (one flat dict of attribute path -> counter, optimizer or scheduler state, or (optimizer, scheduler)
pair; tensors as now) is read into that form first (_legacy_stage).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from bridgectl.core import distributed
from bridgectl.errors import UserError

PREFIX = "step-"
FORMAT = 2
"""meta.json's "format": 2 has manifest.json; checkpoints without the key were written before it existed."""
MANIFEST = "manifest.json"


class CheckpointError(Exception):
    """A checkpoint that cannot be loaded: a file missing or damaged (the message names the checkpoint and file)."""


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


# ---- stage state ----------------------------------------------------------------------------------------------
_OPTIMIZING = (torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler)

_RENAMED_PAIRS = {  # (optimizer, scheduler) pairs of legacy checkpoints -> the attributes they became
    "rl_opt": ("optimizer", "scheduler"),
    "sft_opt": ("sft_optimizer", "sft_scheduler"),  # relift
    "lower_opt": ("lower_optimizer", "lower_scheduler"),
    "upper_opt": ("upper_optimizer", "upper_scheduler"),
    "shadow_opt": ("shadow_optimizer", "shadow_scheduler"),  # bridge
}


class Checkpointable(Protocol):
    """What checkpoints read of a stage (bridgectl/stages/base.Stage implements it; the core cannot import the
    stages, so it is stated here by shape). Each method may be missing: no optimizers, no state."""

    def optimizers(self) -> dict[str, torch.optim.Optimizer | torch.optim.lr_scheduler.LRScheduler]:
        """Every optimizer and LR scheduler of the stage, by the name its state is saved under."""

    def state_dict(self) -> dict:
        """The stage's state besides parameters, optimizers and schedulers: plain values and tensors."""

    def load_state_dict(self, state: dict) -> None:
        """Restores what state_dict returned."""


def _is_tensor_dict(value) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def stage_optimizers(stage: Checkpointable) -> dict:
    """Every optimizer and scheduler `stage` declares (its optimizers()), by the name its state is saved under;
    TypeError for anything else declared."""
    declared = stage.optimizers() if hasattr(stage, "optimizers") else {}
    for name, item in declared.items():
        if not isinstance(item, _OPTIMIZING):
            raise TypeError(
                f"{type(stage).__name__}.optimizers()['{name}'] is a {type(item).__name__}: declare each "
                "optimizer and scheduler under a name of its own"
            )
    return declared


def stage_state(stage: Checkpointable) -> tuple[dict, dict[str, torch.Tensor]]:
    """(trainer.pt's entry, weights.safetensors' `stage/...` tensors) of `stage`: see the module docstring."""
    state = stage.state_dict() if hasattr(stage, "state_dict") else {}
    plain = {key: value for key, value in state.items() if not _is_tensor_dict(value)}
    tensors = {
        f"stage/{key}/{name}": tensor.detach()
        for key, value in state.items()
        if _is_tensor_dict(value)
        for name, tensor in value.items()
    }
    optimizers = {name: item.state_dict() for name, item in stage_optimizers(stage).items()}
    return {"optimizers": optimizers, "state": plain}, tensors


def _legacy_stage(saved: dict) -> dict:
    """A stage entry of a checkpoint written before stage state was declared, in today's form: counters (`updates`,
    a sub-stage's `rules.rl.updates`) become the state, nested by their dotted path, and optimizer and scheduler
    states keep their path (pairs split into the attributes they became)."""
    optimizers, state = {}, {}
    for path, value in saved.items():
        if isinstance(value, list):
            optimizers.update(zip(_RENAMED_PAIRS[path], value))
        elif isinstance(value, dict):
            optimizers[path] = value
        else:
            *parents, name = path.split(".")
            holder = state
            for parent in parents:
                holder = holder.setdefault(parent, {})
            holder[name] = value
    return {"optimizers": optimizers, "state": state}


def load_stage_state(stage: Checkpointable, saved: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Restores what stage_state saved: the optimizers and schedulers (those the checkpoint has), then the stage's
    own state through its load_state_dict."""
    if set(saved) != {"optimizers", "state"}:
        saved = _legacy_stage(saved)
    for name, item in stage_optimizers(stage).items():
        if name in saved["optimizers"]:
            item.load_state_dict(saved["optimizers"][name])
            if isinstance(item, torch.optim.Optimizer):
                _shard_optimizer_state(item)
    state = dict(saved["state"])
    for key, tensor in tensors.items():
        if key.startswith("stage/"):
            group, name = key[len("stage/") :].split("/", 1)
            state.setdefault(group, {})[name] = tensor
    if hasattr(stage, "load_state_dict"):
        stage.load_state_dict(state)
    elif state:
        raise TypeError(
            f"the checkpoint holds state ({', '.join(sorted(state))}) for the {type(stage).__name__}, "
            "which has no load_state_dict to take it"
        )


# ---- RNG -----------------------------------------------------------------------------------------------------
def rng_state(sampling_generator: torch.Generator) -> dict:
    version, keys, gauss = random.getstate()
    numpy_state = np.random.get_state()
    state = {
        "python": [version, list(keys), gauss],
        "torch": torch.get_rng_state(),
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
        "sampling": sampling_generator.get_state(),
    }
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
def save_checkpoint(
    directory: Path, step: int, model, stage, sampling_generator: torch.Generator, meta: dict, keep: int
) -> Path:
    """Writes checkpoints/step-<step>/ atomically and keeps the `keep` newest; returns its path (None on ranks
    other than 0). Called on every rank under data parallelism: sharded tensors (train.fsdp) are gathered whole
    first, which takes every rank; rank 0 alone writes."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    plain, stage_tensors = stage_state(stage)
    tensors = {f"model/{n}": distributed.full_tensor(p.detach()).contiguous().cpu() for n, p in params.items()}
    tensors.update({n: distributed.full_tensor(t).contiguous().cpu() for n, t in stage_tensors.items()})
    plain = _whole(plain)
    if not distributed.is_main():
        return None
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{PREFIX}{step:06d}"

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / "weights.safetensors"))
        _torch_save({"stage": plain, "rng": rng_state(sampling_generator)}, tmp / "trainer.pt")
        (tmp / "meta.json").write_text(json.dumps({"step": step, "format": FORMAT, **meta}, indent=2))
        write_manifest(tmp)

    written_whole(final, write)
    for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        _remove(old)
    return final


class _Recording(io.RawIOBase):
    """The file torch.save writes through, keeping the OSError of a write that failed."""

    def __init__(self, handle) -> None:
        super().__init__()
        self.handle, self.error = handle, None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = error
            raise


def _torch_save(obj, path: Path) -> None:
    """torch.save to `path`, raising a failed write's own OSError (a full disk: errno 28), where torch would report
    a RuntimeError about stream positions that does not say why."""
    with open(path, "wb") as handle:
        recording = _Recording(handle)
        try:
            torch.save(obj, recording)
        except RuntimeError:
            if recording.error is not None:
                raise recording.error from None
            raise


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    """manifest.json in `directory`: {"files": {relative path: {"bytes", "sha256"}}} of every file under it, written
    after them, so that a reader can tell each file is the one written."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {p.relative_to(directory).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (directory / MANIFEST).write_text(json.dumps({"files": entries}, indent=2))


def verify(directory: Path) -> None:
    """Raises CheckpointError unless every file manifest.json of `directory` lists is there with its size and
    sha256 (a checkpoint written before manifests existed passes when its meta.json says so: no "format")."""
    name = directory.name
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        try:
            legacy = "format" not in json.loads((directory / "meta.json").read_text())
        except (OSError, ValueError) as error:
            raise CheckpointError(f"{name}: no {MANIFEST}, and meta.json cannot be read ({error})") from None
        if legacy:
            return
        raise CheckpointError(f"{name}: {MANIFEST} is missing") from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{name}: {MANIFEST} cannot be read ({type(error).__name__}: {error})") from None
    for relative, expected in files.items():
        path = directory / relative
        if not path.is_file():
            raise CheckpointError(f"{name}: {relative} is missing")
        if path.stat().st_size != expected["bytes"]:
            raise CheckpointError(
                f"{name}: {relative} has {path.stat().st_size} bytes, not the {expected['bytes']} written"
            )
        if _sha256(path) != expected["sha256"]:
            raise CheckpointError(f"{name}: {relative} does not match its sha256 in {MANIFEST} (damaged)")


def written_whole(final: Path, write) -> Path:
    """Has `write(tmp)` fill a temporary directory beside `final`, fsyncs it and renames it to `final` (replacing
    one there: the same step written again after a resume). A write that fails or is interrupted removes the
    temporary directory (on a full disk, its files were the space) and raises; what was at `final` stays."""
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        write(tmp)
        for file in tmp.rglob("*"):
            if file.is_file():
                _fsync_file(file)
        _fsync_dir(tmp)
        replaced = final.with_name(f".{final.name}.tmp-removed{os.getpid()}") if final.exists() else None
        if replaced is not None:  # renamed aside, not deleted: it comes back if the rename below fails
            os.rename(final, replaced)
        try:
            os.rename(tmp, final)
        except BaseException:
            if replaced is not None:
                os.rename(replaced, final)
            raise
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, OSError) and error.errno is not None:  # which write failed: the run's error says
            raise OSError(error.errno, f"{error.strerror or error} (writing {final})") from error
        raise
    _fsync_dir(final.parent)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
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
    if remove_partial:  # step checkpoints and the final weights (runner.py) are both written by written_whole
        for partial in [*directory.glob(f".{PREFIX}*.tmp*"), *directory.glob(".final.tmp*")]:
            shutil.rmtree(partial, ignore_errors=True)
    found = [
        p for p in directory.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()
    ]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def read_checkpoint(path: Path) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """(meta, trainer state, tensors) of one checkpoint, its files checked against its manifest first (verify).
    Nothing is unpickled beyond tensors and plain values. Raises CheckpointError for anything that keeps it from
    loading, naming the checkpoint and the file."""
    verify(path)
    loaders = (
        ("meta.json", lambda file: json.loads(file.read_text())),
        ("trainer.pt", lambda file: torch.load(file, weights_only=True)),
        ("weights.safetensors", lambda file: load_file(str(file))),
    )
    loaded = []
    for name, load in loaders:
        try:
            loaded.append(load(path / name))
        except Exception as error:  # a legacy checkpoint's damage shows only here: any error is the file's
            raise CheckpointError(
                f"{path.name}: {name} does not load ({type(error).__name__}: "
                f"{str(error).strip().splitlines()[0] if str(error).strip() else ''})"
            ) from None
    meta, trainer, tensors = loaded
    return meta, trainer, tensors


def read_named_checkpoint(path: Path) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """read_checkpoint for a command given the checkpoint by name (eval and export --checkpoint): a damaged one is
    refused as UserError naming what is wrong (exit 2), before any model loads."""
    try:
        return read_checkpoint(path)
    except CheckpointError as error:
        raise UserError(
            f"checkpoint {error}",
            f"choose another of the run's checkpoints under {path.parent}, or its final weights (no --checkpoint)",
        ) from None


def check_final(directory: Path) -> None:
    """Raises UserError when a run's final weights (checkpoints/final) do not match the manifest written with them
    (eval, export and model.init_from read them); final weights written before manifests existed have none and are
    taken as they are."""
    if not (directory / MANIFEST).exists():
        return
    try:
        verify(directory)
    except CheckpointError as error:
        raise UserError(
            f"run {directory.parent.parent}: checkpoints/{error}",
            "its final weights are damaged: use one of its step checkpoints (--checkpoint "
            "step-NNNNNN), or train it again",
        ) from None


def load_model_tensors(model, tensors: dict[str, torch.Tensor]) -> None:
    """Copies a checkpoint's trainable weights into the model's parameters of the same names."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            if name.startswith("model/"):
                param = params[name[len("model/") :]]
                param.copy_(distributed.shard_like(value, param))


def restore(model, stage, sampling_generator: torch.Generator, trainer: dict, tensors: dict) -> None:
    """Model parameters, the stage's optimizers, schedulers and state (module docstring), and every RNG, as
    saved."""
    load_model_tensors(model, tensors)
    load_stage_state(stage, trainer["stage"], tensors)
    set_rng_state(trainer["rng"], sampling_generator)
