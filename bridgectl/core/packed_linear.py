"""Decoding on the CPU with the linear layers' weights packed once for oneDNN (rollout.cpu_packed_weights).

A decode step multiplies a few rows (the batch's live rows, one token each) by every weight matrix of the model.
At so few rows PyTorch's CPU matmul (MKL's sgemm) re-packs each weight matrix on every call: on the 2-core AMD EPYC
this project measures on, the linear layers' matmuls of SmolLM2-135M at 16 rows took 68 ms per decode step (60% of
the step), against 10 ms to read their 538 MB of weights once. oneDNN's linear with the weight packed ahead of time
(`torch.ops.mkldnn._reorder_linear_weight`, the kernel torch.compile's CPU freezing uses) skips the re-packing:
the same matmuls took 34 ms, single matmuls of the model's shapes 1.15-2.9x less time at 1-960 rows (7.5x for the
output head at 3 rows), and the decode step 1.27-1.51x less (benchmarks/bench_decode.py, its section of
benchmarks/results.md).

The weights are packed on entry to each sampling call (they change with every update), about 0.25 s for
SmolLM2-135M on 2 cores against seconds to minutes of decoding, and the packed copies, as large as the weights, are
dropped on exit. Both kernels compute in float32 and differ only in the order they add up a dot product: the
tokens agreed with unpacked decoding on every benchmark and test run here, and the sampler's log-probs differed
from unpacked decoding's by at most 5e-5 on SmolLM2-135M (16 x 256 and 64 x 128 tokens), so the GRPO ratio of
the first update, sampler's log-probs against the trained model's, is 1 to within that rather than ~1e-6. Used
only where it applies: a CPU model's plain float32 `nn.Linear` layers (quantized layers, which subclass it, keep
their own forward), outside autograd (the sampler runs under `torch.no_grad`), and not on layers whose forward
something else already wraps (accelerate's offloading hooks)."""

from __future__ import annotations

import contextlib
import functools
import os

import torch

MIN_PARAMETERS = 4_000_000
"""Models with fewer linear-layer parameters decode with the plain matmuls: their decode steps are mostly
dispatch overhead, and packing did not pay on the built-in 1.1M-parameter model nor on a 1.8M one (0.8-1.2x over
runs) while it did from 7M up (benchmarks/bench_decode.py's table by model size)."""


def available() -> bool:
    """Whether this PyTorch build has oneDNN's packed linear (CPU builds with MKL-DNN)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def packable_linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """The layers of `model` packing applies to: exactly `nn.Linear` (not a subclass), float32 weights on the
    CPU, without an instance-level forward already set by someone else."""
    return [
        module
        for module in model.modules()
        if type(module) is torch.nn.Linear
        and module.weight.device.type == "cpu"
        and module.weight.dtype == torch.float32
        and "forward" not in module.__dict__
    ]


def free_memory_bytes() -> int | None:
    """The memory the system has free now (None where it does not say: then packing is not held back)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def worth_packing(model: torch.nn.Module) -> bool:
    """Whether decoding `model` with packed weights is expected to pay: oneDNN is there, the model's packable
    linear layers hold at least MIN_PARAMETERS parameters, and the free memory holds at least twice their packed
    copy (a large model on a small machine decodes unpacked rather than swap)."""
    layers = packable_linears(model)
    parameters = sum(m.weight.numel() for m in layers)
    if not available() or parameters < MIN_PARAMETERS:
        return False
    free = free_memory_bytes()
    return free is None or free >= 2 * 4 * parameters


def _packed_forward(packed: torch.Tensor, bias: torch.Tensor | None, inputs: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(inputs, packed, bias, "none", [], "")


@contextlib.contextmanager
def packed_linears(model: torch.nn.Module, rows: int):
    """Within the block, every packable linear layer of `model` computes with its weight packed for oneDNN,
    packed now for `rows` rows (a hint: any number of rows computes correctly). Only for forward passes without
    gradients: the packed kernel has no backward."""
    layers = packable_linears(model)
    try:
        for layer in layers:
            packed = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), max(1, rows))
            bias = None if layer.bias is None else layer.bias.detach()
            layer.forward = functools.partial(_packed_forward, packed, bias)
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
