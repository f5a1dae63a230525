"""Data parallelism over N processes: `bridgectl run --nproc N` relaunches itself under torchrun (gloo on CPU,
NCCL on GPUs, one GPU per process). The global batch stays what the config says and is split across ranks, so a run
on N processes follows a single-process run with the same settings:

  - every rank draws the same global batch from the data streams (same seeds) and keeps its contiguous share of the
    prompt groups / SFT examples (`shard`); rollouts are sampled with one generator per prompt group, seeded from
    the shared sampling generator, so a group's completions do not depend on which rank samples it;
  - losses divide by the global token count over the number of ranks (`mean_denominator`), and gradients are
    averaged across ranks before clipping (`average_gradients`, called by the one clipping helper every update rule
    uses), which together give the full-batch gradient;
  - metrics are averaged across ranks (losses and reward means are then the global values; counts such as
    train/zero_std_groups are per rank); rank 0 alone writes the run directory and checkpoints; every rank
    evaluates the full eval sets (so evaluation equals the single-process one).
Agreement with a single process is to float rounding (sums are taken in another order), tested on CPU with 2 gloo
processes in tests/test_distributed.py.

`train.fsdp=true` shards the model as well (`shard_model`: PyTorch FSDP2, one unit per decoder layer and one for the
rest): each rank keeps 1/N of the weights, gradients and optimizer moments, gathers a layer's weights for its
forward and backward passes, and FSDP reduce-scatters the gradients (averaged, so `average_gradients` leaves them
alone). Checkpoints and the final model hold whole tensors (`full_tensor` gathers, `shard_like` slices them back),
so a run saved with N processes reads like any other. Sharding comes after every adapter is added (BRIDGE's w at
load time) and before any optimizer exists, since it replaces the parameters with sharded ones.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def _device() -> torch.device:
    """Where collective tensors live: NCCL reduces GPU tensors only."""
    return torch.device("cuda", local_rank()) if dist.get_backend() == "nccl" else torch.device("cpu")


def init_from_environment(device_type: str) -> None:
    """Joins the process group torchrun describes in the environment (WORLD_SIZE > 1); nothing otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")


def shutdown() -> None:
    """Leaves the process group once every rank has finished: a worker that exits with gloo's threads still
    running can abort at exit ("terminate called without an active exception"), failing a run that completed."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def shard(items: list) -> list:
    """This rank's contiguous share of a list whose length the world size divides."""
    size = len(items) // world_size()
    return items[rank() * size : (rank() + 1) * size]


def check_batch_split(cfg, processes: int) -> None:
    """The global batches must split evenly over the processes (each rank takes an equal share)."""
    from omegaconf import OmegaConf

    from bridgectl.errors import UserError

    for key in ("rl.prompts_per_step", "sft.batch_size"):
        value = OmegaConf.select(cfg, key)
        if value % processes:
            raise UserError(
                f"{key}={value} does not split evenly over {processes} processes",
                f"use a multiple of {processes}: the global batch is shared out across processes",
            )


def mean_denominator(count: torch.Tensor) -> torch.Tensor:
    """The denominator d that makes `local_sum / d`, averaged over ranks, the mean over the global batch: the global
    count divided by the number of ranks (the local count when not distributed)."""
    if not active():
        return count
    total = count.detach().clone().to(torch.float64)
    dist.all_reduce(total)
    return (total / world_size()).to(count.dtype if count.is_floating_point() else torch.float32)


def gather_values(values: torch.Tensor) -> torch.Tensor:
    """The 1-D `values` of every rank, concatenated in rank order (this rank's own when not distributed); ranks may
    hold different numbers of them."""
    if not active():
        return values
    sizes = [torch.zeros((), dtype=torch.long, device=values.device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor(values.numel(), device=values.device))
    longest = int(max(sizes))
    padded = torch.zeros(longest, dtype=values.dtype, device=values.device)
    padded[: values.numel()] = values
    parts = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(size)] for part, size in zip(parts, sizes)])


def average_gradients(params) -> None:
    if not active():
        return
    for param in params:
        if param.grad is not None and not isinstance(param.grad, DTensor):  # FSDP has averaged its shards
            dist.all_reduce(param.grad)
            param.grad /= world_size()


COUNTED_METRICS = frozenset({"train/zero_std_groups", "train/dropped_groups"})
"""Metrics that count things in this rank's share of the batch: summed across ranks, not averaged."""


def average_metrics(metrics: dict) -> dict:
    """Numeric metrics averaged across ranks, counts (COUNTED_METRICS) summed (None stays None); everything else
    as this rank has it."""
    if not active():
        return metrics
    keys = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=_device())
    dist.all_reduce(values)
    return {**metrics, **{k: v if k in COUNTED_METRICS else v / world_size() for k, v in zip(keys, values.tolist())}}


def total(*counts: int) -> list[int]:
    """Integer counts (tokens) summed over ranks."""
    if not active():
        return list(counts)
    values = torch.tensor(counts, dtype=torch.float64, device=_device())
    dist.all_reduce(values)
    return [int(v) for v in values.tolist()]


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any (so all ranks stop at the same step)."""
    if not active():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def raise_together(error: Exception | None) -> None:
    """Raises on every rank when any rank has an `error` (a UserError: its message and hint, from the lowest rank
    that has one, naming that rank), so a check that fails on one process ends them all with the same Error: and
    exit status instead of leaving the others waiting in a collective."""
    from bridgectl.errors import UserError

    if not active():
        if error is not None:
            raise error
        return
    said = [None] * world_size()
    dist.all_gather_object(
        said, None if error is None else (str(getattr(error, "message", error)), getattr(error, "hint", None))
    )
    first = next(((index, found) for index, found in enumerate(said) if found is not None), None)
    if first is not None:
        index, (message, hint) = first
        where = "" if index == rank() else f" (on rank {index})"
        raise UserError(message + where, hint)


@contextlib.contextmanager
def failing_together():
    """Runs its block on this rank and then raises on every rank when the block raised a UserError on any
    (raise_together): `with failing_together(): check()` in every process instead of a check whose failure on one
    process leaves the others waiting. Every rank must enter it."""
    from bridgectl.errors import UserError

    error = None
    try:
        yield
    except UserError as raised:
        error = raised
    raise_together(error)


ERROR_KEY = "bridgectl/error/rank-{}"
"""The process group's store key under which a failing rank leaves its error (leave_error)."""


def _store_within(seconds: float):
    """The process group's store (torchrun's, held by a launcher, not by a worker), its operations limited to
    `seconds`: it may have gone with its node."""
    import datetime

    store = dist.distributed_c10d._get_default_store()
    store.set_timeout(datetime.timedelta(seconds=seconds))
    return store


def leave_error(message: str) -> None:
    """Leaves this rank's error in the process group's store for rank 0 (error_left_elsewhere), before this
    process ends: the other ranks learn of it only as a collective whose peer is gone ("Connection closed by
    peer"). Best effort; nothing when not distributed."""
    if active():
        with contextlib.suppress(Exception):
            _store_within(5).set(ERROR_KEY.format(rank()), message)


def error_left_elsewhere() -> str | None:
    """The error another rank left (leave_error), naming that rank (the lowest one's, when several did); None
    when none did. A rank leaves it before its process ends, so it is there by the time a collective here fails
    for want of that rank: the cause of this rank's own error then."""
    if active():
        with contextlib.suppress(Exception):
            store = _store_within(5)
            for other in range(world_size()):
                key = ERROR_KEY.format(other)
                if other != rank() and store.check([key]):
                    return f"{store.get(key).decode()} (on rank {other})"
    return None


NODE_WAIT_ENV = "BRIDGECTL_NODE_WAIT_S"
"""Seconds the other ranks wait to see the run directory rank 0 made (default 30; more for a slow shared file
system's attribute cache)."""


def shared_directory_check(path, timeout_s: float | None = None) -> None:
    """Every rank must see the run directory `path` that rank 0 has made: rank 0 writes a file with a fresh token
    in it, the others wait up to `timeout_s` seconds (default $BRIDGECTL_NODE_WAIT_S, else 30) for that file and
    token. A rank on another machine without a shared file system (or with --out on a local disk) fails within
    that time, naming its host, and so do all ranks (raise_together), instead of training into a directory only
    one node has."""
    import secrets
    import socket
    import time
    from pathlib import Path

    from bridgectl.errors import UserError

    if not active():
        return
    timeout_s = float(os.environ.get(NODE_WAIT_ENV, "30")) if timeout_s is None else timeout_s
    marker = Path(path) / ".ranks-see-this"
    token = [secrets.token_hex(8) if is_main() else None]
    if is_main():
        marker.write_text(token[0])
    dist.broadcast_object_list(token, src=0)
    deadline, seen = time.monotonic() + timeout_s, is_main()
    while not seen and time.monotonic() < deadline:
        try:
            seen = marker.read_text() == token[0]
        except OSError:
            seen = False
        if not seen:
            time.sleep(0.2)
    error = (
        None
        if seen
        else UserError(
            f"the run directory {path} is not visible from {socket.gethostname()} (rank {rank()}) within "
            f"{timeout_s:g} s",
            "every node must see --out on one shared file system (NFS, Lustre, ...): give --out a path there",
        )
    )
    try:
        raise_together(error)
    finally:
        if is_main():
            marker.unlink(missing_ok=True)


# ---- sharded models (train.fsdp) ------------------------------------------------------------------------------
def shard_model(policy) -> None:
    """Shards the policy's model (and a frozen reference, when kept) over the ranks with FSDP2: every decoder layer
    (the classes transformers lists in `_no_split_modules`) is one unit, the rest (embeddings, final norm, head)
    the root unit. LoRA layers then run peft's own forward and sampling keeps the adapters unmerged: both merge
    paths rewrite whole weight tensors, which a rank does not hold."""
    from torch.distributed.fsdp import fully_shard

    from bridgectl.core.lora_forward import set_lora_forward

    for model in (policy.model, policy.frozen_reference):
        if model is None:
            continue
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        unit_classes = set(getattr(base, "_no_split_modules", None) or [])
        units = [module for module in base.modules() if type(module).__name__ in unit_classes]
        if not units:
            raise ValueError(f"{type(base).__name__} names no decoder layer class (_no_split_modules) to shard by")
        for unit in units:
            fully_shard(unit)
        # the root unit too gives its gathered weights back after every forward pass (FSDP keeps them by
        # default, to save one gather before backward): a forward pass without backward (sampling, eval) would
        # otherwise leave plain tensors where the optimizers and checkpoints expect the sharded parameters
        fully_shard(model, reshard_after_forward=True)
    set_lora_forward(policy.model, merged=False)
    policy.sampling = "unmerged"  # its weights are shards: a merged copy would be a shard's
    total = sum(p.numel() for p in policy.model.parameters())
    held = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in policy.model.parameters())
    if is_main():
        from bridgectl.core.ui import console

        console.print(
            f"FSDP: {len(units) + 1} units sharded over {world_size()} processes; this process holds "
            f"{held:,} of the model's {total:,} parameters"
        )


def is_sharded(tensor) -> bool:
    return isinstance(tensor, DTensor)


def is_sharded_model(model: torch.nn.Module) -> bool:
    """Whether FSDP manages (part of) `model` (a model that is sampled from may be a sub-module of the sharded
    root, so its own parameters are not looked at)."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(module, FSDPModule) for module in model.modules())


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a shard (a collective: every rank must call it, in the same order); a plain
    tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shard_like(full: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a whole tensor, laid out as `target` (a DTensor); `full` itself when target is plain.
    Every rank holds `full` (read from the same checkpoint), so nothing is communicated."""
    if not isinstance(target, DTensor):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(target.dtype), target.device_mesh, target.placements, src_data_rank=None)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The state dict of a sharded model with every tensor whole (a collective: every rank calls it), for saving
    in transformers or peft format; None for a model that is not sharded (it saves its own)."""
    if not is_sharded_model(model):
        return None
    # a tied weight (embeddings and head) is saved once, under its first name, as transformers saves it
    tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - {
        name for name, _ in model.named_parameters()
    }
    return {name: full_tensor(tensor).cpu() for name, tensor in model.state_dict().items() if name not in tied}
