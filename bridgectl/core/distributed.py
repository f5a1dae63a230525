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
processes in tests/test_distributed.py. Large models that need sharding (FSDP) are not supported yet.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


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


def shard(items: list) -> list:
    """This rank's contiguous share of a list whose length the world size divides."""
    size = len(items) // world_size()
    return items[rank() * size:(rank() + 1) * size]


def check_batch_split(cfg, processes: int) -> None:
    """The global batches must split evenly over the processes (each rank takes an equal share)."""
    from omegaconf import OmegaConf

    from bridgectl.errors import UserError

    for key in ("rl.prompts_per_step", "sft.batch_size"):
        value = OmegaConf.select(cfg, key)
        if value % processes:
            raise UserError(f"{key}={value} does not split evenly over {processes} processes",
                            f"use a multiple of {processes}: the global batch is shared out across processes")


def mean_denominator(count: torch.Tensor) -> torch.Tensor:
    """The denominator d that makes `local_sum / d`, averaged over ranks, the mean over the global batch: the global
    count divided by the number of ranks (the local count when not distributed)."""
    if not active():
        return count
    total = count.detach().clone().to(torch.float64)
    dist.all_reduce(total)
    return (total / world_size()).to(count.dtype if count.is_floating_point() else torch.float32)


def average_gradients(params) -> None:
    if not active():
        return
    for param in params:
        if param.grad is not None:
            dist.all_reduce(param.grad)
            param.grad /= world_size()


def average_metrics(metrics: dict) -> dict:
    """Numeric metrics averaged across ranks (None stays None); everything else as this rank has it."""
    if not active():
        return metrics
    keys = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=_device())
    dist.all_reduce(values)
    return {**metrics, **{k: v / world_size() for k, v in zip(keys, values.tolist())}}


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
