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

Checkpoints: the buffer is training state. Its problems are kept as their positions in the RL data stream (the
stream `task.rl_prompts(seed)` yields, which ctx.rl_problems counts through), in a fixed-size int64 tensor with one
slot per prompt the stage can draw (budget x rl.prompts_per_step; -1 = unused) plus the integer count `buffered`;
core/checkpoint.py saves both with the stage (a dict of tensors, an int attribute) and restores them in place, and
the first step after a restore rebuilds the problems from the stream.

Data parallelism: every rank draws the same problems and samples its share of the groups; the hardest flags are
summed over ranks, so every rank holds the same buffer, and each SFT mini-batch is shared out across the ranks as an
SFT batch is (relift.buffer_size and the mini-batch size must split evenly).
"""

from __future__ import annotations

import itertools

import torch

from bridgectl.core import distributed
from bridgectl.core.context import StepOutput, TrainContext, demonstration_batch, require_paired_demonstrations
from bridgectl.core.grpo import completion_rows, group_seeds, rl_backward, rollout_metrics, sample_and_score
from bridgectl.core.losses import sft_backward
from bridgectl.core.optim import make_optimizer, take_step
from bridgectl.errors import UserError


class ReliftStage:
    name = "relift"

    def __init__(self, ctx: TrainContext, total_updates: int) -> None:
        require_paired_demonstrations(ctx, self.name)
        cfg, world = ctx.cfg.relift, distributed.world_size()
        mini_batch = cfg.sft_mini_batch_size or cfg.buffer_size
        if cfg.buffer_size % world or mini_batch % world:
            raise UserError(f"relift.buffer_size={cfg.buffer_size} and its SFT mini-batches of {mini_batch} do not "
                            f"split evenly over {world} processes",
                            f"use multiples of {world}: each SFT mini-batch is shared out across processes")
        self.ctx = ctx
        self.params = ctx.policy.trainable_parameters()
        optim = ctx.cfg.optim
        self.rl_opt = make_optimizer(self.params, ctx.cfg.rl.lr, optim, total_updates)
        # the SFT optimizer's schedule (warm-up, cosine) counts SFT updates against the stage's budget in steps
        self.sft_opt = make_optimizer(self.params, cfg.sft_lr, optim, total_updates)
        # The buffer: stream positions of the buffered problems (oldest first) in a tensor the checkpoint keeps,
        # with room for every prompt the stage can draw, the count in `buffered`, and the problems themselves.
        slots = max(1, total_updates * ctx.cfg.rl.prompts_per_step)
        self.buffer = {"stream_index": torch.full((slots,), -1, dtype=torch.long)}
        self.buffered = 0
        self._problems: list = []  # not saved: rebuilt from the stream positions after a restore
        self.updates = 0
        self.sft_updates = 0

    def step(self) -> StepOutput:
        ctx, rl = self.ctx, self.ctx.cfg.rl
        model = ctx.policy.model
        self._rebuild_buffer()
        # sample_groups, keeping every rank's view of all the step's problems and their stream positions
        first = ctx.rl_problems.consumed
        problems = [next(ctx.rl_problems) for _ in range(rl.prompts_per_step)]
        mine = distributed.shard(list(zip(range(len(problems)), problems, group_seeds(ctx, len(problems)))))
        grouped = [problem for _, problem, _ in mine for _ in range(rl.num_generations)]
        scored = sample_and_score(ctx, grouped, [seed for _, _, seed in mine])

        loss_rl, stats = rl_backward(model, scored, ctx)  # micro-batched (train.micro_batch_size)
        optimizer, scheduler = self.rl_opt
        grad_norm = take_step(self.params, optimizer, scheduler, ctx.cfg.optim.max_grad_norm)
        self.updates += 1

        hardest = self._hardest(scored, [position for position, _, _ in mine], len(problems))
        for position in hardest:
            self._push(first + position, problems[position])
        metrics = {"train/rl_loss": loss_rl, **rollout_metrics(scored, stats, rl.num_generations),
                   "train/grad_norm": grad_norm, "train/lr": scheduler.get_last_lr()[0],
                   "relift/hard_prompts": len(hardest)}
        sft_tokens = 0
        if self.buffered >= ctx.cfg.relift.buffer_size:
            round_metrics, sft_tokens = self._fine_tune()
            metrics.update(round_metrics)
        else:
            metrics["relift/sft_updates"] = 0
        metrics["relift/buffer_size"] = self.buffered
        metrics["relift/sft_updates_total"] = self.sft_updates
        return StepOutput(metrics=metrics, train_tokens=scored.gen_tokens + sft_tokens, gen_tokens=scored.gen_tokens,
                          completions=completion_rows(scored, ctx, self.updates))

    # ---- the buffer ----------------------------------------------------------------------------------------------
    def _hardest(self, scored, positions: list[int], n_prompts: int) -> list[int]:
        """Positions (in the step's prompt order) of the prompts none of whose rollouts earned a reward, over all
        ranks' groups."""
        solved = scored.correct.view(-1, self.ctx.cfg.rl.num_generations).any(dim=1).tolist()  # the verifier's
        flags = [0] * n_prompts
        for position, any_solved in zip(positions, solved):
            flags[position] = int(not any_solved)
        return [position for position, flag in enumerate(distributed.total(*flags)) if flag]

    def _push(self, stream_index: int, problem) -> None:
        slots = self.buffer["stream_index"]
        if self.buffered >= slots.numel():
            raise RuntimeError(f"the relift buffer is full ({slots.numel()} slots)")
        slots[self.buffered] = stream_index
        self._problems.append(problem)
        self.buffered += 1

    def _pop_oldest(self, n: int) -> list:
        """The `n` oldest buffered problems, removed from the buffer (the rest move to the front)."""
        slots = self.buffer["stream_index"]
        taken, self._problems = self._problems[:n], self._problems[n:]
        rest = slots[n:self.buffered].clone()
        slots.fill_(-1)
        slots[:rest.numel()] = rest
        self.buffered -= n
        return taken

    def _rebuild_buffer(self) -> None:
        """After a checkpoint restore the count and stream positions are back but not the problems: they are read
        again from the RL stream (ctx.rl_problems is the same stream, task.rl_prompts(seed))."""
        if len(self._problems) == self.buffered:
            return
        wanted = self.buffer["stream_index"][:self.buffered].tolist()
        if min(wanted, default=0) < 0:
            raise RuntimeError("the relift buffer's stream positions are incomplete")
        stream, kept = self.ctx.task.rl_prompts(self.ctx.cfg.seed), set(wanted)
        found = {position: problem for position, problem in enumerate(itertools.islice(stream, max(wanted) + 1))
                 if position in kept}
        self._problems = [found[position] for position in wanted]

    # ---- the SFT round -------------------------------------------------------------------------------------------
    def _fine_tune(self) -> tuple[dict, int]:
        """One SFT round on the buffer_size oldest buffered examples: sft_epochs passes over mini-batches of
        sft_mini_batch_size (0: all of them), one update of the SFT optimizer each."""
        ctx, cfg = self.ctx, self.ctx.cfg.relift
        examples = self._pop_oldest(cfg.buffer_size)
        size = cfg.sft_mini_batch_size or cfg.buffer_size
        optimizer, scheduler = self.sft_opt
        losses, norms, tokens = [], [], 0
        for _ in range(cfg.sft_epochs):
            for start in range(0, len(examples), size):
                batch = demonstration_batch(ctx, distributed.shard(examples[start:start + size]))
                losses.append(sft_backward(ctx.policy.model, batch, ctx.cfg.train.micro_batch_size))
                norms.append(take_step(self.params, optimizer, scheduler, ctx.cfg.optim.max_grad_norm))
                tokens += batch.n_tokens
        self.sft_updates += len(losses)
        return {"train/sft_loss": sum(losses) / len(losses), "relift/sft_updates": len(losses),
                "relift/sft_grad_norm": sum(norms) / len(norms), "relift/sft_lr": scheduler.get_last_lr()[0]}, tokens
