"""Stage `relift`: ReLIFT, reinforcement learning interleaved with online fine-tuning on the hardest questions
(Ma et al., arXiv 2506.07527; reference code TheRoadQaQ/ReLIFT, relift/verl/verl/relift/trainer.py `fit` and
relift/verl/verl/relift/actor.py `sft_update_policy`).

The model trains with GRPO, exactly as the `rl` stage does; the questions it cannot solve at all go, with their
demonstrations, into a buffer, and each time the buffer holds M = `relift.buffer_size` of them, an SFT round on them
runs (the paper's Figure 2: N hardest (question, solution) pairs in the buffer, the threshold M "typically set to the
batch size for the FT"). One step:

    prompts  <- rl.prompts_per_step problems x rl.num_generations rollouts, scored, GRPO advantages    (as `rl`)
    theta    <- AdamW_rl step on the GRPO loss                                                   (lr: rl.lr)
    buffer   += each prompt none of whose rollouts earns a reward, with its demonstration, in prompt order
    if |buffer| >= M:
        batch <- the M oldest buffered (question, trace_completion) pairs; they leave the buffer, the rest stays
        for each of relift.sft_epochs epochs, for each mini-batch of relift.sft_mini_batch_size of them (0: all M):
            theta <- AdamW_sft step on L_sft(mini-batch) = token-averaged -log pi(trace, answer | question)
                                                                                                  (lr: relift.sft_lr)

How a step counts: a step is one RL update plus, in the steps where the buffer filled, one SFT round (sft_epochs x
ceil(M / mini-batch) SFT updates, one with the defaults), as in the reference, whose SFT round runs inside the
training step right after the actor's RL update. `train.max_steps` therefore counts RL updates; the SFT updates are
logged (`relift/sft_updates` in the step, `relift/sft_updates_total`), as is the buffer's size after the step
(`relift/buffer_size`) and how many hardest prompts the step added (`relift/hard_prompts`).

Faithful to the reference:
  - hardest = every rollout of the prompt scored the failure value 0 (trainer.py `solve_none_uids`; with 0/1
    rewards: no reward > 0);
  - the buffer is first in, first out: the first sft_data_size examples are trained on and leave, the remainder is
    kept, not cleared (`sft_buffer_batch.slice(sft_data_size, ...)`); at most one SFT round per step, so when a step
    adds more than M hardest prompts the buffer grows;
  - SFT has its own optimizer and learning rate (`sft_actor_optimizer`, `optim.sft.lr`), the loss is the
    token-averaged NLL of the demonstration (core_algos.compute_sft_loss: masked_mean(-log p)), and a round is
    `sft_epochs` passes of mini-batches of `sft_mini_batch_size`, one optimizer step each (`sft_update_policy`); the
    math-7b script sets sft_epochs=1 and sft_mini_batch_size = sft_data_size (64 and 64 in examples/math-7b/train.sh),
    one SFT update per round, which are the defaults here.
Open choices and deviations (all configurable):
  - RL updates use `rl.lr` (no relift.rl_lr): the RL half is the `rl` stage, so with a buffer_size that is never
    reached the stage is exactly `rl` (tests/test_relift.py checks it). The reference uses 1e-6 for both rates;
    at the tiny scale SFT wants ~5e-4 and RL diverges above ~1e-4, hence `relift.sft_lr` = 5e-4 apart from rl.lr;
  - M = 8 for 16 prompts per step: the reference's ratio (sft_data_size 64 for 128 prompts per step);
  - the reference skips an SFT step whose gradient norm exceeds sft.max_sft_grad_norm; here SFT updates are clipped
    by optim.max_grad_norm like every update and never skipped;
  - the reference's RL half has its own settings (no std division of advantages, clip-higher 0.28, two RL
    mini-batch updates per step); here it is the `rl` stage's GRPO (rl.*), so a comparison isolates what ReLIFT adds;
  - the demonstration is the task's paired trace (the reference's `target`: solutions written by a stronger model).

Checkpoints: the buffer is training state. It is kept as what it is, a list of the buffered (question,
demonstration) pairs, oldest first, and state_dict hands it to core/checkpoint.py as plain strings with the step
counters; a restored stage holds the same buffer (tests/test_stage_state.py checks it).

Data parallelism: every rank draws the same problems and samples its share of the groups; the hardest flags are
summed over ranks, so every rank holds the same buffer, and each SFT mini-batch is shared out across the ranks as an
SFT batch is (relift.buffer_size and the mini-batch size must split evenly).
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

from bridgectl.core import distributed
from bridgectl.core.context import StepOutput, TrainContext, demonstration_batch
from bridgectl.core.grpo import (
    completion_rows,
    group_seeds,
    rl_backward,
    rollout_metrics,
    sample_and_score,
    trained_tokens,
)
from bridgectl.core.losses import sft_backward
from bridgectl.core.optim import make_optimizer, take_step
from bridgectl.errors import UserError
from bridgectl.stages.base import CountingStage, Optimizing


@dataclass(frozen=True)
class Demonstration:
    """A buffered hardest prompt: all its SFT round reads (core/context.demonstration_batch), plain strings that a
    checkpoint saves as they are."""

    question: str
    """The prompt as the model sees it."""
    trace_completion: str
    """Its paired demonstration: trace and answer."""


class ReliftStage(CountingStage):
    """ReLIFT (module docstring): the RL optimizer (rl.lr) and the SFT one (relift.sft_lr); its state is the buffer
    and the step counters."""

    name = "relift"

    def __init__(self, ctx: TrainContext, total_updates: int) -> None:
        cfg, world = ctx.cfg.relift, distributed.world_size()
        mini_batch = cfg.sft_mini_batch_size or cfg.buffer_size
        if cfg.buffer_size % world or mini_batch % world:
            raise UserError(
                f"relift.buffer_size={cfg.buffer_size} and its SFT mini-batches of {mini_batch} do not "
                f"split evenly over {world} processes",
                f"use multiples of {world}: each SFT mini-batch is shared out across processes",
            )
        super().__init__(ctx, ctx.cfg.rl.lr, total_updates)  # the RL updates' optimizer
        # the SFT optimizer's schedule (warm-up, cosine) counts SFT updates against the stage's budget in steps
        self.sft_optimizer, self.sft_scheduler = make_optimizer(self.params, cfg.sft_lr, ctx.cfg.optim, total_updates)
        self.buffer: list[Demonstration] = []  # the hardest prompts not trained on yet, oldest first
        self.sft_updates = 0

    def optimizers(self) -> dict[str, Optimizing]:
        """The RL optimizer and scheduler (`optimizer`, `scheduler`) and the SFT rounds' (`sft_optimizer`,
        `sft_scheduler`)."""
        return {**super().optimizers(), "sft_optimizer": self.sft_optimizer, "sft_scheduler": self.sft_scheduler}

    def state_dict(self) -> dict:
        """The training state core/checkpoint.py saves besides the two optimizers and schedulers: the buffer (as
        plain strings) and the step counters."""
        return {
            "buffer": [asdict(example) for example in self.buffer],
            **super().state_dict(),
            "sft_updates": self.sft_updates,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores what state_dict returned (core/checkpoint.restore), or what a checkpoint written before the
        buffer was saved as it is holds (see _legacy_buffer)."""
        super().load_state_dict(state)
        self.sft_updates = state["sft_updates"]
        if isinstance(state["buffer"], dict):
            self.buffer = self._legacy_buffer(state["buffer"]["stream_index"][: state["buffered"]].tolist())
        else:
            self.buffer = [Demonstration(**example) for example in state["buffer"]]

    def _legacy_buffer(self, positions: list[int]) -> list[Demonstration]:
        """The buffer of a checkpoint written before it was saved as it is: only the problems' positions in the RL
        stream (ctx.rl_problems is task.rl_prompts(seed)), so the problems are read again from the stream."""
        stream = itertools.islice(self.ctx.task.rl_prompts(self.ctx.cfg.seed), max(positions, default=-1) + 1)
        wanted = set(positions)
        found = {position: problem for position, problem in enumerate(stream) if position in wanted}
        return [Demonstration(found[position].question, found[position].trace_completion) for position in positions]

    def step(self) -> StepOutput:
        ctx, rl = self.ctx, self.ctx.cfg.rl
        model = ctx.policy.model
        # sample_groups, keeping every rank's view of all the step's problems, by their position in the step
        problems = [next(ctx.rl_problems) for _ in range(rl.prompts_per_step)]
        mine = distributed.shard(list(zip(range(len(problems)), problems, group_seeds(ctx, len(problems)))))
        grouped = [problem for _, problem, _ in mine for _ in range(rl.num_generations)]
        scored = sample_and_score(ctx, grouped, [seed for _, _, seed in mine])

        loss_rl, stats = rl_backward(model, scored, ctx)  # micro-batched (train.micro_batch_size)
        grad_norm = take_step(self.params, self.optimizer, self.scheduler, ctx.cfg.optim.max_grad_norm)
        self.updates += 1

        hardest = self._hardest(scored, [position for position, _, _ in mine], len(problems))
        self.buffer.extend(
            Demonstration(problems[position].question, problems[position].trace_completion) for position in hardest
        )
        metrics = {
            "train/rl_loss": loss_rl,
            **rollout_metrics(scored, stats, rl.num_generations, ctx),
            "train/grad_norm": grad_norm,
            "train/lr": self.scheduler.get_last_lr()[0],
            "relift/hard_prompts": len(hardest),
        }
        sft_tokens = 0
        if len(self.buffer) >= ctx.cfg.relift.buffer_size:
            round_metrics, sft_tokens = self._fine_tune()
            metrics.update(round_metrics)
        else:
            metrics["relift/sft_updates"] = 0
        metrics["relift/buffer_size"] = len(self.buffer)
        metrics["relift/sft_updates_total"] = self.sft_updates
        return StepOutput(
            metrics=metrics,
            train_tokens=trained_tokens(scored, ctx) + sft_tokens,
            gen_tokens=scored.gen_tokens,
            completions=completion_rows(scored, ctx, self.updates),
        )

    # ---- the hardest prompts -------------------------------------------------------------------------------------
    def _hardest(self, scored, positions: list[int], n_prompts: int) -> list[int]:
        """Positions (in the step's prompt order) of the prompts none of whose rollouts earned a reward, over all
        ranks' groups."""
        solved = scored.correct.view(-1, self.ctx.cfg.rl.num_generations).any(dim=1).tolist()  # the verifier's
        flags = [0] * n_prompts
        for position, any_solved in zip(positions, solved):
            flags[position] = int(not any_solved)
        return [position for position, flag in enumerate(distributed.total(*flags)) if flag]

    # ---- the SFT round -------------------------------------------------------------------------------------------
    def _fine_tune(self) -> tuple[dict, int]:
        """One SFT round on the buffer_size oldest buffered examples: sft_epochs passes over mini-batches of
        sft_mini_batch_size (0: all of them), one update of the SFT optimizer each."""
        ctx, cfg = self.ctx, self.ctx.cfg.relift
        # first in, first out: the oldest buffer_size leave, the rest stay (the reference's slice)
        examples, self.buffer = self.buffer[: cfg.buffer_size], self.buffer[cfg.buffer_size :]
        size = cfg.sft_mini_batch_size or cfg.buffer_size
        losses, norms, tokens = [], [], 0
        for _ in range(cfg.sft_epochs):
            for start in range(0, len(examples), size):
                batch = demonstration_batch(ctx, distributed.shard(examples[start : start + size]))
                losses.append(sft_backward(ctx.policy.model, batch, ctx.cfg.train.micro_batch_size))
                norms.append(
                    take_step(self.params, self.sft_optimizer, self.sft_scheduler, ctx.cfg.optim.max_grad_norm)
                )
                tokens += batch.n_tokens
        self.sft_updates += len(losses)
        return {
            "train/sft_loss": sum(losses) / len(losses),
            "relift/sft_updates": len(losses),
            "relift/sft_grad_norm": sum(norms) / len(norms),
            "relift/sft_lr": self.sft_scheduler.get_last_lr()[0],
        }, tokens
