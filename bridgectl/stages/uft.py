"""Stage `uft`: UFT, unified supervised and reinforcement fine-tuning by a hint curriculum (Liu, Farina and Ozdaglar,
arXiv 2505.16984; reference code liumy2010/UFT: run.py, verl/utils/dataset/rl_dataset.py `__getitem__`,
verl/workers/actor/dp_actor.py `update_policy`, verl/trainer/main_ppo.py `RewardManager`).

Each RL prompt is extended by a hint, a prefix of its own demonstration, and the rollouts continue from it; the hint
is long early in the stage and shrinks to nothing. One update per step:

    p(t)     =  hint_end + (hint_start - hint_end) (1 + cos(pi t / T_hint)) / 2   for t <= T_hint, else 0   (Eq. B.1)
                t = 1, 2, ... the stage's update, T_hint = round(uft.hint_fraction_of_steps x the stage's budget)
    per prompt: its demonstration's L tokens (trace_completion) are cut at round(j L / n), j = 0..n,
                n = min(uft.hint_chunks, L); k ~ Binomial(n, p(t)); hint = the first round(k L / n) tokens, decoded
    prompt'  =  question + hint;  rollouts <- rl.num_generations samples from prompt', scored on hint + completion
    A        =  GRPO advantages of those rewards (rl.scale_rewards)
    loss     =  L_grpo(completion tokens only) + uft.sft_coef * [-log pi(hint | question)]_token-mean

The hint's log-likelihood is an SFT loss with the question as prompt and the hint as completion (its tokens only,
no EOS: a hint is a prefix, not an ending), token-averaged over the step's hint tokens; the GRPO loss is the `rl`
stage's, on the generated tokens (the hint is part of the prompt, so it is not scored by it). Both gradients are
accumulated in micro-batches (train.micro_batch_size) and make one AdamW update (uft.lr).

Faithful to the reference:
  - the schedule: cosine from upper_prob 0.95 to lower_prob 0.05 over total_training_steps_hint = 300 of 500 steps,
    then no hint (rl_dataset.py; the timestep counts from 1); the paper writes the same with t from 0 and (t+1);
  - the hint length is drawn per prompt (one draw per dataset item, shared by the prompt's group of rollouts): the
    solution is cut into min(5, len) equal pieces and each is revealed with probability p(t), so the hint has
    Binomial(n, p(t)) pieces (np.random.choice([0, 1], p=[1 - p, p], size=n).sum()); the pieces here are token
    spans of the demonstration (the reference slices its hint field; the paper's Binomial(L, p) counts solution
    steps);
  - the reward scores the hint and the completion together (RewardManager decodes prompt + response), so a full
    hint that already holds the answer is rewarded when the completion does not contradict it;
  - the hint term: masked mean of the cross-entropy on the hint tokens times sft_loss_coef (0.001), added to the
    token-mean policy loss (dp_actor.py); every rollout row of a group carries the same hint, so that mean equals
    the mean over the step's distinct prompts' hint tokens computed here.
Open choices and deviations (all configurable):
  - uft.lr = 1e-4 (the tiny task's RL rate; the reference runs 1e-6 on 0.5-3B models);
  - the reference also adds a KL loss to the reference model (use_kl_loss=True) and an entropy bonus; here the KL
    is rl.beta (default 0, as every RL stage of this tool) and there is no entropy bonus;
  - the hint pieces are token spans, the hint text is their decoded string appended to the question (with the
    tiny task's character tokenizer exactly a prefix of the trace);
  - random draws come from the run's sampling generator (saved in checkpoints), and only while p(t) > 0, so with
    no hint (uft.hint_fraction_of_steps=0 or hint_start = hint_end = 0) and uft.sft_coef=0 the stage is `rl`.

Data parallelism: every rank draws the same problems, group seeds and hint lengths, then samples its share of the
groups and scores its share of the hints (so the hint term's token mean is over the global batch). Not with
train.fsdp (config validation refuses it): a process whose hints of a step are all empty has no hint term to
differentiate, and sharded processes must run the same backward passes.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from bridgectl.core import distributed
from bridgectl.core.advantages import group_advantages
from bridgectl.core.context import StepOutput, TrainContext
from bridgectl.core.grpo import (
    ScoredRollouts,
    completion_rows,
    group_seeds,
    rl_backward,
    rollout_metrics,
    sample_and_score,
    trained_tokens,
)
from bridgectl.core.losses import SFTBatch, make_sft_batch, sft_backward
from bridgectl.core.optim import take_step
from bridgectl.stages.base import CountingStage


@dataclasses.dataclass(frozen=True)
class HintedProblem:
    """An RL problem with its hint: `question` is the original question followed by the hint (what is sampled
    from and logged), `source` the problem itself."""

    question: str
    answer: str
    hint: str
    source: object

    @property
    def columns(self) -> dict:
        """The dataset row's fields, for task.reward_funcs: the problem's own."""
        return getattr(self.source, "columns", {})

    @property
    def conversation(self):
        """The problem's messages when its row is conversational (tasks/data.py), else None."""
        return getattr(self.source, "conversation", None)


def hint_probability(cfg, update: int, total_updates: int) -> float:
    """p(t) of the reference's cosine schedule at the stage's update `update` (counted from 0; t = update + 1):
    hint_end + (hint_start - hint_end) (1 + cos(pi t / T_hint)) / 2 while t <= T_hint, then 0, with
    T_hint = round(hint_fraction_of_steps * total_updates)."""
    hint_steps = round(cfg.hint_fraction_of_steps * total_updates)
    t = update + 1
    if t > hint_steps:
        return 0.0
    return cfg.hint_end + 0.5 * (cfg.hint_start - cfg.hint_end) * (1 + math.cos(math.pi * t / hint_steps))


def hint_length(n_tokens: int, chunks: int, probability: float, generator: torch.Generator) -> int:
    """How many of a demonstration's `n_tokens` tokens to reveal: cut points round(j n_tokens / n), j = 0..n,
    n = min(chunks, n_tokens); each of the n pieces is revealed with `probability` (a Binomial(n, p) count k) and
    the hint ends at cut point k. Nothing is drawn when nothing can be revealed."""
    pieces = min(chunks, n_tokens)
    if pieces == 0 or probability <= 0:
        return 0
    revealed = int((torch.rand(pieces, generator=generator, device=generator.device) < probability).sum())
    return n_tokens if revealed == pieces else round(revealed / pieces * n_tokens)


def hint_batch(tokenizer, problems: list, hints: list[str], device) -> SFTBatch:
    """-log pi(hint | question) as an SFT batch: prompt = the question, completion = the hint, every hint token
    scored but not the EOS make_sft_batch appends (a hint is a prefix of the demonstration, not an ending); an empty
    hint scores nothing."""
    batch = make_sft_batch(tokenizer, [p.question for p in problems], hints, device)
    labels = batch.labels.clone()
    for row in range(labels.size(0)):
        labels[row, (labels[row] != -100).nonzero()[-1]] = -100
    return SFTBatch(batch.input_ids, batch.attention_mask, labels)


class UFTStage(CountingStage):
    """UFT's hint curriculum (module docstring): one optimizer (uft.lr), its step counter as its state."""

    name = "uft"

    def __init__(self, ctx: TrainContext, total_updates: int) -> None:
        super().__init__(ctx, ctx.cfg.uft.lr, total_updates)
        self.total_updates = total_updates  # the hint schedule spans the stage

    def step(self) -> StepOutput:
        ctx, rl, cfg = self.ctx, self.ctx.cfg.rl, self.ctx.cfg.uft
        model, tokenizer = ctx.policy.model, ctx.policy.tokenizer
        probability = hint_probability(cfg, self.updates, self.total_updates)
        # sample_groups, with a hint drawn for every problem on every rank (the generators stay in step)
        problems = [next(ctx.rl_problems) for _ in range(rl.prompts_per_step)]
        seeds = group_seeds(ctx, len(problems))
        hints, lengths, fractions = [], [], []
        for problem in problems:
            ids = tokenizer(problem.trace_completion, add_special_tokens=False)["input_ids"]
            length = hint_length(len(ids), cfg.hint_chunks, probability, ctx.sampling_generator)
            hints.append(tokenizer.decode(ids[:length]) if length else "")
            lengths.append(length)
            fractions.append(length / max(1, len(ids)))
        mine = distributed.shard(list(zip(problems, seeds, hints)))
        grouped = [
            HintedProblem(problem.question + hint, problem.answer, hint, problem)
            for problem, _, hint in mine
            for _ in range(rl.num_generations)
        ]
        scored = self._score_with_hints(sample_and_score(ctx, grouped, [seed for _, seed, _ in mine]))

        loss_rl, stats = rl_backward(model, scored, ctx)  # the generated tokens only (micro-batched)
        loss_hint, hint_tokens = None, 0
        if probability > 0 and cfg.sft_coef > 0:
            batch = hint_batch(
                tokenizer, [problem for problem, _, _ in mine], [hint for _, _, hint in mine], ctx.device
            )
            loss_hint = sft_backward(model, batch, ctx.cfg.train.micro_batch_size, scale=cfg.sft_coef)
            hint_tokens = batch.n_tokens
        grad_norm = take_step(self.params, self.optimizer, self.scheduler, ctx.cfg.optim.max_grad_norm)
        self.updates += 1

        metrics = {
            "train/rl_loss": loss_rl,
            **rollout_metrics(scored, stats, rl.num_generations, ctx),
            "train/grad_norm": grad_norm,
            "train/lr": self.scheduler.get_last_lr()[0],
            "uft/hint_prob": probability,
            "uft/hint_fraction": sum(fractions) / len(fractions),
            "uft/hint_tokens": sum(lengths) / len(lengths),
        }
        if loss_hint is not None:
            metrics["train/sft_loss"] = loss_hint  # the hint tokens' NLL, before uft.sft_coef
        return StepOutput(
            metrics=metrics,
            train_tokens=trained_tokens(scored, ctx) + hint_tokens,
            gen_tokens=scored.gen_tokens,
            completions=completion_rows(scored, ctx, self.updates),
        )

    def _score_with_hints(self, scored: ScoredRollouts) -> ScoredRollouts:
        """Rewards of hint + completion, as the reference's reward reads prompt and response together (rows without
        a hint keep the reward sample_and_score gave their completion), and the GRPO advantages of those. With
        task.reward_funcs every function sees the original problem's prompt and columns and hint + completion as
        the completion, and the logged means and the verifier's verdicts are those of this scoring."""
        ctx = self.ctx
        rewards, verdicts, means = scored.rewards.clone(), scored.verdicts, scored.reward_means
        if any(problem.hint for problem in scored.problems):
            texts = [
                problem.hint + completion for problem, completion in zip(scored.problems, scored.rollouts.completions)
            ]
            total, means, judged = ctx.task.step_reward([problem.source for problem in scored.problems], texts)
            rewards = torch.tensor(total, dtype=rewards.dtype, device=rewards.device)
            verdicts = None if judged is total else torch.tensor(judged, device=rewards.device)
        # recomputed on every process, hinted rows or not: rl.scale_rewards=batch takes the std over all processes
        # (a collective each must join); without hints the advantages are those sample_and_score gave
        advantages = group_advantages(
            rewards,
            ctx.cfg.rl.num_generations,
            ctx.cfg.rl.scale_rewards,
            ctx.cfg.rl.adv_estimator,
            scored.rollouts.lengths,
        )
        return dataclasses.replace(
            scored, rewards=rewards, advantages=advantages, verdicts=verdicts, reward_means=means
        )
