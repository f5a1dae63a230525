"""rollout.backend=vllm: RL rollouts sampled by a vLLM engine that shares this process and its GPU with training
(TRL's "colocate" mode), for the models where decoding dominates a step.

Each sampling call:
  1. loads the trained weights into the engine, every active adapter folded in (core/model.merged_weights, one
     tensor at a time, through vLLM's own checkpoint loader, `model.load_weights`), and empties its prefix cache,
     so the engine samples from exactly the current policy (BRIDGE: pi(theta, w); theta_hat's values while the
     shadow samples its own rollouts);
  2. samples the trainer's own prompt tokens (no second tokenisation), one seed per completion drawn from its
     group's seed, so runs are reproducible with a given engine;
  3. hands back Rollouts whose sampling log-probs are recomputed by the trained model (core/rollout.score_sampled):
     the GRPO ratio is taken against what the trainer computes, not against the engine's kernels.
     `rollout/logprob_gap` logs how far the engine's own log-probs were from the trainer's (mean absolute
     difference per token): a large gap means the engine does not sample the policy being trained.

vLLM's worker runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so weights are loaded by reference, not
copied between processes. One process only: under `--nproc N` every rank would need its own engine and a share
of the GPU, which is not supported yet. Tested only up to the parts that run without vLLM (weight naming, rollout
assembly, rescoring: tests/test_vllm_rollout.py); the engine calls follow vLLM 0.33's API.
"""

from __future__ import annotations

import os

import torch

from bridgectl.core import distributed
from bridgectl.core.model import Policy, merged_weights
from bridgectl.core.rollout import (Rollouts, encode_prompts, prompt_token_lists, rollouts_from_token_ids,
                                    score_sampled)
from bridgectl.errors import UserError

SCORING_ROWS = 16  # rows per no-grad rescoring pass: bounds the [rows, tokens, vocab] logits of large vocabularies


def check_usable(device: torch.device) -> None:
    """A clear error, before any model is loaded, when this run cannot use vLLM."""
    if device.type != "cuda":
        raise UserError("rollout.backend=vllm needs a CUDA GPU (this run is on the CPU)",
                        "use rollout.backend=hf here; vLLM is for GPU runs")
    check_processes(distributed.world_size())
    try:
        import vllm  # noqa: F401
    except ImportError as error:
        raise UserError(f"rollout.backend=vllm needs the vllm package ({error})",
                        "pip install 'bridgectl[vllm]' on a CUDA machine, or use rollout.backend=hf") from None


def check_processes(processes: int) -> None:
    if processes > 1:
        raise UserError(f"rollout.backend=vllm runs in one process for now, not {processes}",
                        "use --nproc 1 with vllm, or rollout.backend=hf with --nproc N")


class VLLMRollouts:
    """A colocated vLLM engine holding a copy of the policy's architecture; see the module docstring."""

    def __init__(self, model_path, cfg, policy: Policy) -> None:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine's worker in this process
        from vllm import LLM

        dtype = next(policy.model.parameters()).dtype
        self.llm = LLM(model=str(model_path), dtype=str(dtype).removeprefix("torch."), seed=cfg.seed,
                       gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
                       max_model_len=cfg.rollout.max_model_len, enforce_eager=cfg.rollout.enforce_eager,
                       trust_remote_code=bool(cfg.model.trust_remote_code),
                       # log-probs after temperature scaling, as the trainer computes them (logprob_gap)
                       logprobs_mode="processed_logprobs")
        self.last_logprob_gap = float("nan")

    def load_policy_weights(self, policy: Policy) -> None:
        """The policy's current weights, adapters folded in, into the engine."""
        weights = merged_weights(policy.model)
        self.llm.apply_model(lambda model: model.load_weights(weights))
        self.llm.reset_prefix_cache()  # cached prompt states were computed with the old weights

    def sample(self, policy: Policy, prompts: list[str], max_new_tokens: int, temperature: float,
               row_seeds: list[int]) -> Rollouts:
        from vllm import SamplingParams

        self.load_policy_weights(policy)
        tokenizer = policy.tokenizer
        device = next(policy.model.parameters()).device
        prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, device)
        requests = [{"prompt_token_ids": ids} for ids in prompt_token_lists(prompt_ids, prompt_mask)]
        # no top-p / top-k truncation (vLLM's defaults): the policy's own distribution, as the hf sampler draws
        params = [SamplingParams(n=1, temperature=temperature, max_tokens=max_new_tokens, seed=seed, logprobs=0,
                                 stop_token_ids=[tokenizer.eos_token_id], detokenize=False) for seed in row_seeds]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        completions = [output.outputs[0] for output in outputs]
        rollouts = rollouts_from_token_ids(tokenizer, prompt_ids, prompt_mask,
                                           [list(c.token_ids) for c in completions])
        rollouts = score_sampled(policy.model, rollouts, temperature, SCORING_ROWS)
        self.last_logprob_gap = logprob_gap(rollouts, [engine_logprobs(c) for c in completions])
        return rollouts


def engine_logprobs(completion) -> list[float]:
    """The engine's log-prob of each sampled token (vLLM: one {token: Logprob} dict per position)."""
    return [position[token].logprob for token, position in zip(completion.token_ids, completion.logprobs or [])]


def logprob_gap(rollouts: Rollouts, engine: list[list[float]]) -> float:
    """Mean |engine log-prob - trainer log-prob| over the sampled tokens (nan when the engine gave none)."""
    gaps = [abs(value - float(rollouts.sampling_logprobs[row, column]))
            for row, values in enumerate(engine) for column, value in enumerate(values)]
    return sum(gaps) / len(gaps) if gaps else float("nan")


def seeds_per_row(group_seeds: list[int], rows_per_group: int) -> list[int]:
    """One sampling seed per completion from its group's seed: a group's completions do not depend on the
    other groups in the batch."""
    return [row_seed for seed in group_seeds
            for row_seed in torch.randint(0, 2**62, (rows_per_group,), generator=torch.Generator().manual_seed(seed)).tolist()]

