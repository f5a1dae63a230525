"""One training run: load, evaluate, run the recipe's stages in order, evaluate, write the run directory.

This is the only place that knows a recipe is a list of stages; the stages and the core never ask which recipe
is running.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from bridgectl.config import stage_budgets
from bridgectl.core import distributed
from bridgectl.core.checkpoint import list_checkpoints, read_checkpoint, restore, save_checkpoint
from bridgectl.core.context import build_context, pick_device
from bridgectl.core.evaluate import eval_metrics, evaluate_all, problem_records
from bridgectl.core.model import save_policy
from bridgectl.core.tracking import RunDir, peak_memory_mb, reset_peak_memory
from bridgectl.core.ui import console, progress_bar
from bridgectl.errors import NonFiniteError, StopRun, UserError
from bridgectl.runs import start_heartbeat
from bridgectl.stages import build_stage
from bridgectl.tasks.rewards import RewardFunctionError, load_reward_functions


def run(cfg: DictConfig, run_path: Path, show_progress: bool = True, tags: dict | None = None,
        on_eval: Callable[[int, dict], None] | None = None, resume: bool = False) -> dict:
    """Trains the recipe of `cfg` into a new run directory at `run_path` and returns its summary. `tags` go into
    summary.json (a sweep's study and trial); `on_eval(step, metrics)` is called after each periodic evaluation and
    may raise StopRun to end the run early with that status. Whatever goes wrong, from loading on, the run
    directory's summary says so (status failed, interrupted or the StopRun status, and the error).

    `resume`: continue the run at `run_path` from its newest checkpoint (from the start when it has none); the
    result equals a run that was never stopped (same metrics and weights; tests/test_resume.py)."""
    run_path = Path(run_path).absolute()  # once: checkpoints and the summary stay put whatever changes the cwd later
    budgets = stage_budgets(cfg)
    load_reward_functions(cfg.task)  # a bad task.reward_funcs exits 2 before the run directory exists
    distributed.init_from_environment(pick_device(cfg.train.device).type)  # before anything is written
    checkpoint = None
    if resume:
        summary = json.loads((run_path / "summary.json").read_text())
        found = list_checkpoints(run_path / "checkpoints", remove_partial=True)
        checkpoint = read_checkpoint(found[-1]) if found else None
        meta = checkpoint[0] if checkpoint else {"step": 0, "wall_s": 0.0}
        # without a checkpoint the run starts over, step 0's evaluation included: no earlier row is kept
        kept_through = meta["step"] if checkpoint else -1
        run_dir = RunDir(run_path, resume_after_step=kept_through, wall_offset=meta["wall_s"],
                         enabled=distributed.is_main())
        summary.update(status="running", resumed_from_step=meta["step"], **(tags or {}))  # a sweep's retry: its own
        summary.pop("error", None)
        run_dir.write_config(cfg)  # the keys --allow-change let through
    else:
        run_dir = RunDir(run_path, enabled=distributed.is_main())  # rank 0 writes; other ranks only train
        run_dir.write_config(cfg)
        summary = {"status": "running", "recipe": cfg.recipe.name, "seed": cfg.seed, "task": cfg.task.name,
                   "model": cfg.model.name, **(tags or {}),
                   "stages": [{"kind": k, "steps": b} for k, b in zip(cfg.recipe.stages, budgets)]}
    # before the summary says "running": `bridgectl runs` tells a live run from a killed one by the heartbeat
    stop_heartbeat = start_heartbeat(run_path) if run_dir.enabled else (lambda: None)
    run_dir.write_summary(summary)
    counters = {"steps": 0, "train_tokens": 0, "gen_tokens": 0}
    try:
        if cfg.tracker.wandb.mode != "disabled" and distributed.is_main():
            from bridgectl.core.wandb_sink import WandbSink

            run_dir.sinks.append(WandbSink(cfg.tracker.wandb, run_path.name, OmegaConf.to_container(cfg, resolve=True),
                                           tags, directory=run_path, resume=resume))
        if cfg.tracker.tensorboard and distributed.is_main():
            from bridgectl.core.tensorboard_sink import TensorBoardSink

            run_dir.sinks.append(TensorBoardSink(run_path, resume=resume))
        _train(cfg, run_dir, summary, budgets, counters, show_progress, on_eval, checkpoint)
    except UserError:  # bad input found while loading (a data file, a model path): nothing ran, nothing is kept
        stop_heartbeat()  # first: a beat written while the directory is removed would leave it half there
        run_dir.close()
        if not resume:
            shutil.rmtree(run_path, ignore_errors=True)
        raise
    except BaseException as error:
        status = error.status if isinstance(error, StopRun) else (
            "interrupted" if isinstance(error, KeyboardInterrupt) else "failed")
        summary.update(status=status, error=f"{type(error).__name__}: {error}", wall_s=run_dir.wall_s, **counters)
        run_dir.write_summary(summary)
        raise
    finally:
        stop_heartbeat()
        run_dir.close()
    return summary


@contextlib.contextmanager
def stop_requests():
    """While training: the first SIGINT (Ctrl-C) or SIGTERM asks the loop to stop after the current step (it then
    writes a checkpoint); a second one stops at once. Yields a dict whose "signal" is set when asked."""
    requested = {"signal": None}
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield requested
        return

    def handler(signum, frame):
        if requested["signal"] is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}")
        requested["signal"] = signal.Signals(signum).name
        console.print(f"{requested['signal']}: stopping after this step and writing a checkpoint "
                      "(send it again to stop now)")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _train(cfg: DictConfig, run_dir: RunDir, summary: dict, budgets: list[int], counters: dict,
           show_progress: bool, on_eval, checkpoint=None) -> None:
    reset_peak_memory(pick_device(cfg.train.device))
    meta = checkpoint[0] if checkpoint else None
    ctx = build_context(cfg, show_progress, skip=meta["consumed"] if meta else None)
    task, policy, device = ctx.task, ctx.policy, ctx.device
    eval_problems = {split: task.eval_problems(split, cfg.eval.n) for split in task.eval_splits}
    if meta is None:
        initial = evaluate_all(ctx, eval_problems, step=0)
        run_dir.log_metrics(0, "init", eval_metrics(initial))
        run_dir.log_problems(0, problem_records(initial))
        run_dir.log_completions(0, [dict(s, split=split) for split, r in initial.items() for s in r.samples])
        summary["eval_initial"] = {split: {"accuracy": r.accuracy, "n": r.n} for split, r in initial.items()}
        run_dir.write_summary(summary)
        train_wall = 0.0
    else:
        counters.update(meta["counters"])
        train_wall = meta["train_wall_s"]
    total_steps = sum(budgets)
    with progress_bar(enabled=show_progress) as progress, stop_requests() as stop:
        for index, (kind, budget) in enumerate(zip(cfg.recipe.stages, budgets)):
            stage = build_stage(kind, ctx, budget)  # built in order even when resuming: stages may add adapters
            done_in_stage = 0
            if meta is not None:
                if index < meta["stage_index"]:
                    continue
                if index == meta["stage_index"]:
                    restore(policy.model, stage, ctx.sampling_generator, checkpoint[1], checkpoint[2])
                    done_in_stage = meta["stage_step"]
            bar = progress.add_task(f"stage {index + 1}/{len(budgets)} {kind}", total=budget,
                                    completed=done_in_stage, info="")
            recent = deque(maxlen=10)
            for stage_step in range(done_in_stage + 1, budget + 1):
                started = time.perf_counter()
                step = counters["steps"] + 1
                try:
                    output = stage.step()
                except (NonFiniteError, RewardFunctionError) as error:  # no update made: the last checkpoint is good
                    raise type(error)(f"step {step} ({kind}): {error}") from None
                counters["steps"] = step
                output.metrics = distributed.average_metrics(output.metrics)
                output.metrics["perf/step_s"] = time.perf_counter() - started
                train_wall += output.metrics["perf/step_s"]
                train_tokens, gen_tokens = distributed.total(output.train_tokens, output.gen_tokens)
                counters["train_tokens"] += train_tokens
                counters["gen_tokens"] += gen_tokens
                evaluated = cfg.train.eval_every > 0 and step % cfg.train.eval_every == 0 and step < total_steps
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
                stopping = distributed.any_rank(stop["signal"] is not None)  # every rank stops at the same step
                if (every > 0 and step % every == 0 and step < total_steps) or stopping:
                    # every rank takes part (train.fsdp gathers sharded tensors whole); rank 0 alone writes
                    save_checkpoint(run_dir.path / "checkpoints", step, policy.model, stage, ctx.sampling_generator,
                                    {"stage_index": index, "stage_step": stage_step, "counters": dict(counters),
                                     "consumed": {"sft": ctx.sft_examples.consumed, "rl": ctx.rl_problems.consumed},
                                     "wall_s": run_dir.wall_s, "train_wall_s": train_wall},
                                    keep=cfg.train.keep_checkpoints)
                if stopping:
                    raise KeyboardInterrupt(f"{stop['signal'] or 'a stop on another rank'} at step {step}; resume with "
                                            f"bridgectl run --resume {run_dir.path}")

    step = counters["steps"]
    final = evaluate_all(ctx, eval_problems, step=step)
    run_dir.log_metrics(step, "final", eval_metrics(final))
    run_dir.log_problems(step, problem_records(final))
    run_dir.log_completions(step, [dict(s, split=split) for split, r in final.items() for s in r.samples])
    whole = distributed.full_state_dict(policy.model)  # train.fsdp: every rank gathers the shards; None otherwise
    if distributed.is_main():
        save_policy(policy, run_dir.path / "checkpoints" / "final", whole)
    summary.update(
        status="completed",
        eval={split: {"accuracy": r.accuracy, "n": r.n, **(r.sampled.metrics() if r.sampled else {})}
              for split, r in final.items()},
        wall_s=run_dir.wall_s, train_wall_s=train_wall, peak_mem_mb=peak_memory_mb(device), **counters,
    )
    run_dir.write_summary(summary)


def _progress_info(recent) -> str:
    """Stage-agnostic progress text: the mean of whatever losses and rewards the recent steps reported."""
    def mean(key):
        values = [m[key] for m in recent if m.get(key) is not None]
        return sum(values) / len(values) if values else None

    parts = []
    for key, label in (("train/reward_mean", "reward"), ("train/rl_loss", "rl_loss"),
                       ("train/sft_loss", "sft_loss"), ("perf/step_s", "s/step")):
        value = mean(key)
        if value is not None:
            parts.append(f"{label} {value:.3f}")
    return "  ".join(parts)
