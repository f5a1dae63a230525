"""Runs on a cluster through submitit: `bridgectl run --launcher slurm --nnodes N --nproc M --launcher-opt ...`
submits one job of N tasks, one per node, each starting torchrun with M processes; the tasks meet at torchrun's
c10d rendezvous on the job's first node (bridgectl/launch/torchrun.py). The command waits with the run's progress bar,
cancels the job on Ctrl-C, and a job that SLURM preempts (or that reaches its time limit) is checkpointed, the
run stopped by SIGTERM (which checkpoints it, bridgectl/training/runner.py's RunSignals), and requeued to continue as
`--resume`. `--launcher submitit-local` takes the same path on this machine (the N tasks as N "nodes" here).

The sweep's worker jobs (bridgectl/sweep/study.py) are made by the same make_executor.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from bridgectl.errors import UserError

LAUNCHERS = ("local", "slurm", "submitit-local")
STOP_GRACE_SECONDS = 300.0
"""How long a preempted job's task waits for torchrun's processes to checkpoint and stop before it requeues."""


def make_executor(launcher: str, folder: Path, options: dict, name: str = "bridgectl"):
    """A submitit executor for `slurm` (sbatch) or `submitit-local` (subprocesses on this machine, for trying the
    cluster path without a cluster). `options` go to submitit's update_parameters (timeout_min,
    slurm_partition, gpus_per_node, cpus_per_task, mem_gb, slurm_account, ...)."""
    try:
        import submitit
    except ImportError:
        raise UserError(f"--launcher {launcher} needs submitit", "pip install 'bridgectl[slurm]'") from None
    cluster = "slurm" if launcher == "slurm" else "local"
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    except RuntimeError as error:  # no srun/sbatch on this machine
        raise UserError(
            f"--launcher {launcher}: {error}",
            "run from a Slurm login node, or start the same bridgectl command on each machine by hand "
            "(docs/guides/clusters.md)",
        ) from None
    try:
        executor.update_parameters(name=name, **options)
    except (ValueError, TypeError, NameError) as error:
        raise UserError(
            f"submitit rejected the {launcher} launcher settings: {error}",
            "--launcher-opt takes submitit's update_parameters names, e.g. timeout_min=120 "
            "slurm_partition=gpu gpus_per_node=1",
        ) from None
    return executor


def rendezvous_port(job_id: str) -> int:
    """The port every task of a job meets on: drawn from the job id, so each task computes the same one."""
    return random.Random(f"bridgectl-{job_id}").randint(20000, 60000)


class NodeTask:
    """One task of a run's job: torchrun on this node (submitit pickles it into the job; on preemption
    `checkpoint` returns the task that continues the run)."""

    def __init__(
        self,
        nproc: int,
        nnodes: int,
        overrides: list[str],
        run_path: str,
        resume: bool,
        allow_change: list[str],
        env: dict | None = None,
    ) -> None:
        self.nproc, self.nnodes, self.overrides, self.env = nproc, nnodes, list(overrides), dict(env or {})
        self.run_path, self.resume, self.allow_change = run_path, resume, list(allow_change)
        self._process: subprocess.Popen | None = None
        self._ended: threading.Event | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_process": None, "_ended": None}  # a task's torchrun process stays in that task

    def __call__(self) -> int:
        """Runs this node's torchrun and returns the run's exit status (0, 2 for a refused run, 130 when
        stopped); the job's result."""
        import submitit

        from bridgectl.launch.torchrun import EXIT_DIR, Rendezvous, torchrun_command, workers_status

        environment = submitit.JobEnvironment()
        run_path = Path(self.run_path)
        rendezvous = None
        if self.nnodes > 1:
            endpoint = f"{environment.hostnames[0]}:{rendezvous_port(environment.job_id)}"
            rendezvous = Rendezvous(self.nnodes, endpoint, f"{run_path.name}-{environment.job_id}")
        # a job SLURM requeued by itself (a node failure) restarts the original task: the run it began continues
        resume = self.resume or (run_path / "summary.json").exists()
        command = torchrun_command(
            self.nproc, self.overrides, run_path, run_path if resume else None, self.allow_change, rendezvous
        )
        preempt_signal = environment._usr_sig()

        def ignore_preemption() -> None:
            """SLURM's --signal reaches every process of the job: torchrun (and, inheriting this, its workers)
            would die of it; this task alone acts on it (checkpoint), stopping them with SIGTERM."""
            signal.signal(preempt_signal, signal.SIG_IGN)

        with tempfile.TemporaryDirectory(prefix="bridgectl-exit-") as statuses:
            self._process = subprocess.Popen(
                command, env={**os.environ, **self.env, EXIT_DIR: statuses}, preexec_fn=ignore_preemption
            )
            # reaped by a thread: submitit's signal handler (checkpoint) runs in this thread and waits for the end
            # too, which it could not while this thread sat inside Popen.wait holding Popen's lock
            self._ended = threading.Event()
            threading.Thread(target=lambda: (self._process.wait(), self._ended.set()), daemon=True).start()
            while not self._ended.wait(1.0):
                pass
            return workers_status(Path(statuses), self._process.returncode)

    def checkpoint(self, *args, **kwargs):
        """submitit calls this on the job's first task when SLURM signals preemption or the time limit: the
        run is stopped by SIGTERM (every rank stops after its step with a checkpoint) and the job requeued with
        a task that resumes it."""
        import submitit

        if self._process is not None and not self._ended.is_set():
            self._process.send_signal(signal.SIGTERM)
            self._ended.wait(timeout=STOP_GRACE_SECONDS)
        resumed = NodeTask(self.nproc, self.nnodes, self.overrides, self.run_path, True, self.allow_change, self.env)
        return submitit.helpers.DelayedSubmission(resumed)


def submit_run(
    launcher: str,
    options: dict,
    nproc: int,
    nnodes: int,
    overrides: list[str],
    run_path: Path,
    resume: bool,
    allow_change: list[str],
    env: dict | None = None,
):
    """Submits the run's job (its files in <out>/.submitit/<name>/) and returns it: N tasks, one per node (on
    one machine for submitit-local, where the tasks play the nodes); `env` is added to its processes'
    environment."""
    layout = {"nodes": nnodes, "tasks_per_node": 1} if launcher == "slurm" else {"tasks_per_node": nnodes}
    executor = make_executor(
        launcher,
        run_path.parent / ".submitit" / run_path.name,
        {**layout, **options},
        name=f"bridgectl-{run_path.name}",
    )
    task = NodeTask(nproc, nnodes, overrides, str(run_path.absolute()), resume, allow_change, env)
    try:
        return executor.submit(task)
    except Exception as error:  # sbatch refused the job (partition, account, limits): the user's settings
        raise UserError(
            f"submitting the run's job failed: {error}",
            "check --launcher-opt (partition, account, time) against `sinfo`",
        ) from None


def last_step(run_path: Path) -> int:
    """The newest step in the run's metrics.jsonl (0 before it has one)."""
    try:
        lines = (run_path / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        with contextlib.suppress(ValueError, KeyError):
            return int(json.loads(line)["step"])
    return 0


def job_status(job) -> int:
    """The exit status of a finished job's run: the first non-zero status of its nodes' tasks, else 0. Raises
    RuntimeError when a task itself failed (not the run, whose status each task returns)."""
    try:
        statuses = [int(status) for status in job.results()]  # one per node
    except Exception as error:
        raise RuntimeError(f"job {job.job_id} failed: {error}") from None
    return next((status for status in statuses if status != 0), 0)


def wait_for_job(job, run_path: Path, total_steps: int, poll_seconds: float = 1.0) -> int:
    """Waits for the run's job with a progress bar of its steps (read from metrics.jsonl, which rank 0 writes on
    the shared file system) and returns its exit status; Ctrl-C cancels the job (its processes get SIGTERM and
    checkpoint) and returns 130."""
    from bridgectl.core.ui import progress_bar

    with progress_bar() as progress:
        task = progress.add_task(f"job {job.job_id}", total=total_steps, info="queued")
        try:
            while not job.done():
                state = job.state
                progress.update(task, completed=last_step(run_path), info=state.lower())
                time.sleep(poll_seconds)
        except KeyboardInterrupt:
            with contextlib.suppress(Exception):
                job.cancel()
            return 130
        progress.update(task, completed=last_step(run_path), info=job.state.lower())
    return job_status(job)
