"""One training run: load, evaluate, run the recipe's stages in order, evaluate, write the run directory.

This is the only place that knows a recipe is a list of stages; the stages and the core never ask which recipe
is running.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf
from rich.markup import escape

from bridgectl.config.compose import stage_budgets
from bridgectl.core import distributed, flops
from bridgectl.core.checkpoint import (
    PREFIX,
    CheckpointError,
    list_checkpoints,
    read_checkpoint,
    restore,
    save_checkpoint,
    write_manifest,
    written_whole,
)
from bridgectl.core.context import pick_device
from bridgectl.core.evaluate import eval_metrics, evaluate_all, problem_records
from bridgectl.core.model import save_policy
from bridgectl.core.ui import console, progress_bar
from bridgectl.errors import NonFiniteError, StopRun, UserError
from bridgectl.rundir.liveness import refuse_if_running, start_heartbeat
from bridgectl.rundir.writer import RunDir, peak_memory_mb, reset_peak_memory
from bridgectl.stages import build_stage
from bridgectl.tasks.rewards import RewardFunctionError, load_reward_functions
from bridgectl.training.budget import (
    budget_summary,
    count_step,
    cumulative_metrics,
    eval_due,
    new_counters,
    spent,
    stage_targets,
    unspent_warning,
)
from bridgectl.training.setup import build_context


def run(
    cfg: DictConfig,
    run_path: Path,
    show_progress: bool = True,
    tags: dict | None = None,
    on_eval: Callable[[int, dict], None] | None = None,
    resume: bool = False,
) -> dict:
    """Trains the recipe of `cfg` into a new run directory at `run_path` and returns its summary. `tags` go into
    summary.json (a sweep's study and trial); `on_eval(step, metrics)` is called after each periodic evaluation and
    may raise StopRun to end the run early with that status. Whatever goes wrong, from loading on (a checkpoint
    that does not load included), the run directory's summary says so (status failed, interrupted or the StopRun
    status, and the error); SIGINT and SIGTERM anywhere in the run end it interrupted (RunSignals).

    `resume`: continue the run at `run_path` from its newest checkpoint that loads (from the start when it has
    none; a damaged newer one is passed over with a warning); the result equals a run that was never stopped (same
    metrics and weights; tests/test_resume.py). Refused (UserError) while another process runs it."""
    run_path = Path(run_path).absolute()  # once: checkpoints and the summary stay put whatever changes the cwd later
    budgets = stage_budgets(cfg)
    load_reward_functions(cfg.task)  # a bad task.reward_funcs exits 2 before the run directory exists
    distributed.init_from_environment(pick_device(cfg.train.device).type)  # before anything is written
    # every process checks what depends on the world size, and none goes on when one fails (the same Error:)
    with distributed.failing_together():
        distributed.check_batch_split(cfg, distributed.world_size())
    with RunSignals() as signals:  # from here a signal waits until the summary can say "interrupted"
        if resume:
            summary = json.loads((run_path / "summary.json").read_text())
            with distributed.failing_together():
                if distributed.is_main():
                    refuse_if_running(run_path, summary)  # before this process writes anything there
            # its logs are cut back once the checkpoint is chosen; until then its clock goes on from the summary's
            run_dir = RunDir(
                run_path, existing=True, wall_offset=float(summary.get("wall_s") or 0.0), enabled=distributed.is_main()
            )
            summary.update(status="running", **(tags or {}))  # a sweep's retry: its own tags
            summary.pop("error", None)
            distributed.shared_directory_check(run_path)
        else:
            with distributed.failing_together():  # rank 0 alone claims the directory (an atomic mkdir); every
                run_dir = RunDir(run_path, enabled=distributed.is_main())  # rank hears whether it could
            try:
                distributed.shared_directory_check(run_path)
            except UserError:
                if distributed.is_main():  # nothing is in it yet: the claim is given back
                    run_dir.close()
                    shutil.rmtree(run_path, ignore_errors=True)
                raise
            summary = {
                "status": "running",
                "recipe": cfg.recipe.name,
                "seed": cfg.seed,
                "task": cfg.task.name,
                "model": cfg.model.name,
                **(tags or {}),
                "stages": [{"kind": k, "steps": b} for k, b in zip(cfg.recipe.stages, budgets)],
            }
        # before the summary says "running": `bridgectl runs` tells a live run from a killed one by the heartbeat
        heartbeat = start_heartbeat(run_path) if run_dir.enabled else None
        counters = new_counters()
        try:
            run_dir.write_config(cfg)  # resuming: the keys --allow-change let through
            run_dir.write_summary(summary)
            phase = _phases(signals, heartbeat)
            phase("loading")
            signals.at_once()
            checkpoint = _resume_point(run_dir, summary) if resume else None
            if cfg.tracker.wandb.mode != "disabled" and distributed.is_main():
                from bridgectl.rundir.wandb_sink import WandbSink

                run_dir.sinks.append(
                    WandbSink(
                        cfg.tracker.wandb,
                        run_path.name,
                        OmegaConf.to_container(cfg, resolve=True),
                        tags,
                        directory=run_path,
                        resume=resume,
                    )
                )
            if cfg.tracker.tensorboard and distributed.is_main():
                from bridgectl.rundir.tensorboard_sink import TensorBoardSink

                run_dir.sinks.append(TensorBoardSink(run_path, resume=resume))
            _train(cfg, run_dir, summary, budgets, counters, show_progress, on_eval, checkpoint, signals, phase)
        except UserError:  # bad input found while loading (a data file, a model path): nothing ran, nothing is kept
            signals.hold()
            if heartbeat is not None:
                heartbeat()  # first: a beat written while the directory is removed would leave it half there
            run_dir.close()
            if not resume and distributed.is_main():  # only rank 0 ever makes or removes the run directory
                shutil.rmtree(run_path, ignore_errors=True)
            raise
        except BaseException as error:
            signals.hold()  # a second signal must not cut the summary's last word short
            status = (
                error.status
                if isinstance(error, StopRun)
                else ("interrupted" if isinstance(error, KeyboardInterrupt) else "failed")
            )
            said = f"{type(error).__name__}: {error}"
            if not distributed.is_main():  # for rank 0's summary: it sees only a collective whose peer is gone
                distributed.leave_error(said)
            elif status == "failed":
                said = distributed.error_left_elsewhere() or said
            summary.update(status=status, error=said, wall_s=run_dir.wall_s, **counters)
            _record_end(run_dir, summary)
            raise
        finally:
            if heartbeat is not None:
                heartbeat()
            run_dir.close()
    return summary


def _record_end(run_dir: RunDir, summary: dict) -> None:
    """Writes the summary of a run that ended early. When even that write fails (a full disk), stderr says so: the
    summary still says "running", and the caller's exit status is the only other word."""
    try:
        run_dir.write_summary(summary)
    except Exception as error:  # the run's own error is raised next: this one must not replace it
        print(
            f"Error: {run_dir.path / 'summary.json'} could not record status {summary['status']} "
            f"({type(error).__name__}: {error}); the run ended with {summary['error']}",
            file=sys.stderr,
        )


def _resume_point(run_dir: RunDir, summary: dict):
    """The newest checkpoint of a resumed run that loads, as read_checkpoint gives it (None: it has none, and
    starts over), its logs cut back to it. A damaged newer one is passed over with a warning and named in the
    summary's `damaged_checkpoints`; CheckpointError (the run fails) when every checkpoint is damaged."""
    found = list_checkpoints(run_dir.path / "checkpoints", remove_partial=True)
    damaged = []
    checkpoint = None
    for path in reversed(found):
        try:
            checkpoint = read_checkpoint(path)
            break
        except CheckpointError as error:
            damaged.append(str(error))
            if distributed.is_main():
                console.print(
                    f"[yellow]Warning:[/yellow] checkpoint {escape(str(error))}; "
                    + ("trying the one before" if path != found[0] else "no checkpoint is left")
                )
    if damaged:
        summary["damaged_checkpoints"] = summary.get("damaged_checkpoints", []) + damaged
    if checkpoint is None and damaged:
        raise CheckpointError(f"no checkpoint of {run_dir.path} loads: " + "; ".join(damaged))
    meta = checkpoint[0] if checkpoint else {"step": 0, "wall_s": 0.0}
    # without a checkpoint the run starts over, step 0's evaluation included: no earlier row is kept
    run_dir.cut_back(meta["step"] if checkpoint else -1, meta["wall_s"], meta.get("log_bytes"))
    summary["resumed_from_step"] = meta["step"]
    run_dir.write_summary(summary)
    return checkpoint


def _phases(signals: RunSignals, heartbeat) -> Callable[[str], None]:
    """The function that records the phase a run enters: in its heartbeat (what `bridgectl runs` and a waiting
    test read) and for the message of a signal that interrupts it."""

    def enter(name: str) -> None:
        signals.phase = name
        if heartbeat is not None:
            heartbeat.phase(name)

    return enter


class RunSignals:
    """SIGINT (Ctrl-C) and SIGTERM for the whole of a run, so that it ends with status interrupted (exit 130)
    wherever it is, never killed with its summary still saying "running". Installed in the main thread only (no
    other receives signals); the previous handlers come back when the block ends. A signal is, by mode:

        held       (until the summary says "running", while a checkpoint or the final summary is written) kept,
                   and raised as KeyboardInterrupt when the mode changes to at once
        at once    (loading, the initial and final evaluations, the final weights) raised as KeyboardInterrupt
        after step (the training loop) `requested` is set, and the loop stops after its step with a checkpoint;
                   a second signal raises at once
    """

    def __init__(self) -> None:
        """Held mode; no handler until the block is entered."""
        self.mode, self.phase, self.requested, self.raised = "held", "starting", None, False
        self._previous: dict = {}

    def __enter__(self) -> RunSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._previous.items():
            signal.signal(sig, old)

    def _interrupt(self, name: str) -> None:
        self.raised = True
        raise KeyboardInterrupt(f"{name} during {self.phase}")

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.mode == "after step" and self.requested is not None:
            self.raised = True
            raise KeyboardInterrupt(f"second {name}")
        first = self.requested is None
        self.requested = self.requested or name
        if self.mode == "at once" and not self.raised:
            self._interrupt(name)
        if self.mode == "after step" and first:
            console.print(f"{name}: stopping after this step and writing a checkpoint (send it again to stop now)")

    def at_once(self) -> None:
        """Signals interrupt at once from here; one that came while held does now."""
        self.mode = "at once"
        if self.requested is not None and not self.raised:
            self._interrupt(self.requested)

    def hold(self) -> None:
        """Signals are kept from here (the run is ending: its summary is being written)."""
        self.mode = "held"

    @contextlib.contextmanager
    def held(self):
        """Signals are kept for the block (a checkpoint being written) and interrupt at once after it."""
        self.mode = "held"
        yield
        self.at_once()

    @contextlib.contextmanager
    def after_step(self):
        """Signals ask the training loop to stop after its step for the block, and interrupt at once after it."""
        self.mode = "after step"
        yield
        self.mode = "at once"


def _save_final(policy, path: Path, whole) -> None:
    """checkpoints/final (save_policy) with its manifest, written whole or not at all (core/checkpoint.py)."""

    def write(tmp: Path) -> None:
        save_policy(policy, tmp, whole)
        write_manifest(tmp)

    written_whole(path, write)


def _train(
    cfg: DictConfig,
    run_dir: RunDir,
    summary: dict,
    budgets: list[int],
    counters: dict,
    show_progress: bool,
    on_eval,
    checkpoint=None,
    signals: RunSignals | None = None,
    phase: Callable[[str], None] = lambda name: None,
) -> None:
    signals = signals or RunSignals()
    reset_peak_memory(pick_device(cfg.train.device))
    meta = checkpoint[0] if checkpoint else None
    ctx = build_context(cfg, show_progress, skip=meta["consumed"] if meta else None)
    task, policy, device = ctx.task, ctx.policy, ctx.device
    eval_problems = {split: task.eval_problems(split, cfg.eval.n) for split in task.eval_splits}
    if meta is None:
        phase("the initial evaluation")
        initial = evaluate_all(ctx, eval_problems, step=0)
        run_dir.log_metrics(0, "init", {**eval_metrics(initial), **cumulative_metrics(counters)})
        run_dir.log_problems(0, problem_records(initial))
        run_dir.log_completions(0, [dict(s, split=split) for split, r in initial.items() for s in r.samples])
        summary["eval_initial"] = {split: {"accuracy": r.accuracy, "n": r.n} for split, r in initial.items()}
        run_dir.write_summary(summary)
        train_wall = 0.0
    else:
        counters.update(meta["counters"])  # one from before a counter existed leaves it at new_counters()' 0
        train_wall = meta["train_wall_s"]
    watch = SignalWatch(cfg, counters, meta.get("no_signal") if meta else None)
    total_steps = sum(budgets)
    targets = stage_targets(cfg, budgets)  # train.budget_flops / budget_tokens: each stage's end, else None
    stage = index = stage_step = None

    def save(step: int, keep: int) -> None:
        # every rank takes part (train.fsdp gathers sharded tensors whole); rank 0 alone writes
        save_checkpoint(
            run_dir.path / "checkpoints",
            step,
            policy.model,
            stage,
            ctx.sampling_generator,
            {
                "stage_index": index,
                "stage_step": stage_step,
                "counters": dict(counters),
                "consumed": {"sft": ctx.sft_examples.consumed, "rl": ctx.rl_problems.consumed},
                "wall_s": run_dir.wall_s,
                "train_wall_s": train_wall,
                "log_bytes": run_dir.log_bytes(),
                "no_signal": watch.state_dict(),
            },
            keep=keep,
        )

    phase("training")
    with progress_bar(enabled=show_progress) as progress, signals.after_step():
        for index, (kind, budget) in enumerate(zip(cfg.recipe.stages, budgets)):
            stage = build_stage(kind, ctx, budget)  # built in order even when resuming: stages may add adapters
            done_in_stage = 0
            if meta is not None:
                if index < meta["stage_index"]:
                    continue
                if index == meta["stage_index"]:
                    restore(policy.model, stage, ctx.sampling_generator, checkpoint[1], checkpoint[2])
                    done_in_stage = meta["stage_step"]
            stage_step = done_in_stage
            bar = progress.add_task(
                f"stage {index + 1}/{len(budgets)} {kind}", total=budget, completed=done_in_stage, info=""
            )
            recent = deque(maxlen=10)
            for stage_step in range(done_in_stage + 1, budget + 1):  # noqa: B007 (save() reads it)
                if targets is not None and spent(cfg, counters) >= targets[index]:
                    break  # this stage's share of the compute budget is spent
                started = time.perf_counter()
                step = counters["steps"] + 1
                try:
                    with flops.counting() as ledger:  # every pass of the step, on this rank (core/flops.py)
                        output = stage.step()
                except (NonFiniteError, RewardFunctionError) as error:  # no update made: the last checkpoint is good
                    raise type(error)(f"step {step} ({kind}): {error}") from None
                counters["steps"] = step
                output.metrics = distributed.average_metrics(output.metrics)
                output.metrics["perf/step_s"] = time.perf_counter() - started
                train_wall += output.metrics["perf/step_s"]
                spent_before = spent(cfg, counters)
                output.metrics.update(count_step(cfg, counters, output, ledger))
                warning = watch.observe(step, output.metrics)
                if warning is not None and warning not in summary.get("warnings", []):  # a resumed run's again
                    summary["warnings"] = summary.get("warnings", []) + [warning]
                    run_dir.write_summary(summary)
                    if distributed.is_main():
                        console.print(f"[yellow]Warning:[/yellow] {escape(warning)}")
                last = step == total_steps or (targets is not None and spent(cfg, counters) >= targets[-1])
                evaluated = not last and eval_due(cfg, step, spent_before, spent(cfg, counters))
                if evaluated:
                    results = evaluate_all(ctx, eval_problems, step=step)
                    output.metrics.update(eval_metrics(results))
                    run_dir.log_problems(step, problem_records(results))
                run_dir.log_metrics(step, kind, output.metrics)
                if evaluated and on_eval is not None:
                    on_eval(step, output.metrics)
                if output.completions:
                    run_dir.log_completions(step, output.completions)
                recent.append(output.metrics)
                progress.update(bar, advance=1, info=_progress_info(recent))
                every = cfg.train.checkpoint_every
                stopping = distributed.any_rank(signals.requested is not None)  # every rank stops at one step
                if not last and ((every > 0 and step % every == 0) or stopping):
                    save(step, cfg.train.keep_checkpoints)
                if stopping:
                    if last:  # its checkpoint is the last step's, written next
                        phase("the final checkpoint")
                        save(step, keep=0)
                    raise KeyboardInterrupt(
                        f"{signals.requested or 'a stop on another rank'} at step {step}; "
                        f"resume with bridgectl run --resume {run_dir.path}"
                    )

    step = counters["steps"]
    last = run_dir.path / "checkpoints" / f"{PREFIX}{step:06d}"
    if stage is not None and not (meta is not None and meta["step"] == step):
        # the last step's checkpoint, before the final evaluation: a run stopped from here on resumes with that
        # evaluation alone. Beside the train.keep_checkpoints newest (keep=0 removes none), gone once completed.
        phase("the final checkpoint")
        with signals.held():
            save(step, keep=0)
    phase("the final evaluation")
    final = evaluate_all(ctx, eval_problems, step=step)
    run_dir.log_metrics(step, "final", {**eval_metrics(final), **cumulative_metrics(counters)})
    run_dir.log_problems(step, problem_records(final))
    run_dir.log_completions(step, [dict(s, split=split) for split, r in final.items() for s in r.samples])
    phase("the final weights")
    whole = distributed.full_state_dict(policy.model)  # train.fsdp: every rank gathers the shards; None otherwise
    if distributed.is_main():
        _save_final(policy, run_dir.path / "checkpoints" / "final", whole)
    summary.update(
        status="completed",
        eval={
            split: {"accuracy": r.accuracy, "n": r.n, **(r.sampled.metrics() if r.sampled else {})}
            for split, r in final.items()
        },
        wall_s=run_dir.wall_s,
        train_wall_s=train_wall,
        peak_mem_mb=peak_memory_mb(device),
        **counters,
        **budget_summary(cfg, counters),
        # the data each run saw (this process's streams: every rank draws the same problems and shards them)
        data={"sft": ctx.sft_examples.usage(), "rl": ctx.rl_problems.usage()},
        # what the final model trained (BRIDGE's w included, its shadow copy of theta not): compare sets it side by side
        trainable_params=sum(p.numel() for p in policy.model.parameters() if p.requires_grad),
    )
    signals.hold()  # completed once the summary says so: a signal now changes nothing
    run_dir.write_summary(summary)
    warning = unspent_warning(cfg, counters)
    if warning is not None and distributed.is_main():
        console.print(escape(warning))
    if distributed.is_main() and last.is_dir():  # checkpoints/final holds the weights; the resumable state goes
        shutil.rmtree(last, ignore_errors=True)


NO_SIGNAL = "rollout/no_signal"
"""The metric of an RL step (core/grpo.rollout_metrics): 1.0 when not one of its advantages was non-zero."""


class SignalWatch:
    """Counts the RL steps (those that log rollout/no_signal) and those of them without a learning signal into the
    run's counters, and after train.no_signal_warn_after of the latter in a row gives one warning naming what those
    steps saw; a run that trains on nothing for minutes must not look like one that learns. Its state goes into
    checkpoints, so a resumed run warns where the uninterrupted one would."""

    def __init__(self, cfg: DictConfig, counters: dict, state: dict | None = None) -> None:
        self.cfg, self.counters = cfg, counters
        state = state or {}
        self.streak: list[dict] = list(state.get("streak", []))
        """The current run of steps without signal (until the warning): step, clipped ratio, reward, skipped."""
        self.warned: bool = bool(state.get("warned", False))

    def state_dict(self) -> dict:
        """What a checkpoint keeps (JSON: meta.json)."""
        return {"streak": self.streak, "warned": self.warned}

    def observe(self, step: int, metrics: dict) -> str | None:
        """Counts step `step` from its metrics (averaged over ranks: the same on every rank); returns the warning's
        text the one time it is due, else None."""
        if NO_SIGNAL not in metrics:  # an SFT step: neither counted nor breaking a run of RL steps
            return None
        self.counters["rl_steps"] += 1
        if metrics[NO_SIGNAL] < 0.5:
            self.streak = []
            return None
        self.counters["no_signal_steps"] += 1
        after = self.cfg.train.no_signal_warn_after
        if self.warned or after <= 0:
            return None
        # rollout_metrics leaves the loss's statistics out of a step whose passes it skipped (nothing was measured)
        skipped = "train/clip_fraction" not in metrics
        self.streak.append(
            {
                "step": step,
                "clipped": metrics.get("rollout/clipped_ratio", 0.0),
                "reward": metrics.get("train/reward_mean"),
                "skipped": skipped,
            }
        )
        if len(self.streak) < after:
            return None
        self.warned = True
        return no_signal_warning(self.cfg, self.streak)


def no_signal_warning(cfg: DictConfig, streak: list[dict]) -> str:
    """The warning for `streak`, consecutive RL steps without signal (SignalWatch): the causes seen in them and the
    remedies."""
    limit, n = cfg.rl.max_completion_length, len(streak)
    causes = []
    clipped = sum(s["clipped"] for s in streak) / n
    if clipped > 0:
        causes.append(
            f"{100 * clipped:.0f}% of the completions were cut at rl.max_completion_length={limit} tokens "
            "without an end token (rollout/clipped_ratio)"
        )
    rewards = [s["reward"] for s in streak if s["reward"] is not None]
    if rewards and all(r == 0 for r in rewards):
        causes.append("every completion scored 0 (train/reward_mean 0: the problems are beyond the model as it is)")
    elif rewards and all(r == 1 for r in rewards):
        causes.append("every completion scored 1 (train/reward_mean 1: the problems are too easy for it)")
    elif rewards:
        causes.append(
            f"within each group every completion scored the same (mean train/reward_mean "
            f"{sum(rewards) / len(rewards):.3g})"
        )
    skipped = sum(s["skipped"] for s in streak)
    passes = (
        "their RL backward passes were skipped and the optimizer stepped on zero gradients"
        if skipped == n
        else "their RL backward passes ran (rl.beta's KL or rl.entropy_coef's bonus has a gradient of its own)"
        if skipped == 0
        else f"the RL backward passes of {skipped} of them were skipped"
    )
    return (
        f"steps {streak[0]['step']}-{streak[-1]['step']}: {n} RL steps in a row without a learning signal (in "
        f"every group all completions got the same reward, so every advantage was 0; {passes}). Seen: "
        f"{'; '.join(causes)}. Remedies: a longer rl.max_completion_length (now {limit}); rl.filter_groups=true "
        "(DAPO's dynamic sampling: groups without reward variance are dropped and more prompts sampled); an SFT "
        "stage first (recipe=two_stage) or model.init_from=<an sft run>. summary.json counts such steps "
        "(no_signal_steps of rl_steps)."
    )


def _progress_info(recent) -> str:
    """Stage-agnostic progress text: the mean of whatever losses and rewards the recent steps reported."""

    def mean(key):
        values = [m[key] for m in recent if m.get(key) is not None]
        return sum(values) / len(values) if values else None

    parts = []
    for key, label in (
        ("train/reward_mean", "reward"),
        ("train/rl_loss", "rl_loss"),
        ("train/sft_loss", "sft_loss"),
        ("perf/step_s", "s/step"),
    ):
        value = mean(key)
        if value is not None:
            parts.append(f"{label} {value:.3f}")
    return "  ".join(parts)
